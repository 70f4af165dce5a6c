"""Converters: timm / Hugging Face checkpoints and configs -> fastvit, as pure functions.

Like timm's ``checkpoint_filter_fn``, every function here maps values to values (state dicts,
configs, models -> constructor arguments): no files, no network. Reading files is
:mod:`fastvit.checkpoint`, hub folders :mod:`fastvit.hub`, and the functions that build models
from all of these :mod:`fastvit.factory`.
"""

from __future__ import annotations

import copy
import re
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .checkpoint import CheckpointError
from .model import HybridEmbed, LayerNorm, LayerScale, PatchEmbed, VisionTransformer
from .reference import resample_pos_embed

__all__ = [
    "convert_timm_state_dict",
    "timm_model_kwargs",
    "convert_hf_state_dict",
    "hf_config_to_kwargs",
    "is_hf_state_dict",
    "model_kwargs",
]


def _mlp_ratio(dim: int, hidden: int) -> float:
    """The ``mlp_ratio`` for which ``int(dim * mlp_ratio) == hidden`` (hidden / dim when exact)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


# --------------------------------------------------------------------------- timm
def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor],
                            model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """A timm / fastvit state dict fitted to ``model`` (timm's ``checkpoint_filter_fn``).

    ``pos_embed`` (1, T + gh * gw, D) is resampled (bicubic, antialiased) to the model's grid and
    ``patch_embed.proj.weight`` (D, C, ph, pw) to its patch size (FlexiViT pseudo-inverse), both as
    timm does; every other tensor is passed through. Keys are not checked here (loading is strict).
    """
    sd = dict(state_dict)
    w = sd.get("patch_embed.proj.weight")
    mw = model.patch_embed.proj.weight
    if w is not None and w.dim() == 4 and w.shape[:2] == mw.shape[:2] and w.shape[2:] != mw.shape[2:]:
        sd["patch_embed.proj.weight"] = _resample_patch_weight(w, tuple(mw.shape[2:]))
    pe = sd.get("pos_embed")
    if pe is not None and model.pos_embed is not None and pe.shape != model.pos_embed.shape:
        n = 0 if model.no_embed_class else model.num_prefix_tokens
        old = pe.shape[1] - n
        side = int(round(old ** 0.5))
        if side * side != old or pe.shape[-1] != model.pos_embed.shape[-1]:
            raise CheckpointError(f"pos_embed: checkpoint {tuple(pe.shape)} cannot be resampled to "
                                  f"{tuple(model.pos_embed.shape)} (not a square grid plus {n} prefix tokens)")
        patch = resample_pos_embed(pe[0, n:], model.patch_embed.grid_size, (side, side), antialias=True)
        sd["pos_embed"] = torch.cat([pe[0, :n], patch], 0).unsqueeze(0)
    return sd


def _resample_patch_weight(w: torch.Tensor, new: Tuple[int, int]) -> torch.Tensor:
    """Conv patch weights (D, C, ph, pw) -> (D, C, *new) so a resized patch gives the same token
    (FlexiViT pseudo-inverse, as timm)."""
    old = tuple(w.shape[2:])
    eye = torch.eye(old[0] * old[1], dtype=torch.float32).reshape(-1, 1, *old)
    basis = torch.nn.functional.interpolate(eye, size=new, mode="bicubic", antialias=True, align_corners=False)
    mat = basis.reshape(old[0] * old[1], -1).T  # (new_area, old_area)
    pinv = torch.linalg.pinv(mat.T)  # (new_area, old_area)
    D, C = w.shape[:2]
    out = w.float().reshape(D * C, -1) @ pinv.T
    return out.reshape(D, C, *new).to(w.dtype)


def _unsupported(what: str):
    raise ValueError(f"timm_model: {what} is not supported by fastvit.VisionTransformer")


def timm_model_kwargs(timm_model: nn.Module) -> dict:
    """VisionTransformer keyword arguments describing a timm ``VisionTransformer`` / DeiT object.

    Architectures fastvit cannot run (attention pooling, q/k norm, other block types or
    activations, patch-embed norm) raise a ValueError naming the feature. A CNN patch source
    (timm's HybridEmbed) becomes ``embed_layer``: a :class:`HybridEmbed` around a copy of the backbone.
    """
    m = timm_model
    if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
        raise TypeError(f"timm_model: expected a timm VisionTransformer, got {type(m).__name__}")
    if getattr(m, "attn_pool", None) is not None:
        _unsupported(f"global_pool={m.global_pool!r} (attention pooling)")
    blk = m.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    if not (hasattr(attn, "qkv") and hasattr(mlp, "fc1") and hasattr(mlp, "fc2")):
        _unsupported(f"block type {type(blk).__name__} / attention {type(attn).__name__} / mlp {type(mlp).__name__}")
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            _unsupported(f"attention {name}")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        _unsupported("MLP norm (scale_mlp_norm)")
    if type(blk).__name__ != "Block":
        _unsupported(f"block type {type(blk).__name__}")
    if getattr(m, "pool_include_prefix", False):
        _unsupported("pool_include_prefix=True")
    act_mod = mlp.act
    if isinstance(act_mod, nn.GELU):
        act = "gelu_tanh" if act_mod.approximate == "tanh" else "gelu"
    elif type(act_mod).__name__ == "GELUTanh":
        act = "gelu_tanh"
    elif type(act_mod).__name__ == "GELU":
        act = "gelu"
    else:
        _unsupported(f"activation {type(act_mod).__name__}")
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        _unsupported(f"norm layer {type(norm1).__name__}")
    dim = m.embed_dim
    pe = m.patch_embed
    if hasattr(pe, "backbone"):
        embed_layer = HybridEmbed(copy.deepcopy(pe.backbone), img_size=pe.img_size, patch_size=pe.patch_size,
                                  feature_size=tuple(g * p for g, p in zip(pe.grid_size, pe.patch_size)),
                                  feature_dim=pe.proj.in_channels, in_chans=m.in_chans if hasattr(m, "in_chans") else 3,
                                  embed_dim=dim, bias=pe.proj.bias is not None)
        img_size, patch_size, in_chans = pe.img_size, pe.patch_size, 3
    else:
        if getattr(pe, "norm", None) is not None and not isinstance(pe.norm, nn.Identity):
            _unsupported("patch_embed norm")
        embed_layer = None
        img_size, patch_size, in_chans = pe.img_size, pe.patch_size, pe.proj.in_channels
    use_fc_norm = isinstance(m.fc_norm, nn.LayerNorm)
    return dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=m.num_classes,
        global_pool=m.global_pool, embed_dim=dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=_mlp_ratio(dim, mlp.fc1.out_features), qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, nn.Module) and hasattr(blk.ls1, "gamma") else None,
        class_token=m.cls_token is not None, pos_embed="none" if m.pos_embed is None else "learn",
        no_embed_class=m.no_embed_class, reg_tokens=getattr(m, "num_reg_tokens", 0),
        pre_norm=isinstance(m.norm_pre, nn.LayerNorm),
        final_norm=isinstance(m.norm, nn.LayerNorm) or use_fc_norm, fc_norm=use_fc_norm,
        dynamic_img_size=m.dynamic_img_size, dynamic_img_pad=getattr(pe, "dynamic_img_pad", False),
        act=act, norm_eps=norm1.eps, distilled=getattr(m, "dist_token", None) is not None, embed_layer=embed_layer,
    )


# --------------------------------------------------------------------------- Hugging Face
_HF_PREFIXES = ("vit.", "deit.", "dinov2.", "dinov2_with_registers.", "model.")
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight",
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
}
# keys a fastvit model has no use for: the masked-image-modelling token and ViTModel's pooler
# (tanh(dense(cls)), which no classifier in the ViT / DeiT / DINOv2 families reads).
_HF_DROP = re.compile(r"^(embeddings\.mask_token|pooler\.dense\.(weight|bias))$")
# transformers <5 and >=5 name the block parts differently; both map to timm's names.
_HF_LAYER = re.compile(r"^(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)$")
_HF_BLOCK = {
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_before": "norm1", "norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}


# key starts no timm checkpoint has ('model.' is left out: training checkpoints use it too)
_HF_MARKERS = ("embeddings.", "encoder.", "vit.", "deit.", "dinov2.", "dinov2_with_registers.")


def is_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether keys carry Hugging Face names (``vit.embeddings...``, ``encoder.layer...``), not timm's."""
    return any(k.startswith(_HF_MARKERS) for k in state_dict)


def convert_hf_state_dict(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Hugging Face ViT / DeiT / DINOv2 state dict -> timm / fastvit names (q, k, v fused to qkv).

    Per layer the query, key and value (D, D) weights and (D,) biases become ``attn.qkv`` (3D, D)
    and (3D,). Raises :class:`~fastvit.checkpoint.CheckpointError` listing every key it does not know.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[int, str, str], torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        k = key
        for p in _HF_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
                break
        if _HF_DROP.match(k):
            continue
        if k in _HF_TOP:
            out[_HF_TOP[k]] = t
            continue
        m = _HF_LAYER.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            part, _, leaf = rest.rpartition(".")
            if part in _HF_BLOCK:
                new = _HF_BLOCK[part]
                if new in ("q", "k", "v"):
                    qkv[(i, new, leaf)] = t
                elif new in ("ls1", "ls2"):
                    if leaf != "lambda1":
                        unknown.append(key)
                        continue
                    out[f"blocks.{i}.{new}.gamma"] = t
                else:
                    out[f"blocks.{i}.{new}.{leaf}"] = t
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"state_dict: unexpected Hugging Face keys ({len(unknown)}): {sorted(unknown)}")
    for i, _, leaf in sorted({(i, 0, leaf) for (i, _, leaf) in qkv}):
        parts = [qkv.get((i, n, leaf)) for n in ("q", "k", "v")]
        if any(p is None for p in parts):
            raise CheckpointError(f"state_dict: layer {i} has an incomplete query/key/value {leaf}")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts, 0)
    if _get(config, "model_type", "") == "dinov2_with_registers" and "pos_embed" in out:
        # HF adds the class position to the class token and gives registers none: fold the class
        # position into the token so the model can keep every prefix token out of pos_embed.
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def hf_config_to_kwargs(config, arch: Optional[str] = None) -> dict:
    """transformers config (object or config.json dict) -> VisionTransformer keyword arguments.

    ``arch`` is the transformers class name (``ViTModel``, ``DeiTForImageClassificationWithTeacher``
    ...); default the config's first ``architectures`` entry.
    """
    model_type = _get(config, "model_type", "vit")
    if model_type not in ("vit", "deit", "dinov2", "dinov2_with_registers"):
        raise ValueError(f"config: expected model_type 'vit', 'deit', 'dinov2' or 'dinov2_with_registers', "
                         f"got {model_type!r}")
    arch = arch or (_get(config, "architectures") or [""])[0]
    hidden_act = _get(config, "hidden_act", "gelu")
    acts = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
    if hidden_act not in acts:
        raise ValueError(f"config: hidden_act expected one of {sorted(acts)}, got {hidden_act!r}")
    dim = _get(config, "hidden_size")
    if model_type.startswith("dinov2"):
        if _get(config, "use_swiglu_ffn", False):
            raise ValueError("config: use_swiglu_ffn=True (DINOv2 giant) is not supported")
        hidden = int(dim * _get(config, "mlp_ratio", 4))
    else:
        hidden = _get(config, "intermediate_size")
    if _get(config, "num_channels", 3) is None:
        raise ValueError("config: num_channels is None")
    classify = arch.endswith("ForImageClassification") or arch.endswith("WithTeacher")
    if model_type.startswith("dinov2") and classify:
        raise ValueError(f"config: {arch} (class token + mean patch token head) is not supported; use Dinov2Model")
    kwargs = dict(
        img_size=_get(config, "image_size", 224), patch_size=_get(config, "patch_size", 16),
        in_chans=_get(config, "num_channels", 3), embed_dim=dim, depth=_get(config, "num_hidden_layers"),
        num_heads=_get(config, "num_attention_heads"), mlp_ratio=_mlp_ratio(dim, hidden),
        qkv_bias=_get(config, "qkv_bias", True), act=acts[hidden_act],
        norm_eps=_get(config, "layer_norm_eps", 1e-12), pos_embed_antialias=False,
        num_classes=len(_get(config, "id2label", {}) or {}) if classify else 0,
        global_pool="token",
    )
    if model_type.startswith("dinov2"):
        kwargs.update(init_values=1.0, dynamic_img_size=True)  # HF DINOv2 always resamples to the input grid
        if model_type == "dinov2_with_registers":
            # the registers model resamples with antialias, plain DINOv2 without
            kwargs.update(reg_tokens=_get(config, "num_register_tokens", 4), no_embed_class=True,
                          pos_embed_antialias=True)
    if model_type == "deit":
        if arch.endswith("WithTeacher"):
            kwargs["distilled"] = True
        else:  # DeiTModel / DeiTForImageClassification: the distillation token is an extra prefix
            kwargs["reg_tokens"] = 1  # token with a position, after the class token; the head reads token 0
    return kwargs


# --------------------------------------------------------------------------- fastvit
def model_kwargs(model: VisionTransformer) -> dict:
    """Constructor arguments that rebuild ``model``'s architecture (what ``fastvit convert`` stores).

    JSON-serialisable; ``VisionTransformer(**model_kwargs(m))`` takes ``m.state_dict()`` strictly.
    """
    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed):
        raise ValueError(f"model: a {type(pe).__name__} patch embedding (CNN backbone) cannot be described by "
                         "constructor arguments; save its state_dict and build it in code")
    blk = model.blocks[0]
    dim = model.embed_dim
    fc_norm = isinstance(model.fc_norm, LayerNorm)
    return dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim, depth=len(model.blocks),
        num_heads=blk.attn.num_heads, mlp_ratio=_mlp_ratio(dim, blk.mlp.fc1.out_features),
        qkv_bias=blk.attn.qkv.bias is not None, proj_bias=blk.attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,  # the values come with the weights
        class_token=model.cls_token is not None, pos_embed="none" if model.pos_embed is None else "learn",
        no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens,
        pre_norm=isinstance(model.norm_pre, LayerNorm),
        final_norm=isinstance(model.norm, LayerNorm) or fc_norm, fc_norm=fc_norm,
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=pe.dynamic_img_pad, act=blk.mlp.act,
        norm_eps=blk.norm1.eps, distilled=model.distilled, pos_embed_antialias=model.pos_embed_antialias,
    )

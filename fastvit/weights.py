"""Checkpoints from timm and Hugging Face -> fastvit, strictly.

Nothing here unpickles arbitrary code: ``.safetensors`` files are read with safetensors and
PyTorch pickles only with ``torch.load(weights_only=True)``. Key mismatches are errors that
list the missing and unexpected keys; nothing is silently re-initialised.
"""

from __future__ import annotations

import copy
import json
import os
import re
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .model import HybridEmbed, VisionTransformer

__all__ = [
    "from_timm",
    "from_hf",
    "from_pretrained",
    "load_checkpoint",
    "load_state_dict",
    "read_state_dict",
    "hf_config_to_kwargs",
    "convert_hf_state_dict",
    "hub_folder",
    "load_model",
    "model_kwargs",
    "convert",
    "hf_outputs",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (keys, shapes, format)."""


# --------------------------------------------------------------------------- strict loading
def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` with an error that lists every problem."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise CheckpointError(f"{source}: checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: .safetensors, or a PyTorch pickle read with weights_only=True.

    A pickle that would run code (or holds anything but tensors and containers) is refused.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: expected an existing file, got {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path!r}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: refused or unreadable with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    for key in ("model", "state_dict", "model_state", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path!r}: expected a dict of tensors (optionally under 'model' or "
                              f"'state_dict'), got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _adapt_timm(model: VisionTransformer, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Resample a timm checkpoint's pos_embed / patch weights to the model's grid / patch (as timm)."""
    from .reference import resample_pos_embed

    sd = dict(sd)
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
    """Resize conv patch weights so a resized patch gives the same token (FlexiViT pseudo-inverse, as timm)."""
    old = tuple(w.shape[2:])
    eye = torch.eye(old[0] * old[1], dtype=torch.float32).reshape(-1, 1, *old)
    basis = torch.nn.functional.interpolate(eye, size=new, mode="bicubic", antialias=True, align_corners=False)
    mat = basis.reshape(old[0] * old[1], -1).T  # (new_area, old_area)
    pinv = torch.linalg.pinv(mat.T)  # (new_area, old_area)
    D, C = w.shape[:2]
    out = w.float().reshape(D * C, -1) @ pinv.T
    return out.reshape(D, C, *new).to(w.dtype)


def load_checkpoint(model: VisionTransformer, path: str) -> VisionTransformer:
    """Load a timm or fastvit checkpoint file into ``model`` strictly (resampling pos / patch as timm)."""
    sd = read_state_dict(path)
    if any(k.startswith(("embeddings.", "vit.", "deit.", "dinov2.", "encoder.")) for k in sd):
        raise CheckpointError(f"checkpoint {path!r}: this is a Hugging Face state dict; use fastvit.from_pretrained "
                              "on its folder (config.json beside it)")
    load_state_dict(model, _adapt_timm(model, sd), source=f"checkpoint {path!r}")
    return model


# --------------------------------------------------------------------------- timm
def _unsupported(what: str):
    raise ValueError(f"timm_model: {what} is not supported by fastvit.VisionTransformer")


def from_timm(timm_model: nn.Module, backend: Optional[str] = None) -> VisionTransformer:
    """Same architecture and weights as a timm ``VisionTransformer`` / DeiT (config read from the object).

    Returns a fastvit model in eval mode, on the timm model's device and dtype.
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
    hidden = mlp.fc1.out_features
    ratio = hidden / dim
    if int(dim * ratio) != hidden:
        ratio = (hidden + 0.5) / dim
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
    distilled = getattr(m, "dist_token", None) is not None
    kwargs = dict(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=m.num_classes,
        global_pool=m.global_pool, embed_dim=dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=ratio, qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, nn.Module) and hasattr(blk.ls1, "gamma") else None,
        class_token=m.cls_token is not None, pos_embed="none" if m.pos_embed is None else "learn",
        no_embed_class=m.no_embed_class, reg_tokens=getattr(m, "num_reg_tokens", 0),
        pre_norm=isinstance(m.norm_pre, nn.LayerNorm),
        final_norm=isinstance(m.norm, nn.LayerNorm) or use_fc_norm, fc_norm=use_fc_norm,
        dynamic_img_size=m.dynamic_img_size, dynamic_img_pad=getattr(pe, "dynamic_img_pad", False),
        act=act, norm_eps=norm1.eps, distilled=distilled, embed_layer=embed_layer, backend=backend,
    )
    if getattr(m, "pool_include_prefix", False):
        _unsupported("pool_include_prefix=True")
    model = VisionTransformer(**kwargs)
    p = next(m.parameters())
    model.to(device=p.device, dtype=p.dtype)
    load_state_dict(model, m.state_dict(), source="timm_model")
    if distilled:
        model.distilled_training = getattr(m, "distilled_training", False)
    return model.train(m.training)


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


def convert_hf_state_dict(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Hugging Face ViT / DeiT / DINOv2 state dict -> timm / fastvit names (q, k, v fused to qkv).

    Raises :class:`CheckpointError` listing every key it does not know.
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
    """transformers config (object or config.json dict) -> VisionTransformer keyword arguments."""
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
        num_heads=_get(config, "num_attention_heads"), mlp_ratio=(hidden + 0.5) / dim if int(dim * (hidden / dim)) != hidden else hidden / dim,
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


def from_hf(hf_model_or_state_dict, config=None, backend: Optional[str] = None) -> VisionTransformer:
    """fastvit model with the weights of a transformers ViT / DeiT / DINOv2 model (or its state dict).

    Args:
        hf_model_or_state_dict: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
            ``DeiTForImageClassification(WithTeacher)``, ``Dinov2Model``, ``Dinov2WithRegistersModel``,
            or a state dict of one of them (then ``config`` is required).
        config: the transformers config (or config.json as a dict); read from the model if omitted.

    ``forward_features`` equals HF's ``last_hidden_state``; for ``*Model`` classes ``forward``
    returns the (normalised) class token, i.e. DINOv2's ``pooler_output``; for classifiers the logits.
    """
    if isinstance(hf_model_or_state_dict, nn.Module):
        hf = hf_model_or_state_dict
        config = config if config is not None else hf.config
        sd = hf.state_dict()
        arch = type(hf).__name__
        p = next(hf.parameters())
        device, dtype = p.device, p.dtype
    elif isinstance(hf_model_or_state_dict, Mapping):
        if config is None:
            raise ValueError("config: expected the transformers config (or config.json dict) with a state dict, got None")
        sd, arch, device, dtype = hf_model_or_state_dict, None, None, None
    else:
        raise TypeError(f"hf_model_or_state_dict: expected a transformers model or a state dict, "
                        f"got {type(hf_model_or_state_dict).__name__}")
    kwargs = hf_config_to_kwargs(config, arch)
    sd = convert_hf_state_dict(sd, config)
    if kwargs["num_classes"] == 0 and "head.weight" in sd:
        kwargs["num_classes"] = sd["head.weight"].shape[0]
    if "dist_token" in sd and kwargs.get("reg_tokens") == 1:
        sd["reg_token"] = sd.pop("dist_token")
    model = VisionTransformer(backend=backend, **kwargs)
    if device is not None:
        model.to(device=device, dtype=dtype)
    load_state_dict(model, sd, source="Hugging Face state_dict")
    return model.eval()


# --------------------------------------------------------------------------- folders and hub names
_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                 "pytorch_model.bin")
_HUB_NAME = re.compile(r"^(?:hf-hub:)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


def _hub_error(repo_id: str, filename: str, e: Exception) -> FileNotFoundError:
    why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return FileNotFoundError(
        f"from_pretrained: {repo_id!r} is not a local folder, and {filename!r} of the Hugging Face hub repo "
        f"{repo_id!r} is neither in the local cache nor downloadable ({type(e).__name__}: {why}). Connect to "
        f"the network (and unset HF_HUB_OFFLINE), or download the repo and pass its folder.")


def hub_folder(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
               local_files_only: bool = False) -> str:
    """Fetch ``config.json``, the (optional) preprocessor config and the weights of a hub repo
    (``org/name``, ``hf-hub:org/name``, ``org/name@revision``) and return the local snapshot folder.

    Online, files come through huggingface_hub (and its cache); offline (no network,
    ``HF_HUB_OFFLINE=1`` or ``local_files_only``) only the cache is used, and a missing file is a
    :class:`FileNotFoundError` that names the repo and the file looked for.
    """
    m = _HUB_NAME.match(name)
    if not m:
        raise ValueError(f"name: expected a local folder or a hub repo id 'org/name[@revision]', got {name!r}")
    repo_id, revision = m.group(1), revision or m.group(2)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:
        raise ImportError(f"from_pretrained: {name!r} is a hub name and needs huggingface_hub "
                          "(pip install 'fastvit[hf]'), or pass a local folder") from e

    def get(filename: str, required: bool) -> Optional[str]:
        try:
            return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                   local_files_only=local_files_only)
        except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
            if required:
                raise _hub_error(repo_id, filename, e) from e
            return None
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"from_pretrained: hub repo {repo_id!r} has no {filename!r}") from None
            return None
        except Exception as e:  # network, auth, unknown repo: say which file was wanted
            raise _hub_error(repo_id, filename, e) from e

    cfg = get("config.json", required=True)
    folder = os.path.dirname(cfg)
    get("preprocessor_config.json", required=False)
    for fn in _WEIGHT_FILES:
        path = get(fn, required=False)
        if path is None:
            continue
        if fn.endswith(".index.json"):
            with open(path) as f:
                for shard in sorted(set(json.load(f)["weight_map"].values())):
                    get(shard, required=True)
        return folder
    raise _hub_error(repo_id, " or ".join(_WEIGHT_FILES), LocalEntryNotFoundError("no weights file found"))


def _read_folder_weights(path: str) -> Dict[str, torch.Tensor]:
    sd: Dict[str, torch.Tensor] = {}
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"checkpoint {index!r}: expected a JSON index with a 'weight_map' ({e})") from e
            for fn in files:
                shard = os.path.join(path, fn)
                if not os.path.isfile(shard):
                    raise FileNotFoundError(f"checkpoint: {index_name} lists {fn!r}, which is missing in {path!r}")
                sd.update(read_state_dict(shard))
            return sd
    for fn in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, fn)):
            return read_state_dict(os.path.join(path, fn))
    raise FileNotFoundError(f"path: expected model.safetensors or pytorch_model.bin (or a sharded index) "
                            f"in {path!r}, found {sorted(os.listdir(path))}")


def _read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"path: expected {cfg_file} to exist")
    try:
        with open(cfg_file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"config: {cfg_file!r} is not valid JSON ({e})") from e


def _timm_layout_model(config: dict, backend: Optional[str]) -> VisionTransformer:
    """Model of a timm hub / fastvit folder (config.json with 'architecture' and 'model_args')."""
    arch = config["architecture"]
    args = dict(config.get("model_args") or {})
    if arch == "fastvit":
        return VisionTransformer(backend=backend, **args)
    for k in ("num_classes", "global_pool"):
        if k in config and k not in args:
            args[k] = config[k]
    from .registry import list_models, model_config

    base = arch.split(".")[0]
    if base in list_models():
        cfg = model_config(base)
        cfg.update(args)
        return VisionTransformer(backend=backend, **cfg)
    try:
        import timm
    except ImportError:
        raise ValueError(f"config: architecture {arch!r} is not a fastvit preset (fastvit.list_models()) and timm "
                         "is not installed to describe it") from None
    return from_timm(timm.create_model(base, pretrained=False, **args).eval(), backend=backend)


def _timm_hub_id(name: str) -> Optional[str]:
    """timm model name (``vit_base_patch16_224.augreg2_in21k_ft_in1k``) -> its hub repo, via timm's table."""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # timm missing, or not a timm name: the caller reports what it expected
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def from_pretrained(name_or_path: str, backend: Optional[str] = None, revision: Optional[str] = None,
                    cache_dir: Optional[str] = None, local_files_only: bool = False) -> VisionTransformer:
    """A fastvit model from a model folder or a Hugging Face hub name.

    Folders (local, or the hub snapshot of ``org/name``) may be:

    * Hugging Face ViT / DeiT / DINOv2: config.json with ``model_type`` + model.safetensors or
      pytorch_model.bin, sharded index files too;
    * timm hub layout (``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``): config.json with
      ``architecture`` / ``model_args`` + timm-named weights;
    * what ``fastvit convert`` writes (architecture 'fastvit').

    Names: a folder, ``org/name[@revision]``, ``hf-hub:org/name``, or a timm model name with its
    pretrained tag (``vit_base_patch16_224.augreg2_in21k_ft_in1k``, resolved to its hub repo by timm).
    Hub names need huggingface_hub; offline only its cache is used (see :func:`hub_folder`).
    """
    path = name_or_path
    if not os.path.isdir(path) and not os.path.exists(path) and "/" not in str(path):
        path = _timm_hub_id(path) or path
    if not os.path.isdir(path):
        if os.path.exists(path) or not _HUB_NAME.match(str(path)):
            raise FileNotFoundError(f"name_or_path: expected a model folder with config.json or a hub repo id "
                                    f"'org/name', got {name_or_path!r}")
        path = hub_folder(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    config = _read_config(path)
    if "architecture" in config:
        model = _timm_layout_model(config, backend)
        sd = _read_folder_weights(path)
        if any(k.startswith("module.") for k in sd):
            sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
        load_state_dict(model, _adapt_timm(model, sd), source=f"checkpoint folder {path!r}")
        return model.eval()
    if "model_type" not in config:
        raise CheckpointError(f"config: {os.path.join(path, 'config.json')!r} has neither 'model_type' (Hugging "
                              "Face) nor 'architecture' (timm / fastvit)")
    return from_hf(_read_folder_weights(path), config, backend=backend)


# --------------------------------------------------------------------------- one entry point, convert
def model_kwargs(model: VisionTransformer) -> dict:
    """Constructor arguments that rebuild ``model``'s architecture (what ``fastvit convert`` stores)."""
    from .model import LayerNorm, LayerScale, PatchEmbed

    pe = model.patch_embed
    if not isinstance(pe, PatchEmbed):
        raise ValueError(f"model: a {type(pe).__name__} patch embedding (CNN backbone) cannot be described by "
                         "constructor arguments; save its state_dict and build it in code")
    blk = model.blocks[0]
    dim, hidden = model.embed_dim, blk.mlp.fc1.out_features
    ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim
    fc_norm = isinstance(model.fc_norm, LayerNorm)
    return dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim, depth=len(model.blocks),
        num_heads=blk.attn.num_heads, mlp_ratio=ratio, qkv_bias=blk.attn.qkv.bias is not None,
        proj_bias=blk.attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,  # the values come with the weights
        class_token=model.cls_token is not None, pos_embed="none" if model.pos_embed is None else "learn",
        no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens,
        pre_norm=isinstance(model.norm_pre, LayerNorm),
        final_norm=isinstance(model.norm, LayerNorm) or fc_norm, fc_norm=fc_norm,
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=pe.dynamic_img_pad, act=blk.mlp.act,
        norm_eps=blk.norm1.eps, distilled=model.distilled, pos_embed_antialias=model.pos_embed_antialias,
    )


def _timm_preprocess(name: str):
    from .preprocess import Preprocessor

    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # timm missing or name unknown to it: fastvit's defaults
        return None
    return Preprocessor.from_timm(cfg.to_dict()) if cfg is not None else None


def load_model(checkpoint: str, model_name: Optional[str] = None, backend: Optional[str] = None,
               local_files_only: bool = False):
    """Model and its :class:`~fastvit.preprocess.Preprocessor` from whatever the user has.

    Args:
        checkpoint: a model folder (HF / timm hub layout / fastvit), a hub name, or a state-dict
            file (.safetensors / .pth / .bin, timm names; then ``model_name`` is required).
        model_name: a preset of :func:`fastvit.list_models` (for state-dict files, or alone for random
            weights when ``checkpoint`` is None).

    Returns:
        (model in eval mode, preprocessor with ``id2label`` when the checkpoint has labels)
    """
    from .preprocess import Preprocessor
    from .registry import create_model

    if checkpoint is None or os.path.isfile(checkpoint):
        if model_name is None:
            raise ValueError(f"model_name: a state-dict file ({checkpoint!r}) needs the architecture, e.g. "
                             "--model vit_base_patch16_224, got None")
        base = model_name.split(".")[0]
        model = create_model(base, checkpoint=checkpoint, backend=backend)
        pre = _timm_preprocess(model_name) or Preprocessor.for_model(model)
        return model.eval(), pre
    folder = checkpoint
    if not os.path.isdir(checkpoint):
        if not _HUB_NAME.match(checkpoint):
            raise FileNotFoundError(f"checkpoint: expected a file, a model folder or a hub name 'org/name', "
                                    f"got {checkpoint!r}")
        folder = hub_folder(checkpoint, local_files_only=local_files_only)
    model = from_pretrained(folder, backend=backend)
    return model, Preprocessor.from_pretrained(folder, model=model)


def convert(src: str, dst: str, model_name: Optional[str] = None) -> str:
    """Write ``src`` (anything :func:`load_model` takes) as a fastvit folder: ``model.safetensors``
    (timm / fastvit names) + ``config.json`` (architecture 'fastvit', constructor arguments,
    preprocessing, labels). :func:`from_pretrained` reads it back. Returns ``dst``."""
    from safetensors.torch import save_file

    model, pre = load_model(src, model_name)
    kwargs = model_kwargs(model)
    os.makedirs(dst, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt", "producer": "fastvit"})
    from . import __version__

    config = dict(architecture="fastvit", fastvit_version=__version__, model_args=kwargs,
                  num_classes=model.num_classes, preprocess=pre.to_dict(), source=str(src))
    if pre.id2label:
        config["id2label"] = {str(k): v for k, v in sorted(pre.id2label.items())}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


def add_convert_parser(sub) -> None:
    """Register ``fastvit convert SRC DST`` on an argparse subparsers object."""
    s = sub.add_parser("convert", help="write a timm / Hugging Face checkpoint as a fastvit folder")
    s.add_argument("src", help="HF / timm / fastvit folder, hub name 'org/name', or a state-dict file")
    s.add_argument("dst", help="output folder (model.safetensors + config.json)")
    s.add_argument("--model", help="architecture for a state-dict file (a name of fastvit.list_models())")
    s.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    dst = convert(args.src, args.dst, model_name=args.model)
    print(f"wrote {os.path.join(dst, 'model.safetensors')} and {os.path.join(dst, 'config.json')}")
    return 0


# --------------------------------------------------------------------------- Hugging Face style outputs
class ViTOutput(dict):
    """Dict with attribute access, as transformers' ModelOutput: ``last_hidden_state`` (B, N, D),
    ``pooler_output`` (B, D), ``logits`` (B, C) for classifiers, ``hidden_states`` (depth + 1 tensors
    (B, N, D): embeddings, then each block's output) and ``attentions`` (depth entries (B, H, N, N),
    None for layers not asked for) when requested."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def hf_outputs(model: VisionTransformer, pixel_values: torch.Tensor, output_hidden_states: bool = False,
               output_attentions=False) -> ViTOutput:
    """Run ``model`` and return transformers-style outputs.

    Args:
        pixel_values: (B, C, H, W).
        output_hidden_states: also return every block's output (HF ``hidden_states``).
        output_attentions: True for every layer, or a list of layer indices: only those compute
            probabilities (via :func:`fastvit.ops.attention_probs`), the rest stay on the fast path.
    """
    depth = len(model.blocks)
    if output_attentions is True:
        want = set(range(depth))
    elif not output_attentions:
        want = set()
    else:
        want = set(model._take_indices(list(output_attentions)))
    x = model.embed(pixel_values)
    hidden = [x]
    attns: list = [None] * depth
    for i, blk in enumerate(model.blocks):
        if i in want:
            x, attns[i] = blk(x, model.backend, return_attn=True)
        else:
            x = blk(x, model.backend)
        hidden.append(x)
    last = model._norm(x)
    out = ViTOutput(last_hidden_state=last, pooler_output=model.forward_head(last, pre_logits=True))
    if model.num_classes:
        out["logits"] = model.forward_head(last)
    if output_hidden_states:
        out["hidden_states"] = tuple(hidden)
    if want:
        out["attentions"] = tuple(attns)
    return out

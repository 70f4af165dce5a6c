"""Converters of the NaFlex families, as pure functions (see :mod:`fastvit.convert`): timm
``NaFlexVit`` and Hugging Face ``Siglip2VisionModel`` / ``Siglip2Model``'s vision tower ->
:class:`~fastvit.naflex.NaFlexVisionTransformer` constructor arguments and state dicts.

A layer above :mod:`fastvit.convert` (it reuses its block / head mappings; convert never imports
it): :mod:`fastvit.factory` picks these for NaFlex inputs (:func:`convert_hf`, :func:`convert_timm`).

Both store the patch projection as a linear layer over patches flattened (ph, pw, C); fastvit
holds it as the conv weight (D, C, ph, pw) (the same numbers, permuted), so the same checkpoint
also runs on fixed-size image batches through the fused patch-embed kernel.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn as nn

from .checkpoint import CheckpointError
from .convert import (_HF_ACTS, _mlp_ratio, _timm_act, _timm_attn_pool_kwargs, convert_hf_state_dict,
                      convert_timm_state_dict, hf_config_to_kwargs, timm_model_kwargs)

__all__ = ["timm_naflex_kwargs", "convert_timm_naflex_state_dict", "is_timm_naflex_state_dict", "hf_siglip2_kwargs",
           "convert_hf_siglip2_state_dict", "linear_to_conv_patch_weight", "is_siglip2_config", "timm_kwargs",
           "convert_timm", "hf_kwargs", "convert_hf"]


def linear_to_conv_patch_weight(w: torch.Tensor, patch_size, in_chans: int) -> torch.Tensor:
    """(D, ph * pw * C) linear patch weight over (ph, pw, C)-flattened patches -> conv weight (D, C, ph, pw)."""
    ph, pw = patch_size
    if w.dim() != 2 or w.shape[1] != ph * pw * in_chans:
        raise CheckpointError(f"patch projection: expected a ({w.shape[0]}, {ph * pw * in_chans}) linear weight "
                              f"(ph * pw * C for patch {(ph, pw)}, {in_chans} channels), got {tuple(w.shape)}")
    return w.reshape(w.shape[0], ph, pw, in_chans).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- timm NaFlexVit
def _unsupported(what: str):
    raise ValueError(f"timm_model: NaFlexVit with {what} is not supported by fastvit")


def timm_naflex_kwargs(m: nn.Module) -> dict:
    """NaFlexVisionTransformer keyword arguments describing a timm ``NaFlexVit``: standard ViT
    blocks (GELU / tanh GELU / QuickGELU, LayerScale), class / register tokens, a learnt position
    grid resized per image with timm's options (interpolation, antialias, align_corners, aspect
    preserving), token / avg / max / avgmax pooling, the MAP head, pre / final / fc norms.

    What fastvit does not build raises a ValueError naming it: EVA / RoPE blocks, factorized or
    grid_sample position embeddings, input / embedding norms, channels-first patch layout, prefix
    tokens in the pooling, q / k norm.
    """
    e = m.embeds
    if getattr(m, "rope", None) is not None:
        _unsupported("RoPE (rope_type set: the per-image tables are not packed)")
    if e.pos_embed_type not in ("learned", "none"):
        _unsupported(f"pos_embed={e.pos_embed_type!r} (a learnt 2-D grid or none)")
    if e.pos_embed_use_grid_sample:
        _unsupported("pos_embed_use_grid_sample=True")
    if e.pos_embed_interp_mode not in ("bilinear", "bicubic"):
        _unsupported(f"pos_embed_interp_mode={e.pos_embed_interp_mode!r}")
    if e.norm_input is not None or not isinstance(e.norm, nn.Identity):
        _unsupported("an input / embedding norm (input_norm_layer / embed_norm_layer)")
    if not getattr(e, "channels_last", True):
        _unsupported("patchify_channels_last=False (patches flattened (C, ph, pw))")
    if getattr(m, "pool_include_prefix", False):
        _unsupported("pool_include_prefix=True")
    for i, blk in enumerate(m.blocks):
        if type(blk).__name__ != "Block":
            _unsupported(f"block type {type(blk).__name__} (block {i}; EVA / RoPE blocks)")
        attn = blk.attn
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                _unsupported(f"attention {name}")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            _unsupported("MLP norm (scale_mlp_norm)")
        if not hasattr(attn, "qkv"):
            _unsupported(f"attention {type(attn).__name__}")
    blk = m.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        _unsupported(f"norm layer {type(norm1).__name__}")
    act = _timm_act(mlp.act)
    dim = m.embed_dim
    ph, pw = e.patch_size
    C = e.in_chans
    if e.pos_embed is not None:
        gh, gw = e.pos_embed.shape[1:3]
    else:
        gh, gw = e.pos_embed_grid_size or (16, 16)
    for n, what in ((m.norm, "norm"), (m.fc_norm, "fc_norm"), (m.norm_pre, "norm_pre")):
        if not isinstance(n, nn.Identity) and not (isinstance(n, nn.LayerNorm) and n.eps == norm1.eps):
            _unsupported(f"{what} {n} (a LayerNorm(eps={norm1.eps}) expected)")
    use_fc_norm = isinstance(m.fc_norm, nn.LayerNorm)
    head = m.head
    return dict(
        img_size=(gh * ph, gw * pw), patch_size=(ph, pw), in_chans=C, num_classes=m.num_classes,
        global_pool=m.global_pool, embed_dim=dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=_mlp_ratio(dim, mlp.fc1.out_features), qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, nn.Module) and hasattr(blk.ls1, "gamma") else None,
        class_token=e.cls_token is not None, pos_embed="none" if e.pos_embed is None else "learn",
        reg_tokens=e.num_reg_tokens, pre_norm=isinstance(m.norm_pre, nn.LayerNorm),
        final_norm=isinstance(m.norm, nn.LayerNorm) or use_fc_norm, fc_norm=use_fc_norm,
        dynamic_img_pad=e.dynamic_img_pad, act=act, norm_eps=norm1.eps,
        head_bias=not isinstance(head, nn.Linear) or head.bias is not None,
        pos_embed_interp=e.pos_embed_interp_mode, pos_embed_antialias=bool(e.pos_embed_antialias),
        pos_embed_align_corners=bool(e.pos_embed_align_corners),
        pos_embed_ar_preserving=bool(e.pos_embed_ar_preserving),
        **_timm_attn_pool_kwargs(m, attn.num_heads, mlp.fc1.out_features, act, norm1.eps),
    )


def is_timm_naflex_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether keys carry timm NaFlexVit's embedding names (``embeds.proj.weight`` ...)."""
    return any(k.startswith("embeds.") for k in state_dict)


def convert_timm_naflex_state_dict(state_dict: Mapping[str, torch.Tensor], patch_size, in_chans: int = 3
                                   ) -> Dict[str, torch.Tensor]:
    """timm ``NaFlexVit`` keys -> fastvit's: ``embeds.proj`` (linear over (ph, pw, C) patches, or a
    conv with ``embed_proj_type='conv'``) -> ``patch_embed.proj`` (conv weight (D, C, ph, pw));
    ``embeds.pos_embed`` (1, gh, gw, D) -> ``pos_embed`` (1, gh * gw, D); ``embeds.cls_token`` /
    ``embeds.reg_token`` -> ``cls_token`` / ``reg_token``. Blocks, norms, ``attn_pool`` and ``head``
    keep their names. Unknown ``embeds.*`` keys raise a CheckpointError."""
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state_dict.items():
        if not k.startswith("embeds."):
            out[k] = v
            continue
        rest = k[len("embeds."):]
        if rest == "proj.weight":
            out["patch_embed.proj.weight"] = v if v.dim() == 4 else linear_to_conv_patch_weight(v, patch_size, in_chans)
        elif rest == "proj.bias":
            out["patch_embed.proj.bias"] = v
        elif rest == "pos_embed":
            if v.dim() != 4:
                raise CheckpointError(f"embeds.pos_embed: expected (1, gh, gw, D), got {tuple(v.shape)}")
            out["pos_embed"] = v.reshape(1, -1, v.shape[-1])
        elif rest in ("cls_token", "reg_token"):
            out[rest] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"state_dict: unexpected timm NaFlexVit embedding keys ({len(unknown)}): "
                              f"{sorted(unknown)}")
    return out


# --------------------------------------------------------------------------- Hugging Face Siglip2
_SIGLIP2_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         num_channels=3, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                         vision_use_head=True, num_patches=256)
_SIGLIP2_ARCHS = ("Siglip2VisionModel", "Siglip2Model")


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def hf_siglip2_kwargs(config, arch: Optional[str] = None) -> dict:
    """NaFlexVisionTransformer keyword arguments of a Hugging Face ``Siglip2VisionModel`` (model_type
    'siglip2_vision_model') or ``Siglip2Model``'s vision tower ('siglip2'): no class token, the
    post-layernorm on every token, the MAP head (``vision_use_head``), a sqrt(num_patches)-square
    position grid resized per image bilinearly with antialias."""
    model_type = _get(config, "model_type")
    arch = arch or (_get(config, "architectures") or [""])[0]
    base = (arch or "").split(".")[-1]
    if base and base not in _SIGLIP2_ARCHS:
        raise ValueError(f"config: {base} is not supported for model_type {model_type!r}; load the image tower as "
                         "Siglip2VisionModel (or a Siglip2Model folder)")
    vc = config
    if model_type == "siglip2":
        vc = _get(config, "vision_config")
        if vc is None:
            raise ValueError("config: model_type 'siglip2' without a vision_config")

    def get(name):
        v = _get(vc, name)
        return _SIGLIP2_DEFAULTS[name] if v is None else v

    act = get("hidden_act")
    if act not in _HF_ACTS:
        raise ValueError(f"config: hidden_act expected one of {sorted(_HF_ACTS)}, got {act!r}")
    n = int(get("num_patches"))
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"config: num_patches expected a square number (the stored position grid), got {n}")
    patch = get("patch_size")
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (int(patch), int(patch))
    dim = get("hidden_size")
    return dict(
        img_size=(side * patch[0], side * patch[1]), patch_size=patch, in_chans=get("num_channels"), embed_dim=dim,
        depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        mlp_ratio=_mlp_ratio(dim, get("intermediate_size")), qkv_bias=True, act=_HF_ACTS[act],
        norm_eps=get("layer_norm_eps"), num_classes=0, class_token=False,
        global_pool="map" if get("vision_use_head") else "", pos_embed_interp="bilinear", pos_embed_antialias=True,
    )


def convert_hf_siglip2_state_dict(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Hugging Face ``Siglip2VisionModel`` / ``Siglip2Model`` state dict -> fastvit names (strict:
    any key it does not know raises a CheckpointError). The linear patch embedding becomes the conv
    weight; the rest maps as SigLIP's tower (q / k / v fused into ``attn.qkv``, the MAP head's
    ``in_proj`` split into ``q`` / ``kv``, the text tower of a Siglip2Model dropped)."""
    kw = hf_siglip2_kwargs(config)
    two_tower = _get(config, "model_type") == "siglip2"
    out = convert_hf_state_dict(sd, dict(model_type="siglip" if two_tower else "siglip_vision_model"))
    w = out.get("patch_embed.proj.weight")
    if w is not None:
        out["patch_embed.proj.weight"] = linear_to_conv_patch_weight(w, kw["patch_size"], kw["in_chans"])
    return out


# --------------------------------------------------------------------------- dispatch (every family)
def is_siglip2_config(config) -> bool:
    return _get(config, "model_type") in ("siglip2", "siglip2_vision_model")


def timm_kwargs(timm_model: nn.Module) -> dict:
    """Constructor arguments of any timm model fastvit builds (NaFlexVit included)."""
    if type(timm_model).__name__ == "NaFlexVit":
        return timm_naflex_kwargs(timm_model)
    return timm_model_kwargs(timm_model)


def convert_timm(state_dict: Mapping[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Any timm / fastvit state dict fitted to ``model``: NaFlexVit's ``embeds.*`` names first
    (:func:`convert_timm_naflex_state_dict`), then :func:`fastvit.convert.convert_timm_state_dict`."""
    if is_timm_naflex_state_dict(state_dict):
        pe = model.patch_embed
        state_dict = convert_timm_naflex_state_dict(state_dict, pe.patch_size, pe.proj.in_channels)
    return convert_timm_state_dict(state_dict, model)


def hf_kwargs(config, arch: Optional[str] = None) -> dict:
    """Constructor arguments of any Hugging Face config fastvit builds (Siglip2 included)."""
    return hf_siglip2_kwargs(config, arch) if is_siglip2_config(config) else hf_config_to_kwargs(config, arch)


def convert_hf(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Any Hugging Face state dict fastvit loads -> fastvit names (Siglip2 included)."""
    return convert_hf_siglip2_state_dict(sd, config) if is_siglip2_config(config) else convert_hf_state_dict(sd, config)

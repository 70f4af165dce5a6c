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
from .facts import ACTIVATIONS
from .model import HybridEmbed, LayerNorm, LayerScale, PatchEmbed, VisionTransformer
from .reference import resample_pos_embed
from .rope import RopeCat, RopeDinoV3, RopeMixed
from .relpos import RelativePositionBias, resize_table

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

    A timm ``Eva`` state dict (EVA-02, DINOv3, RoPE ViTs) takes fastvit's names (see
    :func:`_timm_eva_names`). A timm ``Beit`` state dict takes fastvit's names (see
    :func:`_timm_beit_names`), and a relative position bias table stored for another grid is fitted
    to the model's (timm's ``resize_rel_pos_bias_table``, as its ``checkpoint_filter_fn``).
    """
    if any(k.startswith("embeds.") for k in state_dict):
        raise CheckpointError("state_dict: timm NaFlexVit keys (embeds.*); convert them with "
                              "fastvit.convert_naflex.convert_timm_naflex_state_dict (fastvit.from_timm, "
                              "create_model(checkpoint=) and from_pretrained do)")
    if model.rope is not None or any(_EVA_KEY.match(k) for k in state_dict):
        state_dict = _timm_eva_names(state_dict)  # before BEiT's: the names both families share go here
    sd = _timm_beit_names(state_dict) if any(_BEIT_KEY.match(k) for k in state_dict) else dict(state_dict)
    _fit_rel_pos_tables(sd, model)
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


# keys only a timm Eva checkpoint has (a model with RoPE is converted whatever its keys)
_EVA_KEY = re.compile(r"^(blocks\.\d+\.(attn\.[qkv]_proj|mlp\.fc1_[gx])\.(weight|bias)|rope\.freqs)$")


def _timm_eva_names(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm ``Eva`` keys -> fastvit's, into the fused GEMMs: ``attn.q_proj`` / ``k_proj`` /
    ``v_proj`` (qkv_fused=False) -> ``attn.qkv`` (3D, D) (a missing k bias is zeros); ``attn.q_bias``
    / ``v_bias`` (k has none) -> ``attn.qkv.bias``; ``mlp.fc1_g`` over ``mlp.fc1_x`` (timm SwiGLU) ->
    ``mlp.fc1`` (2 Hd, D), gate rows first; ``gamma_1`` / ``gamma_2`` -> ``ls1.gamma`` /
    ``ls2.gamma``. ``rope.freqs`` (mixed RoPE), ``attn.norm`` and ``mlp.norm`` keep their names;
    so does everything else (fastvit names pass through)."""
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}  # (prefix, leaf) -> {'q': .., 'k': .., 'v': ..}
    for k, v in state_dict.items():
        m = re.match(r"^(blocks\.\d+\.)(.+)$", k)
        rest = m.group(2) if m else None
        if rest is None:
            out[k] = v
        elif rest in ("attn.q_bias", "attn.k_bias", "attn.v_bias"):
            parts.setdefault((m.group(1) + "attn.qkv", "bias"), {})[rest[5]] = v
        elif re.match(r"^attn\.[qkv]_proj\.(weight|bias)$", rest):
            parts.setdefault((m.group(1) + "attn.qkv", rest.rpartition(".")[2]), {})[rest[5]] = v
        elif re.match(r"^mlp\.fc1_[gx]\.(weight|bias)$", rest):
            parts.setdefault((m.group(1) + "mlp.fc1", rest.rpartition(".")[2]), {})[rest[8]] = v
        elif rest in ("gamma_1", "gamma_2"):
            out[f"{m.group(1)}ls{rest[-1]}.gamma"] = v
        else:
            out[k] = v
    for (name, leaf), p in parts.items():
        order = "gx" if name.endswith("fc1") else "qkv"
        if leaf == "bias" and order == "qkv" and "k" not in p and "q" in p:
            p["k"] = torch.zeros_like(p["q"])  # EVA's key projection has no bias
        if any(c not in p for c in order):
            raise CheckpointError(f"state_dict: {name} has the {leaf} of {sorted(p)} only, expected all of "
                                  f"{list(order)}")
        out[f"{name}.{leaf}"] = torch.cat([p[c] for c in order], 0)
    return out


# keys only a timm Beit checkpoint has
_BEIT_KEY = re.compile(r"^blocks\.\d+\.(gamma_[12]|attn\.(q_bias|v_bias|relative_position_bias_table))$")


def _timm_beit_names(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """timm ``Beit`` keys -> fastvit's: ``attn.q_bias`` / ``attn.v_bias`` (+ a zero k bias) ->
    ``attn.qkv.bias`` (3D,); ``gamma_1`` / ``gamma_2`` -> ``ls1.gamma`` / ``ls2.gamma``; a block's
    ``attn.relative_position_bias_table`` -> ``attn.rel_pos_bias.relative_position_bias_table``
    (the shared ``rel_pos_bias.relative_position_bias_table`` keeps its name); the index buffers
    older checkpoints saved are dropped (timm's filter drops them too)."""
    out: Dict[str, torch.Tensor] = {}
    qv: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        if k.endswith("relative_position_index"):
            continue
        m = re.match(r"^(blocks\.\d+\.)(.+)$", k)
        rest = m.group(2) if m else None
        if rest in ("attn.q_bias", "attn.k_bias", "attn.v_bias"):
            qv.setdefault(m.group(1), {})[rest[5]] = v
        elif rest in ("gamma_1", "gamma_2"):
            out[f"{m.group(1)}ls{rest[-1]}.gamma"] = v
        elif rest == "attn.relative_position_bias_table":
            out[f"{m.group(1)}attn.rel_pos_bias.relative_position_bias_table"] = v
        else:
            out[k] = v
    for blk, parts in qv.items():
        if "q" not in parts or "v" not in parts:
            raise CheckpointError(f"state_dict: {blk}attn has {sorted(parts)} of the q / v biases, expected both")
        q = parts["q"]
        out[f"{blk}attn.qkv.bias"] = torch.cat([q, parts.get("k", torch.zeros_like(q)), parts["v"]])
    return out


def _fit_rel_pos_tables(sd: Dict[str, torch.Tensor], model: nn.Module) -> None:
    """Fit every relative position bias table of ``sd`` whose shape is not the model's to the
    model's grid, in place (timm ``checkpoint_filter_fn``: the stored grid is assumed square)."""
    for name, mod in model.named_modules():
        if not isinstance(mod, RelativePositionBias):
            continue
        key = f"{name}.relative_position_bias_table"
        t = sd.get(key)
        if t is None or t.shape == mod.relative_position_bias_table.shape:
            continue
        if t.dim() != 2 or t.shape[1] != mod.num_heads:
            raise CheckpointError(f"{key}: checkpoint {tuple(t.shape)} cannot be fitted to "
                                  f"{tuple(mod.relative_position_bias_table.shape)} (a table per head expected)")
        try:
            sd[key] = resize_table(t, mod.window_size, None, "timm")
        except ValueError as e:
            raise CheckpointError(f"{key}: checkpoint {tuple(t.shape)} cannot be fitted to grid "
                                  f"{mod.window_size}: {e}") from None


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
    """VisionTransformer keyword arguments describing a timm ``VisionTransformer`` / DeiT / CLIP /
    SigLIP object (QuickGELU, pre-norm, the MAP head ``attn_pool`` included).

    Architectures fastvit cannot run (PRR pooling, MAP-head variants other than timm's presets',
    q/k norm, other block types or activations, patch-embed norm) raise a ValueError naming the
    feature. A CNN patch source
    (timm's HybridEmbed) becomes ``embed_layer``: a :class:`HybridEmbed` around a copy of the backbone.
    """
    m = timm_model
    if type(m).__name__ == "NaFlexVit":
        raise TypeError("timm_model: a NaFlexVit is described by fastvit.convert_naflex.timm_naflex_kwargs "
                        "(fastvit.from_timm calls it)")
    if not hasattr(m, "blocks") or not hasattr(m, "patch_embed"):
        raise TypeError(f"timm_model: expected a timm VisionTransformer, got {type(m).__name__}")
    arch = str((getattr(m, "pretrained_cfg", None) or {}).get("architecture") or "")
    if arch.startswith("beit3"):
        _unsupported(f"BEiT-3 ({arch}: sub-LayerNorms inside the attention and the MLP, scale_attn_norm / "
                     "scale_mlp_norm)")
    if type(m).__name__ == "Beit":
        return _timm_beit_kwargs(m)
    if type(m).__name__ == "Eva":
        return _timm_eva_kwargs(m)
    pool = getattr(m, "attn_pool", None)
    if pool is not None and type(pool).__name__ != "AttentionPoolLatent":
        _unsupported(f"global_pool={m.global_pool!r} ({type(pool).__name__})")
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
    act = _timm_act(mlp.act)
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
    pool_args = _timm_attn_pool_kwargs(m, attn.num_heads, mlp.fc1.out_features, act, norm1.eps)
    head = m.head
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
        head_bias=not isinstance(head, nn.Linear) or head.bias is not None, **pool_args,
    )


def _timm_beit_kwargs(m: nn.Module) -> dict:
    """VisionTransformer keyword arguments of a timm ``Beit`` (beit_* / beitv2_*): one class token,
    absolute position embedding on or off, relative position bias per block and / or shared,
    q / v biases (fused into ``qkv.bias`` at conversion), LayerScale ``gamma_1`` / ``gamma_2``,
    mean pooling + ``fc_norm`` (or the class token + ``norm``). SwiGLU / scaled MLPs and a head
    dim other than embed_dim / num_heads raise a ValueError naming them."""
    blk = m.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    dim = m.embed_dim
    if type(mlp).__name__ != "Mlp" or not hasattr(mlp, "fc1"):
        _unsupported(f"BEiT swiglu_mlp=True ({type(mlp).__name__})")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        _unsupported("BEiT scale_mlp=True (a LayerNorm inside the MLP)")
    if attn.qkv.out_features != 3 * dim:
        _unsupported(f"BEiT attn_head_dim={attn.qkv.out_features // 3 // attn.num_heads} (not embed_dim / "
                     f"num_heads = {dim // attn.num_heads})")
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        _unsupported(f"norm layer {type(norm1).__name__}")
    act = _timm_act(mlp.act)
    pe = m.patch_embed
    if getattr(pe, "norm", None) is not None and not isinstance(pe.norm, nn.Identity):
        _unsupported("patch_embed norm")
    use_fc_norm = isinstance(m.fc_norm, nn.LayerNorm)
    head = m.head
    return dict(
        img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels, num_classes=m.num_classes,
        global_pool=m.global_pool, embed_dim=dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=_mlp_ratio(dim, mlp.fc1.out_features), qkv_bias=attn.q_bias is not None,
        proj_bias=attn.proj.bias is not None, init_values=1.0 if blk.gamma_1 is not None else None,
        class_token=True, pos_embed="none" if m.pos_embed is None else "learn",
        final_norm=isinstance(m.norm, nn.LayerNorm) or use_fc_norm, fc_norm=use_fc_norm,
        dynamic_img_pad=getattr(pe, "dynamic_img_pad", False), act=act, norm_eps=norm1.eps,
        use_rel_pos_bias=attn.relative_position_bias_table is not None,
        use_shared_rel_pos_bias=m.rel_pos_bias is not None,
        head_bias=not isinstance(head, nn.Linear) or head.bias is not None,
    )


def _timm_eva_kwargs(m: nn.Module) -> dict:
    """VisionTransformer keyword arguments of a timm ``Eva`` (EVA-02, DINOv3, timm / naver RoPE
    ViTs): RoPE ('cat', 'mixed', 'dinov3'), q / v or separate q / k / v projections (fused into
    ``qkv`` at conversion), SwiGLU (packed or split), sub-LN (``scale_mlp``), ``scale_attn_inner``,
    LayerScale, register tokens, no absolute position embedding.

    What fastvit does not build raises a ValueError naming it: post-norm blocks, q / k norm, gated
    attention, grouped-query attention, a head dim other than embed_dim / num_heads, LayerScale on
    the attention only, RMSNorm, MRoPE / pixel-frequency RoPE, the MAP head, fc_norm with a final norm.
    """
    dim = m.embed_dim
    for i, blk in enumerate(m.blocks):
        name = type(blk).__name__
        if name == "EvaBlockPostNorm":
            _unsupported("Eva use_post_norm=True (post-norm blocks, EvaBlockPostNorm)")
        if name != "EvaBlock":
            _unsupported(f"Eva block type {name}")
        attn = blk.attn
        H = attn.num_heads
        if getattr(attn, "num_kv_heads", H) != H:
            _unsupported(f"Eva grouped-query attention (num_kv_heads={attn.num_kv_heads} of {H} heads, block {i})")
        if getattr(attn, "gate", None) is not None:
            _unsupported("Eva gated attention (gated_attn=True: a sigmoid gate on the attention output)")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
            _unsupported("Eva qk_norm=True (q / k normalised per head before the attention)")
        if attn.head_dim * H != dim:
            _unsupported(f"Eva attn_head_dim={attn.head_dim} (not embed_dim / num_heads = {dim // H})")
        if (blk.gamma_1 is None) != (blk.gamma_2 is None):
            _unsupported("Eva attn_only_layer_scale=True (LayerScale on the attention branch only)")
    blk = m.blocks[0]
    attn, mlp = blk.attn, blk.mlp
    norm1 = blk.norm1
    if not isinstance(norm1, nn.LayerNorm):
        _unsupported(f"Eva norm layer {type(norm1).__name__} (LayerNorm only)")
    eps = norm1.eps
    inner = attn.norm
    if not isinstance(inner, nn.Identity) and not (isinstance(inner, nn.LayerNorm) and inner.eps == eps):
        _unsupported(f"Eva scale_attn_inner with {inner} (a LayerNorm(eps={eps}) expected)")
    qkv = attn.qkv if attn.qkv is not None else attn.q_proj
    qkv_bias = getattr(attn, "q_bias", None) is not None or qkv.bias is not None
    act, hidden, mlp_norm = _timm_eva_mlp(mlp, eps)
    rope = _timm_eva_rope_kwargs(m, attn)
    pe = m.patch_embed
    if getattr(pe, "norm", None) is not None and not isinstance(pe.norm, nn.Identity):
        _unsupported("patch_embed norm")
    if getattr(m, "attn_pool", None) is not None:
        _unsupported("Eva global_pool='map' (attention-pool head)")
    use_fc_norm = isinstance(m.fc_norm, nn.LayerNorm)
    post_norm = isinstance(m.norm, nn.LayerNorm)
    if use_fc_norm and post_norm:
        _unsupported("Eva with both a final norm and fc_norm (use_post_transformer_norm and use_fc_norm)")
    for n, what in ((m.norm, "norm"), (m.fc_norm, "fc_norm"), (m.norm_pre, "norm_pre")):
        if not isinstance(n, nn.Identity) and not (isinstance(n, nn.LayerNorm) and n.eps == eps):
            _unsupported(f"Eva {what} {n} (a LayerNorm(eps={eps}) expected)")
    head = m.head
    return dict(
        img_size=pe.img_size, patch_size=pe.patch_size, in_chans=pe.proj.in_channels, num_classes=m.num_classes,
        global_pool=m.global_pool, embed_dim=dim, depth=len(m.blocks), num_heads=attn.num_heads,
        mlp_ratio=_mlp_ratio(dim, hidden), qkv_bias=qkv_bias, proj_bias=attn.proj.bias is not None,
        init_values=1.0 if blk.gamma_1 is not None else None,  # the values come with the weights
        class_token=m.cls_token is not None, pos_embed="none" if m.pos_embed is None else "learn",
        no_embed_class=m.no_embed_class, reg_tokens=m.reg_token.shape[1] if m.reg_token is not None else 0,
        pre_norm=isinstance(m.norm_pre, nn.LayerNorm), final_norm=post_norm or use_fc_norm, fc_norm=use_fc_norm,
        dynamic_img_size=m.dynamic_img_size, dynamic_img_pad=getattr(pe, "dynamic_img_pad", False), act=act,
        norm_eps=eps, scale_mlp=mlp_norm, scale_attn_inner=isinstance(inner, nn.LayerNorm),
        head_bias=not isinstance(head, nn.Linear) or head.bias is not None, **rope,
    )


def _timm_eva_mlp(mlp: nn.Module, eps: float) -> Tuple[str, int, bool]:
    """(act, hidden width, sub-LN) of an Eva block's MLP: timm ``Mlp``, ``GluMlp`` (SwiGLU packed,
    gate first) or ``SwiGLU`` (fc1_g / fc1_x)."""
    name = type(mlp).__name__
    if name == "Mlp":
        act, hidden, fc1 = _timm_act(mlp.act), mlp.fc1.out_features, mlp.fc1
    elif name in ("GluMlp", "SwiGLU"):
        if not isinstance(mlp.act, nn.SiLU):
            _unsupported(f"Eva gated MLP with {type(mlp.act).__name__} (SwiGLU: SiLU)")
        if name == "GluMlp" and (mlp.gate_last or getattr(mlp, "chunk_dim", -1) != -1):
            _unsupported("Eva GluMlp(gate_last=True) (gate in the second half)")
        fc1 = mlp.fc1 if name == "GluMlp" else mlp.fc1_g
        act, hidden = "swiglu", fc1.out_features // (2 if name == "GluMlp" else 1)
    else:
        _unsupported(f"Eva MLP {name}")
    if (fc1.bias is None) != (mlp.fc2.bias is None):
        _unsupported("Eva MLP with a bias on only one of fc1 / fc2")
    norm = mlp.norm
    if not isinstance(norm, nn.Identity) and not (isinstance(norm, nn.LayerNorm) and norm.eps == eps):
        _unsupported(f"Eva scale_mlp with {norm} (a LayerNorm(eps={eps}) expected)")
    return act, hidden, isinstance(norm, nn.LayerNorm)


def _timm_eva_rope_kwargs(m: nn.Module, attn: nn.Module) -> dict:
    """The RoPE arguments of timm ``Eva`` ``m`` ({} without RoPE); other RoPE kinds raise."""
    rope = m.rope
    if rope is None:
        return {}
    name = type(rope).__name__
    half = bool(getattr(attn, "rotate_half", False))
    head_dim = m.embed_dim // attn.num_heads
    if name == "RotaryEmbeddingCat":
        if rope.in_pixels or rope.grid_type != "index":
            _unsupported(f"Eva RoPE with pixel frequencies (in_pixels=True, grid_type={rope.grid_type!r})")
        if rope.dim != head_dim or rope.rotate_half != half:
            _unsupported(f"Eva RoPE of dim {rope.dim} / rotate_half={rope.rotate_half} (attention: head dim "
                         f"{head_dim}, rotate_half={half})")
        return dict(rope_type="cat", rope_temperature=float(rope.temperature), rope_grid_indexing=rope.grid_indexing,
                    rope_grid_offset=float(rope.grid_offset), rope_rotate_half=half,
                    ref_feat_shape=None if rope.ref_feat_shape is None else tuple(rope.ref_feat_shape))
    if name == "RotaryEmbeddingMixed":
        if half or rope.depth != len(m.blocks) or rope.num_heads != attn.num_heads:
            _unsupported("Eva mixed RoPE with rotate_half or a depth / heads other than the model's")
        return dict(rope_type="mixed", rope_temperature=float(rope.temperature), rope_grid_indexing=rope.grid_indexing)
    if name == "RotaryEmbeddingDinoV3":
        if rope.dim != head_dim or not rope.rotate_half or not half:
            _unsupported("Eva DINOv3 RoPE without rotate_half or of another head dim")
        if rope.min_period is not None and rope.max_period is not None:
            _unsupported("Eva DINOv3 RoPE with min_period / max_period (fastvit builds the temperature schedule)")
        if rope.normalize_coords != "separate":
            _unsupported(f"Eva DINOv3 RoPE normalize_coords={rope.normalize_coords!r}")
        return dict(rope_type="dinov3", rope_temperature=float(rope.temperature),
                    rope_grid_indexing=rope.grid_indexing, rope_grid_offset=float(rope.grid_offset),
                    rope_rotate_half=True)
    _unsupported(f"Eva RoPE {name} (rope_type 'mrope' / 'base')")


def _timm_act(act_mod: nn.Module) -> str:
    """fastvit's name of a timm MLP activation module (a ValueError naming any other)."""
    name = type(act_mod).__name__
    if isinstance(act_mod, nn.GELU):
        act = "gelu_tanh" if act_mod.approximate == "tanh" else "gelu"
    elif name in ("GELUTanh", "GELU"):
        act = "gelu_tanh" if name == "GELUTanh" else "gelu"
    elif name == "QuickGELU":  # OpenAI CLIP (timm's *_clip_quickgelu_* models)
        act = "quick_gelu"
    else:
        _unsupported(f"activation {name}")
    if act not in ACTIVATIONS:
        _unsupported(f"activation {name} ({act!r} is not in fastvit.facts.ACTIVATIONS {ACTIVATIONS})")
    return act


def _timm_attn_pool_kwargs(m: nn.Module, num_heads: int, mlp_hidden: int, act: str, eps: float) -> dict:
    """The MAP-head arguments of timm model ``m`` ({} without one); a ValueError names any
    AttentionPoolLatent setting fastvit's :class:`~fastvit.model.AttentionPoolLatent` lacks."""
    pool = getattr(m, "attn_pool", None)
    if pool is None:
        return {}
    what = "global_pool='map' with"
    if getattr(pool, "pos_embed", None) is not None:
        _unsupported(f"{what} an attention-pool position embedding (pos_embed='abs')")
    if not isinstance(pool.q, nn.Linear):
        _unsupported(f"{what} q_proj=False (latent used as the query)")
    dim = m.embed_dim
    if pool.latent.shape[-1] != dim or pool.q.out_features != dim or pool.kv.in_features != dim:
        _unsupported(f"{what} latent_dim / embed_dim != the model width {dim}")
    for name in ("q_norm", "k_norm"):
        if not isinstance(getattr(pool, name, nn.Identity()), nn.Identity):
            _unsupported(f"{what} qk_norm ({name})")
    if pool.mlp is None or not isinstance(pool.proj, nn.Linear):
        _unsupported(f"{what} out_features=0 (no proj / norm / mlp)")
    if not isinstance(pool.norm, nn.LayerNorm) or pool.norm.eps != eps:
        _unsupported(f"{what} a norm other than the blocks' LayerNorm(eps={eps}): {pool.norm}")
    if pool.num_heads != num_heads:
        _unsupported(f"{what} {pool.num_heads} heads (blocks have {num_heads})")
    if pool.mlp.fc1.out_features != mlp_hidden or _timm_act(pool.mlp.act) != act:
        _unsupported(f"{what} an MLP other than the blocks' (hidden {mlp_hidden}, {act})")
    if pool.q.bias is None or pool.kv.bias is None or pool.proj.bias is None:
        _unsupported(f"{what} qkv_bias=False")
    if pool.pool not in ("token", "avg", ""):
        _unsupported(f"{what} pool_type={pool.pool!r}")
    return dict(attn_pool_latent_len=pool.latent_len, attn_pool_type=pool.pool)


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
    # CLIP / SigLIP encoder layers
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "attn.proj",
    "layer_norm1": "norm1", "layer_norm2": "norm2",
}

# CLIP / SigLIP vision towers (model_type -> family); 'clip' and 'siglip' are two-tower models
# whose vision_config describes the tower and whose text-tower keys are dropped by name.
_HF_TOWERS = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
_HF_TWO_TOWER_DROP = re.compile(r"^(text_model\.|text_projection\.|logit_scale$|logit_bias$)")
_HF_TOWER_TOP = {
    "embeddings.class_embedding": "cls_token",  # (D,) -> (1, 1, D)
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.position_embedding.weight": "pos_embed",  # (N, D) -> (1, N, D)
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "visual_projection.weight": "head.weight",
    # SigLIP's MAP head (in_proj_weight / in_proj_bias are split into q and kv below)
    "head.probe": "attn_pool.latent",
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
# HF CLIP applies post_layernorm to the pooled class token only (timm's fc_norm), SigLIP to every token
_HF_POST_NORM = {"clip": "fc_norm", "siglip": "norm"}
# constructor defaults of CLIPVisionConfig / SiglipVisionConfig, for config.json files that omit them
_HF_TOWER_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 projection_dim=512),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                   vision_use_head=True),
}
_HF_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
            "quick_gelu": "quick_gelu"}


# key starts no timm checkpoint has ('model.' is left out: training checkpoints use it too)
_HF_MARKERS = ("embeddings.", "encoder.", "vit.", "deit.", "dinov2.", "dinov2_with_registers.", "vision_model.",
               "beit.")


def is_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether keys carry Hugging Face names (``vit.embeddings...``, ``encoder.layer...``), not timm's."""
    return any(k.startswith(_HF_MARKERS) for k in state_dict)


def convert_hf_state_dict(sd: Mapping[str, torch.Tensor], config) -> Dict[str, torch.Tensor]:
    """Hugging Face ViT / DeiT / DINOv2 / CLIP / SigLIP state dict -> timm / fastvit names.

    Per layer the query, key and value (D, D) weights and (D,) biases become ``attn.qkv`` (3D, D)
    and (3D,). CLIP / SigLIP vision towers (``CLIPVisionModel(WithProjection)``,
    ``SiglipVisionModel``, or the vision half of ``CLIPModel`` / ``SiglipModel``, whose text-tower
    keys are dropped) map to timm's names: ``visual_projection`` -> ``head``, SigLIP's MAP head
    ``head.*`` -> ``attn_pool.*`` with ``in_proj`` (3D, D) split into ``q`` (D, D) and ``kv`` (2D, D).
    Raises :class:`~fastvit.checkpoint.CheckpointError` listing every key it does not know.
    """
    if _get(config, "model_type", "") in ("siglip2", "siglip2_vision_model"):
        raise ValueError("config: a Siglip2 (NaFlex) state dict is converted by "
                         "fastvit.convert_naflex.convert_hf_siglip2_state_dict (fastvit.from_hf calls it)")
    if _get(config, "model_type", "") == "beit":
        return _convert_hf_beit(sd)
    if _get(config, "model_type", "") == "dinov3_vit":
        return _convert_hf_dinov3(sd)
    family = _HF_TOWERS.get(_get(config, "model_type", ""))
    two_tower = _get(config, "model_type", "") in ("clip", "siglip")
    top = dict(_HF_TOWER_TOP, **{f"post_layernorm.{w}": f"{_HF_POST_NORM[family]}.{w}" for w in ("weight", "bias")}) \
        if family else _HF_TOP
    prefixes = ("vision_model.",) if family else _HF_PREFIXES
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[int, str, str], torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        k = key
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        if family:
            if (two_tower and _HF_TWO_TOWER_DROP.match(key)) or k == "embeddings.position_ids":
                continue  # the text tower; a non-persistent buffer older checkpoints saved
            if k in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
                leaf = "weight" if k.endswith("weight") else "bias"
                D = t.shape[0] // 3
                out[f"attn_pool.q.{leaf}"], out[f"attn_pool.kv.{leaf}"] = t[:D], t[D:]
                continue
            if k == "embeddings.class_embedding":
                out["cls_token"] = t.reshape(1, 1, -1)
                continue
            if k == "embeddings.position_embedding.weight":
                out["pos_embed"] = t.unsqueeze(0)
                continue
        elif _HF_DROP.match(k):
            continue
        if k in top:
            out[top[k]] = t
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


# Hugging Face BEiT (transformers >= 5 names, then the older ones) -> fastvit
_HF_BEIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight", "pooler.layernorm.bias": "fc_norm.bias",  # use_mean_pooling
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
}
_HF_BEIT_BLOCK = {
    "attention.q_proj": "q", "attention.attention.query": "q",
    "attention.k_proj": "k", "attention.attention.key": "k",
    "attention.v_proj": "v", "attention.attention.value": "v",
    "attention.o_proj": "attn.proj", "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1",
    "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
    "relative_position_bias": "attn.rel_pos_bias", "attention.attention.relative_position_bias": "attn.rel_pos_bias",
}
_HF_BEIT_DROP = re.compile(r"^(embeddings\.mask_token|.*relative_position_index)$")


def _convert_hf_beit(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face ``BeitModel`` / ``BeitForImageClassification`` state dict -> fastvit names.

    Per layer q / k / v become ``attn.qkv`` (the key has no bias: zeros fill its third of
    ``qkv.bias``), ``lambda_1`` / ``lambda_2`` the LayerScale gammas, the layer's relative position
    table ``attn.rel_pos_bias``; the shared table is ``rel_pos_bias``; the mean-pooling pooler's
    LayerNorm is ``fc_norm``, ``layernorm`` (class-token pooling) ``norm``. The mask token and index
    buffers are dropped; any other key raises a :class:`~fastvit.checkpoint.CheckpointError`.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[int, str, str], torch.Tensor] = {}
    unknown = []
    for key, t in sd.items():
        k = key[len("beit."):] if key.startswith("beit.") else key
        if _HF_BEIT_DROP.match(k):
            continue
        if k in _HF_BEIT_TOP:
            out[_HF_BEIT_TOP[k]] = t
            continue
        m = _HF_LAYER.match(k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest in ("lambda_1", "lambda_2"):
                out[f"blocks.{i}.ls{rest[-1]}.gamma"] = t
                continue
            part, _, leaf = rest.rpartition(".")
            new = _HF_BEIT_BLOCK.get(part)
            if new in ("q", "k", "v"):
                qkv[(i, new, leaf)] = t
                continue
            if new is not None:
                out[f"blocks.{i}.{new}.{leaf}"] = t
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"state_dict: unexpected Hugging Face BEiT keys ({len(unknown)}): {sorted(unknown)}")
    for i, leaf in sorted({(i, leaf) for (i, _, leaf) in qkv}):
        q, k, v = (qkv.get((i, n, leaf)) for n in ("q", "k", "v"))
        if leaf == "bias" and k is None and q is not None:
            k = torch.zeros_like(q)  # BEiT's key projection has no bias
        if q is None or k is None or v is None:
            raise CheckpointError(f"state_dict: layer {i} has an incomplete query/key/value {leaf}")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([q, k, v], 0)
    return out


# BeitConfig's constructor defaults, for config.json files that omit them
_HF_BEIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                         hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                         use_absolute_position_embeddings=False, use_relative_position_bias=False,
                         use_shared_relative_position_bias=False, layer_scale_init_value=0.1, use_mean_pooling=True)
# what the other BEiT classes add on top of the encoder, for the refusals
_HF_BEIT_REFUSED = {
    "BeitForMaskedImageModeling": "a masked-image-modelling head (lm_head over visual tokens, mask token)",
    "BeitForSemanticSegmentation": "a UperNet / FCN segmentation decoder over multi-level features",
    "BeitBackbone": "multi-level feature maps through an FPN neck (out_indices)",
}


def _hf_beit_kwargs(config, arch: str) -> dict:
    """Keyword arguments of a Hugging Face ``BeitModel`` / ``BeitForImageClassification`` (see
    :func:`hf_config_to_kwargs`). HF BEiT runs at any image size (the position embedding bicubic
    without antialias, the relative position tables resized bilinearly, as HF does)."""
    base = arch.split(".")[-1]
    if base in _HF_BEIT_REFUSED:
        raise ValueError(f"config: {base} ({_HF_BEIT_REFUSED[base]}) is not supported; load the encoder as "
                         "BeitModel (or BeitForImageClassification)")
    if base and base not in ("BeitModel", "BeitForImageClassification"):
        raise ValueError(f"config: expected a BeitModel or BeitForImageClassification for model_type 'beit', "
                         f"got {base!r}")

    def get(name):
        v = _get(config, name)
        return _HF_BEIT_DEFAULTS[name] if v is None else v

    hidden_act = get("hidden_act")
    acts = {k: v for k, v in _HF_ACTS.items() if k != "quick_gelu"}
    if hidden_act not in acts:
        raise ValueError(f"config: hidden_act expected one of {sorted(acts)}, got {hidden_act!r}")
    dim = get("hidden_size")
    mean = bool(get("use_mean_pooling"))
    classify = base == "BeitForImageClassification"
    return dict(
        img_size=get("image_size"), patch_size=get("patch_size"), in_chans=get("num_channels"), embed_dim=dim,
        depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        mlp_ratio=_mlp_ratio(dim, get("intermediate_size")), qkv_bias=True, act=acts[hidden_act],
        norm_eps=get("layer_norm_eps"), pos_embed="learn" if get("use_absolute_position_embeddings") else "none",
        pos_embed_antialias=False, init_values=1.0 if get("layer_scale_init_value") > 0 else None,
        use_rel_pos_bias=bool(get("use_relative_position_bias")),
        use_shared_rel_pos_bias=bool(get("use_shared_relative_position_bias")), rel_pos_resize="bilinear",
        dynamic_img_size=True, global_pool="avg" if mean else "token", fc_norm=mean,
        num_classes=len(_get(config, "id2label", {}) or {}) if classify else 0,
    )


# Hugging Face DINOv3ViTModel -> fastvit
_HF_DINOV3_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
}
_HF_DINOV3_BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attention.o_proj": "attn.proj",
    "mlp.down_proj": "mlp.fc2", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_HF_DINOV3_LAYER = re.compile(r"^(?:model\.)?layer\.(\d+)\.(.+)$")  # saved folders drop 'model.'


def _convert_hf_dinov3(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Hugging Face ``DINOv3ViTModel`` state dict -> fastvit names.

    Per layer ``attention.q_proj`` / ``k_proj`` / ``v_proj`` become ``attn.qkv`` (a projection
    without bias, HF's default ``key_bias=False``, gives zeros in ``qkv.bias``); the MLP's
    ``up_proj`` is ``mlp.fc1``, or with the gated MLP ``gate_proj`` over ``up_proj`` (gate rows
    first, fastvit's 'swiglu'); ``layer_scale{1,2}.lambda1`` the LayerScale gammas. The mask token
    (pretraining only) is dropped; any other unknown key raises a
    :class:`~fastvit.checkpoint.CheckpointError`.
    """
    out: Dict[str, torch.Tensor] = {}
    parts: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in sd.items():
        if key == "embeddings.mask_token" or (key == "embeddings.register_tokens" and t.shape[1] == 0):
            continue  # the mask token is for pretraining; a (1, 0, D) register tensor holds nothing
        if key in _HF_DINOV3_TOP:
            out[_HF_DINOV3_TOP[key]] = t
            continue
        m = _HF_DINOV3_LAYER.match(key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            part, _, leaf = rest.rpartition(".")
            if rest in _HF_DINOV3_BLOCK:
                out[f"blocks.{i}.{_HF_DINOV3_BLOCK[rest]}"] = t
                continue
            if part in _HF_DINOV3_BLOCK:
                out[f"blocks.{i}.{_HF_DINOV3_BLOCK[part]}.{leaf}"] = t
                continue
            if part in ("attention.q_proj", "attention.k_proj", "attention.v_proj"):
                parts.setdefault((f"blocks.{i}.attn.qkv", leaf), {})[part[10]] = t
                continue
            if part in ("mlp.gate_proj", "mlp.up_proj"):
                parts.setdefault((f"blocks.{i}.mlp.fc1", leaf), {})[part[4]] = t
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"state_dict: unexpected Hugging Face DINOv3 keys ({len(unknown)}): {sorted(unknown)}")
    for (name, leaf), p in sorted(parts.items()):
        order = "qkv" if name.endswith("qkv") else ("gu" if "g" in p else "u")
        if leaf == "bias" and order == "qkv" and any(c in p for c in order):
            ref = next(p[c] for c in order if c in p)
            p = {c: p.get(c, torch.zeros_like(ref)) for c in order}  # projections without bias add zeros
        if any(c not in p for c in order):
            raise CheckpointError(f"state_dict: {name} has the {leaf} of {sorted(p)} only, expected {list(order)}")
        out[f"{name}.{leaf}"] = torch.cat([p[c] for c in order], 0)
    return out


# DINOv3ViTConfig's constructor defaults, for config.json files that omit them
_HF_DINOV3_DEFAULTS = dict(patch_size=16, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                           num_attention_heads=6, hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0,
                           image_size=224, num_channels=3, query_bias=True, key_bias=False, value_bias=True,
                           proj_bias=True, mlp_bias=True, use_gated_mlp=False, num_register_tokens=0)


def _hf_dinov3_kwargs(config, arch: str) -> dict:
    """Keyword arguments of a Hugging Face ``DINOv3ViTModel``: class + register tokens, no position
    embedding, DINOv3 RoPE computed as HF rounds it (any image size), LayerScale, q / k / v
    biases as configured (fused into ``qkv``), GELU MLP or the gated one (SwiGLU), final norm,
    pooled output = the normalised class token."""
    base = arch.split(".")[-1]
    if base and base != "DINOv3ViTModel":
        raise ValueError(f"config: {base} is not supported for model_type 'dinov3_vit'; load the encoder as "
                         "DINOv3ViTModel (DINOv3ViTBackbone's multi-level feature maps are not built)")

    def get(name):
        v = _get(config, name)
        return _HF_DINOV3_DEFAULTS[name] if v is None else v

    hidden_act, gated = get("hidden_act"), bool(get("use_gated_mlp"))
    if gated and hidden_act != "silu":
        raise ValueError(f"config: use_gated_mlp with hidden_act={hidden_act!r} is not supported (SwiGLU: 'silu')")
    acts = {k: v for k, v in _HF_ACTS.items() if k != "quick_gelu"}
    if not gated and hidden_act not in acts:
        raise ValueError(f"config: hidden_act expected one of {sorted(acts)} (or 'silu' with use_gated_mlp), "
                         f"got {hidden_act!r}")
    if bool(get("mlp_bias")) != bool(get("proj_bias")):
        raise ValueError(f"config: mlp_bias={get('mlp_bias')} with proj_bias={get('proj_bias')} is not supported "
                         "(fastvit's blocks bias the MLP and the output projection alike)")
    dim = get("hidden_size")
    return dict(
        img_size=get("image_size"), patch_size=get("patch_size"), in_chans=get("num_channels"), embed_dim=dim,
        depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        mlp_ratio=_mlp_ratio(dim, get("intermediate_size")),
        qkv_bias=bool(get("query_bias") or get("key_bias") or get("value_bias")), proj_bias=bool(get("proj_bias")),
        act="swiglu" if gated else acts[hidden_act], norm_eps=get("layer_norm_eps"), init_values=1.0,
        class_token=True, reg_tokens=int(get("num_register_tokens")), pos_embed="none", dynamic_img_size=True,
        global_pool="token", fc_norm=False, num_classes=0, rope_type="dinov3",
        rope_temperature=float(get("rope_theta")), rope_hf=True,
    )


def _get(config, name, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def hf_config_to_kwargs(config, arch: Optional[str] = None) -> dict:
    """transformers config (object or config.json dict) -> VisionTransformer keyword arguments.

    ``arch`` is the transformers class name (``ViTModel``, ``DeiTForImageClassificationWithTeacher``
    ...); default the config's first ``architectures`` entry.
    """
    model_type = _get(config, "model_type", "vit")
    arch = arch or (_get(config, "architectures") or [""])[0]
    if model_type in ("siglip2", "siglip2_vision_model"):
        raise ValueError(f"config: model_type {model_type!r} (Siglip2VisionModel, NaFlex) is described by "
                         "fastvit.convert_naflex.hf_siglip2_kwargs (fastvit.from_hf calls it)")
    if model_type in _HF_TOWERS:
        return _hf_tower_kwargs(config, model_type, arch)
    if model_type == "beit":
        return _hf_beit_kwargs(config, arch)
    if model_type == "dinov3_vit":
        return _hf_dinov3_kwargs(config, arch)
    if model_type not in ("vit", "deit", "dinov2", "dinov2_with_registers"):
        raise ValueError(f"config: expected model_type 'vit', 'deit', 'dinov2', 'dinov2_with_registers', 'beit', "
                         f"{', '.join(map(repr, _HF_TOWERS))}, got {model_type!r}")
    hidden_act = _get(config, "hidden_act", "gelu")
    acts = {k: v for k, v in _HF_ACTS.items() if k != "quick_gelu"}
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


def _hf_tower_kwargs(config, model_type: str, arch: str) -> dict:
    """Keyword arguments of a CLIP / SigLIP vision tower (see :func:`hf_config_to_kwargs`)."""
    family = _HF_TOWERS[model_type]
    if arch.endswith("ForImageClassification"):
        tower = "CLIPVisionModel" if family == "clip" else "SiglipVisionModel"
        raise ValueError(f"config: {arch} (a classifier on mean-pooled patch tokens) is not supported; load the "
                         f"vision tower as {tower}")
    vc = config
    if model_type in ("clip", "siglip"):  # two towers: the vision one is described by vision_config
        vc = _get(config, "vision_config")
        if vc is None:
            raise ValueError(f"config: model_type {model_type!r} without a vision_config")
    defaults = _HF_TOWER_DEFAULTS[family]

    def get(name):
        v = _get(vc, name)
        return defaults[name] if v is None else v

    hidden_act = get("hidden_act")
    if hidden_act not in _HF_ACTS:
        raise ValueError(f"config: hidden_act expected one of {sorted(_HF_ACTS)}, got {hidden_act!r}")
    dim = get("hidden_size")
    kwargs = dict(
        img_size=get("image_size"), patch_size=get("patch_size"), in_chans=get("num_channels"), embed_dim=dim,
        depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        mlp_ratio=_mlp_ratio(dim, get("intermediate_size")), qkv_bias=True, act=_HF_ACTS[hidden_act],
        norm_eps=get("layer_norm_eps"), pos_embed_antialias=False, num_classes=0,
    )
    if family == "clip":
        # pre_layrnorm -> norm_pre (and no patch bias); post_layernorm on the pooled class token -> fc_norm;
        # visual_projection (no bias) -> head
        kwargs.update(pre_norm=True, global_pool="token", fc_norm=True, head_bias=False)
        if arch in ("CLIPVisionModelWithProjection", "CLIPModel"):
            proj = _get(config, "projection_dim") if model_type == "clip" else None
            kwargs["num_classes"] = proj if proj is not None else get("projection_dim")
    else:
        # no class token; post_layernorm on every token -> norm; the MAP head -> attn_pool
        kwargs.update(class_token=False, global_pool="map" if get("vision_use_head") else "")
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
    ap = model.attn_pool
    pool = dict(attn_pool_latent_len=ap.latent_len, attn_pool_type=ap.pool) if ap is not None else {}
    tables = [m for m in model.modules() if isinstance(m, RelativePositionBias)]
    if tables:  # BEiT
        pool.update(use_rel_pos_bias=getattr(blk.attn, "rel_pos_bias", None) is not None,
                    use_shared_rel_pos_bias=model.rel_pos_bias is not None, rel_pos_resize=tables[0].resize)
    return dict(
        img_size=list(pe.img_size), patch_size=list(pe.patch_size), in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=dim, depth=len(model.blocks),
        num_heads=blk.attn.num_heads, mlp_ratio=_mlp_ratio(dim, blk.mlp.fc2.in_features),
        qkv_bias=blk.attn.qkv.bias is not None, proj_bias=blk.attn.proj.bias is not None,
        init_values=1.0 if isinstance(blk.ls1, LayerScale) else None,  # the values come with the weights
        class_token=model.cls_token is not None, pos_embed="none" if model.pos_embed is None else "learn",
        no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens,
        pre_norm=isinstance(model.norm_pre, LayerNorm),
        final_norm=isinstance(model.norm, LayerNorm) or fc_norm, fc_norm=fc_norm,
        dynamic_img_size=model.dynamic_img_size, dynamic_img_pad=pe.dynamic_img_pad, act=blk.mlp.act,
        norm_eps=blk.norm1.eps, distilled=model.distilled, pos_embed_antialias=model.pos_embed_antialias,
        head_bias=model.head_bias, **pool, **_rope_model_kwargs(model),
        **(model.naflex_kwargs() if hasattr(model, "naflex_kwargs") else {}),
    )


def _rope_model_kwargs(model: VisionTransformer) -> dict:
    """The EVA-family arguments of ``model`` (RoPE, sub-LNs); {} for a model without them."""
    blk = model.blocks[0]
    out = {}
    if blk.attn.norm is not None:
        out["scale_attn_inner"] = True
    if blk.mlp.norm is not None:
        out["scale_mlp"] = True
    r = model.rope
    if isinstance(r, RopeCat):
        out.update(rope_type="cat", rope_temperature=r.temperature, rope_grid_indexing=r.grid_indexing,
                   rope_grid_offset=r.grid_offset, rope_rotate_half=r.rotate_half,
                   ref_feat_shape=None if r.ref_feat_shape is None else list(r.ref_feat_shape))
    elif isinstance(r, RopeMixed):
        out.update(rope_type="mixed", rope_temperature=r.temperature, rope_grid_indexing=r.grid_indexing)
    elif isinstance(r, RopeDinoV3):
        if r.min_period is not None or r.normalize_coords != "separate":
            raise ValueError("model: a DINOv3 RoPE with min / max periods or normalize_coords other than "
                             "'separate' cannot be described by constructor arguments")
        out.update(rope_type="dinov3", rope_temperature=r.temperature, rope_grid_indexing=r.grid_indexing,
                   rope_grid_offset=r.grid_offset, rope_hf=r.hf)
    return out

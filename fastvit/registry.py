"""Named model presets: ``model_config(name)``, ``preprocess_config(name)`` and ``list_models()``.

Names follow timm so a timm user finds the same model under the same name (a few carry timm's
pretrained tag, ``vit_base_patch16_clip_224.openai``, where the tag changes the architecture: the
projection width of a CLIP tower). The preset arguments are the architecture only; CLIP, SigLIP
and BEiT presets also name their preprocessing as a timm-style data config. Building a preset with
its weights is :func:`fastvit.factory.create_model`; this table imports no loading code.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, List, Optional

__all__ = ["list_models", "model_config", "preprocess_config", "follows_timm_tags", "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# width, depth, heads for each size
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

_PRESETS: Dict[str, dict] = {}
_PREPROCESS: Dict[str, dict] = {}
# presets whose preprocessing is timm's default tag's: another tag's own pretrained_cfg wins
_TIMM_TAG_DEFAULT = set()


def _add(name: str, preprocess: Optional[dict] = None, **cfg) -> None:
    _PRESETS[name] = cfg
    if preprocess is not None:
        _PREPROCESS[name] = preprocess


_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _vit_pre(img: int, norm: dict, crop_pct: Optional[float] = None) -> dict:
    """timm's pretrained_cfg preprocessing of the plain ViT / DeiT / DINOv2 names' default tags:
    bicubic, crop_pct 0.9 at 224 and 1.0 at larger sizes (augreg / DeiT / DINOv2 tags), the tag's
    mean / std (tests/test_preprocess.py checks every name timm has a cfg for)."""
    crop = crop_pct if crop_pct is not None else (0.9 if img == 224 else 1.0)
    return dict(input_size=(3, img, img), interpolation="bicubic", crop_pct=crop, crop_mode="center", **norm)


for _size in ("tiny", "small", "base", "large"):
    for _patch in (16, 32):
        for _img in (224, 384):
            _add(f"vit_{_size}_patch{_patch}_{_img}", preprocess=_vit_pre(_img, _INCEPTION), img_size=_img,
                 patch_size=_patch, **_SIZES[_size])
for _img in (224, 384):
    _add(f"vit_base_patch8_{_img}", preprocess=_vit_pre(_img, _INCEPTION), img_size=_img, patch_size=8,
         **_SIZES["base"])
    _add(f"vit_large_patch14_{_img}", preprocess=_vit_pre(_img, _INCEPTION), img_size=_img, patch_size=14,
         **_SIZES["large"])
    _add(f"vit_huge_patch14_{_img}", preprocess=_vit_pre(_img, _INCEPTION), img_size=_img, patch_size=14,
         **_SIZES["huge"])
_add("vit_huge_patch16_224", preprocess=_vit_pre(224, _INCEPTION), img_size=224, patch_size=16, **_SIZES["huge"])
_add("vit_small_patch14_224", preprocess=_vit_pre(224, _INCEPTION), img_size=224, patch_size=14, **_SIZES["small"])
_add("vit_base_patch14_224", preprocess=_vit_pre(224, _INCEPTION), img_size=224, patch_size=14, **_SIZES["base"])

for _size in ("tiny", "small", "base"):
    _add(f"deit_{_size}_patch16_224", preprocess=_vit_pre(224, _IMAGENET), img_size=224, patch_size=16,
         **_SIZES[_size])
    _add(f"deit_{_size}_distilled_patch16_224", preprocess=_vit_pre(224, _IMAGENET), img_size=224, patch_size=16,
         distilled=True, **_SIZES[_size])
_add("deit_base_patch16_384", preprocess=_vit_pre(384, _IMAGENET), img_size=384, patch_size=16, **_SIZES["base"])
_add("deit_base_distilled_patch16_384", preprocess=_vit_pre(384, _IMAGENET), img_size=384, patch_size=16,
     distilled=True, **_SIZES["base"])

_TIMM_TAG_DEFAULT.update(_PRESETS)  # every preset so far: plain ViT and DeiT

# DINOv2 (timm names): patch 14 at 518, LayerScale 1e-5, no classifier; the "reg4" variants
# carry 4 register tokens and keep the class token out of the position embedding.
for _size in ("small", "base", "large"):
    _dino = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, **_SIZES[_size])
    _add(f"vit_{_size}_patch14_dinov2", preprocess=_vit_pre(518, _IMAGENET), **_dino)
    _add(f"vit_{_size}_patch14_reg4_dinov2", preprocess=_vit_pre(518, _IMAGENET), reg_tokens=4, no_embed_class=True,
         **_dino)
    _TIMM_TAG_DEFAULT.update({f"vit_{_size}_patch14_dinov2", f"vit_{_size}_patch14_reg4_dinov2"})


# CLIP image towers (timm names): pre-norm, LayerNorm eps 1e-5, the class token pooled and the head
# is the image projection (timm keeps its bias, zero in converted OpenAI / OpenCLIP weights). The
# plain names are timm's defaults (an ImageNet-1k fine-tune: 1000 classes); '.openai' / '.laion2b'
# are the contrastive towers (projection width). OpenAI's weights were trained with QuickGELU: the
# '_quickgelu_' names run it, the plain names run GELU as timm does.
# Preprocessing of the contrastive towers is the original CLIP processor (OpenAI's, and Hugging
# Face's CLIPImageProcessor): bicubic resize of the shortest side to the input size, center crop of
# it, CLIP mean / std. (timm's pretrained_cfg says crop_pct 0.9 for some of them; a timm hub folder
# keeps timm's.)
def _clip_pre(img: int, crop_pct: float = 1.0) -> dict:
    return dict(input_size=(3, img, img), interpolation="bicubic", crop_pct=crop_pct, crop_mode="center",
                mean=CLIP_MEAN, std=CLIP_STD)


# the plain names are timm's ImageNet fine-tunes, evaluated by timm at these crop fractions
_CLIP_FT_CROP = {(32, 224): 0.9, (16, 224): 0.95}


_CLIP_WIDTHS = {"base": 512, "large": 768, "huge": 1024}  # projection width of the contrastive towers
# (size, patch, image size, pretrained tags of contrastive towers)
_CLIP = [("base", 32, 224, ("openai", "laion2b")), ("base", 16, 224, ("openai", "laion2b")), ("base", 16, 384, ()),
         ("large", 14, 224, ("openai", "laion2b")), ("large", 14, 336, ("openai",)), ("huge", 14, 224, ("laion2b",))]
for _size, _patch, _img, _tags in _CLIP:
    _clip = dict(img_size=_img, patch_size=_patch, pre_norm=True, norm_eps=1e-5, **_SIZES[_size])
    _name = f"vit_{_size}_patch{_patch}_clip_{_img}"
    _add(_name, preprocess=_clip_pre(_img, _CLIP_FT_CROP.get((_patch, _img), 1.0)), num_classes=1000, **_clip)
    for _tag in _tags:
        _add(f"{_name}.{_tag}", preprocess=_clip_pre(_img), num_classes=_CLIP_WIDTHS[_size], **_clip)
for _size, _patch, _img in [("base", 32, 224), ("base", 16, 224), ("large", 14, 224), ("large", 14, 336)]:
    _clip = dict(img_size=_img, patch_size=_patch, pre_norm=True, norm_eps=1e-5, act="quick_gelu",
                 num_classes=_CLIP_WIDTHS[_size], **_SIZES[_size])
    _name = f"vit_{_size}_patch{_patch}_clip_quickgelu_{_img}"
    _add(_name, preprocess=_clip_pre(_img), **_clip)
    _add(f"{_name}.openai", preprocess=_clip_pre(_img), **_clip)


# SigLIP image towers (timm names; SigLIP 2 fixed-resolution weights share them): no class token,
# the MAP head (``attn_pool``) pools, no classifier. Activations are timm's per model (GELU, or tanh
# GELU where timm says so). Preprocessing is SigLIP's own (big_vision, Hugging Face's
# SiglipImageProcessor): bicubic resize to the square input size, mean = std = 0.5 (timm's
# pretrained_cfg says a 0.9 center crop; a timm hub folder keeps timm's).
def _siglip_pre(img: int) -> dict:
    return dict(input_size=(3, img, img), interpolation="bicubic", crop_pct=1.0, crop_mode="squash",
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


_SIGLIP_SIZES = dict(_SIZES, so400m=dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362))
_SIGLIP = [("base", 16, 224, "gelu"), ("base", 16, 256, "gelu"), ("base", 16, 384, "gelu"), ("base", 16, 512, "gelu"),
           ("base", 32, 256, "gelu_tanh"), ("large", 16, 256, "gelu"), ("large", 16, 384, "gelu"),
           ("large", 16, 512, "gelu_tanh"), ("so400m", 14, 224, "gelu"), ("so400m", 14, 378, "gelu"),
           ("so400m", 14, 384, "gelu"), ("so400m", 16, 256, "gelu_tanh"), ("so400m", 16, 384, "gelu_tanh"),
           ("so400m", 16, 512, "gelu_tanh")]
for _size, _patch, _img, _act in _SIGLIP:
    _siglip = dict(img_size=_img, patch_size=_patch, class_token=False, num_classes=0, act=_act, **_SIGLIP_SIZES[_size])
    _add(f"vit_{_size}_patch{_patch}_siglip_{_img}", preprocess=_siglip_pre(_img), global_pool="map", **_siglip)
    if (_size, _patch, _img) in (("base", 16, 224), ("so400m", 14, 224)):  # patch-token average instead of MAP
        _add(f"vit_{_size}_patch{_patch}_siglip_gap_{_img}", preprocess=_siglip_pre(_img), global_pool="avg",
             fc_norm=False, **_siglip)


# BEiT / BEiT v2 (timm names): no absolute position embedding, a relative position bias table in
# every block, LayerScale (0.1 for BEiT base, 1e-5 otherwise), mean-pooled patch tokens + fc_norm.
# Preprocessing is timm's pretrained_cfg: bicubic, center crop (0.9 at 224, 1.0 at 384 / 512,
# 0.95 for beitv2_large), mean = std = 0.5 for BEiT, the ImageNet statistics for BEiT v2.
def _beit_pre(img: int, crop_pct: float, v2: bool) -> dict:
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if v2 else ((0.5,) * 3, (0.5,) * 3)
    return dict(input_size=(3, img, img), interpolation="bicubic", crop_pct=crop_pct, crop_mode="center",
                mean=mean, std=std)


_BEIT = [("beit", "base", 224, 0.1, 0.9), ("beit", "base", 384, 0.1, 1.0), ("beit", "large", 224, 1e-5, 0.9),
         ("beit", "large", 384, 1e-5, 1.0), ("beit", "large", 512, 1e-5, 1.0), ("beitv2", "base", 224, 1e-5, 0.9),
         ("beitv2", "large", 224, 1e-5, 0.95)]
for _fam, _size, _img, _init, _crop in _BEIT:
    _add(f"{_fam}_{_size}_patch16_{_img}", preprocess=_beit_pre(_img, _crop, _fam == "beitv2"), img_size=_img,
         patch_size=16, global_pool="avg", pos_embed="none", use_rel_pos_bias=True, init_values=_init,
         **_SIZES[_size])


# The EVA family (timm's Eva class): RoPE in every block, no bias on k (q / v biases fused into
# qkv.bias at loading). Preprocessing is timm's pretrained_cfg of each name's default tag.
_IMNET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _eva_pre(img: int, crop_pct: float, crop_mode: str = "center", mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    return dict(input_size=(3, img, img), interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode,
                mean=tuple(mean), std=tuple(std))


# EVA-02 (MIM pretrained at 224, no classifier; ImageNet fine-tunes at 336 / 448): SwiGLU MLP
# (2/3 of 4x wide, sub-LN from base up), interleaved RoPE over a 16 x 16 reference grid, a learnt
# position embedding, mean pooling + fc_norm. Sizes tiny / small / base / large.
_EVA02_SIZES = dict(tiny=(192, 12, 3), small=(384, 12, 6), base=(768, 12, 12), large=(1024, 24, 16))
for _size, (_dim, _depth, _heads) in _EVA02_SIZES.items():
    _eva = dict(patch_size=14, embed_dim=_dim, depth=_depth, num_heads=_heads, act="swiglu",
                mlp_ratio=2.666015625 if _size == "large" else 4 * 2 / 3, scale_mlp=_size in ("base", "large"),
                global_pool="avg", fc_norm=True, rope_type="cat", ref_feat_shape=(16, 16))
    _add(f"eva02_{_size}_patch14_224", preprocess=_eva_pre(224, 0.9), img_size=224, num_classes=0, **_eva)
    _ft = 336 if _size in ("tiny", "small") else 448
    _add(f"eva02_{_size}_patch14_{_ft}", preprocess=_eva_pre(_ft, 1.0, "center" if _ft == 336 else "squash"),
         img_size=_ft, num_classes=1000, **_eva)

# EVA-02 CLIP image towers (timm's merged2b tags): the EVA-02 block with split q / k / v (fused at
# loading), the attention sub-LN before the projection (scale_attn_inner), class-token pooling and
# a head that projects to the CLIP embedding width.
for _name, _dim, _depth, _heads, _patch, _img, _crop, _embed in [
        ("eva02_base_patch16_clip_224", 768, 12, 12, 16, 224, 0.9, 512),
        ("eva02_large_patch14_clip_224", 1024, 24, 16, 14, 224, 0.9, 768),
        ("eva02_large_patch14_clip_336", 1024, 24, 16, 14, 336, 1.0, 768)]:
    _add(_name, preprocess=_eva_pre(_img, _crop), img_size=_img, num_classes=_embed, patch_size=_patch, embed_dim=_dim,
         depth=_depth, num_heads=_heads, act="swiglu", mlp_ratio=4 * 2 / 3, scale_mlp=True, scale_attn_inner=True,
         global_pool="token", rope_type="cat", ref_feat_shape=(16, 16))

# DINOv3 (timm names): 4 registers, LayerScale, no absolute position embedding, rotate_half RoPE
# on centred coordinates (any image size), LayerNorm eps 1e-5, timm's default pooling (patch
# mean, final norm); "_qkvb" variants carry q / v biases; "plus" sizes a SwiGLU MLP.
_DINOV3 = [("small", 384, 12, 6, 4.0, "gelu", True), ("small_plus", 384, 12, 6, 4.0, "swiglu", True),
           ("base", 768, 12, 12, 4.0, "gelu", True), ("large", 1024, 24, 16, 4.0, "gelu", True),
           ("huge_plus", 1280, 32, 20, 4.0, "swiglu", True), ("7b", 4096, 40, 32, 2.0, "swiglu", False)]
for _size, _dim, _depth, _heads, _ratio, _act, _qkvb in _DINOV3:
    _dino = dict(img_size=256, patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads, mlp_ratio=_ratio,
                 act=_act, init_values=1e-5, reg_tokens=4, pos_embed="none", dynamic_img_size=True,
                 global_pool="avg", fc_norm=False, num_classes=0, norm_eps=1e-5, rope_type="dinov3",
                 rope_temperature=100.0)
    _add(f"vit_{_size}_patch16_dinov3", preprocess=_eva_pre(256, 1.0, **_IMNET), qkv_bias=False, **_dino)
    if _qkvb:
        _add(f"vit_{_size}_patch16_dinov3_qkvb", preprocess=_eva_pre(256, 1.0, **_IMNET), qkv_bias=True, **_dino)

# RoPE-ViT (naver, timm names): class token, no position embedding ('ape': a learnt one beside
# the class token), LayerScale, 'xy' axial RoPE at temperature 100, or 'mixed' learnt per-block
# per-head frequencies (rope.freqs).
for _size in ("small", "base", "large"):
    _rope = dict(img_size=224, patch_size=16, init_values=1e-5, global_pool="token", **_SIZES[_size])
    _axial = dict(rope_type="cat", rope_temperature=100.0, rope_grid_indexing="xy")
    _mixed = dict(rope_type="mixed", rope_temperature=10.0, rope_grid_indexing="xy")
    _add(f"vit_{_size}_patch16_rope_224", preprocess=_eva_pre(224, 0.9, **_IMNET), pos_embed="none", **_axial,
         **_rope)
    _add(f"vit_{_size}_patch16_rope_mixed_224", preprocess=_eva_pre(224, 0.9, **_IMNET), pos_embed="none",
         **_mixed, **_rope)
    if _size != "large":
        _add(f"vit_{_size}_patch16_rope_ape_224", preprocess=_eva_pre(224, 0.9, **_IMNET), no_embed_class=True,
             **_axial, **_rope)
        _add(f"vit_{_size}_patch16_rope_mixed_ape_224", preprocess=_eva_pre(224, 0.9, **_IMNET),
             no_embed_class=True, **_mixed, **_rope)

# timm SBB ViTs with RoPE at 256: register tokens, no class token or position embedding, LayerScale,
# RoPE over a 16 x 16 reference grid, mean pooling + fc_norm.
_HALF = (0.5,) * 3
_SBB = [("medium", 512, 12, 8, 1, True, _HALF, _HALF), ("mediumd", 512, 20, 8, 1, False, _HALF, _HALF),
        ("betwixt", 640, 12, 10, 4, True, CLIP_MEAN, CLIP_STD), ("base", 768, 12, 12, 1, True, _HALF, _HALF)]
for _size, _dim, _depth, _heads, _reg, _bias, _mean, _std in _SBB:
    _add(f"vit_{_size}_patch16_rope_reg{_reg}_gap_256", preprocess=_eva_pre(256, 0.95, mean=_mean, std=_std),
         img_size=256, patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads, qkv_bias=_bias,
         init_values=1e-5, class_token=False, reg_tokens=_reg, pos_embed="none", global_pool="avg", fc_norm=True,
         rope_type="cat", ref_feat_shape=(16, 16))


# NaFlex (timm's naflexvit_* names; fastvit.naflex.NaFlexVisionTransformer, chosen by its
# pos_embed_interp argument): a 16 x 16 learnt position grid resized per image, no position on the
# prefix tokens, any image size, packed batches of mixed sizes. The SigLIP 2 towers (timm's
# v2_webli weights, the same architecture as Hugging Face's Siglip2VisionModel) preprocess as
# Hugging Face's Siglip2ImageProcessor (bilinear, 256 patches); the others as timm's NaFlex eval
# transform (bicubic, 576 patches, mean = std = 0.5). The factorized-position variant
# (naflexvit_base_patch16_parfac_gap) is not built.
def _naflex_pre(hf: bool) -> dict:
    if hf:
        return dict(kind="naflex", patch_size=(16, 16), max_num_patches=256, resample="bilinear", mean=(0.5,) * 3,
                    std=(0.5,) * 3, backend="torch", fuse_rescale=True)
    return dict(kind="naflex", patch_size=(16, 16), max_num_patches=576, resample="bicubic", mean=(0.5,) * 3,
                std=(0.5,) * 3, backend="pil", fuse_rescale=False)


_NAFLEX = dict(img_size=256, patch_size=16, class_token=False, pos_embed_interp="bicubic")
for _name, _extra in [
        ("naflexvit_base_patch16_gap", dict(init_values=1e-5, global_pool="avg", reg_tokens=4, fc_norm=True)),
        ("naflexvit_base_patch16_par_gap", dict(init_values=1e-5, global_pool="avg", reg_tokens=4, fc_norm=True,
                                                pos_embed_ar_preserving=True)),
        ("naflexvit_base_patch16_map", dict(init_values=1e-5, global_pool="map", reg_tokens=1))]:
    _add(_name, preprocess=_naflex_pre(False), num_classes=1000, **dict(_NAFLEX, **_SIZES["base"], **_extra))
for _pool in ("gap", "map"):
    _add(f"naflexvit_so150m2_patch16_reg1_{_pool}", preprocess=_naflex_pre(False), num_classes=1000,
         **dict(_NAFLEX, embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, init_values=1e-5, qkv_bias=False,
                reg_tokens=1, **(dict(global_pool="avg", fc_norm=True) if _pool == "gap" else dict(global_pool="map"))))
for _size, _dims in (("base", _SIZES["base"]), ("so400m", _SIGLIP_SIZES["so400m"])):
    _add(f"naflexvit_{_size}_patch16_siglip", preprocess=_naflex_pre(True), num_classes=0,
         **dict(_NAFLEX, **_dims, act="gelu_tanh", global_pool="map", pos_embed_interp="bilinear"))


def model_config(name: str) -> dict:
    """The constructor arguments of preset ``name`` (a copy)."""
    if name not in _PRESETS:
        close = fnmatch.filter(_PRESETS, f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"name: expected one of fastvit.list_models() (e.g. {close or list(_PRESETS)[:5]}), "
                         f"got {name!r}")
    return dict(_PRESETS[name])


def preprocess_config(name: str) -> Optional[dict]:
    """The preprocessing of preset ``name`` as a timm data config (``input_size``, ``interpolation``,
    ``crop_pct``, ``crop_mode``, ``mean``, ``std``; for :meth:`fastvit.preprocess.Preprocessor.from_timm`),
    every preset names one (plain ViT / DeiT / DINOv2: the default tag's timm ``pretrained_cfg``)."""
    model_config(name)  # the same error for an unknown name
    cfg = _PREPROCESS.get(name)
    return None if cfg is None else dict(cfg)


def follows_timm_tags(name: str) -> bool:
    """Whether preset ``name``'s preprocessing is timm's default tag's (plain ViT / DeiT / DINOv2),
    so that a tagged name (``vit_base_patch16_224.augreg_in1k``) takes its own tag's pretrained_cfg
    instead; the CLIP / SigLIP / EVA / BEiT presets name their processor whatever the tag."""
    model_config(name)
    return name in _TIMM_TAG_DEFAULT


def list_models(pattern: str = "*") -> List[str]:
    """Preset names matching the shell-style ``pattern``, sorted."""
    return sorted(fnmatch.filter(_PRESETS, pattern))

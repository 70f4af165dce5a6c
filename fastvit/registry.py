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

__all__ = ["list_models", "model_config", "preprocess_config", "CLIP_MEAN", "CLIP_STD"]

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


def _add(name: str, preprocess: Optional[dict] = None, **cfg) -> None:
    _PRESETS[name] = cfg
    if preprocess is not None:
        _PREPROCESS[name] = preprocess


for _size in ("tiny", "small", "base", "large"):
    for _patch in (16, 32):
        for _img in (224, 384):
            _add(f"vit_{_size}_patch{_patch}_{_img}", img_size=_img, patch_size=_patch, **_SIZES[_size])
for _img in (224, 384):
    _add(f"vit_base_patch8_{_img}", img_size=_img, patch_size=8, **_SIZES["base"])
    _add(f"vit_large_patch14_{_img}", img_size=_img, patch_size=14, **_SIZES["large"])
    _add(f"vit_huge_patch14_{_img}", img_size=_img, patch_size=14, **_SIZES["huge"])
_add("vit_huge_patch16_224", img_size=224, patch_size=16, **_SIZES["huge"])
_add("vit_small_patch14_224", img_size=224, patch_size=14, **_SIZES["small"])
_add("vit_base_patch14_224", img_size=224, patch_size=14, **_SIZES["base"])

for _size in ("tiny", "small", "base"):
    _add(f"deit_{_size}_patch16_224", img_size=224, patch_size=16, **_SIZES[_size])
    _add(f"deit_{_size}_distilled_patch16_224", img_size=224, patch_size=16, distilled=True, **_SIZES[_size])
_add("deit_base_patch16_384", img_size=384, patch_size=16, **_SIZES["base"])
_add("deit_base_distilled_patch16_384", img_size=384, patch_size=16, distilled=True, **_SIZES["base"])

# DINOv2 (timm names): patch 14 at 518, LayerScale 1e-5, no classifier; the "reg4" variants
# carry 4 register tokens and keep the class token out of the position embedding.
for _size in ("small", "base", "large"):
    _dino = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, **_SIZES[_size])
    _add(f"vit_{_size}_patch14_dinov2", **_dino)
    _add(f"vit_{_size}_patch14_reg4_dinov2", reg_tokens=4, no_embed_class=True, **_dino)


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
    or None when the preset names none (then timm's ``pretrained_cfg`` or the ViT defaults apply)."""
    model_config(name)  # the same error for an unknown name
    cfg = _PREPROCESS.get(name)
    return None if cfg is None else dict(cfg)


def list_models(pattern: str = "*") -> List[str]:
    """Preset names matching the shell-style ``pattern``, sorted."""
    return sorted(fnmatch.filter(_PRESETS, pattern))

"""Named model presets: ``model_config(name)`` and ``list_models()``.

Names follow timm so a timm user finds the same model under the same name; the preset
arguments are the architecture only. Building a preset with its weights is
:func:`fastvit.factory.create_model`; this table imports no loading code.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, List

__all__ = ["list_models", "model_config"]

# width, depth, heads for each size
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

_PRESETS: Dict[str, dict] = {}


def _add(name: str, **cfg) -> None:
    _PRESETS[name] = cfg


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


def model_config(name: str) -> dict:
    """The constructor arguments of preset ``name`` (a copy)."""
    if name not in _PRESETS:
        close = fnmatch.filter(_PRESETS, f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"name: expected one of fastvit.list_models() (e.g. {close or list(_PRESETS)[:5]}), "
                         f"got {name!r}")
    return dict(_PRESETS[name])


def list_models(pattern: str = "*") -> List[str]:
    """Preset names matching the shell-style ``pattern``, sorted."""
    return sorted(fnmatch.filter(_PRESETS, pattern))

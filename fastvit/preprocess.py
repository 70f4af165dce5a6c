"""Image preprocessing as the checkpoint was trained: resize, center-crop, rescale, normalise.

Two sources of truth exist and they differ in small ways that change pixels, so both are
reproduced exactly rather than approximated:

* timm's eval transform (``timm.data.create_transform(**resolve_data_config(...))``): PIL
  resize of the shortest edge to ``floor(size / crop_pct)``, torchvision ``CenterCrop``
  (offset ``round((h - c) / 2)``), ``x / 255`` then ``(x - mean) / std``.
* Hugging Face image processors (``preprocessor_config.json``; transformers 5 runs them on
  uint8 tensors through torchvision): tensor resize with antialias, crop offset
  ``floor((h - c) / 2)``, and rescale fused into normalisation ``(x - 255 mean) / (255 std)``.

Inputs: PIL images, paths, numpy uint8 arrays (H, W[, C]) and torch uint8 tensors (C, H, W).
Outputs: float32 tensors (B, 3, H, W).
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Preprocessor", "load_image", "load_labels", "topk_predictions", "IMAGENET_MEAN", "IMAGENET_STD",
           "IMAGE_EXTENSIONS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# PIL.Image.Resampling values, as Hugging Face stores them in preprocessor_config.json
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLES = tuple(_PIL_RESAMPLE.values())
_TORCH_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic"}

Size = Union[int, Tuple[int, int]]


def _pair(v, arg: str) -> Tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return int(v[0]), int(v[1])
    raise ValueError(f"{arg}: expected an int or (height, width), got {v!r}")


def _hf_size(d, arg: str) -> Optional[Size]:
    if d is None:
        return None
    if isinstance(d, int):
        return d
    if isinstance(d, Mapping):
        if d.get("height") is not None and d.get("width") is not None:
            return int(d["height"]), int(d["width"])
        if d.get("shortest_edge") is not None and d.get("longest_edge") is None:
            return int(d["shortest_edge"])
    raise ValueError(f"{arg}: expected {{'height', 'width'}} or {{'shortest_edge'}}, got {d!r}")


@dataclass
class Preprocessor:
    """Checkpoint-exact image preprocessing.

    Args:
        size: resize target: an int resizes the shortest edge (the other keeps the aspect
            ratio, ``int(size * long / short)``), (H, W) resizes to exactly that; None keeps the size.
        crop_size: (H, W) center crop after the resize, or None.
        resample: 'bilinear', 'bicubic', 'nearest', 'lanczos', 'box' or 'hamming'.
        mean, std: per-channel normalisation of the [0, 1]-scaled image.
        backend: 'pil' resizes with PIL (timm, torchvision on PIL images); 'torch' resizes uint8
            tensors as torchvision's tensor kernel does (transformers 5 image processors).
        crop_rounding: 'round' (torchvision CenterCrop) or 'floor' (Hugging Face) crop offset.
        fuse_rescale: normalise as ``(x - 255 mean) / (255 std)`` (Hugging Face) instead of
            ``(x / 255 - mean) / std`` (timm); they differ in the last float32 bit.
        rescale_first: rescale to [0, 1] before the resize, which then runs on float32 pixels
            (no rounding to uint8; Hugging Face's DINOv3ViTImageProcessor order); 'torch' backend.
        id2label: class index -> readable label, when the checkpoint has one.
    """

    size: Optional[Size] = None
    crop_size: Optional[Tuple[int, int]] = (224, 224)
    resample: str = "bicubic"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    backend: str = "pil"
    crop_rounding: str = "round"
    fuse_rescale: bool = False
    rescale_factor: float = 1 / 255
    rescale_first: bool = False
    id2label: Optional[Dict[int, str]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.resample not in _RESAMPLES:
            raise ValueError(f"resample: expected one of {_RESAMPLES}, got {self.resample!r}")
        if self.backend not in ("pil", "torch"):
            raise ValueError(f"backend: expected 'pil' or 'torch', got {self.backend!r}")
        if self.backend == "torch" and self.resample not in _TORCH_MODES:
            raise ValueError(f"resample: backend 'torch' supports {tuple(_TORCH_MODES)}, got {self.resample!r}")
        if self.rescale_first and (self.backend != "torch" or self.fuse_rescale):
            raise ValueError("rescale_first: expected backend 'torch' without fuse_rescale (the resize runs on the "
                             "rescaled float image)")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding: expected 'round' or 'floor', got {self.crop_rounding!r}")
        if self.size is not None and not isinstance(self.size, int):
            self.size = _pair(self.size, "size")
        if self.crop_size is not None:
            self.crop_size = _pair(self.crop_size, "crop_size")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean / std: expected 3 values each, got {self.mean} / {self.std}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, config: Union[str, Mapping[str, Any]], id2label=None) -> "Preprocessor":
        """From a Hugging Face ``preprocessor_config.json`` (path, folder or dict)."""
        cfg = _read_json(config, "preprocessor_config.json")
        size = _hf_size(cfg.get("size"), "size") if cfg.get("do_resize", True) else None
        crop = _hf_size(cfg.get("crop_size"), "crop_size") if cfg.get("do_center_crop", False) else None
        if isinstance(crop, int):
            crop = (crop, crop)
        resample = cfg.get("resample", 2)
        resample = _PIL_RESAMPLE[resample] if isinstance(resample, int) else str(resample)
        mean, std = cfg.get("image_mean", (0.5,) * 3), cfg.get("image_std", (0.5,) * 3)
        if not cfg.get("do_normalize", True):
            mean, std = (0.0,) * 3, (1.0,) * 3
        if not cfg.get("do_rescale", True):
            raise ValueError("preprocessor_config: do_rescale=False (inputs already in [0, 1]) is not supported")
        kind = str(cfg.get("image_processor_type", ""))
        pil = kind.endswith("Pil")
        # DINOv3's processor rescales, then resizes the float image, then normalises (unfused)
        first = not pil and kind.startswith("DINOv3ViTImageProcessor")
        return cls(size=size, crop_size=crop, resample=resample, mean=mean, std=std,
                   backend="pil" if pil else "torch", crop_rounding="floor", fuse_rescale=not pil and not first,
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), rescale_first=first, id2label=id2label)

    @classmethod
    def from_timm(cls, pretrained_cfg: Mapping[str, Any], id2label=None) -> "Preprocessor":
        """From a timm ``pretrained_cfg`` / data config (input_size, interpolation, mean, std, crop_pct, crop_mode)."""
        cfg = dict(pretrained_cfg)
        if "input_size" in cfg:
            _, h, w = cfg["input_size"]
        else:
            h, w = _pair(cfg.get("img_size", 224), "img_size")
        crop_pct = cfg.get("crop_pct") or 0.875
        mode = cfg.get("crop_mode") or "center"
        if mode == "squash":
            size: Size = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        elif mode == "center":
            if h != w:
                raise ValueError(f"pretrained_cfg: crop_mode 'center' with a non-square input_size {(h, w)} "
                                 "is not supported")
            size = math.floor(h / crop_pct)
        else:
            raise ValueError(f"pretrained_cfg: crop_mode expected 'center' or 'squash', got {mode!r}")
        return cls(size=size, crop_size=(h, w), resample=cfg.get("interpolation", "bicubic") or "bicubic",
                   mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD), backend="pil",
                   crop_rounding="round", fuse_rescale=False, id2label=id2label)

    @classmethod
    def from_preset(cls, name: str, id2label=None) -> "Preprocessor":
        """The processor a preset of :func:`fastvit.list_models` names: timm's ``pretrained_cfg`` of
        the name's default tag (plain ViT / DeiT / DINOv2), the original processors of the CLIP /
        SigLIP towers (CLIP: shortest-side bicubic resize + center crop, CLIP mean / std; SigLIP:
        bicubic resize to the square size, mean = std = 0.5)."""
        from .registry import preprocess_config

        return cls.from_timm(preprocess_config(name), id2label=id2label)

    @classmethod
    def for_model(cls, model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct: float = 0.9) -> "Preprocessor":
        """Fallback when a checkpoint says nothing: timm's ViT defaults at the model's image size."""
        h, w = model.patch_embed.img_size
        if h == w:
            return cls.from_timm(dict(input_size=(3, h, w), mean=mean, std=std, crop_pct=crop_pct))
        return cls.from_timm(dict(input_size=(3, h, w), mean=mean, std=std, crop_pct=1.0, crop_mode="squash"))

    @classmethod
    def from_pretrained(cls, path: str, model=None) -> "Preprocessor":
        """From a model folder: ``preprocessor_config.json`` (HF), else ``config.json`` with a timm
        ``pretrained_cfg`` (timm hub / fastvit convert layout), else :meth:`for_model` defaults.
        ``id2label`` comes from config.json (``id2label`` or timm's ``label_names``)."""
        id2label = load_labels(path)
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            return cls.from_hf(os.path.join(path, "preprocessor_config.json"), id2label=id2label)
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            cfg = _read_json(cfg_file, "config.json")
            if "preprocess" in cfg:
                return cls.from_dict(cfg["preprocess"], id2label=id2label)
            if "pretrained_cfg" in cfg:
                return cls.from_timm(cfg["pretrained_cfg"], id2label=id2label)
        if model is None:
            raise FileNotFoundError(f"path: expected preprocessor_config.json or config.json with pretrained_cfg "
                                    f"in {path!r} (or pass model= for defaults)")
        pre = cls.for_model(model)
        pre.id2label = id2label
        return pre

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (without id2label), the inverse of :meth:`from_dict`."""
        d = asdict(self)
        d.pop("id2label")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], id2label=None) -> "Preprocessor":
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__ if f != "id2label"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"preprocess: unexpected keys {unknown}, expected some of {sorted(known)}")
        return cls(**d, id2label=id2label)

    # ------------------------------------------------------------------ transform
    @property
    def output_size(self) -> Optional[Tuple[int, int]]:
        if self.crop_size is not None:
            return self.crop_size
        return self.size if isinstance(self.size, tuple) else None

    def _resized_hw(self, h: int, w: int) -> Tuple[int, int]:
        if self.size is None:
            return h, w
        if isinstance(self.size, tuple):
            return self.size
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(self.size * long / short)
        return (self.size, new_long) if h <= w else (new_long, self.size)

    def _crop_box(self, h: int, w: int) -> Tuple[int, int]:
        ch, cw = self.crop_size
        if ch > h or cw > w:
            raise ValueError(f"crop_size: {self.crop_size} is larger than the resized image {(h, w)}")
        if self.crop_rounding == "round":
            return int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        return int((h - ch) / 2.0), int((w - cw) / 2.0)

    def _geometry_pil(self, img) -> torch.Tensor:
        from PIL import Image

        w, h = img.size
        nh, nw = self._resized_hw(h, w)
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), getattr(Image.Resampling, self.resample.upper()))
        arr = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, H, W) uint8
        return self._crop(arr)

    def _geometry_torch(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        nh, nw = self._resized_hw(h, w)
        if (nh, nw) != (h, w):
            x = _resize_uint8(x, (nh, nw), self.resample)
        return self._crop(x)

    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        if self.crop_size is None:
            return x
        top, left = self._crop_box(*x.shape[-2:])
        return x[..., top:top + self.crop_size[0], left:left + self.crop_size[1]]

    def geometry(self, image) -> torch.Tensor:
        """Resize and crop only: uint8 (3, H, W), the pixels the model sees (for pictures)."""
        img = to_rgb(image, want_pil=self.backend == "pil")
        return self._geometry_pil(img) if self.backend == "pil" else self._geometry_torch(img)

    def load(self, source, mode: str = "exact", max_pixels: Optional[int] = None) -> torch.Tensor:
        """One image -> uint8 (3, H, W), the pixels the model sees (resized, cropped, not normalised).

        Args:
            source: a path, the file's bytes, a PIL image, a uint8 numpy array (H, W[, C]) or a
                uint8 tensor (C, H, W).
            mode: 'exact' (bit-exact with :meth:`geometry`: timm's eval transform / Hugging Face's
                processor) or 'fast' (DCT-domain JPEG downscaling at decode, uint8 area resize:
                see :mod:`fastvit.data.decode` and the measured distance in the README).
            max_pixels: refuse larger images, checked from the header before decoding.

        Raises:
            fastvit.data.decode.DecodeError (a ValueError) with the reason for a bad image;
            ValueError for mode 'exact' on a ``rescale_first`` processor (its exact output is
            float only: :meth:`process`).

        A model with :meth:`fastvit.VisionTransformer.set_input_normalization` (from this
        processor) takes the stacked result as its uint8 input.
        """
        from .data.decode import load_uint8

        return load_uint8(source, self, mode, max_pixels)

    @property
    def tensor_resample(self) -> str:
        """The ``F.interpolate`` mode of ``resample`` for tensor resizes (GPU decode): the same
        filter, or bicubic for the PIL-only ones (lanczos, box, hamming)."""
        return _TORCH_MODES.get(self.resample, "bicubic")

    @property
    def uint8_exact(self) -> bool:
        """Whether the exact output is a uint8 image (False for ``rescale_first``, which resizes the
        float image: its exact result is :meth:`process`'s float one)."""
        return not self.rescale_first

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32 normalised."""
        shape = (3, 1, 1)
        if self.fuse_rescale:
            mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
            return (x.float() - mean.view(shape)) / std.view(shape)
        x = x.float() * self.rescale_factor if self.rescale_factor != 1 / 255 else x.float().div(255)
        return (x - torch.tensor(self.mean).view(shape)) / torch.tensor(self.std).view(shape)

    def denormalize(self, x: torch.Tensor) -> np.ndarray:
        """Normalised (3, H, W) -> uint8 (H, W, 3) numpy image, for display."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        img = ((x.detach().float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
        return img.permute(1, 2, 0).numpy()

    def process(self, image) -> torch.Tensor:
        """One image (PIL, path, uint8 numpy (H, W[, C]) or uint8 tensor (C, H, W)) -> float32 (3, H, W)."""
        if self.rescale_first:
            x = to_rgb(image, want_pil=False) * self.rescale_factor  # float32 (3, H, W)
            nh, nw = self._resized_hw(*x.shape[-2:])
            if (nh, nw) != tuple(x.shape[-2:]):
                x = _resize_float(x, (nh, nw), self.resample)
            x = self._crop(x)
            return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)
        return self.normalize(self.geometry(image))

    def __call__(self, images) -> torch.Tensor:
        """One image or a list of them -> float32 batch (B, 3, H, W)."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images: expected at least one image, got an empty list")
            out = [self.process(im) for im in images]
            sizes = {tuple(o.shape) for o in out}
            if len(sizes) > 1:
                raise ValueError(f"images: processed sizes differ {sorted(sizes)}; set crop_size or a (H, W) size")
            return torch.stack(out)
        return self.process(images).unsqueeze(0)


# --------------------------------------------------------------------------- helpers
def _read_json(config, default_name: str) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.path.join(config, default_name) if os.path.isdir(config) else config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: expected a JSON file or a folder with {default_name}, got {config!r}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"config: {path!r} is not valid JSON ({e})") from e


def _native_uint8(mode: str) -> bool:
    # torchvision resizes uint8 directly (no float round trip) for bicubic / lanczos always and
    # for bilinear only where torch has its AVX2/AVX512 or ARM uint8 kernel; the results differ
    # by one grey level from the float path, so the same choice is made here.
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return mode == "bicubic"


def _resize_uint8(x: torch.Tensor, size: Tuple[int, int], resample: str) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, h, w) as torchvision's tensor resize with antialias on CPU."""
    mode = _TORCH_MODES[resample]
    aa = mode in ("bilinear", "bicubic")
    align = False if aa else None
    img = x.unsqueeze(0)
    if x.device.type == "cpu" and _native_uint8(mode) and mode != "nearest":
        return F.interpolate(img, size=size, mode=mode, align_corners=align, antialias=aa)[0]
    out = F.interpolate(img.float(), size=size, mode=mode, align_corners=align, antialias=aa)
    if mode == "bicubic":
        out = out.clamp_(0, 255)
    return out.round_().to(torch.uint8)[0]


def _resize_float(x: torch.Tensor, size: Tuple[int, int], resample: str) -> torch.Tensor:
    """float (3, H, W) -> (3, h, w) as torchvision's tensor resize with antialias (no clamp, no rounding)."""
    mode = _TORCH_MODES[resample]
    aa = mode in ("bilinear", "bicubic")
    return F.interpolate(x.unsqueeze(0), size=size, mode=mode, align_corners=False if aa else None, antialias=aa)[0]


def to_rgb(image, want_pil: bool):
    """PIL / path / numpy uint8 (H, W[, C]) / torch uint8 (C, H, W) -> RGB PIL image or uint8 (3, H, W)."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if want_pil:
            return image
        return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image: expected a uint8 numpy array (H, W[, C]), got dtype {image.dtype}")
        if not image.flags.writeable:  # np.asarray(PIL image) is read-only; torch wants to own its memory
            image = image.copy()
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image: expected a numpy array (H, W), (H, W, 1|3|4), got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3] if image.shape[-1] != 1 else
                                                      np.repeat(image, 3, -1))).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f"image: expected a uint8 tensor (C, H, W), got dtype {image.dtype}")
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"image: expected a uint8 tensor (C, H, W) with C in 1, 3, 4, got shape "
                             f"{tuple(image.shape)}")
        image = image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1)
        image = image.cpu().contiguous()
        if want_pil:
            return Image.fromarray(image.permute(1, 2, 0).numpy())
        return image
    raise TypeError(f"image: expected a PIL image, a path, a uint8 numpy array or a uint8 tensor, "
                    f"got {type(image).__name__}")


def load_image(path: Union[str, os.PathLike]):
    """Open an image file as an RGB PIL image, with an error that names the file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image: expected an existing file, got {str(path)!r}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image: {str(path)!r} is not a readable image ({e})") from e


def load_labels(path: str) -> Optional[Dict[int, str]]:
    """``id2label`` of a model folder: config.json ``id2label`` (HF) or ``label_names`` (timm), else None."""
    cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_file):
        return None
    cfg = _read_json(cfg_file, "config.json")
    if cfg.get("id2label"):
        return {int(k): str(v) for k, v in cfg["id2label"].items()}
    if cfg.get("label_names"):
        return {i: str(v) for i, v in enumerate(cfg["label_names"])}
    return None


def topk_predictions(logits: torch.Tensor, k: int = 5, id2label: Optional[Mapping[int, str]] = None
                     ) -> List[List[Dict[str, Any]]]:
    """logits (B, C) -> per image a list of k dicts {index, label, prob} (softmax, best first)."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (B, num_classes), got shape {tuple(logits.shape)}")
    k = min(k, logits.shape[1])
    probs = logits.float().softmax(-1)
    p, idx = probs.topk(k, dim=-1)
    out = []
    for row_p, row_i in zip(p.tolist(), idx.tolist()):
        out.append([{"index": i, "label": (id2label or {}).get(i, str(i)), "prob": pr} for i, pr in zip(row_i, row_p)])
    return out

"""NaFlex: images at their own aspect ratio under a patch budget (SigLIP 2 NaFlex, timm NaFlexVit).

Both libraries resize each image, keeping its aspect ratio, to the largest size whose patch grid
fits a budget (``max_num_patches`` / ``max_seq_len``), then cut it into patches; the model
resizes its stored position-embedding grid to each image's grid. They differ in the pixels:

* Hugging Face ``Siglip2ImageProcessor`` (transformers 5): uint8 tensor resize with antialias
  (bilinear), rescale fused into the normalisation, patches padded to ``max_num_patches`` with
  ``pixel_attention_mask`` / ``spatial_shapes``; the model resizes the position grid bilinearly
  with antialias.
* timm's NaFlex eval transform (``create_transform(naflex=True, patchify=True)``): PIL resize
  (the checkpoint's interpolation), ``x / 255`` then ``(x - mean) / std``; the model resizes as its
  ``pos_embed_interp_mode`` / ``pos_embed_antialias`` / ``pos_embed_align_corners`` /
  ``pos_embed_ar_preserving`` say.

:class:`NaFlexPreprocessor` reproduces both bit-exactly; :class:`NaFlexVisionTransformer` is a
:class:`~fastvit.model.VisionTransformer` whose position embedding is resized per image as the
family does, and whose :meth:`~fastvit.model.VisionTransformer.forward_packed` runs a batch of
mixed sizes as one packed sequence. :func:`packed_batches` is ``fastvit embed``'s batch runner for
such models (a token budget per forward with ``max_tokens``).

Patches are flattened (ph, pw, C), channel fastest (both libraries' layout), row-major over the grid.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .model import VisionTransformer
from .preprocess import _PIL_RESAMPLE, IMAGENET_MEAN, IMAGENET_STD, Preprocessor, _read_json, load_labels, to_rgb

__all__ = ["NaFlexVisionTransformer", "NaFlexPreprocessor", "fit_to_patches", "patchify", "resize_pos_embed",
           "model_class", "is_naflex", "unpad_hf_inputs", "packed_batches", "POS_EMBED_MODES", "NAFLEX_KWARGS"]

POS_EMBED_MODES = ("bilinear", "bicubic")
# the constructor arguments only the NaFlex model takes (their presence selects its class)
NAFLEX_KWARGS = ("pos_embed_interp", "pos_embed_ar_preserving", "pos_embed_align_corners")


def _pair(v, arg: str) -> Tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list)):
        raise TypeError(f"{arg}: expected an int or (height, width), got {type(v).__name__}")
    if isinstance(v, int):
        return v, v
    if len(v) != 2:
        raise ValueError(f"{arg}: expected an int or (height, width), got {v!r}")
    return int(v[0]), int(v[1])


# --------------------------------------------------------------------------- geometry
def fit_to_patches(height: int, width: int, patch_size: Union[int, Tuple[int, int]], max_patches: int,
                   eps: float = 1e-5) -> Tuple[int, int]:
    """The (H, W) an image of ``height`` x ``width`` is resized to: multiples of the patch size, at
    least one patch each way, at most ``max_patches`` patches, the aspect ratio kept as closely as
    that allows.

    The scale is found by the bisection both libraries run (over (eps / 10, 100) down to ``eps``,
    each side rounded up to a whole number of patches), so the sizes match theirs exactly, ties and
    rounding included.
    """
    ph, pw = _pair(patch_size, "patch_size")
    if height < 1 or width < 1:
        raise ValueError(f"image: expected a size of at least 1 x 1, got {height} x {width}")
    if max_patches < 1:
        raise ValueError(f"max_patches: expected >= 1, got {max_patches}")

    def side(scale: float, n: int, p: int) -> int:
        return int(max(p, math.ceil(n * scale / p) * p))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height, ph) // ph) * (side(mid, width, pw) // pw) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height, ph), side(lo, width, pw)


def patchify(image: torch.Tensor, patch_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """(C, H, W) with H, W multiples of the patch -> (gh * gw, ph * pw * C) patch rows, row-major."""
    ph, pw = _pair(patch_size, "patch_size")
    C, H, W = image.shape
    if H % ph or W % pw:
        raise ValueError(f"image: expected height and width multiples of the patch size {(ph, pw)}, got {(H, W)}")
    gh, gw = H // ph, W // pw
    return image.reshape(C, gh, ph, gw, pw).permute(1, 3, 2, 4, 0).reshape(gh * gw, ph * pw * C)


def resize_pos_embed(pos: torch.Tensor, new_grid: Tuple[int, int], old_grid: Tuple[int, int],
                     mode: str = "bicubic", antialias: bool = True, align_corners: bool = False,
                     ar_preserving: bool = False) -> torch.Tensor:
    """A learnt position grid resized to one image's grid, in float32, as timm's NaFlexEmbeds does
    (and, with mode 'bilinear' + antialias, as Hugging Face's Siglip2VisionEmbeddings).

    Args:
        pos: (old_h * old_w, D).
        new_grid, old_grid: (rows, cols).
        ar_preserving: resize to the square (L, L), L = max(new_grid), and keep the top-left
            (rows, cols) (timm ``pos_embed_ar_preserving``).

    Returns:
        (rows * cols, D) in pos's dtype (pos itself when the grids are equal).
    """
    rows, cols = new_grid
    if (rows, cols) == tuple(old_grid):
        return pos
    size = (max(rows, cols),) * 2 if ar_preserving else (rows, cols)
    D = pos.shape[-1]
    grid = pos.float().reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=size, mode=mode, align_corners=align_corners, antialias=antialias)
    return grid[:, :, :rows, :cols].permute(0, 2, 3, 1).reshape(rows * cols, D).to(pos.dtype)


# --------------------------------------------------------------------------- the model
class NaFlexVisionTransformer(VisionTransformer):
    """A :class:`~fastvit.model.VisionTransformer` for NaFlex checkpoints: any image size (the
    position grid resized per image), and mixed sizes in one packed batch
    (:meth:`~fastvit.model.VisionTransformer.forward_packed`).

    Prefix tokens (class / registers) carry no position embedding (``no_embed_class``), as in
    timm's NaFlexVit. Parameter names are fastvit's (timm's ``VisionTransformer`` names):
    ``patch_embed.proj.weight`` holds the patch projection as a conv weight (D, C, ph, pw).

    Args:
        pos_embed_interp: 'bilinear' (SigLIP 2) or 'bicubic' (timm's default).
        pos_embed_antialias: antialias when resizing the position grid (both libraries: True).
        pos_embed_align_corners, pos_embed_ar_preserving: timm NaFlexEmbeds' options.
        other arguments: as :class:`~fastvit.model.VisionTransformer` (``img_size`` / ``patch_size``
            give the stored position grid; ``dynamic_img_size`` is always on).
    """

    def __init__(self, *args, pos_embed_interp: str = "bicubic", pos_embed_ar_preserving: bool = False,
                 pos_embed_align_corners: bool = False, **kwargs):
        if pos_embed_interp not in POS_EMBED_MODES:
            raise ValueError(f"pos_embed_interp: expected one of {POS_EMBED_MODES}, got {pos_embed_interp!r}")
        if kwargs.get("no_embed_class") is False or kwargs.get("dynamic_img_size") is False:
            raise ValueError("no_embed_class / dynamic_img_size: a NaFlex model always has both (prefix tokens without "
                             "position, any image size)")
        kwargs.update(no_embed_class=True, dynamic_img_size=True)
        super().__init__(*args, **kwargs)
        self.pos_embed_interp = pos_embed_interp
        self.pos_embed_ar_preserving = bool(pos_embed_ar_preserving)
        self.pos_embed_align_corners = bool(pos_embed_align_corners)

    def _compute_embed_inputs(self, grid):
        prefix = self._prefix_params()
        prefix = torch.cat(prefix, 0) if prefix else None  # (T, D): no position on prefix tokens
        pos = None
        if self.pos_embed is not None:
            pos = resize_pos_embed(self.pos_embed[0], grid, self.patch_embed.grid_size, self.pos_embed_interp,
                                   self.pos_embed_antialias, self.pos_embed_align_corners,
                                   self.pos_embed_ar_preserving)
        return pos, prefix

    def naflex_kwargs(self) -> Dict[str, Any]:
        """The NaFlex constructor arguments (with :func:`fastvit.convert.model_kwargs`, the whole model)."""
        return dict(pos_embed_interp=self.pos_embed_interp, pos_embed_ar_preserving=self.pos_embed_ar_preserving,
                    pos_embed_align_corners=self.pos_embed_align_corners)


def model_class(kwargs: Mapping[str, Any]) -> type:
    """The model class constructor arguments ``kwargs`` describe: :class:`NaFlexVisionTransformer`
    when they hold a NaFlex-only argument, else :class:`~fastvit.model.VisionTransformer`."""
    return NaFlexVisionTransformer if any(k in kwargs for k in NAFLEX_KWARGS) else VisionTransformer


def is_naflex(model) -> bool:
    return isinstance(model, NaFlexVisionTransformer)


# --------------------------------------------------------------------------- the processors
@dataclass
class NaFlexPreprocessor:
    """Checkpoint-exact NaFlex preprocessing: resize to fit ``max_num_patches`` (aspect ratio kept),
    rescale, normalise; patchify for the pre-patchified inputs.

    Args:
        patch_size: (ph, pw).
        max_num_patches: the patch budget of one image.
        resample: 'bilinear', 'bicubic', ... (see :class:`~fastvit.preprocess.Preprocessor`).
        mean, std: per-channel normalisation of the [0, 1]-scaled image.
        backend: 'torch' (Hugging Face: uint8 tensor resize with antialias) or 'pil' (timm).
        fuse_rescale: ``(x - 255 mean) / (255 std)`` (Hugging Face) instead of ``(x / 255 - mean) / std``.
        id2label: class index -> label, when the checkpoint has one.
    """

    patch_size: Tuple[int, int] = (16, 16)
    max_num_patches: int = 256
    resample: str = "bilinear"
    mean: Tuple[float, ...] = (0.5, 0.5, 0.5)
    std: Tuple[float, ...] = (0.5, 0.5, 0.5)
    backend: str = "torch"
    fuse_rescale: bool = True
    rescale_factor: float = 1 / 255
    id2label: Optional[Dict[int, str]] = field(default=None, repr=False)

    def __post_init__(self):
        self.patch_size = _pair(self.patch_size, "patch_size")
        if isinstance(self.max_num_patches, bool) or not isinstance(self.max_num_patches, int) \
                or self.max_num_patches < 1:
            raise ValueError(f"max_num_patches: expected an int >= 1, got {self.max_num_patches!r}")
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        # the resize / normalise rules are the Preprocessor's: the same checks, once
        self._template(self.patch_size)
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}

    def _template(self, size: Tuple[int, int]) -> Preprocessor:
        return Preprocessor(size=size, crop_size=None, resample=self.resample, mean=self.mean, std=self.std,
                            backend=self.backend, crop_rounding="floor", fuse_rescale=self.fuse_rescale,
                            rescale_factor=self.rescale_factor)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, config: Union[str, Mapping[str, Any]], id2label=None) -> "NaFlexPreprocessor":
        """From a Hugging Face ``Siglip2ImageProcessor`` ``preprocessor_config.json`` (path, folder or dict)."""
        cfg = _read_json(config, "preprocessor_config.json")
        kind = str(cfg.get("image_processor_type", "Siglip2ImageProcessor"))
        if not kind.startswith("Siglip2ImageProcessor"):
            raise ValueError(f"preprocessor_config: expected a Siglip2ImageProcessor (NaFlex), got {kind!r}")
        if not cfg.get("do_resize", True) or not cfg.get("do_rescale", True):
            raise ValueError("preprocessor_config: do_resize=False / do_rescale=False is not supported (the NaFlex "
                             "resize fits the patch budget; inputs are uint8 images)")
        resample = cfg.get("resample", 2)
        resample = _PIL_RESAMPLE[resample] if isinstance(resample, int) else str(resample)
        mean, std = cfg.get("image_mean", (0.5,) * 3), cfg.get("image_std", (0.5,) * 3)
        if not cfg.get("do_normalize", True):
            mean, std = (0.0,) * 3, (1.0,) * 3
        pil = kind.endswith("Pil")
        return cls(patch_size=cfg.get("patch_size", 16), max_num_patches=int(cfg.get("max_num_patches", 256)),
                   resample=resample, mean=mean, std=std, backend="pil" if pil else "torch", fuse_rescale=not pil,
                   rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), id2label=id2label)

    @classmethod
    def from_timm(cls, pretrained_cfg: Mapping[str, Any], patch_size: Union[int, Tuple[int, int]] = 16,
                  max_seq_len: int = 576, id2label=None) -> "NaFlexPreprocessor":
        """timm's NaFlex eval transform (``create_transform(naflex=True, patch_size=, max_seq_len=, patchify=True)``
        with the ``pretrained_cfg``'s interpolation, mean and std)."""
        cfg = dict(pretrained_cfg)
        return cls(patch_size=patch_size, max_num_patches=int(max_seq_len),
                   resample=cfg.get("interpolation", "bicubic") or "bicubic", mean=cfg.get("mean", IMAGENET_MEAN),
                   std=cfg.get("std", IMAGENET_STD), backend="pil", fuse_rescale=False, id2label=id2label)

    @classmethod
    def from_preset(cls, name: str, id2label=None) -> "NaFlexPreprocessor":
        """The processor a NaFlex preset of :func:`fastvit.list_models` names."""
        from .registry import preprocess_config

        cfg = preprocess_config(name)
        if cfg is None or cfg.get("kind") != "naflex":
            raise ValueError(f"name: preset {name!r} names no NaFlex preprocessing")
        cfg = dict(cfg)
        cfg.pop("kind")
        return cls(**cfg, id2label=id2label)

    @classmethod
    def from_pretrained(cls, path: str, model=None) -> "NaFlexPreprocessor":
        """From a model folder: ``preprocessor_config.json`` (HF), else ``config.json``'s ``preprocess``
        (what ``fastvit convert`` writes) or timm's ``pretrained_cfg`` (timm hub layout: the NaFlex
        eval transform at timm's default budget of 576 patches, the patch size of ``model``)."""
        id2label = load_labels(path)
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            return cls.from_hf(os.path.join(path, "preprocessor_config.json"), id2label=id2label)
        cfg = _read_json(os.path.join(path, "config.json"), "config.json")
        if "preprocess" in cfg:
            return cls.from_dict(cfg["preprocess"], id2label=id2label)
        if "pretrained_cfg" in cfg and model is not None:
            return cls.from_timm(cfg["pretrained_cfg"], patch_size=tuple(model.patch_embed.patch_size),
                                 id2label=id2label)
        raise FileNotFoundError(f"path: expected a Siglip2 preprocessor_config.json or a config.json with NaFlex "
                                f"'preprocess' (or timm's pretrained_cfg) in {path!r}")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready fields (without id2label; ``kind`` 'naflex'), the inverse of :meth:`from_dict`."""
        d = asdict(self)
        d.pop("id2label")
        d["patch_size"] = list(d["patch_size"])
        return dict(kind="naflex", **d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], id2label=None) -> "NaFlexPreprocessor":
        d = dict(d)
        if d.pop("kind", None) != "naflex":
            raise ValueError("preprocess: expected a NaFlex preprocessor dict (kind 'naflex')")
        known = {f for f in cls.__dataclass_fields__ if f != "id2label"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"preprocess: unexpected keys {unknown}, expected some of {sorted(known)}")
        return cls(**d, id2label=id2label)

    # ------------------------------------------------------------------ transform
    @property
    def output_size(self) -> None:
        """None: every image keeps its own size."""
        return None

    @property
    def uint8_exact(self) -> bool:
        """False: the packed runners take :meth:`process`'s normalised float images (the uint8
        pixels are :meth:`geometry`'s)."""
        return False

    def target_size(self, height: int, width: int) -> Tuple[int, int]:
        """(H, W) an image of ``height`` x ``width`` is resized to (see :func:`fit_to_patches`)."""
        return fit_to_patches(height, width, self.patch_size, self.max_num_patches)

    def _decoded(self, image):
        img = to_rgb(image, want_pil=self.backend == "pil")
        h, w = (img.height, img.width) if self.backend == "pil" else tuple(img.shape[-2:])
        return img, self.target_size(h, w)

    def geometry(self, image) -> torch.Tensor:
        """Resize only: uint8 (3, H, W), the pixels the model sees."""
        img, size = self._decoded(image)
        return self._template(size).geometry(img)

    def process(self, image) -> torch.Tensor:
        """One image (PIL, path, uint8 numpy (H, W[, C]) or uint8 tensor (C, H, W)) -> float32
        (3, H, W), H, W multiples of the patch, at most ``max_num_patches`` patches."""
        img, size = self._decoded(image)
        return self._template(size).process(img)

    def __call__(self, images) -> List[torch.Tensor]:
        """One image or a list -> a list of float32 (3, H_i, W_i) (sizes differ: no batch tensor)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("images: expected at least one image, got an empty list")
        return [self.process(im) for im in images]

    def hf_inputs(self, images, max_num_patches: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """What ``Siglip2ImageProcessor(images, return_tensors='pt')`` returns: ``pixel_values``
        (B, M, ph * pw * C) float32 (zero rows past each image's patches), ``pixel_attention_mask``
        (B, M) int32, ``spatial_shapes`` (B, 2) int64; M = ``max_num_patches``."""
        M = self.max_num_patches if max_num_patches is None else int(max_num_patches)
        xs = self(images)
        ph, pw = self.patch_size
        values = torch.zeros(len(xs), M, ph * pw * xs[0].shape[0])
        mask = torch.zeros(len(xs), M, dtype=torch.int32)
        shapes = torch.zeros(len(xs), 2, dtype=torch.int64)
        for i, x in enumerate(xs):
            p = patchify(x, self.patch_size)
            if p.shape[0] > M:
                raise ValueError(f"max_num_patches: {M} is less than image {i}'s {p.shape[0]} patches")
            values[i, :p.shape[0]] = p
            mask[i, :p.shape[0]] = 1
            shapes[i] = torch.tensor([x.shape[1] // ph, x.shape[2] // pw])
        return dict(pixel_values=values, pixel_attention_mask=mask, spatial_shapes=shapes)

    def timm_inputs(self, images, max_seq_len: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """What timm's NaFlex eval transform + ``NaFlexCollator`` give: ``patches`` (B, M, ph * pw * C)
        float32, ``patch_coord`` (B, M, 2) int64 (row, col), ``patch_valid`` (B, M) bool."""
        M = self.max_num_patches if max_seq_len is None else int(max_seq_len)
        hf = self.hf_inputs(images, M)
        B = hf["pixel_values"].shape[0]
        coord = torch.zeros(B, M, 2, dtype=torch.int64)
        for i, (gh, gw) in enumerate(hf["spatial_shapes"].tolist()):
            rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
            coord[i, :gh * gw] = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1)
        return dict(patches=hf["pixel_values"], patch_coord=coord, patch_valid=hf["pixel_attention_mask"].bool())


# --------------------------------------------------------------------------- Hugging Face padded inputs
def unpad_hf_inputs(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                    spatial_shapes) -> Tuple[List[torch.Tensor], List[Tuple[int, int]]]:
    """Siglip2-style padded inputs -> (each image's patch rows (gh * gw, K), grids).

    pixel_values (B, M, K); pixel_attention_mask (B, M) 1 for the image's patches, which come first
    (as Siglip2ImageProcessor writes them); spatial_shapes (B, 2) (gh, gw)."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 3:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values: expected patches (B, max_num_patches, ph * pw * C) with spatial_shapes, got "
                         f"{got}")
    B, M, _ = pixel_values.shape
    shapes = torch.as_tensor(spatial_shapes).tolist() if spatial_shapes is not None else None
    if shapes is None or len(shapes) != B or any(len(s) != 2 for s in shapes):
        raise ValueError(f"spatial_shapes: expected ({B}, 2) (rows, cols) per image, got "
                         f"{None if shapes is None else tuple(torch.as_tensor(spatial_shapes).shape)}")
    grids = [(int(h), int(w)) for h, w in shapes]
    if pixel_attention_mask is None:
        raise ValueError("pixel_attention_mask: expected (B, max_num_patches) with spatial_shapes, got None")
    mask = torch.as_tensor(pixel_attention_mask)
    if tuple(mask.shape) != (B, M):
        raise ValueError(f"pixel_attention_mask: expected shape {(B, M)}, got {tuple(mask.shape)}")
    counts = mask.ne(0).sum(1).tolist()
    out = []
    for i, ((gh, gw), n) in enumerate(zip(grids, counts)):
        if gh < 1 or gw < 1 or gh * gw > M:
            raise ValueError(f"spatial_shapes: image {i}'s grid {(gh, gw)} does not fit {M} patches")
        if n != gh * gw:
            raise ValueError(f"pixel_attention_mask: image {i} expected {gh * gw} valid positions (spatial_shapes "
                             f"{(gh, gw)}), got {n}")
        if not bool(mask[i, :n].ne(0).all()):
            raise ValueError(f"pixel_attention_mask: image {i} expected its {n} valid positions first (as "
                             "Siglip2ImageProcessor writes them), got padding between them")
        out.append(pixel_values[i, :n])
    return out, grids


# --------------------------------------------------------------------------- fastvit embed
def _collate_list(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    return [i for i, _ in good], [x for _, x in good] or None, bad


def _chunks(sizes: Sequence[int], max_tokens: Optional[int]) -> List[Tuple[int, int]]:
    """Consecutive [start, stop) runs of ``sizes`` whose sum stays within ``max_tokens`` (one item
    per run at least)."""
    if max_tokens is None:
        return [(0, len(sizes))] if sizes else []
    out, start, total = [], 0, 0
    for i, s in enumerate(sizes):
        if i > start and total + s > max_tokens:
            out.append((start, i))
            start, total = i, 0
        total += s
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def packed_batches(model, embedding: str, max_tokens: Optional[int] = None) -> Callable[..., Iterator]:
    """A batch runner for ``fastvit embed`` with the signature and yields of
    :func:`fastvit.imagefiles.run_batches` for NaFlex preprocessing: each loaded batch (images of
    different sizes) goes through :meth:`~fastvit.model.VisionTransformer.forward_packed`, cut
    into consecutive runs of at most ``max_tokens`` tokens (an image larger than the budget alone).

    embedding: the resolved embedding ('pooled', 'projected' or 'logits'; see
    :func:`fastvit.embed.embedding_fn`)."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens: expected an int >= 1 or None, got {max_tokens!r}")
    if embedding not in ("pooled", "projected", "logits"):
        raise ValueError(f"embedding: expected 'pooled', 'projected' or 'logits', got {embedding!r}")
    prefix = model.num_prefix_tokens
    ph, pw = model.patch_embed.patch_size

    def run(fn, files, preprocessor, batches, device, dtype, num_workers=0, on_batch=None, mode="exact",
            decode="cpu", stats=None, normalize=None):
        # the fixed-size runner's options: images are decoded on the CPU and preprocessed exactly
        # (mode 'fast' has no NaFlex variant), as normalised floats (``normalize`` is for uint8 batches)
        from torch.utils.data import DataLoader

        from .imagefiles import ImageFiles

        if decode != "cpu":
            raise ValueError(f"decode: NaFlex packed batches decode on the CPU, got {decode!r}")
        device = torch.device(device)
        cuda = device.type == "cuda"
        loader = DataLoader(ImageFiles(files, preprocessor), batch_sampler=list(batches), num_workers=num_workers,
                            collate_fn=_collate_list, pin_memory=cuda, persistent_workers=False)
        for idx, xs, bad in loader:
            out = None
            if xs is not None:
                sizes = [prefix + (x.shape[1] // ph) * (x.shape[2] // pw) for x in xs]
                parts = []
                with torch.no_grad():
                    for a, b in _chunks(sizes, max_tokens):
                        res = model.forward_packed([x.to(device=device, dtype=dtype, non_blocking=cuda)
                                                    for x in xs[a:b]], pre_logits=embedding == "pooled")
                        emb = res.pooled if embedding == "pooled" else res.logits
                        if emb is None:
                            raise ValueError(f"embedding {embedding!r}: expected (B, D) per image batch; the model "
                                             f"does not pool (global_pool={model.global_pool!r})")
                        parts.append(emb)
                out = torch.cat(parts)
            if on_batch is not None:
                on_batch(len(idx) + len(bad))
            yield idx, out, bad

    return run


def batch_runner(model, preprocessor, embedding: str, max_tokens: Optional[int], default: Callable) -> Callable:
    """``fastvit embed``'s batch runner: :func:`packed_batches` when ``preprocessor`` is a
    :class:`NaFlexPreprocessor` (images keep their own sizes), else ``default``
    (:func:`fastvit.imagefiles.run_batches`); ``max_tokens`` is for the packed runner only."""
    if isinstance(preprocessor, NaFlexPreprocessor):
        return packed_batches(model, embedding, max_tokens)
    if max_tokens is not None:
        raise ValueError(f"max_tokens: a token budget is for NaFlex models (packed batches of mixed sizes), got "
                         f"{max_tokens} with a fixed-size {type(preprocessor).__name__}")
    return default

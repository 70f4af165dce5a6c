"""Bytes -> uint8 (3, H, W) pixels with the checkpoint's geometry, or a reason.

Three ways, one contract (:meth:`fastvit.Preprocessor.load` and :func:`decode_batch`):

* ``mode="exact"``: PIL decode + the preprocessor's own resize / crop, bit-exact with timm's eval
  transform and Hugging Face's image processors (what :meth:`Preprocessor.geometry` gives).
  Processors that resize the float image (``rescale_first``, HF DINOv3) have no exact uint8
  result: :func:`uint8_exact` says so and the jobs send their float output instead.
* ``mode="fast"``: no float work on the CPU and as little pixel work as the target allows. A
  JPEG at least twice the resize target is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain
  (OpenCV's ``IMREAD_REDUCED_*``; PIL ``draft`` without OpenCV), then resized in uint8 with an
  area filter (``cv2.INTER_AREA``; PIL's resize with ``reducing_gap`` without OpenCV) and cropped
  as exact mode crops. Measured in ``benchmarks/test_data_path.py``; the distance to exact is in
  benchmarks/NOTES.md.
* :func:`decode_batch` with ``device="cuda"``: JPEGs decoded together by nvJPEG
  (``torchvision.io.decode_jpeg`` on a list), resized / cropped on the device; any other file, or
  a JPEG nvJPEG refuses (CMYK, some progressive or corrupt files), is decoded on the CPU alone.

Every failure is a :class:`DecodeError` with a readable reason (empty, truncated, not an image,
too many pixels); nothing returns a silently wrong image. Pixel limits are checked from the
header, before the pixels are decoded (decompression bombs).
"""

from __future__ import annotations

import io
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["MODES", "DecodeError", "sniff", "load_uint8", "decode_batch", "uint8_exact", "fast_backend",
           "read_bytes", "DEFAULT_MAX_PIXELS"]

MODES = ("exact", "fast")
# PIL's own bomb guard errors at 2 x 89.5 Mpx; a server sets a tighter limit
DEFAULT_MAX_PIXELS = 178_956_970
# smallest image that has pixels to resize; a 1 x 1 "image" is a tracking pixel, not a photo
MIN_SIDE = 2

_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


class DecodeError(ValueError):
    """An input that is not a decodable image; ``str(e)`` is the reason."""


def sniff(data: bytes) -> Optional[str]:
    """The image format of ``data`` from its first bytes ('jpeg', 'png', 'webp', 'gif', 'bmp',
    'tiff'), or None when it is none of them (PIL may still know it)."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def read_bytes(path: Union[str, os.PathLike]) -> bytes:
    """The bytes of an image file, with reasons for a missing or empty one."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DecodeError(f"FileNotFoundError: No such file or directory: {str(path)!r}") from None
    except OSError as e:
        raise DecodeError(f"unreadable file {str(path)!r} ({e.strerror or e})") from None
    if not data:
        raise DecodeError("empty file (0 bytes)")
    return data


def uint8_exact(pre) -> bool:
    """Whether ``pre``'s exact output is a uint8 image (False for processors that resize the
    rescaled float image: their exact result exists only as float)."""
    return not pre.rescale_first


def fast_backend() -> str:
    """'opencv' when OpenCV is importable (the faster decoder / resizer here), else 'pil'."""
    return "opencv" if _cv2() is not None else "pil"


_CV2 = None


def _cv2():
    global _CV2
    if _CV2 is None:
        try:
            import cv2

            _CV2 = cv2
        except ImportError:
            _CV2 = False
    return _CV2 or None


# --------------------------------------------------------------------------- header + checks
def _open(data: bytes, max_pixels: Optional[int]):
    """PIL image of ``data``, header read only, size checked against ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DecodeError("empty input (0 bytes)")
    try:
        with _no_bomb_warning():
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"UnidentifiedImageError: cannot identify image file (first bytes {bytes(data[:8])!r})"
                          ) from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"DecompressionBombError: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None
    _check_size(im.size, max_pixels)
    return im


def _check_size(size: Tuple[int, int], max_pixels: Optional[int]) -> None:
    w, h = size
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if w * h > limit:
        raise DecodeError(f"too many pixels: {w} x {h} = {w * h} > the limit {limit} (decompression bomb guard)")
    if min(w, h) < MIN_SIDE:
        raise DecodeError(f"image too small: {w} x {h} pixels (expected at least {MIN_SIDE} x {MIN_SIDE})")


class _no_bomb_warning:
    """PIL warns (not raises) between 1x and 2x its pixel limit; our own limit decides instead."""

    def __enter__(self):
        import warnings

        from PIL import Image

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _rgb(im) -> "object":
    """Fully decoded RGB PIL image; decoder errors become reasons."""
    try:
        im.load()
        return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def _jpeg_complete(data: bytes) -> bool:
    # libjpeg (OpenCV) fills a truncated JPEG with grey and only warns: a complete one ends in
    # EOI (FF D9), possibly followed by padding zeros
    return data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


# --------------------------------------------------------------------------- geometry
def _target(pre, h: int, w: int) -> Tuple[int, int]:
    return pre._resized_hw(h, w)


def _crop_hwc(a: np.ndarray, pre, bgr: bool) -> torch.Tensor:
    """(h, w, 3) uint8 array at the resize target -> cropped (3, H, W) uint8 tensor, one copy."""
    if pre.crop_size is not None:
        top, left = pre._crop_box(a.shape[0], a.shape[1])
        a = a[top:top + pre.crop_size[0], left:left + pre.crop_size[1]]
    if bgr:
        a = a[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


_CV_INTERP_UP = {"bicubic": "INTER_CUBIC", "bilinear": "INTER_LINEAR", "nearest": "INTER_NEAREST",
                 "lanczos": "INTER_LANCZOS4", "box": "INTER_AREA", "hamming": "INTER_LINEAR"}


def _cv_resize(a: np.ndarray, nh: int, nw: int, resample: str) -> np.ndarray:
    cv2 = _cv2()
    if (a.shape[0], a.shape[1]) == (nh, nw):
        return a
    shrink = nh <= a.shape[0] and nw <= a.shape[1]
    # area averaging is the antialiased downscale; an upscale uses the checkpoint's filter
    interp = cv2.INTER_AREA if shrink else getattr(cv2, _CV_INTERP_UP[resample])
    return cv2.resize(a, (nw, nh), interpolation=interp)


def _reduction(w: int, h: int, nw: int, nh: int) -> int:
    """Largest DCT-domain scale-down 1, 2, 4, 8 that keeps the image at least the resize target."""
    f = 1
    while f < 8 and w >= 2 * f * nw and h >= 2 * f * nh:
        f *= 2
    return f


def _fast_from_bytes(data: bytes, pre, max_pixels: Optional[int]) -> torch.Tensor:
    im = _open(data, max_pixels)
    w, h = im.size
    nh, nw = _target(pre, h, w)
    cv2 = _cv2()
    if im.format == "JPEG" and im.mode in ("RGB", "L") and _jpeg_complete(data):
        if cv2 is not None:
            f = _reduction(w, h, nw, nh)
            flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                    8: cv2.IMREAD_REDUCED_COLOR_8}[f] | cv2.IMREAD_IGNORE_ORIENTATION
            a = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
            if a is not None and a.ndim == 3:
                return _crop_hwc(_cv_resize(a, nh, nw, pre.resample), pre, bgr=True)
        else:
            im.draft("RGB", (nw, nh))  # PIL picks the largest DCT scale keeping >= (nw, nh)
    rgb = _rgb(im)
    return _fast_geometry_pil(rgb, pre)


def _fast_geometry_pil(rgb, pre) -> torch.Tensor:
    """A decoded RGB PIL image -> (3, H, W) uint8 the fast way."""
    w, h = rgb.size
    nh, nw = _target(pre, h, w)
    if _cv2() is not None:
        return _crop_hwc(_cv_resize(np.asarray(rgb), nh, nw, pre.resample), pre, bgr=False)
    from PIL import Image

    if (w, h) != (nw, nh):
        # reducing_gap: a box reduction by an integer factor first, then the filter on <= 2x the target
        rgb = rgb.resize((nw, nh), getattr(Image.Resampling, pre.resample.upper()), reducing_gap=2.0)
    return _crop_hwc(np.asarray(rgb), pre, bgr=False)


def load_uint8(source, pre, mode: str = "exact", max_pixels: Optional[int] = None) -> torch.Tensor:
    """One image -> uint8 (3, H, W) with ``pre``'s geometry (see the module docstring).

    Args:
        source: a path, the file's bytes (``bytes`` / ``bytearray`` / ``memoryview``), a PIL image,
            a uint8 numpy array (H, W[, C]) or a uint8 tensor (C, H, W).
        pre: the :class:`fastvit.Preprocessor`.
        mode: 'exact' or 'fast'.
        max_pixels: refuse images with more pixels (checked from the header); default PIL's limit.

    Raises:
        DecodeError: the input is not a decodable image (the reason says why).
        ValueError: ``mode`` is unknown, or 'exact' for a processor without an exact uint8 result.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if mode == "exact" and not uint8_exact(pre):
        raise ValueError("mode: 'exact' has no uint8 result for this processor (rescale_first: it resizes the "
                         "rescaled float image, as Hugging Face's DINOv3 processor); use process() for the exact "
                         "float image or mode='fast' for a uint8 approximation")
    if isinstance(source, (str, os.PathLike)):
        source = read_bytes(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if mode == "fast":
            return _fast_from_bytes(data, pre, max_pixels)
        return pre.geometry(_rgb(_open(data, max_pixels)))
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_size(source.size, max_pixels)
        return _fast_geometry_pil(source.convert("RGB"), pre) if mode == "fast" else pre.geometry(source)
    # arrays / tensors: already pixels; the geometry is the processor's either way
    return pre.geometry(source)


# --------------------------------------------------------------------------- batches (GPU decode)
def _resize_device(x: torch.Tensor, pre) -> torch.Tensor:
    """uint8 (3, h, w) on any device -> (3, H, W) uint8 with ``pre``'s geometry, resized as
    torchvision's tensor resize (antialias, float, rounded): Hugging Face's processors' algorithm."""
    nh, nw = _target(pre, *x.shape[-2:])
    if (nh, nw) != tuple(x.shape[-2:]):
        mode = pre.tensor_resample
        aa = mode in ("bilinear", "bicubic")
        y = F.interpolate(x.unsqueeze(0).float(), size=(nh, nw), mode=mode, align_corners=False if aa else None,
                          antialias=aa)[0]
        x = y.clamp_(0, 255).round_().to(torch.uint8)
    return pre._crop(x)


def decode_batch(items: Sequence[bytes], pre, device: Union[str, torch.device] = "cuda", mode: str = "exact",
                 max_pixels: Optional[int] = None) -> List[Union[torch.Tensor, DecodeError]]:
    """Decode many files at once: per item a uint8 (3, H, W) tensor on ``device`` or the
    :class:`DecodeError` saying why not.

    JPEGs go to ``torchvision.io.decode_jpeg`` as one list (nvJPEG's batched decode on CUDA; the
    same call runs libjpeg on the CPU, which is how this path is tested without a GPU), then are
    resized / cropped on ``device``. Other formats, and JPEGs the batched decoder refuses, are
    decoded alone on the CPU (``mode`` as :func:`load_uint8`) and copied over.
    """
    device = torch.device(device)
    out: List[Union[torch.Tensor, DecodeError, None]] = [None] * len(items)
    jpeg_idx, jpeg_data = [], []
    for i, data in enumerate(items):
        try:
            data = bytes(data)
            im = _open(data, max_pixels)
            if im.format == "JPEG" and im.mode in ("RGB", "L") and _jpeg_complete(data):
                jpeg_idx.append(i)
                jpeg_data.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            else:
                out[i] = load_uint8(data, pre, mode if uint8_exact(pre) else "fast", max_pixels).to(device)
        except DecodeError as e:
            out[i] = e
    if jpeg_idx:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg(jpeg_data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one file the batched decoder refuses fails the whole call
            decoded = [None] * len(jpeg_data)
        for i, t, img in zip(jpeg_idx, jpeg_data, decoded):
            if img is None:
                # alone on the CPU: PIL decodes what nvJPEG refuses, or says why the file is bad
                try:
                    out[i] = load_uint8(items[i], pre, mode if uint8_exact(pre) else "fast", max_pixels).to(device)
                except DecodeError as e:
                    out[i] = e
            else:
                out[i] = _resize_device(img, pre)
    return out  # type: ignore[return-value]

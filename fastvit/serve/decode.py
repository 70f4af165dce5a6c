"""Request bytes -> the pixels the model sees, or a reason. Every decode of the server goes
through :func:`decode_input` (one place to change the decode path)."""

from __future__ import annotations

from typing import Optional

import torch

from ..data.decode import DEFAULT_MAX_PIXELS, DecodeError, _open, _rgb

__all__ = ["decode_input", "DecodeError", "DEFAULT_MAX_PIXELS", "input_dtype"]


def input_dtype(preprocessor, mode: str) -> torch.dtype:
    """dtype of :func:`decode_input`'s images: uint8 pixels, or float32 for a processor whose
    exact output exists only as float (``rescale_first``)."""
    return torch.uint8 if mode == "fast" or preprocessor.uint8_exact else torch.float32


def decode_input(data: bytes, preprocessor, max_pixels: Optional[int] = None, mode: str = "exact") -> torch.Tensor:
    """One request image -> (3, H, W) with ``preprocessor``'s geometry: uint8 (the model folds the
    normalisation in) or float32 normalised (see :func:`input_dtype`).

    The header is read first and its size checked against ``max_pixels`` (decompression bombs)
    and the smallest side (a 1 x 1 tracking pixel is refused) before any pixel is decoded;
    empty, truncated, corrupt and non-image bytes are refused too.

    Raises:
        DecodeError: the reason the input is not a usable image.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    if input_dtype(preprocessor, mode) == torch.uint8:
        return preprocessor.load(bytes(data), mode=mode, max_pixels=max_pixels)
    return preprocessor.process(_rgb(_open(bytes(data), max_pixels)))

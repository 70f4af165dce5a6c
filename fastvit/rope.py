"""Rotary position embedding tables of the ViT families that use RoPE, computed as timm / HF do.

Each module maps a token grid (rows, cols) to the table :func:`fastvit.ops.attention` takes:
``cat([sin, cos], -1)`` of the patch tokens in row-major order, (N, 2 d) for every head, or one
(H, N, 2 d) per block for the mixed (learnt) kind. The model computes a table once per grid and
caches it (:meth:`fastvit.model.VisionTransformer._block_pos_inputs`), so these run per new image
size, not per forward. Tables are float32 whatever the model dtype: the attention rotates in
float32 and rounds to q's dtype (timm keeps its frequencies in float32 too).

=========================  ============================================  =================================
kind                       timm / HF                                     pairs, coordinates
=========================  ============================================  =================================
:class:`RopeCat`           ``RotaryEmbeddingCat`` (``rope_type='cat'``,  interleaved; integer positions,
                           ``in_pixels=False``): EVA-02, timm SBB        scaled to ``ref_feat_shape``
                           ``vit_*_rope_reg*``, naver ``vit_*_rope_*``   (EVA), 'ij' or 'xy' channels
:class:`RopeMixed`         ``RotaryEmbeddingMixed``: naver               interleaved; learnt frequencies
                           ``vit_*_rope_mixed_*``                        ``freqs`` (2, depth, H, d / 2)
:class:`RopeDinoV3`        ``RotaryEmbeddingDinoV3``; HF                 halves (rotate_half); centred
                           ``DINOv3ViTRopePositionEmbedding``            coordinates in [-1, 1]
=========================  ============================================  =================================

Only the inference path is built: timm's training-time coordinate augmentation (shift / jitter /
rescale) does not run in eval mode and has no counterpart here.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["RopeCat", "RopeMixed", "RopeDinoV3", "ROPE_TYPES", "build_rope"]

ROPE_TYPES = ("cat", "mixed", "dinov3")
_INDEXINGS = ("ij", "xy")


def _check(name: str, value, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _layout(x: torch.Tensor, half: bool) -> torch.Tensor:
    """Per-frequency values (..., d / 2) -> (..., d): [f0, f0, f1, f1, ...] for interleaved pairs,
    [f0, f1, ..., f0, f1, ...] for rotate_half."""
    return torch.cat([x, x], dim=-1) if half else x.repeat_interleave(2, -1)


def _index_grid(grid: Tuple[int, int], indexing: str, offset: float = 0.0,
                ref: Optional[Tuple[int, int]] = None, device=None) -> torch.Tensor:
    """Integer patch positions (+ offset), optionally rescaled so ``grid`` spans ``ref``:
    (rows, cols, 2), channels (row, col) for 'ij', (col, row) for 'xy' (timm ``_build_grid``)."""
    shape = list(grid)
    if indexing == "xy":
        shape = shape[::-1]
        ref = None if ref is None else tuple(ref)[::-1]
    t = [torch.arange(s, device=device, dtype=torch.int64).to(torch.float32) + offset for s in shape]
    if ref is not None:
        t = [x / f * r for x, f, r in zip(t, shape, ref)]  # EVA's resize rule (ref = pretraining grid)
    return torch.stack(torch.meshgrid(t, indexing=indexing), dim=-1)


class RopeCat(nn.Module):
    """Axial RoPE with fixed frequencies (timm ``RotaryEmbeddingCat``, ``in_pixels=False``).

    Frequencies ``temperature ** -(i / (d / 4))``, i < d / 4, applied to each axis' position; the
    table holds the row-axis angles then the column-axis ones (the reverse for 'xy').

    Args:
        head_dim: d (a multiple of 4).
        temperature: frequency base (EVA-02 10000, naver RoPE-ViT 100).
        grid_indexing: 'ij' (EVA-02, timm) or 'xy' (naver RoPE-ViT).
        grid_offset: added to the integer positions.
        ref_feat_shape: (rows, cols) the positions are rescaled to whatever the grid (EVA-02: the
            pretraining grid, 16 x 16), or None for raw positions.
        rotate_half: emit the rotate_half layout instead of interleaved pairs.
    """

    def __init__(self, head_dim: int, temperature: float = 10000.0, grid_indexing: str = "ij",
                 grid_offset: float = 0.0, ref_feat_shape: Optional[Sequence[int]] = None, rotate_half: bool = False):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: expected a multiple of 4 for 2-D RoPE, got {head_dim}")
        _check("rope_grid_indexing", grid_indexing, _INDEXINGS)
        self.head_dim = head_dim
        self.temperature = float(temperature)
        self.grid_indexing = grid_indexing
        self.grid_offset = float(grid_offset)
        self.ref_feat_shape = None if ref_feat_shape is None else (int(ref_feat_shape[0]), int(ref_feat_shape[1]))
        self.rotate_half = rotate_half
        n = head_dim // 4
        exp = torch.arange(0, n, 1, dtype=torch.int64).to(torch.float32) / n
        # float32 frequencies (timm's freq_bands); non-persistent: checkpoints do not hold them
        self.register_buffer("bands", 1.0 / (self.temperature ** exp), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.bands.dtype != torch.float32:  # .half() / .to(bfloat16) keep the frequencies in float32
            self.bands = self.bands.float()
        return self

    def forward(self, grid: Tuple[int, int]) -> torch.Tensor:
        """(rows, cols) -> (rows * cols, 2 d) float32 ``cat([sin, cos], -1)``."""
        bands = self.bands.float()
        pos = _index_grid(grid, self.grid_indexing, self.grid_offset, self.ref_feat_shape, bands.device)
        ang = pos.unsqueeze(-1) * bands  # (rows, cols, 2, d / 4)
        sin = _layout(ang.sin().flatten(-2).flatten(0, -2), self.rotate_half)
        cos = _layout(ang.cos().flatten(-2).flatten(0, -2), self.rotate_half)
        return torch.cat([sin, cos], -1)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, temperature={self.temperature}, grid_indexing={self.grid_indexing!r}, "
                f"ref_feat_shape={self.ref_feat_shape}, rotate_half={self.rotate_half}")


class RopeMixed(nn.Module):
    """RoPE-Mixed (Heo et al. 2024; timm ``RotaryEmbeddingMixed``): learnt 2-D frequencies per
    block and head, ``freqs`` (2, depth, H, d / 2), loaded from the checkpoint as ``rope.freqs``.

    The angle of a token at (x, y) is ``x * freqs[0] + y * freqs[1]``, positions are integer patch
    indices ('xy': x is the column).

    Args:
        head_dim: d (a multiple of 4). depth: blocks. num_heads: H.
        temperature: base of the initial frequency magnitudes (timm 10).
        grid_indexing: 'xy' (timm's presets) or 'ij'.
    """

    def __init__(self, head_dim: int, depth: int, num_heads: int, temperature: float = 10.0,
                 grid_indexing: str = "xy"):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: expected a multiple of 4 for 2-D RoPE, got {head_dim}")
        _check("rope_grid_indexing", grid_indexing, _INDEXINGS)
        self.head_dim, self.depth, self.num_heads = head_dim, depth, num_heads
        self.temperature = float(temperature)
        self.grid_indexing = grid_indexing
        self.freqs = nn.Parameter(self._init_freqs())

    def _init_freqs(self) -> torch.Tensor:
        """Initial frequencies as timm's ``init_random_2d_freqs`` (random rotation per block and
        head; the checkpoint's values replace them)."""
        mag = 1.0 / (self.temperature ** (torch.arange(0, self.head_dim, 4, dtype=torch.float32) / self.head_dim))
        angles = torch.rand(self.depth, self.num_heads, 1) * 2 * math.pi
        fx = torch.cat([mag * torch.cos(angles), mag * torch.cos(angles + math.pi / 2)], dim=-1)
        fy = torch.cat([mag * torch.sin(angles), mag * torch.sin(angles + math.pi / 2)], dim=-1)
        return torch.stack([fx, fy], dim=0)  # (2, depth, H, d / 2)

    def forward(self, grid: Tuple[int, int]) -> List[torch.Tensor]:
        """(rows, cols) -> one (H, rows * cols, 2 d) float32 table per block."""
        freqs = self.freqs.float()
        pos = _index_grid(grid, self.grid_indexing, device=freqs.device).reshape(-1, 2)
        t_x, t_y = pos[:, 0], pos[:, 1]
        # outer products as elementwise products (timm: no matmul, so no reduced-precision GEMM)
        ang = t_x.unsqueeze(-1) * freqs[0].unsqueeze(-2) + t_y.unsqueeze(-1) * freqs[1].unsqueeze(-2)
        table = torch.cat([_layout(ang.sin(), False), _layout(ang.cos(), False)], dim=-1)  # (depth, H, N, 2 d)
        return list(table.unbind(0))

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, depth={self.depth}, num_heads={self.num_heads}, "
                f"grid_indexing={self.grid_indexing!r}")


class RopeDinoV3(nn.Module):
    """DINOv3's RoPE (timm ``RotaryEmbeddingDinoV3``, HF ``DINOv3ViTRopePositionEmbedding``).

    Patch centres ``(i + 0.5 + offset) / n`` mapped to [-1, 1] per axis (``normalize_coords``:
    'separate' divides each axis by its own size, 'min' / 'max' by the smaller / larger), angles
    ``2 pi * coord / period`` with periods ``temperature ** (2 i / (d / 2))`` (or geometric from
    ``min_period`` to ``max_period``), laid out for rotate_half.

    Args:
        head_dim: d (a multiple of 4). temperature: the period base (DINOv3 100).
        min_period, max_period: the other period schedule (both or neither).
        normalize_coords: 'separate', 'min' or 'max'. grid_offset: added to the centres.
        grid_indexing: 'ij' or 'xy'.
        hf: compute as Hugging Face does (``coord * inv_freq`` with ``inv_freq = 1 / base **
            arange(0, 1, 4 / d)``) instead of timm's ``coord / period``: the same function,
            rounded differently; each matches its library bit for bit.
    """

    def __init__(self, head_dim: int, temperature: Optional[float] = 100.0, min_period: Optional[float] = None,
                 max_period: Optional[float] = None, normalize_coords: str = "separate", grid_offset: float = 0.0,
                 grid_indexing: str = "ij", hf: bool = False):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim: expected a multiple of 4 for 2-D RoPE, got {head_dim}")
        _check("rope_normalize_coords", normalize_coords, ("separate", "min", "max"))
        _check("rope_grid_indexing", grid_indexing, _INDEXINGS)
        if (min_period is None) != (max_period is None):
            raise ValueError(f"min_period / max_period: expected both or neither, got {min_period} / {max_period}")
        if min_period is None and temperature is None:
            raise ValueError("temperature: expected a period base when min_period / max_period are not given, got None")
        if hf and (min_period is not None or normalize_coords != "separate" or grid_offset or grid_indexing != "ij"):
            raise ValueError("hf: Hugging Face DINOv3 RoPE has only the temperature schedule, 'separate' "
                             "normalisation, no offset and 'ij' indexing")
        self.head_dim = head_dim
        self.temperature = None if temperature is None else float(temperature)
        self.min_period, self.max_period = min_period, max_period
        self.normalize_coords = normalize_coords
        self.grid_offset = float(grid_offset)
        self.grid_indexing = grid_indexing
        self.hf = hf
        self.register_buffer("periods", self._periods(), persistent=False)

    def _periods(self) -> torch.Tensor:
        n = self.head_dim // 4
        if self.hf:  # stored inverted, as HF's inv_freq
            return 1 / self.temperature ** torch.arange(0, 1, 4 / self.head_dim, dtype=torch.float32)
        if self.min_period is not None:
            exp = torch.linspace(0, 1, n, dtype=torch.float32)
            return self.min_period * ((self.max_period / self.min_period) ** exp)
        exp = 2.0 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2)
        return self.temperature ** exp

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.periods.dtype != torch.float32:  # keep the periods float32 under .half() / .to(bfloat16)
            self.periods = self._periods().to(self.periods.device)
        return self

    def _coords(self, grid: Tuple[int, int], device) -> torch.Tensor:
        """Patch centres in [-1, 1], (rows * cols, 2) float32."""
        shape = list(grid)
        if self.grid_indexing == "xy":
            shape = shape[::-1]
        if self.normalize_coords == "max":
            denom = [float(max(shape))] * 2
        elif self.normalize_coords == "min":
            denom = [float(min(shape))] * 2
        else:
            denom = [float(s) for s in shape]
        if self.hf:
            t = [torch.arange(0.5, s, dtype=torch.float32, device=device) / s for s in shape]
        else:
            t = [(torch.arange(0.5, s, dtype=torch.float32, device=device) + self.grid_offset) / d
                 for s, d in zip(shape, denom)]
        c = torch.stack(torch.meshgrid(t, indexing=self.grid_indexing), dim=-1).flatten(0, 1)
        return 2.0 * c - 1.0

    def forward(self, grid: Tuple[int, int]) -> torch.Tensor:
        """(rows, cols) -> (rows * cols, 2 d) float32 ``cat([sin, cos], -1)`` (rotate_half layout)."""
        periods = self.periods
        coords = self._coords(grid, periods.device)[:, :, None]
        if self.hf:
            ang = 2 * math.pi * coords * periods[None, None, :]
        else:
            ang = 2 * math.pi * coords / periods[None, None, :]
        ang = ang.flatten(1)  # (N, d / 2): row-axis frequencies, then column-axis
        return torch.cat([_layout(ang.sin(), True), _layout(ang.cos(), True)], dim=-1)

    def extra_repr(self) -> str:
        sched = (f"temperature={self.temperature}" if self.min_period is None
                 else f"min_period={self.min_period}, max_period={self.max_period}")
        return f"head_dim={self.head_dim}, {sched}, normalize_coords={self.normalize_coords!r}, hf={self.hf}"


def build_rope(rope_type: Optional[str], head_dim: int, depth: int, num_heads: int, temperature: Optional[float],
               grid_indexing: str = "ij", grid_offset: float = 0.0, ref_feat_shape: Optional[Sequence[int]] = None,
               rotate_half: bool = False, normalize_coords: str = "separate", min_period: Optional[float] = None,
               max_period: Optional[float] = None, hf: bool = False) -> Optional[nn.Module]:
    """The RoPE module of ``rope_type`` (None: none), with timm's defaults for a missing temperature
    ('cat' 10000, 'mixed' 10, 'dinov3' 100)."""
    if rope_type is None:
        return None
    _check("rope_type", rope_type, ROPE_TYPES)
    if hf and rope_type != "dinov3":
        raise ValueError(f"rope_hf: only rope_type='dinov3' has a Hugging Face variant, got {rope_type!r}")
    if rope_type == "cat":
        return RopeCat(head_dim, 10000.0 if temperature is None else temperature, grid_indexing, grid_offset,
                       ref_feat_shape, rotate_half)
    if rope_type == "mixed":
        if rotate_half:
            raise ValueError("rope_rotate_half: rope_type='mixed' pairs interleaved dims (timm requires False)")
        return RopeMixed(head_dim, depth, num_heads, 10.0 if temperature is None else temperature, grid_indexing)
    if not rotate_half:
        raise ValueError("rope_rotate_half: rope_type='dinov3' rotates halves (expected True)")
    return RopeDinoV3(head_dim, 100.0 if temperature is None and min_period is None else temperature, min_period,
                      max_period, normalize_coords, grid_offset, grid_indexing, hf)

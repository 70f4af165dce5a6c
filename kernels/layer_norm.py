"""LayerNorm over the last dim, and the row-statistics kernel of the fused LN prologue.

One kernel, two modes (constexpr flags, so each mode compiles to its own lean code):

* ``WRITE_Y``: y = (x - mean) * rstd * weight + bias, in x's dtype (a standalone LayerNorm,
  e.g. the final norm),
* ``WRITE_STATS``: only mean and rstd per row, float32 (M,) -- what :mod:`.linear` reads to
  normalise its A tiles on the fly, so the qkv / fc1 GEMMs read the un-normalised stream once
  and no normalised copy is ever written.

A program owns ``BLOCK_M`` rows and walks D in ``BLOCK_D`` chunks: pass 1 the mean, pass 2 the
variance as the mean of (x - mean)^2 (two-pass: no cancellation, unlike E[x^2] - E[x]^2),
pass 3 the output. For ViT widths (D <= 4096) every pass is a single chunk and passes 2-3
re-read x from L1/L2. Statistics are float32 whatever the input dtype (as ATen does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import dtype_name

from .autotune import Binding, Config, Tunable, cdiv, next_pow2


@triton.jit
def _ln_fwd(
    X, W, B, Y, Mean, Rstd,
    stride_xm, stride_ym,
    M, D, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    cols0 = tl.arange(0, BLOCK_D)
    x_row = X + rows[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        acc += tl.load(x_row + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < D), other=0.0).to(tl.float32)
    mean = tl.sum(acc, 1) / D
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        m = mask_m[:, None] & (cols[None, :] < D)
        x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
        xc = tl.where(m, x - mean[:, None], 0.0)
        acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, 1) / D + eps)
    if WRITE_STATS:
        tl.store(Mean + rows, mean, mask=mask_m)
        tl.store(Rstd + rows, rstd, mask=mask_m)
    if WRITE_Y:
        y_row = Y + rows[:, None].to(tl.int64) * stride_ym
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols0
            mask_d = cols < D
            m = mask_m[:, None] & mask_d[None, :]
            x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            tl.store(y_row + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


def _configs():
    """Row-block x chunk sizes. ~4-8K elements per program keeps registers modest at 4 warps."""
    out = []
    for bd in (256, 512, 1024, 2048, 4096):
        for bm in (1, 2, 4, 8, 16):
            if 1024 <= bm * bd <= 16384:
                for w in (4, 8):
                    out.append(Config.make(w, 1, BLOCK_M=bm, BLOCK_D=bd))
    return out


def keep(cfg: Config, key: Tuple) -> bool:
    """key = (D, dtype name, mode)."""
    D = key[0]
    bd = cfg["BLOCK_D"]
    # AOT table: > 64 fp32 values per thread spills, and so (oddly, 8 B) does a single
    # 1024-wide row at 4 warps on sm_90
    if cfg["BLOCK_M"] * bd // (32 * cfg.num_warps) > 64 or (cfg["BLOCK_M"] == 1 and bd < 2048):
        return False
    # one chunk when D fits in 4096 (no loop overhead); never a chunk far wider than D
    return bd == min(next_pow2(max(D, 16)), 4096) or (D > 4096 and bd >= 1024)


def heuristic(key: Tuple) -> Config:
    D = key[0]
    bd = min(next_pow2(max(D, 16)), 4096)
    bm = max(1, min(16, 4096 // bd))
    return Config.make(4 if bm * bd <= 4096 else 8, 1, BLOCK_M=bm, BLOCK_D=bd)  # <= 32 values per thread


TUNE = Tunable("layer_norm", _configs, keep, heuristic)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float = 1e-6, out: Optional[torch.Tensor] = None,
                   config: Optional[Config] = None) -> torch.Tensor:
    """LayerNorm of x over its last dim.

    Args:
        x: (..., D). weight, bias: (D,) or None.
        out: optional (..., D) output of x's dtype whose rows are (M, D)-viewable.

    Returns:
        (..., D) in x's dtype.
    """
    D = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = out.view(-1, D)
    if M == 0 or D == 0:
        return out

    def run(cfg: Config):
        _ln_fwd[(cdiv(M, cfg["BLOCK_M"]),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, y2, x2, x2,
            x2.stride(0), y2.stride(0), M, D, float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Y=True, WRITE_STATS=False,
            **cfg.launch_kwargs(),
        )

    run(config or TUNE.pick((D, dtype_name(x.dtype), "y"), x.device, run))
    return out


def row_stats(x2: torch.Tensor, eps: float, config: Optional[Config] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row LayerNorm statistics of a 2-D (M, D) tensor: mean (M,), rstd (M,), float32."""
    M, D = x2.shape
    mean = torch.empty(M, dtype=torch.float32, device=x2.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x2.device)
    if M == 0:
        return mean, rstd

    def run(cfg: Config):
        _ln_fwd[(cdiv(M, cfg["BLOCK_M"]),)](
            x2, x2, x2, x2, mean, rstd, x2.stride(0), 0, M, D, float(eps),
            HAS_W=False, HAS_B=False, WRITE_Y=False, WRITE_STATS=True, **cfg.launch_kwargs(),
        )

    run(config or TUNE.pick((D, dtype_name(x2.dtype), "stats"), x2.device, run))
    return mean, rstd


def row_stats_for(M: int, D: int, dtype: torch.dtype, device: torch.device):
    """:func:`row_stats` for every (M, D) ``x2`` of ``dtype`` on ``device`` whose row stride is
    what the first call's was (a bound linear's LN prologue): the config and grid are looked up
    at the first call, then a call allocates the two outputs and launches."""
    key = (D, dtype_name(dtype), "stats")
    bound = Binding()
    sx = []  # the row stride of the first call's x2

    def run(x2: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        mean = torch.empty(M, dtype=torch.float32, device=device)
        rstd = torch.empty(M, dtype=torch.float32, device=device)
        if bound.grid is None:
            def launch(cfg: Config):
                _ln_fwd[(cdiv(M, cfg["BLOCK_M"]),)](x2, x2, x2, x2, mean, rstd, x2.stride(0), 0, M, D, eps, HAS_W=False,
                                                   HAS_B=False, WRITE_Y=False, WRITE_STATS=True, **cfg.launch_kwargs())

            cfg = TUNE.pick(key, device, launch)
            sx[:] = [x2.stride(0)]
            bound.set((cdiv(M, cfg["BLOCK_M"]),), dict(HAS_W=False, HAS_B=False, WRITE_Y=False, WRITE_STATS=True,
                                                       **cfg.launch_kwargs()))
        _ln_fwd[bound.grid](x2, x2, x2, x2, mean, rstd, sx[0], 0, M, D, eps, **bound.kwargs)
        return mean, rstd

    return run


def layer_norm_for(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-6):
    """:func:`layer_norm_fwd` bound to these arguments' call signature (fastvit.ops' cached plan):
    rows, strides, flags and key read once, config and grid at the first call; a later call
    reshapes, allocates and launches."""
    D = x.shape[-1]
    x2 = _rows(x)
    M = x2.shape[0]
    if M == 0 or D == 0:
        return layer_norm_fwd
    copy = x2.data_ptr() != x.data_ptr() or x2.stride(-1) != x.stride(-1)  # _rows copied: every call does
    shape, dtype, device = tuple(x.shape), x.dtype, x.device
    sx = x2.stride(0)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Y=True, WRITE_STATS=False)
    key = (D, dtype_name(dtype), "y")
    bound = Binding()

    def run(x, weight, bias, eps=1e-6):
        x2 = _rows(x) if copy else x.view(M, D)
        out = torch.empty(shape, dtype=dtype, device=device)
        y2 = out.view(M, D)
        w = x2 if weight is None else weight
        b = x2 if bias is None else bias
        if bound.grid is None:
            def launch(cfg: Config):
                _ln_fwd[(cdiv(M, cfg["BLOCK_M"]),)](x2, w, b, y2, x2, x2, sx, D, M, D, eps, **flags,
                                                   **cfg.launch_kwargs())

            cfg = TUNE.pick(key, device, launch)
            bound.set((cdiv(M, cfg["BLOCK_M"]),), {**flags, **cfg.launch_kwargs()})
        _ln_fwd[bound.grid](x2, w, b, y2, x2, x2, sx, D, M, D, eps, **bound.kwargs)
        return out

    return run


KERNELS = {"layer_norm": _ln_fwd}
__all__ = ["layer_norm_fwd", "layer_norm_for", "row_stats", "row_stats_for", "TUNE", "keep", "heuristic", "_configs",
           "KERNELS"]

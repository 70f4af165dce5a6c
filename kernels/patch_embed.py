"""Fused patch embedding: NCHW image -> (B, T + gh * gw, D) tokens in one kernel.

The conv with kernel = stride = patch is a GEMM ``A @ W^T`` with A the im2col matrix of the
image, (B * gh * gw, C * Ph * Pw), and W the conv weight viewed as (D, C * Ph * Pw). The kernel
never builds A: each A tile is gathered straight from the image (row m -> image b, patch row
gy, patch column gx; column k -> channel c, pixel row py, pixel column px), cast to the weight
dtype in the load (a float32 or uint8 image feeds a bf16 model with no separate ``.to()`` pass), and
zero-filled outside the image (``pad``, timm's dynamic_img_pad). The epilogue adds the bias
and the position embedding row of the patch and stores the row after the T prefix rows.

The prefix rows (class / distillation / register tokens, their position embedding already
added by the model) are written by the first programs of the same launch: one kernel, one
output buffer, no ``torch.cat``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import dtype_name, patch_grid

from .autotune import Config, Tunable, cdiv, next_pow2, smem_limit


@triton.jit
def _patch_embed_fwd(
    X, W, Bias, Pos, Prefix, Y,
    B, C, H, W_img, GH, GW, D, K, T, NUM_PREFIX_PROGRAMS,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wd, stride_pos, stride_pre, stride_yb, stride_yt,
    PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_n = pid % num_n
    pid_m = pid // num_n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    if pid_m < NUM_PREFIX_PROGRAMS:
        # prefix rows: row r of the B * T block is token r % T of image r // T
        r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (r[:, None] < B * T) & mask_n[None, :]
        b = r // T
        t = r % T
        vals = tl.load(Prefix + t[:, None] * stride_pre + offs_n[None, :], mask=mask, other=0.0)
        tl.store(Y + b[:, None].to(tl.int64) * stride_yb + t[:, None] * stride_yt + offs_n[None, :],
                 vals.to(Y.dtype.element_ty), mask=mask)
    else:
        NP = GH * GW
        M = B * NP
        offs_m = (pid_m - NUM_PREFIX_PROGRAMS) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m % M  # clamped like the linear kernel: out-of-range rows are never stored
        b = rows // NP
        p = rows % NP
        gy = p // GW
        gx = p % GW
        img_row = X + b.to(tl.int64) * stride_xb + (gy * PH) * stride_xh + (gx * PW) * stride_xw  # patch corner
        cols = offs_n % D
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            c = kk // (PH * PW)
            rem = kk % (PH * PW)
            py = rem // PW
            px = rem % PW
            a_mask = kk[None, :] < K
            if PAD:
                a_mask = a_mask & ((gy * PH)[:, None] + py[None, :] < H) & ((gx * PW)[:, None] + px[None, :] < W_img)
            a = tl.load(img_row[:, None] + c[None, :] * stride_xc + py[None, :] * stride_xh + px[None, :] * stride_xw,
                        mask=a_mask, other=0).to(W.dtype.element_ty)
            w = tl.load(W + cols[None, :].to(tl.int64) * stride_wd + kk[:, None], mask=kk[:, None] < K, other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = (offs_m[:, None] < M) & mask_n[None, :]
        if HAS_POS:
            acc += tl.load(Pos + p[:, None] * stride_pos + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + b[:, None].to(tl.int64) * stride_yb + (T + p)[:, None] * stride_yt + offs_n[None, :],
                 acc.to(Y.dtype.element_ty), mask=mask)


def _configs():
    """GEMM tiles for M = B * patches, N = D, K = C * P * P (588 / 768 / 3072 for P 14 / 16 / 32).
    The gathered A tile's address math (c, py, px per element) costs registers, so the
    accumulator is kept to <= 32 values per thread (AOT table: 64 x 128 at 4 warps spills
    with padding on sm_80)."""
    rows = [(128, 128, 32, 3, 8), (64, 128, 32, 3, 8), (128, 64, 32, 3, 8), (64, 64, 32, 3, 4), (32, 64, 32, 3, 4)]
    return [Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk) for bm, bn, bk, s, w in rows]


def keep(cfg: Config, key: Tuple) -> bool:
    """key = (M bucket, D, K, patch, dtype name, flags, image dtype name)."""
    m_b, D, K, _, dt, _, _ = key
    elem = 4 if dt == "float32" else 2
    if cfg.num_stages * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem > smem_limit():
        return False
    if cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg.num_warps) > (16 if dt == "float32" else 32):
        return False
    return cfg["BLOCK_M"] <= 2 * m_b and cfg["BLOCK_N"] <= 2 * next_pow2(D)


def heuristic(key: Tuple) -> Config:
    """A gathered A tile cannot use TMA / cp.async bulk copies, so deep pipelines buy little:
    64 x 64 x 32 at 4 warps (32 x 64 for float32, whose ieee products run on FMA units)."""
    m_b, D, K, _, dt, _, _ = key
    bm = max(16, min(32 if dt == "float32" else 64, m_b))
    bn = max(16, min(64, next_pow2(D)))
    return Config.make(4, 3, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=32)


TUNE = Tunable("patch_embed", _configs, keep, heuristic)


def patch_embed_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    pos_embed: Optional[torch.Tensor] = None, prefix: Optional[torch.Tensor] = None,
                    pad: bool = False, out: Optional[torch.Tensor] = None,
                    config: Optional[Config] = None) -> torch.Tensor:
    """Image -> tokens (conv-as-GEMM + bias + pos + prefix rows) in one launch.

    Args:
        x: (B, C, H, W), any float dtype or uint8, any strides (cast to weight.dtype in the load).
        weight: (D, C, Ph, Pw). bias: (D,) or None. pos_embed: (gh * gw, D) or None.
        prefix: (T, D) or None. pad: zero-pad H, W up to patch multiples.
        out: optional (B, T + gh * gw, D) output in weight.dtype with unit last stride.

    Returns:
        (B, T + gh * gw, D).
    """
    B, C, H, W = x.shape
    D, _, ph, pw = weight.shape
    gh, gw = patch_grid(H, W, (ph, pw), pad)
    T = 0 if prefix is None else prefix.shape[0]
    if out is None:
        out = torch.empty(B, T + gh * gw, D, dtype=weight.dtype, device=x.device)
    if B == 0 or D == 0:
        return out
    K = C * ph * pw
    w2 = weight.reshape(D, K)
    if w2.stride(1) != 1:
        w2 = w2.contiguous()
    if pos_embed is not None and pos_embed.stride(-1) != 1:
        pos_embed = pos_embed.contiguous()
    if prefix is not None and prefix.stride(-1) != 1:
        prefix = prefix.contiguous()
    M = B * gh * gw
    needs_pad = pad and (H % ph != 0 or W % pw != 0)
    flags = (bias is not None, pos_embed is not None, needs_pad)
    prec = "ieee" if weight.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"

    def run(cfg: Config):
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        n_prefix = cdiv(B * T, bm)
        grid = ((n_prefix + cdiv(M, bm)) * cdiv(D, bn),)
        _patch_embed_fwd[grid](
            x, w2, bias if bias is not None else w2, pos_embed if pos_embed is not None else w2,
            prefix if prefix is not None else w2, out,
            B, C, H, W, gh, gw, D, K, T, n_prefix,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            w2.stride(0), pos_embed.stride(0) if pos_embed is not None else 0,
            prefix.stride(0) if prefix is not None else 0, out.stride(0), out.stride(1),
            PH=ph, PW=pw, HAS_BIAS=flags[0], HAS_POS=flags[1], PAD=flags[2], PRECISION=prec,
            **cfg.launch_kwargs(),
        )

    m_b = min(next_pow2(max(M, 16)), 8192)
    # the image dtype is cast in the load: it changes the compiled code and the bytes read
    key = (m_b, D, K, (ph, pw), dtype_name(weight.dtype), flags, dtype_name(x.dtype))
    run(config or TUNE.pick(key, x.device, run))
    return out


KERNELS = {"patch_embed": _patch_embed_fwd}
__all__ = ["patch_embed_fwd", "TUNE", "keep", "heuristic", "_configs", "KERNELS"]

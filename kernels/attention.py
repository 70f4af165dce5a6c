"""Flash-style attention forward (tiled, exp2 online softmax, never materialises N x N).

Two kernels:

* ``_attn_fwd`` -- the fast path. q, k, v are (B, H, N, d) tensors with arbitrary strides
  (the model passes strided views of its packed qkv buffer), the output is written in
  (B, N, H, d) memory order and returned as its (B, H, N, d) transposed view, so the
  projection reads it as (B, N, H * d) with no copy.
* ``_attn_probs_fwd`` -- opt-in, for pictures: a first pass finds each row's max and sum, a
  second pass writes the normalised probabilities (float32, (B, H, N, N_kv)) and accumulates
  the output. The fast path never pays for it.

Any N (the kv tail is masked in a separate last iteration, so full tiles run unmasked; no
padding copies), head dims up to 256 through a power-of-two ``BLOCK_D`` with a mask on d
when ``HEAD_DIM`` is not one (48, 80, 96 ...). fp16 / bf16 inputs use tensor-core dots with
float32 accumulation. float32 inputs use ``input_precision='ieee'`` (exact fp32 products,
matching PyTorch's default ``torch.backends.cuda.matmul.allow_tf32 = False``), or tf32 when
the user enabled ``allow_tf32``. On a GPU, float32 attention runs only for head dims <= 64:
the ieee products run on FMA units with q / k tiles in registers, and the AOT table shows
every larger-head config spilling (``unsupported()`` then names the reason and the backend
selection falls back).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import dtype_name

from .autotune import Config, Tunable, n_bucket, next_pow2, smem_limit, target_arch

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- kernels
@triton.jit
def _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, offs_d, N_KV, qk_scale,
               stride_kn, stride_vn, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
               MASK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_N) kv tile of the online softmax; returns the updated (acc, m_i, l_i)."""
    kn = start_n + offs_n
    if MASK_N:
        if EVEN_D:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=kn[None, :] < N_KV, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kn[:, None] < N_KV, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=(kn[None, :] < N_KV) & (offs_d[:, None] < HEAD_DIM),
                        other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(kn[:, None] < N_KV) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs + start_n * stride_kn)
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
    if MASK_N:
        s = tl.where(kn[None, :] < N_KV, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _program(H, N_Q, BLOCK_M: tl.constexpr):
    """(batch, head, query block) of this program. 1-D grid with the query blocks of one
    (batch, head) adjacent: CTAs running together share K / V in L2 instead of re-reading them
    from HBM once per query block (and no 65535 limit as on grid axis 1)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid_bh = pid // num_m
    return pid_bh // H, pid_bh % H, pid % num_m


@triton.jit
def _attn_fwd(
    Q, K, V, O,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, h, pid_m = _program(H, N_Q, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    k_ptrs = K + b.to(tl.int64) * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN_D:
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_n, offs_d, N_KV, qk_scale,
                                   stride_kn, stride_vn, HEAD_DIM, EVEN_D, False, PRECISION)
    if n_full < N_KV:
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, n_full, offs_n, offs_d, N_KV, qk_scale,
                                   stride_kn, stride_vn, HEAD_DIM, EVEN_D, True, PRECISION)
    acc = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=offs_m[:, None] < N_Q)
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_probs_fwd(
    Q, K, V, O, P,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_pb, stride_ph, stride_pm,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, h, pid_m = _program(H, N_Q, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_ptrs = K + b.to(tl.int64) * stride_kb + h * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    # pass 1: row max and row sum (online), so pass 2 can write final probabilities directly
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        kn = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(kn[None, :] < N_KV) & mask_d[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(kn[None, :] < N_KV, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_row = P + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + offs_m[:, None].to(tl.int64) * stride_pm
    for start_n in range(0, N_KV, BLOCK_N):
        kn = start_n + offs_n
        k = tl.load(k_ptrs + start_n * stride_kn, mask=(kn[None, :] < N_KV) & mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(kn[:, None] < N_KV) & mask_d[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(kn[None, :] < N_KV, s, float("-inf"))
        p = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
        tl.store(p_row + kn[None, :], p, mask=mask_m[:, None] & (kn[None, :] < N_KV))
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages). 16-bit: the Triton fused-attention tutorial's
# H100 space, minus the tiles tests/test_aot.py showed spilling (e.g. 128 x 128 at 4 warps,
# 128 x 32 at 8 warps with 3+ stages on sm_80). float32 ('ieee' products run on FMA units
# and keep q / k tiles in registers): only 16-row tiles compile without spills, for d <= 64.
_CFG_16BIT = [(64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 3), (128, 32, 8, 2),
              (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)]
_CFG_PROBS = [(64, 32, 4, 2), (64, 32, 8, 2)]  # the probs kernel keeps more live: small tiles
_CFG_FP32 = [(16, 16, 4, 2), (16, 32, 4, 2)]
FP32_MAX_HEAD_DIM = 64


def _configs():
    return [Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in _CFG_16BIT + _CFG_PROBS + _CFG_FP32]


def _smem_bytes(cfg: Config, block_d: int, elem: int) -> int:
    # q tile once, k and v tiles per pipeline stage (rough, as Triton's own pruning does)
    return (cfg["BLOCK_M"] * block_d + 2 * cfg["BLOCK_N"] * block_d * max(cfg.num_stages - 1, 1)) * elem


def keep(cfg: Config, key: Tuple) -> bool:
    """key = (n bucket, n_kv bucket, head dim, dtype name, probs flag, batch * heads bucket)."""
    n_b, nkv_b, d, dt, probs, _ = key
    block_d = next_pow2(max(d, 16))
    row = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.num_warps, cfg.num_stages)
    if dt == "float32":
        # AOT table: the forward is spill-free at 16 x 16, the probs kernel at 16 x 32
        return block_d <= FP32_MAX_HEAD_DIM and row == (_CFG_FP32[1] if probs else _CFG_FP32[0])
    if row not in (_CFG_PROBS if probs else _CFG_16BIT):
        return False
    if _smem_bytes(cfg, block_d, 2) > smem_limit():
        return False
    threads = 32 * cfg.num_warps
    acc = cfg["BLOCK_M"] * block_d // threads  # fp32 accumulator registers per thread
    s = cfg["BLOCK_M"] * cfg["BLOCK_N"] // threads  # score tile registers per thread
    if acc > (32 if probs else 64) or acc + s > 128:
        return False
    # 128-wide heads (d 80 / 96 / 128) also hold 128-wide k / v fragments: on sm_80 only 8-warp
    # tiles with BLOCK_N <= 64 stay spill-free (AOT table)
    if block_d >= 128 and (cfg.num_warps < 8 or cfg["BLOCK_N"] > 64):
        return False
    # sm_80 has no warpgroup MMA: 128-row tiles on 4 warps hit 255 registers and spill there
    # under triton 3.6 (AOT table, both triton versions compiled in CI)
    if target_arch() < 90 and cfg["BLOCK_M"] >= 128 and cfg.num_warps < 8:
        return False
    if cfg["BLOCK_M"] > 64 and n_b <= 64:  # tiny sequences: more programs beat bigger tiles
        return False
    return cfg["BLOCK_N"] <= max(nkv_b, 32)


def heuristic(key: Tuple) -> Config:
    """Without tuning: the tutorial's H100 picks (128 x 64; 4 warps for d <= 64 on sm_90, 8 above
    and on sm_80),
    64-row tiles for short sequences and the probs kernel, 16-row tiles for float32."""
    n_b, nkv_b, d, dt, probs, _ = key
    block_d = next_pow2(max(d, 16))
    if dt == "float32":
        bm, bn, w, s = _CFG_FP32[1] if probs else _CFG_FP32[0]
    elif probs:
        bm, bn, w, s = 64, 32, 4 if block_d <= 64 else 8, 2
    elif n_b <= 64:
        bm, bn, w, s = (64, 32, 4, 3) if block_d <= 64 else (64, 64, 8, 3)
    else:
        bm, bn, w, s = (128, 64, 4, 3) if block_d <= 64 and target_arch() >= 90 else (128, 64, 8, 3)
    return Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn)


def interpreter_heuristic(key: Tuple) -> Config:
    """The CPU interpreter pays per program, not per register: always the 16-bit tiles."""
    return heuristic(key[:3] + ("float16",) + key[4:])


TUNE_FWD = Tunable("attention", _configs, keep, heuristic, interpreter_heuristic)
TUNE_PROBS = Tunable("attention_probs", _configs, keep, heuristic, interpreter_heuristic)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit operands


def bh_bucket(bh: int) -> int:
    """batch * heads, bucketed: it sets how many CTAs fill the GPU, which changes the best tile
    (bs1 ViT-B has 12 heads = 12-24 CTAs, bs256 has 3072 x the query blocks). Powers of two,
    capped where every config runs many waves on any GPU."""
    return min(next_pow2(bh), 1024)


def _key(q, k, probs: bool):
    return (n_bucket(q.shape[2]), n_bucket(k.shape[2]), q.shape[3], dtype_name(q.dtype), probs,
            bh_bucket(q.shape[0] * q.shape[1]))


def empty_out(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, d) view of a fresh (B, N, H, d) buffer: the layout attention writes."""
    B, H, N, d = q.shape
    return torch.empty(B, N, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)


# --------------------------------------------------------------------------- launchers
def _not_yet(bias, rope) -> None:
    if bias is not None or rope is not None:  # LIMITS.features keeps dispatch from getting here
        raise NotImplementedError("triton attention: bias / rope are not implemented yet")


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False,
                  out: Optional[torch.Tensor] = None, config: Optional[Config] = None) -> torch.Tensor:
    """Softmax(q k^T * scale) v.

    Args:
        q: (B, H, N, d); k, v: (B, H, N_kv, d); any strides with a unit-stride last dim.
        scale: softmax scale (default d ** -0.5).
        out: optional (B, H, N, d) output to write (any strides, unit last stride); default a
            transposed view of a new (B, N, H, d) buffer.
        config: force a launch config (tests / AOT); default the tuned or heuristic one.

    Returns:
        out, (B, H, N, d).
    """
    _not_yet(bias, rope)
    if out is None:
        out = empty_out(q)
    _launch(_attn_fwd, TUNE_FWD, q, k, v, out, None, scale, config)
    return out


def attention_probs_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                        bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None,
                        rope_half: bool = False, out: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                        config: Optional[Config] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention plus its probabilities.

    Args: as :func:`attention_fwd`; ``probs`` an optional (B, H, N, N_kv) float32 output.

    Returns:
        out (B, H, N, d) in q's dtype, probs (B, H, N, N_kv) float32 (rows sum to 1).
    """
    _not_yet(bias, rope)
    B, H, N, _ = q.shape
    if out is None:
        out = empty_out(q)
    if probs is None:
        probs = torch.empty(B, H, N, k.shape[2], dtype=torch.float32, device=q.device)
    if probs.stride(3) != 1 and probs.numel():
        raise ValueError(f"probs: expected a unit-stride last dim, got strides {tuple(probs.stride())}")
    _launch(_attn_probs_fwd, TUNE_PROBS, q, k, v, out, probs, scale, config)
    return out, probs


def _launch(kernel, tunable: Tunable, q, k, v, out, probs, scale: Optional[float], config: Optional[Config]) -> None:
    """Launch ``kernel`` (either attention kernel: the probs one takes ``probs`` and its strides)
    on a 1-D grid of B * H * cdiv(N, BLOCK_M) programs."""
    B, H, N, d = q.shape
    if B * H == 0 or N == 0:
        return
    scale = d ** -0.5 if scale is None else scale
    extra = () if probs is None else (probs,)
    extra_strides = () if probs is None else (probs.stride(0), probs.stride(1), probs.stride(2))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2)) + extra_strides
    const = dict(HEAD_DIM=d, BLOCK_D=next_pow2(max(d, 16)), PRECISION=_precision(q.dtype))

    def run(cfg: Config):
        grid = (B * H * triton.cdiv(N, cfg["BLOCK_M"]),)
        kernel[grid](q, k, v, out, *extra, float(scale) * LOG2E, *strides, H, N, k.shape[2], **const,
                     **cfg.launch_kwargs())

    run(config or tunable.pick(_key(q, k, probs is not None), q.device, run))


KERNELS = {"attention": _attn_fwd, "attention_probs": _attn_probs_fwd}
__all__ = ["attention_fwd", "attention_probs_fwd", "empty_out", "TUNE_FWD", "TUNE_PROBS", "keep", "heuristic",
           "_configs", "KERNELS"]

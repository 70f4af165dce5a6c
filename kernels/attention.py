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

Bias and RoPE are constexpr-specialised (``HAS_BIAS``, ``ROPE`` 0 none / 1 interleaved / 2
rotate_half, ``ROPE_PER_HEAD``), so the plain kernels compile as before. The bias tile
(BLOCK_M, BLOCK_N) is loaded with each kv tile (masked on the kv tail and the query rows) and
added in the exp2 domain (times log2 e); a row that has seen only -inf logits so far (a -inf
bias masks keys) subtracts 0 instead of -inf. RoPE: q is rotated once in the prologue, each k
tile as it is loaded (no extra pass over q / k in memory), both as their pair halves A / B (the
first dim of every rotation pair and its partner), so q.k = q_A.k_A + q_B.k_B runs as two dots
over half the head dim: no register shuffle, every element loaded once. The rotation runs in
float32 and is rounded to the input dtype (timm's ``apply_rot_embed_cat(...).type_as(v)``).
With a bias or RoPE the forward runs every kv tile masked in one loop (a lower register peak
than the unmasked loop plus tail); RoPE on 32-key tiles (``keep()``; AOT table).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import dtype_name

from .autotune import Binding, Config, Tunable, cdiv, n_bucket, next_pow2, smem_limit, target_arch

LOG2E = 1.4426950408889634
LOG2E_C = tl.constexpr(LOG2E)  # the bias is added in the exp2 domain too


# --------------------------------------------------------------------------- kernels
@triton.jit
def _rope_pair(a_ptrs, tok, col, N_TOK, N_ROT, r_ptr, stride_rn, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """Load the two halves (A, B) of a q or k tile and rotate them: ``A cos_A - B sin_A``,
    ``B cos_B + A sin_B`` in float32, each rounded to x's dtype (timm
    ``apply_rot_embed_cat(...).type_as(x)``).

    A holds the dims ``col`` of every rotation pair and B their partners ``col + DELTA``:
    interleaved RoPE pairs (2 j, 2 j + 1), rotate_half (j, j + d / 2). ``a_ptrs`` point at A;
    ``tok`` (token index) and ``col`` broadcast to the tile, so one helper serves the
    (BLOCK_M, BLOCK_D / 2) q halves and the transposed (BLOCK_D / 2, BLOCK_N) k halves. Since
    q.k = q_A.k_A + q_B.k_B, the halves are never put back together: no register shuffle, no
    partner reload. The last N_ROT of N_TOK tokens read table row ``tok - (N_TOK - N_ROT)``;
    prefix tokens (class / registers) get cos 1, sin 0."""
    DELTA: tl.constexpr = 1 if ROPE == 1 else HEAD_DIM // 2
    mask = (tok < N_TOK) & (col < HEAD_DIM - DELTA)  # pair j < d / 2
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    b = tl.load(a_ptrs + DELTA, mask=mask, other=0.0)
    row = tok - (N_TOK - N_ROT)
    rmask = mask & (row >= 0)
    t_ptrs = r_ptr + row * stride_rn + col  # sin_A; cos at + d, B at + DELTA
    sin_a = tl.load(t_ptrs, mask=rmask, other=0.0).to(tl.float32)
    cos_a = tl.load(t_ptrs + HEAD_DIM, mask=rmask, other=1.0).to(tl.float32)
    sin_b = tl.load(t_ptrs + DELTA, mask=rmask, other=0.0).to(tl.float32)
    cos_b = tl.load(t_ptrs + (HEAD_DIM + DELTA), mask=rmask, other=1.0).to(tl.float32)
    af = a.to(tl.float32)
    bf = b.to(tl.float32)
    return (af * cos_a - bf * sin_a).to(a.dtype), (bf * cos_b + af * sin_b).to(a.dtype)


@triton.jit
def _pair_cols(BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    """The A dims of the rotation pairs, (BLOCK_D / 2,): 2 j (interleaved) or j (rotate_half)."""
    j = tl.arange(0, BLOCK_D // 2)
    if ROPE == 1:
        j = 2 * j
    return j


@triton.jit
def _logits(q, q_b, k_ptrs, b_ptrs, r_ptr, kn, offs_d, mask_m, N_KV, N_ROT, qk_scale, stride_kn, stride_rn,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, MASK_N: tl.constexpr,
            PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) logits of the kv tile at ``kn`` in the log2 domain:
    q k^T * scale * log2(e) (+ bias * log2(e)), -inf past N_KV when the tile is masked. k is
    loaded here (``k_ptrs``: (BLOCK_D, BLOCK_N) at this tile); with RoPE, q / q_b are the rotated
    halves (A, B) and k is loaded as its rotated halves (``k_ptrs`` then point at the A dims)."""
    if ROPE != 0:
        col = _pair_cols(BLOCK_D, ROPE)
        k_a, k_b = _rope_pair(k_ptrs, kn[None, :], col[:, None], N_KV, N_ROT, r_ptr, stride_rn, HEAD_DIM, ROPE)
        s = tl.dot(q_b, k_b, tl.dot(q, k_a, input_precision=PRECISION), input_precision=PRECISION)
    else:
        if MASK_N:
            if EVEN_D:
                k = tl.load(k_ptrs, mask=kn[None, :] < N_KV, other=0.0)
            else:
                k = tl.load(k_ptrs, mask=(kn[None, :] < N_KV) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        else:
            if EVEN_D:
                k = tl.load(k_ptrs)
            else:
                k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        s = tl.dot(q, k, input_precision=PRECISION)
    s = s * qk_scale
    if HAS_BIAS:
        if MASK_N:
            bmask = mask_m[:, None] & (kn[None, :] < N_KV)
        else:
            bmask = mask_m[:, None]
        s += tl.load(b_ptrs, mask=bmask, other=0.0).to(tl.float32) * LOG2E_C
    if MASK_N:
        s = tl.where(kn[None, :] < N_KV, s, float("-inf"))
    return s


@triton.jit
def _safe_max(m, HAS_BIAS: tl.constexpr):
    """The row max to subtract: with a bias a row may have seen only -inf logits so far (a -inf
    bias masks keys), and exp2(-inf - -inf) would be NaN; 0 instead gives p = 0, alpha = 0."""
    if HAS_BIAS:
        m = tl.where(m == float("-inf"), 0.0, m)
    return m


@triton.jit
def _attn_tile(acc, m_i, l_i, q, q_b, k_ptrs, v_ptrs, b_ptrs, r_ptr, start_n, mask_m, offs_n, offs_d, N_KV, N_ROT,
               qk_scale, stride_kn, stride_vn, stride_rn, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               EVEN_D: tl.constexpr, MASK_N: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
               ROPE: tl.constexpr):
    """One (BLOCK_N) kv tile of the online softmax; returns the updated (acc, m_i, l_i)."""
    kn = start_n + offs_n
    s = _logits(q, q_b, k_ptrs + start_n * stride_kn, b_ptrs + start_n, r_ptr, kn, offs_d, mask_m, N_KV, N_ROT,
                qk_scale, stride_kn, stride_rn, HEAD_DIM, BLOCK_D, EVEN_D, MASK_N, PRECISION, HAS_BIAS, ROPE)
    if MASK_N:
        if EVEN_D:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=kn[:, None] < N_KV, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=(kn[:, None] < N_KV) & (offs_d[None, :] < HEAD_DIM),
                        other=0.0)
    else:
        if EVEN_D:
            v = tl.load(v_ptrs + start_n * stride_vn)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_sub = _safe_max(m_new, HAS_BIAS)
    p = tl.math.exp2(s - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
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
def _prologue(Q, K, Bias, Rope, b, h, offs_m, offs_n, offs_d, mask_m, N_Q, N_ROT,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_bb, stride_bh, stride_bm, stride_rh, stride_rn,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, ROPE: tl.constexpr,
              ROPE_PER_HEAD: tl.constexpr):
    """This program's q tile(s) and the kv loop's base pointers at key 0: returns (q, q_b,
    k_ptrs, b_ptrs, r_ptr). Without RoPE: q (BLOCK_M, BLOCK_D), q_b = q, k_ptrs (BLOCK_D,
    BLOCK_N). With RoPE: the rotated halves q (A) and q_b (B), (BLOCK_M, BLOCK_D / 2) each, and
    k_ptrs (BLOCK_D / 2, BLOCK_N) at k's A dims. b_ptrs: (BLOCK_M, BLOCK_N) bias pointers; r_ptr:
    this head's RoPE table. Unused pointers are returned as the bare base pointers."""
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    r_ptr = Rope
    if ROPE != 0:
        if ROPE_PER_HEAD:
            r_ptr = Rope + h * stride_rh
        col = _pair_cols(BLOCK_D, ROPE)
        q, q_b = _rope_pair(q_base + offs_m[:, None] * stride_qn + col[None, :], offs_m[:, None], col[None, :], N_Q,
                            N_ROT, r_ptr, stride_rn, HEAD_DIM, ROPE)
        k_ptrs = k_base + offs_n[None, :] * stride_kn + col[:, None]
    else:
        q_ptrs = q_base + offs_m[:, None] * stride_qn + offs_d[None, :]
        if HEAD_DIM == BLOCK_D:
            q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        q_b = q
        k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]
    b_ptrs = Bias
    if HAS_BIAS:
        b_ptrs = (Bias + b.to(tl.int64) * stride_bb + h.to(tl.int64) * stride_bh + offs_m[:, None] * stride_bm
                  + offs_n[None, :])
    return q, q_b, k_ptrs, b_ptrs, r_ptr


@triton.jit
def _attn_fwd(
    Q, K, V, O, Bias, Rope,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_bb, stride_bh, stride_bm, stride_rh, stride_rn,
    H, N_Q, N_KV, N_ROT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # add Bias (B or 1, H, N_Q, N_KV) to the logits
    ROPE: tl.constexpr,  # 0: none, 1: interleaved pairs, 2: halves (rotate_half)
    ROPE_PER_HEAD: tl.constexpr,  # Rope is (H, N_ROT, 2 d) instead of (N_ROT, 2 d)
):
    b, h, pid_m = _program(H, N_Q, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    q, q_b, k_ptrs, b_ptrs, r_ptr = _prologue(Q, K, Bias, Rope, b, h, offs_m, offs_n, offs_d, mask_m, N_Q, N_ROT,
                                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                              stride_bb, stride_bh, stride_bm, stride_rh, stride_rn,
                                              HEAD_DIM, BLOCK_D, HAS_BIAS, ROPE, ROPE_PER_HEAD)
    v_ptrs = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if ROPE != 0 or HAS_BIAS:
        # every tile masked (the rotation's and the bias's loads are masked anyway): one loop
        # body, as in the probs kernel, keeps the register peak lower than a full-tile loop plus
        # a tail (AOT table)
        for start_n in range(0, N_KV, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_b, k_ptrs, v_ptrs, b_ptrs, r_ptr, start_n, mask_m, offs_n,
                                       offs_d, N_KV, N_ROT, qk_scale, stride_kn, stride_vn, stride_rn, HEAD_DIM,
                                       BLOCK_D, EVEN_D, True, PRECISION, HAS_BIAS, ROPE)
    else:
        n_full = (N_KV // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_b, k_ptrs, v_ptrs, b_ptrs, r_ptr, start_n, mask_m, offs_n,
                                       offs_d, N_KV, N_ROT, qk_scale, stride_kn, stride_vn, stride_rn, HEAD_DIM,
                                       BLOCK_D, EVEN_D, False, PRECISION, HAS_BIAS, ROPE)
        if n_full < N_KV:
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_b, k_ptrs, v_ptrs, b_ptrs, r_ptr, n_full, mask_m, offs_n,
                                       offs_d, N_KV, N_ROT, qk_scale, stride_kn, stride_vn, stride_rn, HEAD_DIM,
                                       BLOCK_D, EVEN_D, True, PRECISION, HAS_BIAS, ROPE)
    acc = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_probs_fwd(
    Q, K, V, O, P, Bias, Rope,
    qk_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    stride_pb, stride_ph, stride_pm,
    stride_bb, stride_bh, stride_bm, stride_rh, stride_rn,
    H, N_Q, N_KV, N_ROT,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROPE: tl.constexpr, ROPE_PER_HEAD: tl.constexpr,  # as in _attn_fwd
):
    b, h, pid_m = _program(H, N_Q, BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q, q_b, k_ptrs, b_ptrs, r_ptr = _prologue(Q, K, Bias, Rope, b, h, offs_m, offs_n, offs_d, mask_m, N_Q, N_ROT,
                                              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                                              stride_bb, stride_bh, stride_bm, stride_rh, stride_rn,
                                              HEAD_DIM, BLOCK_D, HAS_BIAS, ROPE, ROPE_PER_HEAD)
    v_ptrs = V + b.to(tl.int64) * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    # pass 1: row max and row sum (online), so pass 2 can write final probabilities directly
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N_KV, BLOCK_N):
        kn = start_n + offs_n
        s = _logits(q, q_b, k_ptrs + start_n * stride_kn, b_ptrs + start_n, r_ptr, kn, offs_d, mask_m, N_KV, N_ROT,
                    qk_scale, stride_kn, stride_rn, HEAD_DIM, BLOCK_D, False, True, PRECISION, HAS_BIAS, ROPE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = _safe_max(m_new, HAS_BIAS)
        l_i = l_i * tl.math.exp2(m_i - m_sub) + tl.sum(tl.math.exp2(s - m_sub[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / l_i
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p_row = P + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + offs_m[:, None].to(tl.int64) * stride_pm
    for start_n in range(0, N_KV, BLOCK_N):
        kn = start_n + offs_n
        s = _logits(q, q_b, k_ptrs + start_n * stride_kn, b_ptrs + start_n, r_ptr, kn, offs_d, mask_m, N_KV, N_ROT,
                    qk_scale, stride_kn, stride_rn, HEAD_DIM, BLOCK_D, False, True, PRECISION, HAS_BIAS, ROPE)
        v = tl.load(v_ptrs + start_n * stride_vn, mask=(kn[:, None] < N_KV) & mask_d[None, :], other=0.0)
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
# RoPE rotates every k tile as it is loaded: two k halves and four float32 sin / cos tiles per
# kv tile, on top of the plain kernel's registers. The AOT table (sm_80 / sm_90, triton 3.6 and
# 3.8) keeps 32-key tiles: 64 x 32 at 4 warps for heads <= 64 (and 128 x 32 at 8 warps, 128 x 64
# at 8 warps on sm_90), 64 x 32 at 8 warps for 128-wide heads; every 64+-key tile on sm_80
# spills. (64, 32, 8, 3) is only used with RoPE.
_CFG_ROPE_64 = [(64, 32, 4, 3), (128, 32, 8, 2)]
_CFG_ROPE_64_SM90 = [(128, 64, 8, 3)]
_CFG_ROPE_128 = [(64, 32, 8, 2), (64, 32, 8, 3)]
# the probs kernel rotates each k tile twice (both passes): 16-key tiles (rotate_half at d 80
# spills on sm_80 with 32)
_CFG_PROBS_ROPE = [(64, 16, 4, 2), (64, 16, 8, 2)]


def _configs():
    rows = _CFG_16BIT + _CFG_PROBS + _CFG_FP32 + [(64, 32, 8, 3)] + _CFG_PROBS_ROPE
    return [Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in rows]


def _smem_bytes(cfg: Config, block_d: int, elem: int, rope: bool = False, bias: bool = False) -> int:
    # q tile once, k and v tiles per pipeline stage (rough, as Triton's own pruning does); RoPE
    # also pipelines two float32 table tiles of the k tile's size, the bias a score-sized tile
    stages = max(cfg.num_stages - 1, 1)
    kv = 2 * cfg["BLOCK_N"] * block_d * stages * elem
    table = 2 * cfg["BLOCK_N"] * block_d * stages * 4 if rope else 0
    bias_tile = cfg["BLOCK_M"] * cfg["BLOCK_N"] * stages * elem if bias else 0
    return cfg["BLOCK_M"] * block_d * elem + kv + table + bias_tile


def keep(cfg: Config, key: Tuple) -> bool:
    """key: see :func:`_key`."""
    n_b, nkv_b, d, dt, probs, _, has_bias, rope, _ = key
    block_d = block_d_of(d, rope)
    row = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.num_warps, cfg.num_stages)
    if dt == "float32":
        # AOT table: the forward is spill-free at 16 x 16, the probs kernel at 16 x 32 (16 x 16
        # with RoPE: 16 x 32 spills under triton 3.6)
        return block_d <= FP32_MAX_HEAD_DIM and row == (_CFG_FP32[1] if probs and not rope else _CFG_FP32[0])
    if rope and probs:
        rows = _CFG_PROBS_ROPE
    elif rope:
        rows = _CFG_ROPE_128 if block_d >= 128 else _CFG_ROPE_64 + (_CFG_ROPE_64_SM90 if target_arch() >= 90 else [])
    else:
        rows = _CFG_PROBS if probs else _CFG_16BIT
    if row not in rows:
        return False
    if _smem_bytes(cfg, block_d, 2, bool(rope), has_bias) > smem_limit():
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
    # ... and 128 x 32 (2 stages) spills 8 B there under triton 3.8 (254 registers under 3.6)
    if block_d >= 128 and target_arch() < 90 and row == (128, 32, 8, 2):
        return False
    # sm_80 has no warpgroup MMA: 128-row tiles on 4 warps hit 255 registers and spill there
    # under triton 3.6 (AOT table, both triton versions compiled in CI); with a bias tile they
    # reach 255 on sm_90 too
    if (target_arch() < 90 or has_bias) and cfg["BLOCK_M"] >= 128 and cfg.num_warps < 8:
        return False
    # the bias tile next to a 128-key score tile spills (both archs), next to 128-wide heads in
    # 128-row tiles on sm_80, and 4 warps reach 255 registers from 64-key tiles (AOT table)
    if has_bias and (cfg["BLOCK_N"] >= 128 or (cfg.num_warps < 8 and cfg["BLOCK_N"] >= 64)
                     or (target_arch() < 90 and block_d >= 128 and cfg["BLOCK_M"] >= 128)):
        return False
    if cfg["BLOCK_M"] > 64 and n_b <= 64:  # tiny sequences: more programs beat bigger tiles
        return False
    return cfg["BLOCK_N"] <= max(nkv_b, 32)


def heuristic(key: Tuple) -> Config:
    """Without tuning: the tutorial's H100 picks (128 x 64; 4 warps for d <= 64 on sm_90, 8 above,
    on sm_80 and with a bias), 64-row tiles for short sequences, the probs kernel and a bias
    with 128-wide heads, 16-row tiles for float32; with RoPE the spill-free 32-key tiles (64 x
    32, 4 warps for d <= 64, 8 for 128-wide heads; 16-key tiles in the probs kernel)."""
    n_b, nkv_b, d, dt, probs, _, has_bias, rope, _ = key
    block_d = block_d_of(d, rope)
    if dt == "float32":
        bm, bn, w, s = _CFG_FP32[1] if probs and not rope else _CFG_FP32[0]
    elif probs:
        bm, bn, w, s = 64, 16 if rope else 32, 4 if block_d <= 64 else 8, 2
    elif rope:
        bm, bn, w, s = _CFG_ROPE_128[0] if block_d >= 128 else _CFG_ROPE_64[0]
    elif n_b <= 64 or (has_bias and block_d >= 128):
        bm, bn, w, s = (64, 32, 4, 3) if block_d <= 64 else (64, 64, 8, 3)
    else:
        bm, bn, w, s = (128, 64, 4, 3) if block_d <= 64 and target_arch() >= 90 and not has_bias else (128, 64, 8, 3)
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


def block_d_of(d: int, rope: int = 0) -> int:
    """The tile width over the head dim: a power of two >= 16 (tl.dot's K minimum); with RoPE the
    q.k product runs as two dots over half the width each, so >= 32."""
    return next_pow2(max(d, 32 if rope else 16))


def _key(q, k, probs: bool, bias: bool = False, rope: int = 0, rope_per_head: bool = False):
    """(n bucket, n_kv bucket, head dim, dtype name, probs, batch * heads bucket, bias, rope mode,
    per-head rope): the bias / RoPE flags change the compiled code and its register use."""
    return (n_bucket(q.shape[2]), n_bucket(k.shape[2]), q.shape[3], dtype_name(q.dtype), probs,
            bh_bucket(q.shape[0] * q.shape[1]), bias, rope, rope_per_head)


def empty_out(q: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, d) view of a fresh (B, N, H, d) buffer: the layout attention writes."""
    B, H, N, d = q.shape
    return torch.empty(B, N, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)


# --------------------------------------------------------------------------- launchers
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False,
                  out: Optional[torch.Tensor] = None, config: Optional[Config] = None) -> torch.Tensor:
    """Softmax(rope(q) rope(k)^T * scale + bias) v.

    Args:
        q: (B, H, N, d); k, v: (B, H, N_kv, d); any strides with a unit-stride last dim.
        scale: softmax scale (default d ** -0.5).
        bias: optional additive logits (H, N, N_kv) or (1 or B, H, N, N_kv), any float dtype,
            unit-stride last dim.
        rope: optional ``cat([sin, cos], -1)`` table (N_r, 2 d) or (H, N_r, 2 d) for the last N_r
            tokens of q and k; unit-stride last dim.
        rope_half: pair dims (i, i + d / 2) instead of (2 i, 2 i + 1).
        out: optional (B, H, N, d) output to write (any strides, unit last stride); default a
            transposed view of a new (B, N, H, d) buffer.
        config: force a launch config (tests / AOT); default the tuned or heuristic one.

    Returns:
        out, (B, H, N, d).
    """
    if out is None:
        out = empty_out(q)
    _launch(_attn_fwd, TUNE_FWD, q, k, v, out, None, scale, bias, rope, rope_half, config)
    return out


def attention_probs_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                        bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None,
                        rope_half: bool = False, out: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                        config: Optional[Config] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention plus its probabilities (after the RoPE rotation and the bias).

    Args: as :func:`attention_fwd`; ``probs`` an optional (B, H, N, N_kv) float32 output.

    Returns:
        out (B, H, N, d) in q's dtype, probs (B, H, N, N_kv) float32 (rows sum to 1).
    """
    B, H, N, _ = q.shape
    if out is None:
        out = empty_out(q)
    if probs is None:
        probs = torch.empty(B, H, N, k.shape[2], dtype=torch.float32, device=q.device)
    if probs.stride(3) != 1 and probs.numel():
        raise ValueError(f"probs: expected a unit-stride last dim, got strides {tuple(probs.stride())}")
    _launch(_attn_probs_fwd, TUNE_PROBS, q, k, v, out, probs, scale, bias, rope, rope_half, config)
    return out, probs


def _features(bias: Optional[torch.Tensor], rope: Optional[torch.Tensor], rope_half: bool):
    """(stride args, N_ROT, constexprs) for the bias / RoPE arguments. Absent ones get zero strides
    (the launch passes q in their place, never read: the HAS_BIAS / ROPE constexprs compile them out)."""
    n_rot = 0
    strides = [0, 0, 0, 0, 0]  # stride_bb, stride_bh, stride_bm, stride_rh, stride_rn
    if bias is not None:
        if bias.dim() == 3:
            strides[1:3] = bias.stride(0), bias.stride(1)  # broadcast over the batch
        else:
            strides[0:3] = bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1), bias.stride(2)
    if rope is not None:
        n_rot = rope.shape[-2]
        strides[3:5] = (rope.stride(0), rope.stride(1)) if rope.dim() == 3 else (0, rope.stride(0))
    const = dict(HAS_BIAS=bias is not None, ROPE=0 if rope is None else 2 if rope_half else 1,
                 ROPE_PER_HEAD=rope is not None and rope.dim() == 3)
    return tuple(strides), n_rot, const


def _prepare(q, k, v, out, probs, bias, rope, rope_half: bool):
    """What a launch takes from the call signature alone (shapes, strides, dtypes, flags): the
    scalar arguments after the scale, the constexprs and the tuning key."""
    B, H, N, d = q.shape
    extra_strides = () if probs is None else (probs.stride(0), probs.stride(1), probs.stride(2))
    feat_strides, n_rot, flags = _features(bias, rope, rope_half)
    tail = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2)) + extra_strides \
        + feat_strides + (H, N, k.shape[2], n_rot)
    const = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d, flags["ROPE"]), PRECISION=_precision(q.dtype), **flags)
    key = _key(q, k, probs is not None, flags["HAS_BIAS"], flags["ROPE"], flags["ROPE_PER_HEAD"])
    return tail, const, key


def _launch(kernel, tunable: Tunable, q, k, v, out, probs, scale: Optional[float], bias, rope, rope_half: bool,
            config: Optional[Config]) -> None:
    """Launch ``kernel`` (either attention kernel: the probs one takes ``probs`` and its strides)
    on a 1-D grid of B * H * cdiv(N, BLOCK_M) programs."""
    B, H, N, d = q.shape
    if B * H == 0 or N == 0:
        return
    scale = d ** -0.5 if scale is None else scale
    extra = () if probs is None else (probs,)
    feats = (q if bias is None else bias, q if rope is None else rope)
    tail, const, key = _prepare(q, k, v, out, probs, bias, rope, rope_half)

    def run(cfg: Config):
        grid = (B * H * cdiv(N, cfg["BLOCK_M"]),)
        kernel[grid](q, k, v, out, *extra, *feats, float(scale) * LOG2E, *tail, **const, **cfg.launch_kwargs())

    run(config or tunable.pick(key, q.device, run))


def attention_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                  bias: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False):
    """:func:`attention_fwd` bound to these arguments' call signature: fastvit.ops' cached plan.

    Every call of a plan has the same shapes, strides, dtypes, device and flags, so the strides,
    constexprs and tuning key are read here once, and the config and grid at the first call (the
    first launch tunes or looks up, as :func:`attention_fwd`; in a CUDA-graph capture it raises
    NotWarmedUp as that does). A later call allocates the output and launches: no stride reads,
    no key, no config lookup (~4x less Python than attention_fwd, benchmarks/test_host_overhead.py).
    The fp32 product precision follows ``torch.backends.cuda.matmul.allow_tf32`` at each call.
    """
    B, H, N, d = q.shape
    if B * H == 0 or N == 0:
        return attention_fwd
    dtype, device = q.dtype, q.device
    layout = torch.empty(B, N, H, d, device="meta").transpose(1, 2)  # empty_out's strides, no memory
    tail, const, key = _prepare(q, k, v, layout, None, bias, rope, rope_half)
    default_scale = d ** -0.5
    fp32 = dtype == torch.float32
    bound = Binding()

    def run(q, k, v, scale=None, bias=None, rope=None, rope_half=False):
        out = torch.empty(B, N, H, d, dtype=dtype, device=device).transpose(1, 2)
        s = (default_scale if scale is None else float(scale)) * LOG2E
        bt = q if bias is None else bias
        rt = q if rope is None else rope
        if bound.grid is None:
            def launch(cfg: Config):
                _attn_fwd[(B * H * cdiv(N, cfg["BLOCK_M"]),)](q, k, v, out, bt, rt, s, *tail, **const,
                                                            **cfg.launch_kwargs())

            cfg = TUNE_FWD.pick(key, device, launch)
            bound.set((B * H * cdiv(N, cfg["BLOCK_M"]),), {**const, **cfg.launch_kwargs()})
        if fp32:  # allow_tf32 may change between calls
            _attn_fwd[bound.grid](q, k, v, out, bt, rt, s, *tail, **{**bound.kwargs, "PRECISION": _precision(dtype)})
        else:
            _attn_fwd[bound.grid](q, k, v, out, bt, rt, s, *tail, **bound.kwargs)
        return out

    return run


KERNELS = {"attention": _attn_fwd, "attention_probs": _attn_probs_fwd}
__all__ = ["attention_fwd", "attention_for", "attention_probs_fwd", "empty_out", "TUNE_FWD", "TUNE_PROBS", "keep", "heuristic",
           "_configs", "KERNELS"]

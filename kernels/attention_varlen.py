"""Flash-style attention over packed variable-length sequences (flash-attention's varlen layout).

q (total_q, H, d), k / v (total_k, H, d) hold B sequences back to back; int32 cumulative
offsets ``cu_seqlens_q`` / ``cu_seqlens_k`` (B + 1,) say where each starts. Sequence i's queries
attend to its keys only. The output is written as (total_q, H, d), the layout the projection
reads as (total_q, H * d).

Grid: one program per (sequence, head, query block) over ``cdiv(max_seqlen_q, BLOCK_M)`` query
blocks per sequence; a program past its sequence's end returns after loading two offsets. The
alternative, a block -> sequence map (``sum_i cdiv(N_i, BLOCK_M)`` programs exactly), needs the
offsets' values to build it: either a device-to-host copy (a sync per call) or a few extra small
kernels per call and a grid sized by the bound ``cdiv(total_q, BLOCK_M) + B`` anyway. Idle
programs cost a CTA launch each (well under a microsecond of scheduler time); for the NaFlex
mixes (every image near the token budget) the longest sequence is close to the mean and few
programs are idle, while for a mix with one long sequence among short ones at most
``B * H * cdiv(max_seqlen_q, BLOCK_M)`` programs exist, most exiting at once. flash-attention's
varlen kernels make the same choice.

The kv loop is :func:`fastvit.kernels.attention._attn_tile`, the fixed-length kernel's (exp2
online softmax, full tiles unmasked, the sequence's kv tail in one masked last tile), so both
kernels share their arithmetic and their config space (``_configs()`` / ``keep()`` of the plain
forward). RoPE (``ROPE`` / ``ROPE_PER_HEAD`` constexprs, as there) takes one table row per
packed token: the fixed-length kernel's rotation (q in the prologue, each k tile as it is
loaded, both as pair halves) with the table based at the sequence's first token; it is self
attention only (k's tokens are q's, so one table base serves both). The tuning key is
(max_seqlen_q bucket, max_seqlen_k bucket, head dim, dtype, RoPE mode, per-head table): what
changes the compiled code or the best tile, never the number of sequences.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import dtype_name

from .attention import (_CFG_16BIT, _CFG_FP32, _CFG_ROPE_64, _CFG_ROPE_64_SM90, _CFG_ROPE_128, LOG2E, _attn_tile,
                        _pair_cols, _precision, _rope_pair, block_d_of)
from .attention import heuristic as _plain_heuristic, interpreter_heuristic as _plain_interpreter_heuristic
from .attention import keep as _plain_keep
from .autotune import Config, Tunable, cdiv, n_bucket, target_arch


@triton.jit
def _attn_varlen_fwd(
    Q, K, V, O, CuQ, CuK, Rope,
    qk_scale,  # softmax scale * log2(e): the softmax runs on exp2
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_rh, stride_rt,
    H, NUM_M,  # heads, query blocks per sequence (cdiv(max_seqlen_q, BLOCK_M))
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    ROPE: tl.constexpr,  # 0: none, 1: interleaved pairs, 2: halves (rotate_half); self attention only
    ROPE_PER_HEAD: tl.constexpr,  # Rope is (H, total, 2 d) instead of (total, 2 d)
):
    # the query blocks of one (sequence, head) adjacent, as in the fixed-length kernel: CTAs
    # running together share that sequence's K / V in L2
    pid = tl.program_id(0)
    pid_bh = pid // NUM_M
    pid_m = pid % NUM_M
    b = pid_bh // H
    h = pid_bh % H
    q_start = tl.load(CuQ + b)
    n_q = tl.load(CuQ + b + 1) - q_start
    if pid_m * BLOCK_M >= n_q:  # past this sequence's end: no work
        return
    k_start = tl.load(CuK + b)
    n_kv = tl.load(CuK + b + 1) - k_start
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    # token offsets in int64: total * stride may pass 2 ** 31 elements
    q_base = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kt + h * stride_kh
    v_ptrs = V + k_start.to(tl.int64) * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if ROPE != 0:
        # the fixed-length kernel's rotation with this sequence's rows of the per-token table
        # (k's tokens are q's: one table base for both), every token rotated (N_ROT = length)
        r_ptr = Rope + q_start.to(tl.int64) * stride_rt
        if ROPE_PER_HEAD:
            r_ptr += h * stride_rh
        col = _pair_cols(BLOCK_D, ROPE)
        q, q_b = _rope_pair(q_base + offs_m[:, None] * stride_qt + col[None, :], offs_m[:, None], col[None, :], n_q,
                            n_q, r_ptr, stride_rt, HEAD_DIM, ROPE)
        k_ptrs = k_base + offs_n[None, :] * stride_kt + col[:, None]
        # every tile masked, one loop (the fixed-length kernel's RoPE loop: lower register peak)
        for start_n in range(0, n_kv, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q_b, k_ptrs, v_ptrs, K, r_ptr, start_n, mask_m, offs_n,
                                       offs_d, n_kv, n_kv, qk_scale, stride_kt, stride_vt, stride_rt, HEAD_DIM,
                                       BLOCK_D, EVEN_D, True, PRECISION, False, ROPE)
    else:
        q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :]
        if EVEN_D:
            q = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        k_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None]
        # no bias, no RoPE: their pointers are K (never read, the constexprs compile them out)
        n_full = (n_kv // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q, k_ptrs, v_ptrs, K, K, start_n, mask_m, offs_n, offs_d,
                                       n_kv, 0, qk_scale, stride_kt, stride_vt, 0, HEAD_DIM, BLOCK_D, EVEN_D, False,
                                       PRECISION, False, 0)
        if n_full < n_kv:
            acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, q, k_ptrs, v_ptrs, K, K, n_full, mask_m, offs_n, offs_d,
                                       n_kv, 0, qk_scale, stride_kt, stride_vt, 0, HEAD_DIM, BLOCK_D, EVEN_D, True,
                                       PRECISION, False, 0)
    acc = acc / l_i[:, None]
    o_ptrs = O + q_start.to(tl.int64) * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    if EVEN_D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------- configs
def _configs():
    """The fixed-length forward's rows: 16-bit, float32 and RoPE (the same loops, the same
    registers up to a few scalars: the offset loads and the early exit; AOT table)."""
    rows = []
    for row in _CFG_16BIT + _CFG_FP32 + _CFG_ROPE_64 + _CFG_ROPE_64_SM90 + _CFG_ROPE_128:
        if row not in rows:
            rows.append(row)
    return [Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, w, s in rows]


def _plain_key(key: Tuple) -> Tuple:
    """The fixed-length kernel's key for a varlen key: no probs, no bias, its RoPE flags; the
    batch * heads bucket at its cap (a packed batch is meant to fill the GPU)."""
    nq_b, nkv_b, d, dt, rope, per_head = key
    return (nq_b, nkv_b, d, dt, False, 1024, False, rope, per_head)


def _spills(cfg: Config, key: Tuple) -> bool:
    """Rows the fixed-length forward keeps that spill here: the varlen kernel holds a few more
    scalars live (offsets, sequence lengths, int64 bases), and under triton 3.8 on sm_80 64 x 64 at
    8 warps with 128-wide heads (d 72 / 80 / 96 / 128) reaches 255 registers + 8 B of spill, 128 x
    64 at 8 warps and 3 stages with 32-wide heads 16 B (AOT table; triton 3.6 compiles both clean)."""
    if target_arch() >= 90 or key[4]:
        return False
    row, block_d = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg.num_warps, cfg.num_stages), block_d_of(key[2])
    return (block_d >= 128 and row == (64, 64, 8, 3)) or (block_d <= 32 and row == (128, 64, 8, 3))


def keep(cfg: Config, key: Tuple) -> bool:
    """key: see :func:`_key`. The fixed-length forward's pruning (shared memory, registers per
    arch, spills in the AOT table, tiles far larger than the sequences), minus :func:`_spills`."""
    return _plain_keep(cfg, _plain_key(key)) and not _spills(cfg, key)


def heuristic(key: Tuple) -> Config:
    """Without tuning: the fixed-length forward's pick for a sequence of the longest length; where
    that one spills here (:func:`_spills`), the first kept config, else 128 x 64 at 8 warps (the
    128-wide heads' spill-free tile on sm_80 when short sequences prune every other)."""
    cfg = _plain_heuristic(_plain_key(key))
    if not _spills(cfg, key):
        return cfg
    kept = [c for c in _configs() if keep(c, key)]
    return kept[0] if kept else Config.make(8, 3, BLOCK_M=128, BLOCK_N=64)


def interpreter_heuristic(key: Tuple) -> Config:
    """The CPU interpreter pays per program: the 16-bit tiles, 64 rows (fewer idle programs)."""
    return _plain_interpreter_heuristic((64,) + _plain_key(key)[1:])


TUNE = Tunable("attention_varlen", _configs, keep, heuristic, interpreter_heuristic)


def _rope_flags(rope: Optional[torch.Tensor], rope_half: bool) -> Tuple[int, bool]:
    """(ROPE, ROPE_PER_HEAD) constexprs: 0 none, 1 interleaved pairs, 2 halves."""
    return (0 if rope is None else 2 if rope_half else 1), rope is not None and rope.dim() == 3


def _key(q: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, rope: int = 0, per_head: bool = False) -> Tuple:
    """(max_seqlen_q bucket, max_seqlen_k bucket, head dim, dtype name, RoPE mode, per-head RoPE)."""
    return (n_bucket(max_seqlen_q), n_bucket(max_seqlen_k), q.shape[2], dtype_name(q.dtype), rope, per_head)


def _prepare(q, k, v, out, rope, rope_half) -> Tuple[tuple, dict]:
    """The strides and constexprs a launch takes from the call signature alone (an absent RoPE
    table gets zero strides: q is passed in its place, never read)."""
    d = q.shape[2]
    mode, per_head = _rope_flags(rope, rope_half)
    r_strides = (0, 0) if rope is None else (rope.stride(0), rope.stride(1)) if per_head else (0, rope.stride(0))
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
               out.stride(1)) + r_strides
    const = dict(HEAD_DIM=d, BLOCK_D=block_d_of(d, mode), PRECISION=_precision(q.dtype), ROPE=mode,
                 ROPE_PER_HEAD=per_head)
    return strides, const


# --------------------------------------------------------------------------- launchers
def attention_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         scale: Optional[float] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False,
                         out: Optional[torch.Tensor] = None, config: Optional[Config] = None) -> torch.Tensor:
    """softmax(rope(q) rope(k)^T * scale) v per packed sequence.

    Args:
        q: (total_q, H, d); k, v: (total_k, H, d); any strides with a unit-stride last dim.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets on q's device (checked by fastvit.ops).
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence.
        scale: softmax scale (default d ** -0.5).
        rope: optional per-token ``cat([sin, cos], -1)`` table (total_q, 2 d) or (H, total_q, 2 d),
            unit-stride last dim; self attention (k's offsets are q's).
        rope_half: pair dims (i, i + d / 2) instead of (2 i, 2 i + 1).
        out: optional (total_q, H, d) output (any strides, unit last stride); default a new
            contiguous one.
        config: force a launch config (tests / AOT); default the tuned or heuristic one.

    Returns:
        out, (total_q, H, d).
    """
    total_q, H, d = q.shape
    if out is None:
        out = torch.empty(total_q, H, d, dtype=q.dtype, device=q.device)
    B = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or B <= 0 or H == 0 or max_seqlen_q == 0:
        return out
    cq, ck = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    strides, const = _prepare(q, k, v, out, rope, rope_half)
    s = (d ** -0.5 if scale is None else float(scale)) * LOG2E
    rt = q if rope is None else rope

    def run(cfg: Config):
        num_m = cdiv(max_seqlen_q, cfg["BLOCK_M"])
        _attn_varlen_fwd[(B * H * num_m,)](q, k, v, out, cq, ck, rt, s, *strides, H, num_m, **const,
                                           **cfg.launch_kwargs())

    key = _key(q, max_seqlen_q, max_seqlen_k, const["ROPE"], const["ROPE_PER_HEAD"])
    run(config or TUNE.pick(key, q.device, run))
    return out


def attention_varlen_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                         scale: Optional[float] = None, rope: Optional[torch.Tensor] = None, rope_half: bool = False):
    """:func:`attention_varlen_fwd` bound to these arguments' call signature (fastvit.ops' cached
    plan): strides, constexprs and the offsets' contiguity are read here once. max_seqlen_q /
    max_seqlen_k may differ between calls of one signature: the config is looked up per call
    (one dict lookup), the grid follows max_seqlen_q. The fp32 product precision follows
    ``torch.backends.cuda.matmul.allow_tf32`` at each call."""
    total_q, H, d = q.shape
    B = cu_seqlens_q.shape[0] - 1
    if total_q == 0 or B <= 0 or H == 0 or not (cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous()):
        return attention_varlen_fwd
    dtype, device = q.dtype, q.device
    layout = torch.empty(total_q, H, d, device="meta")
    strides, const = _prepare(q, k, v, layout, rope, rope_half)
    mode, per_head = const["ROPE"], const["ROPE_PER_HEAD"]
    default_scale = d ** -0.5
    fp32 = dtype == torch.float32

    def run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, rope=None, rope_half=False):
        out = torch.empty(total_q, H, d, dtype=dtype, device=device)
        if max_seqlen_q == 0:
            return out
        s = (default_scale if scale is None else float(scale)) * LOG2E
        kw = const if not fp32 else {**const, "PRECISION": _precision(dtype)}
        rt = q if rope is None else rope

        def launch(cfg: Config):
            num_m = cdiv(max_seqlen_q, cfg["BLOCK_M"])
            _attn_varlen_fwd[(B * H * num_m,)](q, k, v, out, cu_seqlens_q, cu_seqlens_k, rt, s, *strides, H, num_m,
                                               **kw, **cfg.launch_kwargs())

        launch(TUNE.pick(_key(q, max_seqlen_q, max_seqlen_k, mode, per_head), device, launch))
        return out

    return run


KERNELS = {"attention_varlen": _attn_varlen_fwd}
__all__ = ["attention_varlen_fwd", "attention_varlen_for", "TUNE", "keep", "heuristic", "_configs", "KERNELS"]

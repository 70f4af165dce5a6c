"""One GEMM family with a fused LayerNorm prologue and bias / GELU / LayerScale / residual epilogue.

    y = act(LN?(x) @ W^T + b) * gamma + residual          x (M, K), W (N, K), y (M, N)

This is every linear layer of a ViT block:

    qkv = linear(x, W_qkv, b, ln=norm1)                   # LN prologue
    x   = linear(o, W_proj, b, gamma=ls1, residual=x)     # epilogue: LayerScale + residual
    h   = linear(x, W_fc1, b, act='gelu', ln=norm2)       # prologue + GELU epilogue
    x   = linear(h, W_fc2, b, gamma=ls2, residual=x)

LN prologue: a small kernel (:func:`.layer_norm.row_stats`) writes each row's mean and rstd
(float32, 8 bytes a row); the GEMM normalises every A tile as it loads it, rounds it to the
input dtype (as an unfused LayerNorm output would be) and feeds the tensor cores. The
normalised activations never touch memory.

Epilogue math is float32 on the accumulator with one rounding at the store, so the fused op is
at least as accurate as the unfused chain (which rounds after every step).

SwiGLU (``act='swiglu'``, the EVA-02 / timm ``SwiGLU`` / ``GluMlp`` fc1) is gated: W is (2 N, K),
rows [0, N) the gate and [N, 2 N) the value. A program computes an output tile of N columns
with two accumulators, gate rows n and value rows n + N, two ``tl.dot`` per K step on the same
(normalised) A tile, and stores ``silu(gate) * value`` (float32, one rounding): the (M, 2 N)
product never reaches memory and there is no elementwise pass. Two accumulators per tile is
twice the register file of a plain tile, so gated keys get half as wide tiles (``keep()``,
``heuristic()``). The variant is a constexpr branch on ``ACT``: the other activations compile
to the same code as before it existed.

fp16 / bf16 use tensor cores with float32 accumulation; float32 inputs use exact fp32 products
(``input_precision='ieee'``) unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then tf32),
mirroring what ``F.linear`` does.

Rows and columns past M / N are *clamped* (to M - 1 / N - 1) in the loads instead of masked,
so the K loop has no M/N masks; only the store is masked. K tails are masked only when
``K % BLOCK_K != 0`` (``EVEN_K`` constexpr).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from fastvit.facts import ACT_CODES, GATED_ACTS, dtype_name

from .autotune import Binding, Config, Tunable, cdiv, next_pow2, smem_limit
from .layer_norm import row_stats, row_stats_for


# the gated activation's code (fastvit.facts.ACT_CODES): W holds gate rows, then value rows
SWIGLU = tl.constexpr(ACT_CODES["swiglu"])


@triton.jit
def _act(x, ACT: tl.constexpr):
    """ACT: code of fastvit.facts.ACT_CODES (0 identity, 1 exact GELU (erf), 2 tanh GELU, 3 QuickGELU);
    x is float32."""
    if ACT == 1:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates to +-1 without inf - inf
        t = 1.0 - 2.0 / (tl.math.exp2(u * 2.8853900817779268) + 1.0)
        x = 0.5 * x * (1.0 + t)
    elif ACT == 3:
        # x * sigmoid(1.702 x) = x / (1 + exp(-1.702 x)); exp2 overflows to inf for large negative x,
        # giving x / inf = -0 (never inf / inf): exp(-1.702 x) = exp2(-1.702 * log2(e) x)
        x = x / (1.0 + tl.math.exp2(x * -2.4554669595930156))
    return x


@triton.jit
def _swiglu(gate, value):
    """silu(gate) * value in float32; silu(g) = g / (1 + exp(-g)) with exp(-g) = exp2(-log2(e) g):
    a large negative gate overflows exp2 to inf and gives -0 (never inf / inf)."""
    return gate / (1.0 + tl.math.exp2(gate * -1.4426950408889634)) * value


@triton.jit
def _linear_fwd(
    A, W, Bias, Gamma, Res, Y, Mean, Rstd, LnW, LnB,
    M, N, K,
    stride_am, stride_wn, stride_rm, stride_ym,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_LN: tl.constexpr, HAS_LN_B: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # grouped launch order: GROUP_M row blocks share the same W column blocks while in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    # 64-bit math only for the block's base address; per-element offsets stay 32-bit (they
    # are < BLOCK * stride), which keeps pointer tensors from eating the register file
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_m, M - 1)  # clamped: rows past M re-read row M-1, never stored
    cols = tl.minimum(offs_n, N - 1)
    A += row0.to(tl.int64) * stride_am
    if ACT == SWIGLU:  # value rows n + N of the (2 N, K) weight; N is the output width
        wv_ptrs = W + (col0 + N).to(tl.int64) * stride_wn + (cols - col0)[None, :] * stride_wn + offs_k[:, None]
    W += col0.to(tl.int64) * stride_wn
    a_ptrs = A + (rows - row0)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = W + (cols - col0)[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) = W^T tile
    if HAS_LN:
        mean = tl.load(Mean + rows)
        rstd = tl.load(Rstd + rows)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)  # the gate's, when gated
    if ACT == SWIGLU:
        acc_v = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
            if ACT == SWIGLU:
                wv = tl.load(wv_ptrs)
        else:
            kmask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
            if ACT == SWIGLU:
                wv = tl.load(wv_ptrs, mask=kmask[:, None], other=0.0)
        if HAS_LN:
            if EVEN_K:
                lw = tl.load(LnW + k0 + offs_k).to(tl.float32)
            else:
                lw = tl.load(LnW + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)
            an = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :]
            if HAS_LN_B:
                if EVEN_K:
                    lb = tl.load(LnB + k0 + offs_k).to(tl.float32)
                else:
                    lb = tl.load(LnB + k0 + offs_k, mask=kmask, other=0.0).to(tl.float32)
                an = an + lb[None, :]
            a = an.to(W.dtype.element_ty)  # masked K columns: lw = lb = 0 there, so a = 0
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if ACT == SWIGLU:  # the same A tile against the value rows
            acc_v = tl.dot(a, wv, acc_v, input_precision=PRECISION)
            wv_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT == SWIGLU:  # bias (2 N,): gate half, then value half
            acc_v += tl.load(Bias + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT == SWIGLU:
        acc = _swiglu(acc, acc_v)
    else:
        acc = _act(acc, ACT)
    if HAS_GAMMA:
        acc *= tl.load(Gamma + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    rel = (offs_m - row0)[:, None]
    if HAS_RES:
        r = tl.load(Res + row0.to(tl.int64) * stride_rm + rel * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        acc += r.to(tl.float32)
    tl.store(Y + row0.to(tl.int64) * stride_ym + rel * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
def _configs():
    """The Triton matmul tutorial's H100 list (fp16) plus 128 x 128 x 64 / 8 warps, which the
    tutorial's own sweep favours for K >= 768 (ViT widths)."""
    rows = [  # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 64, 3, 8), (128, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 64, 3, 4),
        (128, 32, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2), (16, 64, 64, 3, 4),
    ]
    return [_config(*row) for row in rows + _GATED_ROWS]


def _config(bm: int, bn: int, bk: int, s: int, w: int) -> Config:
    return Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)


# SwiGLU tiles only (keep() drops them for the other activations, whose candidates stay the
# tutorial's): 128 x 128 x 64 / 8 warps / 3 stages at half width -- two 128 x 64 accumulators, the
# same MMA work, W bytes and shared memory a K step as that plain tile (the gated heuristic)
_GATED_ROWS = [(128, 64, 64, 3, 8)]
_GATED_ONLY = frozenset(_config(*row) for row in _GATED_ROWS)


def smem_bytes(cfg: Config, elem: int, gated: bool = False) -> int:
    """Pipelined A and W tiles; a gated tile loads two W tiles (gate and value rows) per stage."""
    return cfg.num_stages * (cfg["BLOCK_M"] + (2 if gated else 1) * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elem


def _gated(flags: Tuple) -> bool:
    return flags[1] == SWIGLU.value


def keep(cfg: Config, key: Tuple) -> bool:
    """key = (M bucket, N, K, dtype name, flags: (bias, act code, gamma, residual, ln, ln_bias));
    N is the output width (half the weight's rows when gated: act code SWIGLU)."""
    m_b, N, K, dt, flags = key
    elem = 4 if dt == "float32" else 2
    gated = _gated(flags)
    if cfg in _GATED_ONLY and not gated:
        return False
    if smem_bytes(cfg, elem, gated) > smem_limit():
        return False
    if cfg["BLOCK_K"] < 16 or cfg["BLOCK_M"] < 16:  # tl.dot minimums
        return False
    if cfg["BLOCK_M"] > 2 * m_b or cfg["BLOCK_N"] > 2 * next_pow2(N) or cfg["BLOCK_K"] > next_pow2(K):
        return False
    # the LN prologue normalises A in registers: with 128 accumulator registers per thread on
    # top, 128 x 128 at 4 warps spills on sm_80 (AOT table)
    has_ln = bool(flags[4])
    acc_regs = cfg["BLOCK_M"] * cfg["BLOCK_N"] // (32 * cfg.num_warps)  # float32 accumulator a thread
    if has_ln and acc_regs > 64:
        return False
    # gated: two accumulators, at most 64 registers a thread for both (as a plain tile with the LN
    # prologue). At 128 (128 x 128 x 64 / 8 warps, 128 x 64 x 32 / 4, 64 x 128 x 32 / 4) a bias-only
    # epilogue fits on sm_90 (242 regs), but gamma + residual spill 24-56 B on sm_90, the LN
    # prologue 56 B and BLOCK_K 64 3.9 KB on sm_80 (AOT table, triton 3.6 and 3.8)
    if gated and 2 * acc_regs > 64:
        return False
    return True


def heuristic(key: Tuple) -> Config:
    """128 x 128 x 64, 8 warps, 3 stages for 16-bit operands and large M (the tutorial's H100
    pick for K >= 512); 64 x 64 x 32 in 2 stages for float32 (twice the bytes per tile); narrower tiles
    when M or N is small (classifier heads, tiny batches). Gated (SwiGLU): half as wide
    (128 x 64 x 64; float32 64 x 32 x 16)."""
    m_b, N, K, dt, flags = key
    if dt == "float32":
        # 2 stages: with 3 (at 4 or 8 warps) some epilogues spill 8 B under triton 3.6 or 3.8; this
        # config compiled spill-free for every flavour on sm_80 / sm_90 under both (AOT table)
        bm, bn, bk, w, s = 64, 64, 32, 4, 2
    else:
        bm, bn, bk, w, s = 128, 128, 64, 8, 3
    if _gated(flags):
        # two accumulators: half as many output columns, the same MMA work and W bytes a tile.
        # float32 also halves BLOCK_K: 64 x 32 x 32 spills 16 B on sm_80 under triton 3.8, 64 x 32
        # x 16 is spill-free for every gated flavour on sm_80 / sm_90 under 3.6 and 3.8 (AOT table)
        bn //= 2
        if dt == "float32":
            bk = 16
    bm = max(16, min(bm, m_b))
    bn = max(16, min(bn, next_pow2(N)))
    bk = max(16, min(bk, next_pow2(K)))
    if bm * bn <= 64 * 64:
        w = 4
    return Config.make(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)


TUNE = Tunable("linear", _configs, keep, heuristic)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _m_bucket(M: int) -> int:
    # M = batch * tokens: bucketed so batch sizes 8 and 9 share a tuning, 8 and 256 do not
    return min(next_pow2(max(M, 16)), 8192)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: Optional[str] = None, gamma: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, ln_weight: Optional[torch.Tensor] = None,
               ln_bias: Optional[torch.Tensor] = None, ln_eps: float = 1e-6,
               out: Optional[torch.Tensor] = None, config: Optional[Config] = None) -> torch.Tensor:
    """``act(LN?(x) @ weight.T + bias) * gamma + residual`` in one GEMM (+ a stats kernel with LN).

    Args:
        x: (..., K), unit-stride last dim. weight: (N, K) ((2 N, K) for 'swiglu'). bias: (N,) or
            None ((2 N,) for 'swiglu'). gamma: (N,) or None.
        act: None, 'gelu', 'gelu_tanh', 'quick_gelu' or 'swiglu' (weight (2 N, K), gate rows then
            value rows; output ``silu(gate) * value``). residual: (..., N) or None.
        ln_weight, ln_bias: (K,) -- LayerNorm x first (eps ``ln_eps``) when ln_weight is given.
        out: optional (..., N) output of x's dtype, (M, N)-viewable with unit last stride.
        config: force a launch config (tests / AOT).

    Returns:
        (..., N) in x's dtype.
    """
    K = x.shape[-1]
    N = weight.shape[0] // 2 if act in GATED_ACTS else weight.shape[0]  # output width
    x2 = _rows(x)
    M = x2.shape[0]
    if out is None:
        out = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    y2 = out.view(-1, N)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty product: the epilogue alone
        from fastvit import reference

        out.copy_(reference.linear(x, weight, bias, act, gamma, residual, ln_weight, ln_bias, ln_eps))
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    r2 = _rows(residual) if residual is not None else None
    if ln_weight is not None:
        mean, rstd = row_stats(x2, ln_eps)
    else:
        mean = rstd = None
    dummy = x2
    flags = (bias is not None, ACT_CODES[act], gamma is not None, residual is not None,
             ln_weight is not None, ln_bias is not None)

    def run(cfg: Config):
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        _linear_fwd[grid](
            x2, weight,
            bias if bias is not None else dummy, gamma if gamma is not None else dummy,
            r2 if r2 is not None else dummy, y2,
            mean if mean is not None else dummy, rstd if rstd is not None else dummy,
            ln_weight if ln_weight is not None else dummy, ln_bias if ln_bias is not None else dummy,
            M, N, K,
            x2.stride(0), weight.stride(0), r2.stride(0) if r2 is not None else 0, y2.stride(0),
            HAS_BIAS=flags[0], ACT=flags[1], HAS_GAMMA=flags[2], HAS_RES=flags[3],
            HAS_LN=flags[4], HAS_LN_B=flags[5], EVEN_K=K % cfg["BLOCK_K"] == 0,
            PRECISION=_precision(x.dtype), **cfg.launch_kwargs(),
        )

    key = (_m_bucket(M), N, K, dtype_name(x.dtype), flags)
    run(config or TUNE.pick(key, x.device, run))
    return out


def mlp_fwd(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], act: Optional[str] = "gelu",
            gamma: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
            ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
            ln_eps: float = 1e-6, hidden_ln_weight: Optional[torch.Tensor] = None,
            hidden_ln_bias: Optional[torch.Tensor] = None, hidden_ln_eps: float = 1e-6,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``residual + gamma * fc2(LN_h?(act(fc1(LN?(x)))))`` as two fused GEMMs.

    The hidden activation (..., Hd) is written once in x's dtype (as the unfused chain rounds
    it). A single-kernel MLP that keeps the hidden tile on chip is not built: the issue keeps it
    only if it beats this pair on a GPU, and no GPU has measured that yet.

    Args: x (..., D); fc1_weight (Hd, D) ((2 Hd, D) for 'swiglu': gate rows, then value rows);
        fc1_bias (Hd,) / (2 Hd,); fc2_weight (D_out, Hd); fc2_bias (D_out,); act / gamma (D_out,) /
        residual (..., D_out) / ln_* (D,) as :func:`linear_fwd`; hidden_ln_* (Hd,): the hidden
        LayerNorm (EVA-02 sub-LN), fc2's LN prologue.

    Returns:
        (..., D_out) in x's dtype.
    """
    h = linear_fwd(x, fc1_weight, fc1_bias, act, None, None, ln_weight, ln_bias, ln_eps)
    return linear_fwd(h, fc2_weight, fc2_bias, None, gamma, residual, hidden_ln_weight, hidden_ln_bias, hidden_ln_eps,
                      out=out)


def linear_for(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               act: Optional[str] = None, gamma: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, ln_weight: Optional[torch.Tensor] = None,
               ln_bias: Optional[torch.Tensor] = None, ln_eps: float = 1e-6):
    """:func:`linear_fwd` bound to these arguments' call signature (fastvit.ops' cached plan).

    Every call of a plan has the same shapes, strides, dtypes and flags: the row views, strides,
    flags and tuning key are read here once, the config and grid at the first call (which tunes
    or looks up as linear_fwd does, and raises NotWarmedUp inside a CUDA-graph capture); a later
    call reshapes, allocates, runs the LN statistics (bound as well) and launches. The fp32
    product precision follows ``torch.backends.cuda.matmul.allow_tf32`` at each call, as
    linear_fwd."""
    K = x.shape[-1]
    N = weight.shape[0] // 2 if act in GATED_ACTS else weight.shape[0]
    x2 = _rows(x)
    M = x2.shape[0]
    if M == 0 or N == 0 or K == 0:
        return linear_fwd
    copy_x = x2.data_ptr() != x.data_ptr()  # _rows copied (not viewable): every call copies
    w_copy = weight.stride(1) != 1
    r2 = _rows(residual) if residual is not None else None
    copy_r = r2 is not None and r2.data_ptr() != residual.data_ptr()
    shape, dtype, device = (*x.shape[:-1], N), x.dtype, x.device
    flags = (bias is not None, ACT_CODES[act], gamma is not None, residual is not None,
             ln_weight is not None, ln_bias is not None)
    consts = dict(HAS_BIAS=flags[0], ACT=flags[1], HAS_GAMMA=flags[2], HAS_RES=flags[3], HAS_LN=flags[4],
                  HAS_LN_B=flags[5])
    strides = (M, N, K, x2.stride(0), K if w_copy else weight.stride(0), 0 if r2 is None else r2.stride(0), N)
    key = (_m_bucket(M), N, K, dtype_name(dtype), flags)
    stats = row_stats_for(M, K, dtype, device) if ln_weight is not None else None
    fp32 = dtype == torch.float32
    bound = Binding()

    def run(x, weight, bias=None, act=None, gamma=None, residual=None, ln_weight=None, ln_bias=None, ln_eps=1e-6):
        x2 = _rows(x) if copy_x else x.view(M, K)
        w = weight.contiguous() if w_copy else weight
        out = torch.empty(shape, dtype=dtype, device=device)
        y2 = out.view(M, N)
        r2 = None if residual is None else _rows(residual) if copy_r else residual.view(M, N)
        if stats is not None:
            mean, rstd = stats(x2, ln_eps)
        else:
            mean = rstd = x2
        args = (x2, w, x2 if bias is None else bias, x2 if gamma is None else gamma, x2 if r2 is None else r2, y2,
                mean, rstd, x2 if ln_weight is None else ln_weight, x2 if ln_bias is None else ln_bias) + strides
        if bound.grid is None:
            def launch(cfg: Config):
                _linear_fwd[(cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)](
                    *args, EVEN_K=K % cfg["BLOCK_K"] == 0, PRECISION=_precision(dtype), **consts,
                    **cfg.launch_kwargs())

            cfg = TUNE.pick(key, device, launch)
            bound.set((cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),),
                      dict(EVEN_K=K % cfg["BLOCK_K"] == 0, PRECISION="tf32", **consts, **cfg.launch_kwargs()))
        if fp32:  # allow_tf32 may change between calls
            _linear_fwd[bound.grid](*args, **{**bound.kwargs, "PRECISION": _precision(dtype)})
        else:
            _linear_fwd[bound.grid](*args, **bound.kwargs)
        return out

    return run


def mlp_for(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
            fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], act: Optional[str] = "gelu",
            gamma: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
            ln_weight: Optional[torch.Tensor] = None, ln_bias: Optional[torch.Tensor] = None,
            ln_eps: float = 1e-6, hidden_ln_weight: Optional[torch.Tensor] = None,
            hidden_ln_bias: Optional[torch.Tensor] = None, hidden_ln_eps: float = 1e-6):
    """:func:`mlp_fwd` bound to these arguments' call signature: fc1 bound here, fc2 at the first
    call (to the hidden activation it gets)."""
    fc1 = linear_for(x, fc1_weight, fc1_bias, act, None, None, ln_weight, ln_bias, ln_eps)
    fc2 = []

    def run(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act="gelu", gamma=None, residual=None, ln_weight=None,
            ln_bias=None, ln_eps=1e-6, hidden_ln_weight=None, hidden_ln_bias=None, hidden_ln_eps=1e-6):
        h = fc1(x, fc1_weight, fc1_bias, act, None, None, ln_weight, ln_bias, ln_eps)
        if not fc2:
            fc2.append(linear_for(h, fc2_weight, fc2_bias, None, gamma, residual, hidden_ln_weight, hidden_ln_bias,
                                  hidden_ln_eps))
        return fc2[0](h, fc2_weight, fc2_bias, None, gamma, residual, hidden_ln_weight, hidden_ln_bias, hidden_ln_eps)

    return run


KERNELS = {"linear": _linear_fwd}
__all__ = ["linear_fwd", "linear_for", "mlp_fwd", "mlp_for", "TUNE", "keep", "heuristic", "_configs", "KERNELS"]

"""linear on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: ``act(LN?(x) @ W.T + b) * gamma + residual`` against the oracle (``utils.check_op``) over
utils.LINEAR_SHAPES x a set of epilogues x float32 / float16 / bfloat16, outputs poisoned; every
combination of LN prologue (none / weight / weight + bias), bias, GELU / gelu_tanh / QuickGELU /
SwiGLU, gamma and residual on one small shape; SwiGLU (weight (2 N, K): gate rows, then value rows)
on its own shapes (odd K, N off the block) and under every Triton launch config, and its tuning
candidates; an independent float64 formulation (explicit LayerNorm, erf and tanh GELU,
x * sigmoid(1.702 x), silu(gate) * value); 3-D and row-strided input; the validation errors
(argument, expected, actual); the cuda backend's plain-GEMM fallback paths (GPU); and a seeded
random sweep. A backend that cannot run a case here is skipped with the reason from
fastvit.backends.reasons.
"""

import importlib
import itertools

import pytest
import torch

from fastvit import ops
from fastvit.facts import ACT_CODES, ACTIVATIONS, GATED_ACTS
from utils import (BACKENDS, DEV, DTYPES, LINEAR_SHAPES, TOLERANCES, assert_close_rule, check_op, epilogue_args,
                   epilogue_cases, epilogue_id, maybe, randn, require, run_checked, run_plain_gemm_fallback, run_sweep,
                   shapes_named, validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")

LN = (None, "w", "wb")  # LayerNorm prologue: none, weight only, weight and bias
# (act, bias, gamma, residual, ln) on the shape grid: the ViT uses (qkv, proj, fc1) and the edges
EPILOGUES = [
    (None, True, False, False, None),        # plain + bias
    (None, False, False, False, None),       # no bias at all
    (None, True, False, False, "wb"),        # qkv: LN prologue
    ("gelu", True, False, False, "wb"),      # fc1: LN + GELU
    ("gelu_tanh", True, False, False, None),
    (None, True, True, True, None),          # proj: LayerScale + residual
    ("gelu", True, True, True, "wb"),        # everything
    ("gelu_tanh", False, True, True, "w"),   # LN without bias, no linear bias
]
# QuickGELU (CLIP) on a few shapes only: the activation is elementwise in the same epilogue, and
# test_linear_all_epilogue_combinations crosses it with every flag set
QUICK_GELU_EPILOGUES = [
    ("quick_gelu", True, False, False, "wb"),  # CLIP fc1: LN + QuickGELU
    ("quick_gelu", False, True, True, "w"),    # everything after the activation
]
QUICK_GELU_SHAPES = ("1-K8-N5", "97-K200-N33", "3x7-K24-N40", "2x197-K192-N576-gpu", "1576-K768-N3072-gpu")
# SwiGLU (EVA-02, timm SwiGLU / GluMlp fc1): weight (2 N, K), gate rows then value rows; two
# accumulators a tile in the Triton GEMM, so its own tile and K-tail masks meet odd sizes here:
# N below, between and past the gated blocks (5, 33, 77, 21, 50), odd K (33, 77: masked K tail)
SWIGLU_EPILOGUES = [
    ("swiglu", True, False, False, "wb"),   # EVA-02 fc1: LN + SwiGLU
    ("swiglu", True, True, True, None),     # bias halves, then gamma + residual
    ("swiglu", False, True, True, "w"),     # no bias, LN without bias
]
SWIGLU_SHAPES = shapes_named(LINEAR_SHAPES, ("1-K8-N5", "97-K200-N33", "1-K100-N77", "3x7-K24-N40",
                                             "2x197-K192-N576-gpu", "1576-K768-N3072-gpu")) + [
    pytest.param((5,), 33, 21, id="5-K33-N21"), pytest.param((2, 9), 77, 50, id="2x9-K77-N50")]
ALL_EPILOGUES = list(itertools.product(ACTIVATIONS, (True, False), (True, False), (True, False), LN))


# (epilogue, lead, K, N)
LINEAR_CASES = (epilogue_cases(EPILOGUES, LINEAR_SHAPES) +
                epilogue_cases(QUICK_GELU_EPILOGUES, shapes_named(LINEAR_SHAPES, QUICK_GELU_SHAPES)) +
                epilogue_cases(SWIGLU_EPILOGUES, SWIGLU_SHAPES))


def linear_args(lead, K, N, dtype, act, bias, gamma, residual, ln, eps=1e-5):
    """The op's positional arguments; x has a non-zero mean so the LN prologue matters."""
    x = randn(*lead, K, dtype=dtype, scale=2.0, shift=0.5)
    rows = 2 * N if act in GATED_ACTS else N  # swiglu: gate rows, then value rows
    w = randn(rows, K, dtype=dtype, scale=K ** -0.5)
    b = maybe(bias, lambda: randn(rows, dtype=dtype))
    return (x, w, b, *epilogue_args(lead, K, N, dtype, act, gamma, residual, ln, eps))


@pytest.mark.parametrize("epilogue,lead,K,N", LINEAR_CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear(backend, dtype, atol, rtol, epilogue, lead, K, N, poison):
    require(backend, "linear", dtype=dtype, act=epilogue[0])
    out = run_checked("linear", backend, linear_args(lead, K, N, dtype, *epilogue), poison, atol, rtol)
    assert out.shape == (*lead, N) and out.dtype == dtype


@pytest.mark.parametrize("act,bias,gamma,residual,ln", ALL_EPILOGUES, ids=[epilogue_id(e) for e in ALL_EPILOGUES])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_all_epilogue_combinations(backend, dtype, atol, rtol, act, bias, gamma, residual, ln, poison):
    """Every (LN prologue, bias, activation, gamma, residual) combination on a small 3-D input."""
    require(backend, "linear", dtype=dtype, act=act)
    args = linear_args((3, 7), 24, 40, dtype, act, bias, gamma, residual, ln)
    run_checked("linear", backend, args, poison, atol, rtol)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_ln,with_gamma,with_res,with_bias", [
    (False, False, False, True), (True, False, False, True), (False, True, True, True), (True, True, True, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_matches_formula(backend, act, with_ln, with_gamma, with_res, with_bias):
    """float32 against an independent float64 formulation (explicit LayerNorm, erf / tanh GELU,
    QuickGELU as x / (1 + exp(-1.702 x)))."""
    require(backend, "linear", dtype=torch.float32, act=act)
    B, N, K, M = 3, 7, 24, 40
    x = torch.randn(B, N, K, device=DEV, dtype=torch.float64)
    rows = 2 * M if act in GATED_ACTS else M
    w, b = torch.randn(rows, K, device=DEV).double(), torch.randn(rows, device=DEV).double() if with_bias else None
    g = torch.randn(M, device=DEV).double() if with_gamma else None
    r = torch.randn(B, N, M, device=DEV).double() if with_res else None
    lw, lb = (torch.randn(K, device=DEV).double(), torch.randn(K, device=DEV).double()) if with_ln else (None, None)
    h = x
    if with_ln:
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-6) * lw + lb
    y = h @ w.T + (b if b is not None else 0)
    if act == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))
    elif act == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (y + 0.044715 * y ** 3)))
    elif act == "quick_gelu":
        y = y / (1 + torch.exp(-1.702 * y))
    elif act == "swiglu":
        gate, value = y[..., :M], y[..., M:]
        y = gate / (1 + torch.exp(-gate)) * value
    if g is not None:
        y = y * g
    if r is not None:
        y = y + r
    f = lambda t: None if t is None else t.float()  # noqa: E731
    out = ops.linear(f(x), f(w), f(b), act, f(g), f(r), f(lw), f(lb), 1e-6, backend=backend)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(out, y, None, atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_3d_and_strided_input(backend, poison):
    """(B, N, K) input with a row stride larger than K (a slice), no bias, LN without bias."""
    require(backend, "linear", dtype=torch.float32, act=None)
    x = torch.randn(3, 17, 70, device=DEV)[..., :64]  # row stride 70, unit last stride
    args = (x, torch.randn(24, 64, device=DEV) * 0.1, None, None, None, None, torch.randn(64, device=DEV), None, 1e-6)
    out = run_checked("linear", backend, args, poison, *TOLERANCES[torch.float32])
    assert out.shape == (3, 17, 24)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_linear_swiglu_every_triton_config(dtype, atol, rtol, poison):
    """The gated Triton GEMM under every launch config of ``_configs()`` (tiles wider and narrower
    than N = 70, K = 45 with a masked K tail): the value rows n + N pair with gate rows n in
    every column block. Every kept gated config also compiles spill-free (tests/test_aot.py)."""
    require("triton", "linear", dtype=dtype, act="swiglu")
    kl = importlib.import_module("fastvit.kernels.linear")  # the package re-exports a function named linear
    args = linear_args((37,), 45, 70, dtype, "swiglu", True, True, True, "wb")
    for cfg in kl._configs():
        with poison():
            out = kl.linear_fwd(*args, config=cfg)
        check_op("linear", "triton", args, out, atol, rtol, name=f"out {cfg}")


def test_linear_swiglu_tuning_candidates():
    """Gated keys prune to tiles whose two accumulators fit (AOT table) and keep their heuristic
    among the candidates; the gated-only rows never reach the other activations' keys."""
    require("triton", "linear", dtype=torch.float32, act="swiglu")
    kl = importlib.import_module("fastvit.kernels.linear")
    autotune = importlib.import_module("fastvit.kernels.autotune")

    for arch in (80, 90):
        autotune.set_target(arch)
        try:
            for dt in ("float16", "float32"):
                for ln in (False, True):
                    gated = (8192, 1536, 768, dt, (True, ACT_CODES["swiglu"], False, False, ln, ln))
                    plain = (8192, 1536, 768, dt, (True, ACT_CODES["gelu"], False, False, ln, ln))
                    cands = kl.TUNE.candidates(gated)
                    assert dt == "float32" or kl.heuristic(gated) in cands, (arch, dt, ln)
                    for c in cands:  # both accumulators in <= 64 float32 registers a thread
                        assert 2 * c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c.num_warps, (arch, dt, ln, str(c))
                    assert not set(kl.TUNE.candidates(plain)) & kl._GATED_ONLY, (arch, dt, ln)
                    assert kl.heuristic(gated)["BLOCK_N"] * 2 == kl.heuristic(plain)["BLOCK_N"]
        finally:
            autotune.set_target(None)


@pytest.mark.gpu
@pytest.mark.parametrize("act,bias,gamma,residual,ln", [
    (act, *flags) for act in ACTIVATIONS
    for flags in [(True, True, True, "wb"), (True, False, True, None), (False, False, False, None)]])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_linear_cuda_plain_gemm_fallback(dtype, atol, rtol, act, bias, gamma, residual, ln, poison, monkeypatch):
    """FASTVIT_CUDA_PLAIN_GEMM=1: the cuda backend's paths for when cuBLASLt has no algorithm for
    an epilogue (plain GEMM + elementwise epilogue)."""
    require("cuda", "linear", dtype=dtype, act=act)
    args = linear_args((2, 197), 192, 576, dtype, act, bias, gamma, residual, ln)
    run_plain_gemm_fallback("linear", args, poison, monkeypatch, atol, rtol)


# --------------------------------------------------------------------------- validation
def _r(*shape):
    return torch.randn(*shape)


VALIDATION = [
    ("x-last-dim", lambda b: ops.linear(_r(2, 8), _r(4, 9), backend=b), ValueError,
     r"x: expected last dim 9 \(= weight.shape\[1\]\), got shape \(2, 8\)"),
    ("bias-shape", lambda b: ops.linear(_r(2, 8), _r(4, 8), _r(5), backend=b), ValueError,
     r"bias: expected shape \(4,\), got shape \(5,\)"),
    ("act", lambda b: ops.linear(_r(2, 8), _r(4, 8), act="relu", backend=b), ValueError,
     r"act: expected one of \(None, 'gelu', 'gelu_tanh', 'quick_gelu', 'swiglu'\), got 'relu'"),
    ("residual-shape", lambda b: ops.linear(_r(2, 8), _r(4, 8), residual=_r(3, 4), backend=b), ValueError,
     r"residual: expected shape \(2, 4\), got shape \(3, 4\)"),
    ("ln-bias-alone", lambda b: ops.linear(_r(2, 8), _r(4, 8), ln_bias=_r(8), backend=b), ValueError,
     r"ln_weight: expected a tensor when ln_bias is given, got None"),
    ("gamma-shape", lambda b: ops.linear(_r(2, 8), _r(4, 8), gamma=_r(8), backend=b), ValueError,
     r"gamma: expected shape \(4,\), got shape \(8,\)"),
    ("weight-str", lambda b: ops.linear(_r(2, 8), "w", backend=b), TypeError,
     r"weight: expected a torch.Tensor, got str"),
    ("weight-dtype", lambda b: ops.linear(_r(2, 8), _r(5, 8).half(), backend=b), TypeError,
     r"weight: expected dtype torch.float32 \(as x\), got dtype torch.float16"),
    ("x-stride", lambda b: ops.linear(_r(8, 2).t(), _r(5, 8), backend=b), ValueError,
     r"x: expected a last dim with stride 1, got strides \(1, 2\)"),
    ("x-int", lambda b: ops.linear(_r(2, 8).int(), _r(5, 8), backend=b), TypeError,
     r"x: expected dtype float32, float16 or bfloat16, got torch.int32"),
    # swiglu: (2 N, K) weight, (2 N,) bias, N-wide epilogue
    ("swiglu-odd-rows", lambda b: ops.linear(_r(2, 8), _r(5, 8), act="swiglu", backend=b), ValueError,
     r"weight: expected an even number of rows with act='swiglu' \(gate rows, then value rows\), got shape \(5, 8\)"),
    ("swiglu-bias-shape", lambda b: ops.linear(_r(2, 8), _r(6, 8), _r(3), act="swiglu", backend=b), ValueError,
     r"bias: expected shape \(6,\), got shape \(3,\)"),
    ("swiglu-gamma-shape", lambda b: ops.linear(_r(2, 8), _r(6, 8), act="swiglu", gamma=_r(6), backend=b),
     ValueError, r"gamma: expected shape \(3,\), got shape \(6,\)"),
    ("swiglu-residual-shape", lambda b: ops.linear(_r(2, 8), _r(6, 8), act="swiglu", residual=_r(2, 6), backend=b),
     ValueError, r"residual: expected shape \(2, 3\), got shape \(2, 6\)"),
]

test_validation_errors = validation_errors_test(VALIDATION)


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype):
    M, K, N = rng.randint(1, 40), rng.randint(1, 80), rng.randint(1, 80)
    lead = rng.choice([(M,), (1, M), (M, 1)])
    shift = rng.choice([0.0, 1.0])
    bias, gamma, res, ln = (rng.random() < 0.5 for _ in range(4))
    ln_bias = ln and rng.random() < 0.5
    act = rng.choice(ACTIVATIONS)
    x = randn(*lead, K, dtype=dtype, shift=shift)
    rows = 2 * N if act in GATED_ACTS else N
    args = (x, randn(rows, K, dtype=dtype, scale=K ** -0.5), maybe(bias, lambda: randn(rows, dtype=dtype)), act,
            maybe(gamma, lambda: randn(N, dtype=dtype)), maybe(res, lambda: randn(*lead, N, dtype=dtype)),
            maybe(ln, lambda: randn(K, dtype=dtype)), maybe(ln_bias, lambda: randn(K, dtype=dtype)), 1e-5)
    desc = f"x{tuple(x.shape)} N={N} bias={bias} act={act} gamma={gamma} res={res} ln={ln}/{ln_bias}"

    def shape(out):
        assert out.shape == (*lead, N), f"shape {tuple(out.shape)}"

    return desc, args, {"act": act}, shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, poison):
    run_sweep("linear", backend, _sweep_case, poison)

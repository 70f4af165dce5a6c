"""mlp on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: ``residual + gamma * fc2(act(fc1(LN?(x))))`` against the oracle (``utils.check_op``)
over utils.MLP_SHAPES x variants (GELU / gelu_tanh / QuickGELU / none, biases or not, LN prologue, gamma,
residual) x float32 / float16 / bfloat16, outputs poisoned; mlp equals the composition of two
linears on the same backend and an independent F.* formulation; D_out != D; the validation
errors (argument, expected, actual); the cuda backend's plain-GEMM fallback (GPU); and a seeded
random sweep. A backend that cannot run a case here is skipped with the reason from
fastvit.backends.reasons.
"""

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops
from utils import (BACKENDS, DTYPES, MLP_SHAPES, TOLERANCES, assert_close_rule, epilogue_args, epilogue_cases,
                   epilogue_id, maybe, randn, require, run_checked, run_plain_gemm_fallback, run_sweep, shapes_named,
                   validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")

# (act, biases, gamma, residual, ln)
VARIANTS = [
    ("gelu", True, False, False, None),
    ("gelu", True, True, True, "wb"),        # a ViT block's second half
    ("gelu_tanh", True, False, True, "wb"),
    ("gelu_tanh", True, False, False, None),
    (None, True, True, True, None),
    (None, False, False, False, None),
    ("gelu", False, True, True, "w"),
]
# QuickGELU (CLIP) on a few shapes only: the activation is the linear epilogue's, which
# tests/test_op_linear.py crosses with every flag set
QUICK_GELU_VARIANTS = [
    ("quick_gelu", True, False, True, "wb"),   # a CLIP block's second half
    ("quick_gelu", False, True, False, None),
]
QUICK_GELU_SHAPES = ("3-D32-H128-O32", "7-D40-H72-O24", "8x197-D768-H3072-O768-gpu")


# (variant, lead, D, hidden, D_out)
MLP_CASES = (epilogue_cases(VARIANTS, MLP_SHAPES) +
             epilogue_cases(QUICK_GELU_VARIANTS, shapes_named(MLP_SHAPES, QUICK_GELU_SHAPES)))


def mlp_args(lead, D, hidden, D_out, dtype, act, biases, gamma, residual, ln, eps=1e-6):
    x = randn(*lead, D, dtype=dtype, scale=1.5, shift=0.3)
    return (x, randn(hidden, D, dtype=dtype, scale=D ** -0.5), maybe(biases, lambda: randn(hidden, dtype=dtype)),
            randn(D_out, hidden, dtype=dtype, scale=hidden ** -0.5), maybe(biases, lambda: randn(D_out, dtype=dtype)),
            *epilogue_args(lead, D, D_out, dtype, act, gamma, residual, ln, eps))


@pytest.mark.parametrize("variant,lead,D,hidden,D_out", MLP_CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp(backend, dtype, atol, rtol, variant, lead, D, hidden, D_out, poison):
    require(backend, "mlp", dtype=dtype, act=variant[0])
    out = run_checked("mlp", backend, mlp_args(lead, D, hidden, D_out, dtype, *variant), poison, atol, rtol)
    assert out.shape == (*lead, D_out) and out.dtype == dtype


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_is_two_linears(backend, dtype, atol, rtol):
    """mlp == linear(linear(x, fc1, act, LN), fc2, gamma, residual) on the same backend (the
    hidden activation rounded to x's dtype in between), and float32 matches F.* in float64."""
    require(backend, "mlp", dtype=dtype, act="gelu")
    x, w1, b1, w2, b2, act, g, r, lw, lb, eps = mlp_args((2, 5), 16, 64, 16, dtype, "gelu", True, True, True, "wb",
                                                         eps=1e-5)
    out = ops.mlp(x, w1, b1, w2, b2, act, g, r, lw, lb, eps, backend=backend)
    h = ops.linear(x, w1, b1, act, None, None, lw, lb, eps, backend=backend)
    two = ops.linear(h, w2, b2, None, g, r, backend=backend)
    # the same hidden values: fused and two-call results differ by summation order only (one
    # rounding step of the output for 16-bit, the float32 slack for float32)
    assert_close_rule(out, two.double(), None, atol=atol, rtol=rtol, name="mlp vs two linears")
    if dtype == torch.float32:
        d = [t.double() for t in (x, w1, b1, w2, b2, g, r, lw, lb)]
        hd = F.gelu(F.linear(F.layer_norm(d[0], (16,), d[7], d[8], eps), d[1], d[2]))
        fa, fr = TOLERANCES[torch.float32]
        assert_close_rule(out, F.linear(hd, d[3], d[4]) * d[5] + d[6], None, atol=fa, rtol=fr, name="mlp vs F.*")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS[:3] + QUICK_GELU_VARIANTS[:1], ids=epilogue_id)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_mlp_cuda_plain_gemm_fallback(dtype, atol, rtol, variant, poison, monkeypatch):
    """FASTVIT_CUDA_PLAIN_GEMM=1: the cuda backend's paths for when cuBLASLt has no algorithm for
    an epilogue (plain GEMM + elementwise epilogue)."""
    require("cuda", "mlp", dtype=dtype, act=variant[0])
    run_plain_gemm_fallback("mlp", mlp_args((2, 50), 96, 384, 96, dtype, *variant), poison, monkeypatch, atol, rtol)


# --------------------------------------------------------------------------- validation
def _r(*shape):
    return torch.randn(*shape)


VALIDATION = [
    ("fc2-shape", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 15), None, backend=b), ValueError,
     r"fc2_weight: expected shape \(D_out, 16\), got shape \(8, 15\)"),
    ("fc1-bias-shape", lambda b: ops.mlp(_r(2, 8), _r(16, 8), _r(15), _r(8, 16), None, backend=b), ValueError,
     r"fc1_bias: expected shape \(16,\), got shape \(15,\)"),
    ("x-last-dim", lambda b: ops.mlp(_r(2, 9), _r(16, 8), None, _r(8, 16), None, backend=b), ValueError,
     r"x: expected last dim 8 \(= fc1_weight.shape\[1\]\), got shape \(2, 9\)"),
    ("fc2-bias-dtype", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), _r(8).half(), backend=b), TypeError,
     r"fc2_bias: expected dtype torch.float32 \(as x\), got dtype torch.float16"),
    ("act", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), None, "swish", backend=b), ValueError,
     r"act: expected one of \(None, 'gelu', 'gelu_tanh', 'quick_gelu', 'swiglu'\), got 'swish'"),
    ("residual-shape", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(6, 16), None, residual=_r(2, 8), backend=b),
     ValueError, r"residual: expected shape \(2, 6\), got shape \(2, 8\)"),
]

test_validation_errors = validation_errors_test(VALIDATION)


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype):
    M, D, Hd, Do = rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 72), rng.randint(1, 40)
    act = rng.choice(["gelu", "gelu_tanh", None, "quick_gelu"])
    b1, b2, gamma, res, ln = (rng.random() < 0.5 for _ in range(5))
    ln_bias = ln and rng.random() < 0.5
    args = (randn(M, D, dtype=dtype), randn(Hd, D, dtype=dtype, scale=D ** -0.5),
            maybe(b1, lambda: randn(Hd, dtype=dtype)),
            randn(Do, Hd, dtype=dtype, scale=Hd ** -0.5), maybe(b2, lambda: randn(Do, dtype=dtype)), act,
            maybe(gamma, lambda: randn(Do, dtype=dtype)), maybe(res, lambda: randn(M, Do, dtype=dtype)),
            maybe(ln, lambda: randn(D, dtype=dtype)), maybe(ln_bias, lambda: randn(D, dtype=dtype)), 1e-6)
    desc = f"M={M} D={D} hidden={Hd} D_out={Do} act={act} b1={b1} b2={b2} gamma={gamma} res={res} ln={ln}/{ln_bias}"
    return desc, args, {"act": act}, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, poison):
    run_sweep("mlp", backend, _sweep_case, poison)

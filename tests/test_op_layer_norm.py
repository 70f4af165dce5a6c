"""layer_norm on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: LayerNorm over the last dim against the oracle (``utils.check_op``) over
utils.LAYER_NORM_SHAPES (1-D rows of 1 .. 6000, 3-D, rows sliced out of a wider buffer) x
affine (weight + bias / weight only / none) x float32 / float16 / bfloat16, outputs poisoned;
an independent float64 formulation (explicit mean / biased variance); the validation errors
(argument, expected, actual); and a seeded random sweep. A backend that cannot run a case here
is skipped with the reason from fastvit.backends.reasons.
"""

import pytest
import torch

from fastvit import ops
from utils import (BACKENDS, DEV, DTYPES, LAYER_NORM_SHAPES, TOLERANCES, assert_close_rule, maybe, randn, require,
                   run_checked, run_sweep, validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")

AFFINE = ["wb", "w", "none"]


@pytest.mark.parametrize("shape,sliced", LAYER_NORM_SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm(backend, dtype, atol, rtol, affine, shape, sliced, poison):
    require(backend, "layer_norm", dtype=dtype)
    D = shape[-1]
    x = randn(*shape[:-1], D + (7 if sliced else 0), dtype=dtype, scale=3.0, shift=1.0)[..., :D]
    w = maybe(affine != "none", lambda: randn(D, dtype=dtype, scale=0.5, shift=1.0))
    b = maybe(affine == "wb", lambda: randn(D, dtype=dtype))
    out = run_checked("layer_norm", backend, (x, w, b, 1e-6), poison, atol, rtol)
    assert out.shape == x.shape and out.dtype == dtype


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_matches_formula(backend, eps):
    """float32 against an explicit float64 mean / biased-variance formulation."""
    require(backend, "layer_norm", dtype=torch.float32)
    x = torch.randn(4, 9, 33, device=DEV) * 2 + 3
    w, b = torch.randn(33, device=DEV), torch.randn(33, device=DEV)
    xd = x.double()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    want = (xd - mu) / torch.sqrt(var + eps) * w.double() + b.double()
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(ops.layer_norm(x, w, b, eps, backend=backend), want, None, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- validation
VALIDATION = [
    ("weight-shape", lambda b: ops.layer_norm(torch.randn(2, 8), torch.randn(7), None, backend=b), ValueError,
     r"weight: expected shape \(8,\), got shape \(7,\)"),
    ("bias-dtype", lambda b: ops.layer_norm(torch.randn(2, 8), None, torch.randn(8).half(), backend=b), TypeError,
     r"bias: expected dtype torch.float32 \(as x\), got dtype torch.float16"),
    ("x-stride", lambda b: ops.layer_norm(torch.randn(8, 2).t(), None, None, backend=b), ValueError,
     r"x: expected a last dim with stride 1, got strides \(1, 2\)"),
    ("x-list", lambda b: ops.layer_norm([1.0, 2.0], None, None, backend=b), TypeError,
     r"x: expected a torch.Tensor, got list"),
]

test_validation_errors = validation_errors_test(VALIDATION)


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype):
    M, D = rng.randint(1, 20), rng.randint(1, 300)
    scale, shift = rng.choice([1.0, 10.0]), rng.choice([0.0, 5.0])
    has_w, has_b = rng.random() < 0.7, rng.random() < 0.7
    eps = rng.choice([1e-6, 1e-5, 1e-12])
    x = randn(M, D, dtype=dtype, scale=scale, shift=shift)
    args = (x, maybe(has_w, lambda: randn(D, dtype=dtype)), maybe(has_b, lambda: randn(D, dtype=dtype)), eps)
    return f"M={M} D={D} x*{scale}+{shift} w={has_w} b={has_b} eps={eps}", args, {}, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, poison):
    run_sweep("layer_norm", backend, _sweep_case, poison)

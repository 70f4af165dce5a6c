"""mlp on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: ``residual + gamma * fc2(LN_h?(act(fc1(LN?(x)))))`` against the oracle (``utils.check_op``)
over utils.MLP_SHAPES x variants (GELU / gelu_tanh / QuickGELU / none, biases or not, LN prologue, gamma,
residual) x float32 / float16 / bfloat16, outputs poisoned; SwiGLU (fc1 (2 Hd, D): gate rows, then
value rows) with and without the hidden LayerNorm (EVA-02 sub-LN), and float32 parity with timm's
SwiGLU / GluMlp(gate_last=False) modules; mlp equals the composition of two linears on the same
backend and an independent F.* formulation; D_out != D; the validation errors (argument,
expected, actual), SwiGLU's and the hidden LayerNorm's included; the cuda backend's plain-GEMM
fallback (GPU); and a seeded random sweep (SwiGLU and the hidden LayerNorm in it). A backend
that cannot run a case here is skipped with the reason from fastvit.backends.reasons.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from fastvit import ops
from fastvit.facts import GATED_ACTS
from utils import (BACKENDS, DEV, DTYPES, MLP_SHAPES, TOLERANCES, assert_close_rule, epilogue_args, epilogue_cases,
                   epilogue_id, error_report, maybe, randn, require, run_checked, run_plain_gemm_fallback, run_sweep,
                   shapes_named, validation_errors_test)

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
# SwiGLU (EVA-02 / timm SwiGLU, GluMlp(gate_last=False)): fc1 (2 Hd, D), gate rows then value
# rows; EVA-02 adds a LayerNorm of the hidden activation before fc2 (sub-LN, hidden_ln)
# (act, biases, gamma, residual, ln, hidden_ln)
SWIGLU_VARIANTS = [
    ("swiglu", True, False, True, "wb", "wb"),   # an EVA-02 block's second half: LN, SwiGLU, sub-LN, residual
    ("swiglu", True, True, True, None, None),    # gamma + residual, no LayerNorm at all
    ("swiglu", False, True, False, "w", "w"),    # no biases, LayerNorms without bias
    ("swiglu", True, False, False, None, "wb"),  # sub-LN alone
]
SWIGLU_SHAPES = ("3-D32-H128-O32", "1x197-D48-H100-O48", "7-D40-H72-O24", "8x197-D768-H3072-O768-gpu")


def swiglu_id(variant):
    return epilogue_id(variant[:5]) + (f"-hln{variant[5]}" if variant[5] else "-nohln")


# (variant, lead, D, hidden, D_out)
MLP_CASES = (epilogue_cases(VARIANTS, MLP_SHAPES) +
             epilogue_cases(QUICK_GELU_VARIANTS, shapes_named(MLP_SHAPES, QUICK_GELU_SHAPES)))
SWIGLU_CASES = [pytest.param(v, *sh.values, id=f"{swiglu_id(v)}-{sh.id}", marks=sh.marks)
                for v in SWIGLU_VARIANTS for sh in shapes_named(MLP_SHAPES, SWIGLU_SHAPES)]


def mlp_args(lead, D, hidden, D_out, dtype, act, biases, gamma, residual, ln, eps=1e-6, hidden_ln=None):
    """The op's positional arguments; fc1 has 2 x hidden rows for a gated act; with ``hidden_ln``
    (None, "w" or "wb") the hidden LayerNorm arguments follow."""
    x = randn(*lead, D, dtype=dtype, scale=1.5, shift=0.3)
    rows = 2 * hidden if act in GATED_ACTS else hidden  # swiglu: gate rows, then value rows
    args = (x, randn(rows, D, dtype=dtype, scale=D ** -0.5), maybe(biases, lambda: randn(rows, dtype=dtype)),
            randn(D_out, hidden, dtype=dtype, scale=hidden ** -0.5), maybe(biases, lambda: randn(D_out, dtype=dtype)),
            *epilogue_args(lead, D, D_out, dtype, act, gamma, residual, ln, eps))
    if hidden_ln is None:
        return args
    return args + (randn(hidden, dtype=dtype, scale=0.5, shift=1.0),
                   maybe(hidden_ln == "wb", lambda: randn(hidden, dtype=dtype, scale=0.5)), 1e-5)


@pytest.mark.parametrize("variant,lead,D,hidden,D_out", MLP_CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp(backend, dtype, atol, rtol, variant, lead, D, hidden, D_out, poison):
    require(backend, "mlp", dtype=dtype, act=variant[0])
    out = run_checked("mlp", backend, mlp_args(lead, D, hidden, D_out, dtype, *variant), poison, atol, rtol)
    assert out.shape == (*lead, D_out) and out.dtype == dtype


@pytest.mark.parametrize("variant,lead,D,hidden,D_out", SWIGLU_CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_swiglu(backend, dtype, atol, rtol, variant, lead, D, hidden, D_out, poison):
    """SwiGLU MLPs (fc1 (2 Hd, D)) with and without the hidden LayerNorm (EVA-02 sub-LN), LN
    prologue, gamma and residual, against the oracle."""
    require(backend, "mlp", dtype=dtype, act="swiglu")
    args = mlp_args(lead, D, hidden, D_out, dtype, *variant[:5], hidden_ln=variant[5])
    out = run_checked("mlp", backend, args, poison, atol, rtol)
    assert out.shape == (*lead, D_out) and out.dtype == dtype


def _timm_swiglu_cases():
    """(name, timm module, fastvit mlp arguments after x): timm's two SwiGLU forms with weights
    loaded into the op. SwiGLU: fc1_g stacked over fc1_x; GluMlp(gate_last=False): fc1 as is
    (first half the gate). Both with the hidden LayerNorm (norm_layer), GluMlp also without."""
    timm_mlp = pytest.importorskip("timm.layers.mlp")

    def randomize(m):  # timm's LayerNorm starts at (1, 0): make the sub-LN matter
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith("norm."):
                    p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        return m.to(DEV).eval()

    D, Hd, D_out = 40, 72, 24
    sw = randomize(timm_mlp.SwiGLU(D, Hd, D_out, norm_layer=torch.nn.LayerNorm))
    glu_ln = randomize(timm_mlp.GluMlp(D, 2 * Hd, D_out, act_layer=torch.nn.SiLU, norm_layer=torch.nn.LayerNorm,
                                       gate_last=False))
    glu = randomize(timm_mlp.GluMlp(D, 2 * Hd, D_out, act_layer=torch.nn.SiLU, gate_last=False))

    def glu_args(m):
        ln = m.norm if isinstance(m.norm, torch.nn.LayerNorm) else None
        return (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, "swiglu", None, None, None, None, 1e-6,
                None if ln is None else ln.weight, None if ln is None else ln.bias, 1e-6 if ln is None else ln.eps)

    return [
        ("SwiGLU", sw, (torch.cat([sw.fc1_g.weight, sw.fc1_x.weight]), torch.cat([sw.fc1_g.bias, sw.fc1_x.bias]),
                        sw.fc2.weight, sw.fc2.bias, "swiglu", None, None, None, None, 1e-6, sw.norm.weight,
                        sw.norm.bias, sw.norm.eps)),
        ("GluMlp+norm", glu_ln, glu_args(glu_ln)),
        ("GluMlp", glu, glu_args(glu)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_swiglu_matches_timm(backend):
    """float32 parity with timm's SwiGLU(in, hidden, norm_layer=LayerNorm) and GluMlp(act_layer=SiLU,
    gate_last=False): their weights in the op give their outputs (max relative error < 1e-5 on
    torch; the file's float32 tolerances against the float64 module elsewhere)."""
    require(backend, "mlp", dtype=torch.float32, act="swiglu")
    x = torch.randn(3, 50, 40, device=DEV) * 1.5 + 0.3
    for name, module, args in _timm_swiglu_cases():
        with torch.no_grad():
            out = ops.mlp(x, *args, backend=backend)
            ref = module(x)
            ref64 = copy.deepcopy(module).double()(x.double())
        assert out.shape == ref.shape == (3, 50, 24), name
        if backend == "torch":
            rel = ((out - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-5, f"{name}: max relative error {rel:.3e} vs timm; " + error_report(out, ref)
        atol, rtol = TOLERANCES[torch.float32]
        assert_close_rule(out, ref64, ref, atol=atol, rtol=rtol, name=f"{name} vs timm (float64)")


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
    # swiglu: fc1 (2 Hd, D) with gate rows then value rows, fc2 and the hidden LayerNorm Hd wide
    ("swiglu-odd-fc1", lambda b: ops.mlp(_r(2, 8), _r(15, 8), None, _r(8, 7), None, "swiglu", backend=b), ValueError,
     r"fc1_weight: expected an even number of rows with act='swiglu' \(gate rows, then value rows\), "
     r"got shape \(15, 8\)"),
    ("swiglu-fc2-full-width", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), None, "swiglu", backend=b),
     ValueError, r"fc2_weight: expected shape \(D_out, 8\), got shape \(8, 16\)"),
    ("swiglu-fc1-bias-half", lambda b: ops.mlp(_r(2, 8), _r(16, 8), _r(8), _r(8, 8), None, "swiglu", backend=b),
     ValueError, r"fc1_bias: expected shape \(16,\), got shape \(8,\)"),
    ("swiglu-hidden-ln-shape", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 8), None, "swiglu",
                                                 hidden_ln_weight=_r(16), backend=b),
     ValueError, r"hidden_ln_weight: expected shape \(8,\), got shape \(16,\)"),
    ("hidden-ln-bias-shape", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), None, hidden_ln_weight=_r(16),
                                               hidden_ln_bias=_r(8), backend=b),
     ValueError, r"hidden_ln_bias: expected shape \(16,\), got shape \(8,\)"),
    ("hidden-ln-bias-alone", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), None, hidden_ln_bias=_r(16),
                                               backend=b),
     ValueError, r"hidden_ln_weight: expected a tensor when hidden_ln_bias is given, got None"),
    ("hidden-ln-dtype", lambda b: ops.mlp(_r(2, 8), _r(16, 8), None, _r(8, 16), None,
                                          hidden_ln_weight=_r(16).half(), backend=b),
     TypeError, r"hidden_ln_weight: expected dtype torch.float32 \(as x\), got dtype torch.float16"),
]

test_validation_errors = validation_errors_test(VALIDATION)


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype):
    M, D, Hd, Do = rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 72), rng.randint(1, 40)
    act = rng.choice(["gelu", "gelu_tanh", None, "quick_gelu", "swiglu"])
    b1, b2, gamma, res, ln, hln = (rng.random() < 0.5 for _ in range(6))
    ln_bias = ln and rng.random() < 0.5
    # a LayerNorm of fewer than 8 hidden values is ill-conditioned (it scales by 1 / std of a few
    # values): the contract's 16-bit rounding of the hidden, absent from the float32 oracle, blows up
    hln = hln and Hd >= 8
    hln_bias = hln and rng.random() < 0.5
    rows = 2 * Hd if act in GATED_ACTS else Hd
    args = (randn(M, D, dtype=dtype), randn(rows, D, dtype=dtype, scale=D ** -0.5),
            maybe(b1, lambda: randn(rows, dtype=dtype)),
            randn(Do, Hd, dtype=dtype, scale=Hd ** -0.5), maybe(b2, lambda: randn(Do, dtype=dtype)), act,
            maybe(gamma, lambda: randn(Do, dtype=dtype)), maybe(res, lambda: randn(M, Do, dtype=dtype)),
            maybe(ln, lambda: randn(D, dtype=dtype)), maybe(ln_bias, lambda: randn(D, dtype=dtype)), 1e-6,
            maybe(hln, lambda: randn(Hd, dtype=dtype, scale=0.5, shift=1.0)),
            maybe(hln_bias, lambda: randn(Hd, dtype=dtype)), 1e-5)
    desc = (f"M={M} D={D} hidden={Hd} D_out={Do} act={act} b1={b1} b2={b2} gamma={gamma} res={res} ln={ln}/{ln_bias} "
            f"hidden_ln={hln}/{hln_bias}")
    return desc, args, {"act": act}, None


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, poison):
    run_sweep("mlp", backend, _sweep_case, poison)

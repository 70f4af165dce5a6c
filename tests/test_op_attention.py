"""attention and attention_probs on every backend (torch, triton, cuda), one shape set, one oracle.

Covers: the output against the oracle (``utils.check_op``: reference upcast one precision step,
DESIGN.md rule) over utils.ATTENTION_SHAPES x float32 / float16 / bfloat16, outputs poisoned
(NaN-filled allocations, every element must be written); q / k / v as strided views of one
packed (B, N, 3, H, d) qkv buffer, N_kv != N with separately allocated and transposed k / v;
the layout contract (a (B, H, N, d) view of (B, N, H, d) memory); the scale argument against an
independent float64 einsum; attention_probs rows summing to 1 and out == probs @ v; the
validation errors (argument, expected, actual) raised before any backend is chosen; and a seeded
random sweep per op. A backend that cannot run a case here is skipped with the reason from
fastvit.backends.reasons (triton bf16 in the interpreter, cuda without a GPU, cuda has no
attention_probs kernel). GPU-only shapes carry @pytest.mark.gpu.
"""

import pytest
import torch

from fastvit import ops, reference
from utils import (ATTENTION_PROBS_SHAPES, ATTENTION_SHAPES, BACKENDS, DEV, DTYPES, TOLERANCES, assert_all_written,
                   assert_close_rule, require, run_checked, run_sweep, validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")


def qkv_views(B, H, N, Nkv, d, dtype):
    """q, k, v (B, H, N / N_kv, d). N == N_kv: strided views of one packed (B, N, 3, H, d) qkv
    buffer, as the model passes them; otherwise q from a (B, N, H, d) buffer, k from a
    (B, N_kv, H, d) buffer (transposed views) and v contiguous."""
    if N == Nkv:
        qkv = torch.randn(B, N, 3, H, d, device=DEV).to(dtype)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = torch.randn(B, N, H, d, device=DEV).to(dtype).transpose(1, 2)
    k = torch.randn(B, Nkv, H, d, device=DEV).to(dtype).transpose(1, 2)
    v = torch.randn(B, H, Nkv, d, device=DEV).to(dtype)
    return q, k, v


def assert_layout(out, B, H, N, d, dtype):
    assert out.shape == (B, H, N, d), f"shape {tuple(out.shape)}, expected {(B, H, N, d)}"
    assert out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), \
        f"output must be a (B, H, N, d) view of (B, N, H, d) memory, got strides {out.stride()}"


def run_on_views(op, backend, dtype, atol, rtol, B, H, N, Nkv, d, poison):
    """``op`` (attention / attention_probs) with the default scale on :func:`qkv_views`, poisoned,
    against the oracle (scale d ** -0.5), the output's layout checked; returns the op's result."""
    require(backend, op, dtype=dtype, head_dim=d)
    q, k, v = qkv_views(B, H, N, Nkv, d, dtype)
    result = run_checked(op, backend, (q, k, v), poison, atol, rtol, oracle_args=(q, k, v, d ** -0.5))
    assert_layout(result[0] if isinstance(result, tuple) else result, B, H, N, d, dtype)
    return result


# --------------------------------------------------------------------------- attention
@pytest.mark.parametrize("B,H,N,Nkv,d", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(backend, dtype, atol, rtol, B, H, N, Nkv, d, poison):
    run_on_views("attention", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison)


@pytest.mark.parametrize("N", [1, 2, 50, 197])
@pytest.mark.parametrize("d", [32, 48, 80])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_math_and_scale(backend, N, d):
    """float32 against an independent float64 einsum formulation, default scale and 0.3."""
    require(backend, "attention", dtype=torch.float32, head_dim=d)
    B, H = 3, 2
    q, k, v = qkv_views(B, H, N, N, d, torch.float32)
    atol, rtol = TOLERANCES[torch.float32]

    def math(scale):
        s = torch.einsum("bhnd,bhmd->bhnm", q.double(), k.double()) * scale
        return torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v.double())

    out = ops.attention(q, k, v, backend=backend)
    assert_layout(out, B, H, N, d, torch.float32)
    assert_close_rule(out, math(d ** -0.5), None, atol=atol, rtol=rtol, name="default scale")
    out = ops.attention(q, k, v, scale=0.3, backend=backend)
    assert_close_rule(out, math(0.3), None, atol=atol, rtol=rtol, name="scale 0.3")
    # the reference's own oracle mode (explicit float32 math) agrees with the formulation too
    assert_close_rule(reference.attention(q, k, v, upcast=True), math(d ** -0.5), None, atol=atol, rtol=rtol,
                      name="reference upcast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_layout_and_scale_kv_len(backend, poison):
    """N_kv != N with separately allocated q / k / v: the layout contract and the scale argument
    (a result with the default scale must differ: the argument is not ignored)."""
    require(backend, "attention", dtype=torch.float32, head_dim=48)
    q, k, v = qkv_views(2, 3, 37, 21, 48, torch.float32)
    out = run_checked("attention", backend, (q, k, v, 0.3), poison, *TOLERANCES[torch.float32])
    assert_layout(out, 2, 3, 37, 48, torch.float32)
    default = reference.attention(q.double(), k.double(), v.double())
    assert (out.double() - default).abs().max() > 1e-3, "scale argument ignored"
    # out.transpose(1, 2).reshape(B, N, H * d) is the model's next input: no copy
    flat = out.transpose(1, 2).reshape(2, 37, 3 * 48)
    assert flat.data_ptr() == out.data_ptr()


# --------------------------------------------------------------------------- attention_probs
@pytest.mark.parametrize("B,H,N,Nkv,d", ATTENTION_PROBS_SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_probs(backend, dtype, atol, rtol, B, H, N, Nkv, d, poison):
    out, probs = run_on_views("attention_probs", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison)
    assert probs.shape == (B, H, N, Nkv) and probs.dtype == torch.float32
    p_atol, p_rtol = TOLERANCES[torch.float32]
    assert_close_rule(probs.sum(-1), torch.ones(B, H, N, dtype=torch.float64, device=DEV), None, atol=p_atol,
                      rtol=p_rtol, name="probs row sums")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_probs_rows_and_output(backend, poison):
    """Rows sum to 1, out == probs @ v, and out agrees with attention on the same backend."""
    require(backend, "attention_probs", dtype=torch.float32, head_dim=32)
    q, k, v = (torch.randn(2, 4, 10, 32, device=DEV) for _ in range(3))
    with poison():
        out, p = ops.attention_probs(q, k, v, backend=backend)
    assert_all_written(out, "out")
    assert_all_written(p, "probs")
    assert p.shape == (2, 4, 10, 10) and p.dtype == torch.float32
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(p.sum(-1), torch.ones(2, 4, 10, dtype=torch.float64, device=DEV), None, atol, "row sums", rtol)
    assert_close_rule(out, p.double() @ v.double(), None, atol, "out vs probs @ v", rtol)
    plain = ops.attention(q, k, v, backend=backend)
    assert_close_rule(out, plain.double(), None, atol, "out vs attention", rtol)


# --------------------------------------------------------------------------- validation
def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


VALIDATION = [
    ("q-3d", lambda b: ops.attention(_r(2, 3, 4), _r(2, 3, 4), _r(2, 3, 4), backend=b), ValueError,
     r"q: expected a 4-D tensor, got shape \(2, 3, 4\)"),
    ("k-head-dim", lambda b: ops.attention(_r(1, 2, 4, 8), _r(1, 2, 4, 16), _r(1, 2, 4, 16), backend=b), ValueError,
     r"k: expected shape \(1, 2, N_kv, 8\)"),
    ("k-dtype", lambda b: ops.attention(_r(1, 2, 4, 8), _r(1, 2, 4, 8).half(), _r(1, 2, 4, 8), backend=b), TypeError,
     r"k: expected dtype torch.float32 \(as q\), got dtype torch.float16"),
    ("q-stride", lambda b: ops.attention(_r(1, 2, 8, 4).transpose(-1, -2), _r(1, 2, 4, 8), _r(1, 2, 4, 8), backend=b),
     ValueError, r"q: expected a last dim with stride 1"),
    ("head-dim-300", lambda b: ops.attention(_r(1, 1, 2, 300), _r(1, 1, 2, 300), _r(1, 1, 2, 300), backend=b),
     ValueError, r"q: expected head dim <= 256, got head dim 300"),
    ("v-shape", lambda b: ops.attention(_r(2, 3, 10, 16), _r(2, 3, 12, 16), _r(2, 3, 11, 16), backend=b), ValueError,
     r"v: expected shape \(2, 3, 12, 16\), got shape \(2, 3, 11, 16\)"),
    ("probs-q-int", lambda b: ops.attention_probs(_r(1, 1, 2, 8).int(), _r(1, 1, 2, 8), _r(1, 1, 2, 8), backend=b),
     TypeError, r"q: expected dtype float32, float16 or bfloat16, got torch.int32"),
    ("scale-str", lambda b: ops.attention(_r(1, 1, 2, 8), _r(1, 1, 2, 8), _r(1, 1, 2, 8), "0.1", backend=b),
     TypeError, r"scale: expected a float or None, got str"),
]

test_validation_errors = validation_errors_test(VALIDATION)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend: expected one of \('triton', 'cuda', 'torch', 'auto'\) or None, "
                                         r"got 'tensorrt'"):
        ops.attention(*(torch.randn(1, 1, 2, 8),) * 3, backend="tensorrt")


# --------------------------------------------------------------------------- random sweep
def _sweep_case(rng, dtype, probs):
    # the interpreter's cost is per program (B * H * q blocks): mostly one head, sometimes 3
    B, H = rng.choice([(1, 1), (1, 1), (2, 1), (1, 2), (3, 1)])
    N = rng.randint(1, 24 if probs else 40)
    Nkv = N if rng.random() < 0.7 else rng.randint(1, 40)
    d = rng.choice([8, 16, 24, 32, 40, 48, 64, 80, 96, 112, 128])
    scale = rng.choice([None, 0.05, 0.5])
    packed = Nkv == N and rng.random() < 0.7
    if packed:
        q, k, v = torch.randn(B, N, 3, H, d, device=DEV).to(dtype).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = torch.randn(B, H, N, d, device=DEV).to(dtype)
        k, v = (torch.randn(B, H, Nkv, d, device=DEV).to(dtype) for _ in range(2))
    desc = f"B={B} H={H} N={N} Nkv={Nkv} d={d} scale={scale} packed={packed}"

    def layout(out):
        assert_layout(out[0] if probs else out, B, H, N, d, dtype)

    return desc, (q, k, v, scale), {"head_dim": d}, layout


@pytest.mark.parametrize("op", ["attention", "attention_probs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_sweep(backend, op, poison):
    run_sweep(op, backend, lambda rng, dt: _sweep_case(rng, dt, op == "attention_probs"), poison)

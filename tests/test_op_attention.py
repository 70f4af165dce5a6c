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

Bias and RoPE (``bias=``, ``rope=``, ``rope_half=``): every bias form ((H, N, N_kv), (1 or B, H,
N, N_kv), strided, float32 under 16-bit q, -inf entries), both RoPE layouts with shared and
per-head tables and 0 / 1 / 5 prefix tokens, their combination, in attention and
attention_probs, against the same oracle; a backend without the feature
(``BackendLimits.features``) is skipped with its reason. The reference's RoPE is checked
bit-for-bit against timm's ``apply_rot_embed_cat`` and EVA attention formula.
"""

import pytest
import torch

from fastvit import ops, reference
from utils import (ATTENTION_PROBS_SHAPES, ATTENTION_SHAPES, BACKENDS, DEV, DTYPES, TOLERANCES, assert_all_written,
                   assert_close_rule, check_op, randn, require, run_checked, run_sweep, shapes_named,
                   validation_errors_test)

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


# --------------------------------------------------------------------------- bias and RoPE
def rope_table(*lead, n_rot, d, dtype=torch.float32):
    """A ``cat([sin, cos], -1)`` table (*lead, N_r, 2 d) of random angles: entries in [-1, 1]
    as in a real table, but sin / cos differ within each rotation pair, so a kernel that reads
    the wrong partner's entry fails."""
    theta = torch.rand(*lead, n_rot, d, device=DEV) * 6.3
    return torch.cat([theta.sin(), theta.cos()], -1).to(dtype)


def make_rope(layout, per_head, H, n_rot, d):
    """(table, rope_half) for a layout ('interleaved' / 'half'); a per-head table is a strided
    (H, N_r, 2 d) view of an (N_r, H, 2 d) buffer."""
    if per_head:
        return rope_table(n_rot, n_rot=H, d=d).transpose(0, 1), layout == "half"  # (N_r, H, 2 d) buffer
    table = rope_table(n_rot=n_rot, d=d)
    return table, layout == "half"


def make_bias(kind, B, H, N, Nkv, dtype):
    """Additive logits, 2 x normal (large enough that a mis-scaled bias fails). kind: 'h' (H, N,
    N_kv), '1h' / 'bh' (1 / B, H, N, N_kv), 'bh-strided' (a (B, H, N, N_kv) view of an (H, B, N,
    N_kv + 3) buffer), 'h-fp32' (float32 whatever q's dtype)."""
    if kind == "h":
        return randn(H, N, Nkv, dtype=dtype, scale=2.0)
    if kind == "1h":
        return randn(1, H, N, Nkv, dtype=dtype, scale=2.0)
    if kind == "bh":
        return randn(B, H, N, Nkv, dtype=dtype, scale=2.0)
    if kind == "bh-strided":
        return randn(H, B, N, Nkv + 3, dtype=dtype, scale=2.0)[..., :Nkv].transpose(0, 1)
    assert kind == "h-fp32", kind
    return randn(H, N, Nkv, dtype=torch.float32, scale=2.0)


def run_features(op, backend, dtype, atol, rtol, B, H, N, Nkv, d, poison, bias_kind=None, rope_layout=None,
                 per_head=False, prefix=0):
    """``op`` on :func:`qkv_views` with a bias (``bias_kind``, :func:`make_bias`) and / or RoPE on
    the last min(N, N_kv) - prefix tokens, poisoned, against the oracle; the backend is skipped
    with its reasons when it lacks a feature. Returns the op's result."""
    features = ((f"{op}.bias",) if bias_kind else ()) + ((f"{op}.rope",) if rope_layout else ()) + \
        ((f"{op}.rope_per_head",) if rope_layout and per_head else ())
    require(backend, op, dtype=dtype, head_dim=d, features=features)
    q, k, v = qkv_views(B, H, N, Nkv, d, dtype)
    bias = make_bias(bias_kind, B, H, N, Nkv, dtype) if bias_kind else None
    rope, half = make_rope(rope_layout, per_head, H, min(N, Nkv) - prefix, d) if rope_layout else (None, False)
    with poison():
        result = getattr(ops, op)(q, k, v, bias=bias, rope=rope, rope_half=half, backend=backend)
    if rope is not None:
        # the contract rounds the rotated q / k to q's dtype before q k^T: the oracle starts from
        # them (reference.apply_rope is timm's rotation, test_reference_rope_is_timm), not from
        # an upcast rotation that a float16 probs output could never match within float32 slack
        q, k = reference.apply_rope(q, rope, half), reference.apply_rope(k, rope, half)
    check_op(op, backend, (q, k, v, d ** -0.5, bias), result, atol, rtol)
    assert_layout(result[0] if isinstance(result, tuple) else result, B, H, N, d, dtype)
    return result


_D72 = [pytest.param(2, 2, 29, 29, 72, id="B2-H2-N29-Nkv29-d72")]  # SigLIP so400m's head dim, not in the shared set
BIAS_SHAPES = shapes_named(ATTENTION_SHAPES, [
    "B3-H1-N1-Nkv1-d32", "B3-H1-N50-Nkv50-d48", "B1-H1-N197-Nkv197-d80", "B2-H3-N37-Nkv21-d48",
    "B3-H2-N10-Nkv130-d40", "B2-H3-N33-Nkv33-d64", "B8-H12-N197-Nkv197-d64-gpu", "B3-H2-N10-Nkv130-d96-gpu",
    "B2-H16-N257-Nkv257-d80-gpu"]) + _D72
ROPE_SHAPES = shapes_named(ATTENTION_SHAPES, [
    "B3-H1-N2-Nkv2-d64", "B3-H1-N50-Nkv50-d64", "B1-H1-N197-Nkv197-d80", "B2-H3-N37-Nkv21-d48",
    "B3-H2-N10-Nkv130-d40", "B2-H3-N33-Nkv33-d64", "B8-H12-N197-Nkv197-d64-gpu", "B3-H2-N50-Nkv50-d128-gpu",
    "B2-H16-N257-Nkv257-d80-gpu"]) + _D72
PREFIXES = (0, 1, 5)  # no prefix; class token; class + 4 registers


def _rope_cases(shapes):
    """Per shape every (layout, per-head) pair, the prefix count cycling over PREFIXES across
    shapes so each pair meets each prefix; prefixes that leave no rotated token are dropped."""
    out = []
    for i, sh in enumerate(shapes):
        _, _, N, Nkv, _ = sh.values
        for j, (layout, per_head) in enumerate([(lo, ph) for lo in ("interleaved", "half") for ph in (False, True)]):
            prefix = PREFIXES[(i + j) % len(PREFIXES)]
            if prefix >= min(N, Nkv):
                prefix = 0
            out.append(pytest.param(*sh.values, layout, per_head, prefix, marks=sh.marks,
                                    id=f"{sh.id}-{layout}{'-perhead' if per_head else ''}-prefix{prefix}"))
    return out


@pytest.mark.parametrize("B,H,N,Nkv,d", BIAS_SHAPES)
@pytest.mark.parametrize("kind", ["h", "1h", "bh", "bh-strided", "h-fp32"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias(backend, dtype, atol, rtol, kind, B, H, N, Nkv, d, poison):
    run_features("attention", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison, bias_kind=kind)


@pytest.mark.parametrize("B,H,N,Nkv,d,layout,per_head,prefix", _rope_cases(ROPE_SHAPES))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rope(backend, dtype, atol, rtol, B, H, N, Nkv, d, layout, per_head, prefix, poison):
    run_features("attention", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison, rope_layout=layout,
                 per_head=per_head, prefix=prefix)


@pytest.mark.parametrize("B,H,N,Nkv,d,kind,layout,per_head,prefix", [
    pytest.param(2, 3, 37, 37, 64, "1h", "interleaved", False, 1, id="B2-H3-N37-d64-1h-interleaved-prefix1"),
    pytest.param(3, 2, 50, 50, 48, "bh", "half", True, 5, id="B3-H2-N50-d48-bh-half-perhead-prefix5"),
    pytest.param(2, 1, 20, 45, 80, "h-fp32", "half", False, 0, id="B2-H1-N20-Nkv45-d80-hfp32-half"),
    pytest.param(1, 2, 29, 29, 72, "bh-strided", "interleaved", True, 1, id="B1-H2-N29-d72-strided-interleaved-perhead"),
    pytest.param(8, 12, 197, 197, 64, "h", "interleaved", False, 1, id="B8-H12-N197-d64-h-interleaved-gpu",
                 marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_and_rope(backend, dtype, atol, rtol, B, H, N, Nkv, d, kind, layout, per_head, prefix, poison):
    run_features("attention", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison, bias_kind=kind,
                 rope_layout=layout, per_head=per_head, prefix=prefix)


@pytest.mark.parametrize("B,H,N,Nkv,d", shapes_named(ATTENTION_PROBS_SHAPES, [
    "B3-H2-N1-Nkv1-d32", "B2-H4-N10-Nkv10-d32", "B2-H1-N20-Nkv45-d48", "B3-H2-N50-Nkv50-d80",
    "B8-H12-N197-Nkv197-d64-gpu", "B3-H2-N10-Nkv130-d96-gpu"]))
@pytest.mark.parametrize("kind,layout,per_head", [("1h", None, False), (None, "interleaved", False),
                                                  ("bh", "half", True), ("h-fp32", "interleaved", True)],
                         ids=["bias", "rope", "bias-rope_half-perhead", "bias32-rope-perhead"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_probs_bias_rope(backend, dtype, atol, rtol, kind, layout, per_head, B, H, N, Nkv, d, poison):
    """Probabilities after the rotation and the bias (checked against the oracle's), rows summing to 1."""
    prefix = 1 if min(N, Nkv) > 1 else 0
    _, probs = run_features("attention_probs", backend, dtype, atol, rtol, B, H, N, Nkv, d, poison, bias_kind=kind,
                            rope_layout=layout, per_head=per_head, prefix=prefix)
    p_atol, p_rtol = TOLERANCES[torch.float32]
    assert_close_rule(probs.sum(-1), torch.ones(B, H, N, dtype=torch.float64, device=DEV), None, atol=p_atol,
                      rtol=p_rtol, name="probs row sums")


@pytest.mark.parametrize("op", ["attention", "attention_probs"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_minus_inf(backend, op, dtype, atol, rtol, poison):
    """A -inf bias masks keys (as an SDPA float mask): every other query row sees -inf for its
    first 40 keys (whole leading kv tiles: no finite logit yet when the online softmax starts),
    one row all but its last key; masked probabilities are exactly 0."""
    B, H, N, Nkv, d = 2, 2, 45, 70, 32
    require(backend, op, dtype=dtype, head_dim=d, features=(f"{op}.bias",))
    q, k, v = qkv_views(B, H, N, Nkv, d, dtype)
    bias = randn(H, N, Nkv, dtype=dtype)
    bias[:, ::2, :40] = float("-inf")
    bias[:, 7, :-1] = float("-inf")
    with poison():
        result = getattr(ops, op)(q, k, v, bias=bias, backend=backend)
    check_op(op, backend, (q, k, v, d ** -0.5, bias), result, atol, rtol)
    if op == "attention_probs":
        probs = result[1]
        assert (probs[:, :, ::2, :40] == 0).all() and (probs[:, :, 7, :-1] == 0).all()
        assert torch.allclose(probs[:, :, 7, -1], torch.ones_like(probs[:, :, 7, -1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_and_rope_change_the_result(backend):
    """Neither argument is ignored: with them the output differs from plain attention."""
    require(backend, "attention", dtype=torch.float32, head_dim=32,
            features=("attention.bias", "attention.rope", "attention.rope_per_head"))
    q, k, v = qkv_views(2, 2, 17, 17, 32, torch.float32)
    plain = ops.attention(q, k, v, backend=backend)
    for kw in (dict(bias=make_bias("h", 2, 2, 17, 17, torch.float32)), dict(rope=rope_table(n_rot=16, d=32)),
               dict(rope=rope_table(n_rot=16, d=32), rope_half=True), dict(rope=rope_table(2, n_rot=16, d=32))):
        out = ops.attention(q, k, v, backend=backend, **kw)
        assert (out - plain).abs().max() > 1e-2, f"{sorted(kw)} ignored"


@pytest.mark.parametrize("backend", ["triton"])
def test_triton_every_config_with_bias_and_rope(backend, poison):
    """Every launch config of both kernels (``_configs()``, the tile shapes the tuner may pick)
    with bias + RoPE on odd sizes: N and N_kv not tile multiples, head dim 40 (the rotation
    halves are 20 of 32 columns), prefix tokens; both layouts, float16."""
    require(backend, "attention", dtype=torch.float16, head_dim=40,
            features=("attention.bias", "attention.rope", "attention.rope_per_head"))
    import importlib

    att = importlib.import_module("fastvit.kernels.attention")
    B, H, N, Nkv, d = 1, 2, 45, 70, 40
    q, k, v = qkv_views(B, H, N, Nkv, d, torch.float16)
    bias = make_bias("bh", B, H, N, Nkv, torch.float16)
    atol, rtol = TOLERANCES[torch.float16]
    for i, cfg in enumerate(att._configs()):
        rope, half = make_rope(("interleaved", "half")[i % 2], i % 3 == 0, H, 43, d)
        with poison():
            out = att.attention_fwd(q, k, v, d ** -0.5, bias, rope, half, config=cfg)
            out_p = att.attention_probs_fwd(q, k, v, d ** -0.5, bias, rope, half, config=cfg)
        args = (reference.apply_rope(q, rope, half), reference.apply_rope(k, rope, half), v, d ** -0.5, bias)
        check_op("attention", backend, args, out, atol, rtol, name=f"attention {cfg}")
        check_op("attention_probs", backend, args, out_p, atol, rtol, name=f"attention_probs {cfg}")


# --------------------------------------------------------------------------- reference RoPE == timm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "perhead"])
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
def test_reference_rope_is_timm(half, per_head, dtype):
    """``reference.apply_rope`` is timm's ``apply_rot_embed_cat`` bit for bit (float32 table,
    any q dtype), with the prefix tokens passed through; reference attention with RoPE is timm's
    EVA attention (cat(prefix, rotated rest).type_as(v), then SDPA)."""
    layers = pytest.importorskip("timm.layers")
    B, H, N, d, npt = 2, 3, 21, 48, 5
    q, k, v = (torch.randn(B, H, N, d).to(dtype) for _ in range(3))
    rope = rope_table(*((H,) if per_head else ()), n_rot=N - npt, d=d).cpu()
    got = reference.apply_rope(q, rope, half)
    want = torch.cat([q[:, :, :npt], layers.apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
    assert got.dtype == dtype and torch.equal(got, want)
    full = rope_table(*((H,) if per_head else ()), n_rot=N, d=d).cpu()  # no prefix: every token rotated
    assert torch.equal(reference.apply_rope(q, full, half), layers.apply_rot_embed_cat(q, full, half=half))

    def eva(q, k, v):
        q = torch.cat([q[:, :, :npt], layers.apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], layers.apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert torch.equal(reference.attention(q, k, v, rope=rope, rope_half=half), eva(q, k, v))


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
    # bias / rope: shape, dtype, stride, device; rope needs an even head dim and N_r <= min(N, N_kv)
    ("bias-shape", lambda b: ops.attention(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8), bias=_r(3, 5, 5), backend=b),
     ValueError, r"bias: expected shape \(3, 5, 7\) or \(2, 3, 5, 7\) \(H, N, N_kv of q / k\), got shape \(3, 5, 5\)"),
    ("bias-batch", lambda b: ops.attention(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8), bias=_r(3, 3, 5, 7),
                                           backend=b),
     ValueError, r"bias: expected shape \(3, 5, 7\) or \(2, 3, 5, 7\).*got shape \(3, 3, 5, 7\)"),
    ("bias-stride", lambda b: ops.attention(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8),
                                            bias=_r(3, 7, 5).transpose(1, 2), backend=b),
     ValueError, r"bias: expected a last dim with stride 1, got strides \(35, 1, 5\)"),
    ("bias-device", lambda b: ops.attention(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8),
                                            bias=torch.empty(3, 5, 7, device="meta"), backend=b),
     ValueError, r"bias: expected device cpu \(as q\), got device meta"),
    ("bias-int", lambda b: ops.attention(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8),
                                         bias=torch.zeros(3, 5, 7, dtype=torch.int32), backend=b),
     TypeError, r"bias: expected dtype float32, float16 or bfloat16, got torch.int32"),
    ("rope-odd-head-dim", lambda b: ops.attention(_r(1, 2, 5, 9), _r(1, 2, 5, 9), _r(1, 2, 5, 9), rope=_r(5, 18),
                                                  backend=b),
     ValueError, r"q: expected an even head dim with rope, got head dim 9"),
    ("rope-too-many-rows", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 4, 8), _r(1, 2, 4, 8), rope=_r(5, 16),
                                                   backend=b),
     ValueError, r"rope: expected shape \(N_r, 16\) or \(2, N_r, 16\) \(cat\(\[sin, cos\], -1\) with "
                 r"0 < N_r <= min\(N, N_kv\) = 4\), got shape \(5, 16\)"),
    ("rope-width", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8), rope=_r(5, 8), backend=b),
     ValueError, r"rope: expected shape \(N_r, 16\).*got shape \(5, 8\)"),
    ("rope-heads", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8), rope=_r(3, 5, 16),
                                           backend=b),
     ValueError, r"rope: expected shape \(N_r, 16\) or \(2, N_r, 16\).*got shape \(3, 5, 16\)"),
    ("rope-stride", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8), rope=_r(16, 5).t(),
                                            backend=b),
     ValueError, r"rope: expected a last dim with stride 1, got strides \(1, 5\)"),
    ("rope-device", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8),
                                            rope=torch.empty(5, 16, device="meta"), backend=b),
     ValueError, r"rope: expected device cpu \(as q\), got device meta"),
    ("rope-half-int", lambda b: ops.attention(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8), rope=_r(5, 16),
                                              rope_half=1, backend=b),
     TypeError, r"rope_half: expected a bool, got int"),
    ("probs-bias-shape", lambda b: ops.attention_probs(_r(2, 3, 5, 8), _r(2, 3, 7, 8), _r(2, 3, 7, 8),
                                                       bias=_r(2, 3, 5, 5), backend=b),
     ValueError, r"bias: expected shape \(3, 5, 7\) or \(2, 3, 5, 7\).*got shape \(2, 3, 5, 5\)"),
    ("probs-rope-empty", lambda b: ops.attention_probs(_r(1, 2, 5, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8),
                                                       rope=_r(0, 16), backend=b),
     ValueError, r"rope: expected shape \(N_r, 16\).*0 < N_r <= min\(N, N_kv\) = 5\), got shape \(0, 16\)"),
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

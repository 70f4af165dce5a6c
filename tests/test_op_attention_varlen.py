"""attention_varlen (packed variable-length sequences) on every backend, one oracle.

Covers: the output against the oracle (``utils.check_op``: the reference upcast one precision
step, DESIGN.md rule) over sequence-length mixes with 1-token, off-block, empty and long
sequences, head dims of the awkward set, float32 / float16 / bfloat16 (bf16 and the larger mixes
GPU-only for triton), outputs NaN-poisoned; q / k / v as strided views of one packed (total, 3,
H, d) qkv buffer and as separate tensors with other key lengths (cross attention); the output
layout ((total_q, H, d) contiguous); RoPE per packed token (shared / per-head tables, both pair
layouts, unrotated tokens), the packed RoPE reference against the fixed-length attention's RoPE
per sequence; the reference against per-sequence SDPA and against padded
SDPA with a key-padding mask (the equality a padded NaFlex batch relies on); the Triton kernel
bit-identical per sequence to the fixed-length kernel at the same launch config, every launch
config of ``_configs()`` on a mix, a seeded random sweep of mixes; the offsets' value checks
(once per tensor: an in-place change re-checks, ``varlen_offsets`` is never read back);
validation errors naming argument / expected / got before any backend is chosen; gradients
through the custom op; torch.compile(fullgraph=True) in a fresh process; GPU-only: bf16,
sequences of thousands of tokens, 50 reruns bit-identical.

The cuda backend declares no attention_varlen kernel: its cases skip with that reason.
"""

import importlib
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastvit import backends, ops, reference
from utils import (BACKENDS, DEV, DTYPES, HAS_CUDA, TOLERANCES, assert_all_written, assert_close_rule, check_op,
                   require, run_checked, skip_reason, validation_errors_test)

pytestmark = pytest.mark.usefixtures("full_precision")
OP = "attention_varlen"


def _varlen_kernels():
    # import_module: the package re-exports a function named like the submodule
    return importlib.import_module("fastvit.kernels.attention_varlen")


def packed(lens_q, lens_k, H, d, dtype):
    """(q, k, v, cu_q, cu_k, max_q, max_k). ``lens_k`` None: self attention, q / k / v strided
    views of one packed (total, 3, H, d) qkv buffer (as the model passes them); else q from a
    (total_q, H, d) buffer, k a (total_k, H, d) view of a (H, total_k, d) buffer, v contiguous."""
    cu_q, max_q = ops.varlen_offsets(lens_q, device=DEV)
    if lens_k is None:
        qkv = torch.randn(sum(lens_q), 3, H, d, device=DEV).to(dtype)
        q, k, v = qkv.unbind(1)
        return q, k, v, cu_q, cu_q, max_q, max_q
    cu_k, max_k = ops.varlen_offsets(lens_k, device=DEV)
    q = torch.randn(sum(lens_q), H, d, device=DEV).to(dtype)
    k = torch.randn(H, sum(lens_k), d, device=DEV).to(dtype).transpose(0, 1)
    v = torch.randn(sum(lens_k), H, d, device=DEV).to(dtype)
    return q, k, v, cu_q, cu_k, max_q, max_k


def _case(lens_q, lens_k, H, d, gpu=False):
    name = "q" + "_".join(map(str, lens_q)) + ("" if lens_k is None else "-k" + "_".join(map(str, lens_k)))
    return pytest.param(lens_q, lens_k, H, d, id=f"{name}-H{H}-d{d}" + ("-gpu" if gpu else ""),
                        marks=(pytest.mark.gpu,) if gpu else ())


MIX = [1, 50, 197, 3, 257]  # a 1-token sequence, off-block lengths, one past 256
CASES = [
    _case(MIX, None, 2, 64),
    _case(MIX, None, 1, 48),
    _case([7, 1, 33], None, 3, 80),
    _case([2], None, 2, 32),               # one sequence
    _case([5, 0, 17], None, 2, 96),        # an empty sequence in the middle
    _case([29, 64], None, 2, 72),          # SigLIP so400m's head dim
    _case([10, 3, 20], [37, 1, 64], 2, 40),  # cross attention, d not a multiple of 16
    _case([1, 1, 1, 1], [3, 130, 1, 2], 1, 128),
    # GPU: NaFlex-like mixes at a 256 / 1024 token budget (ViT-B / so400m heads), thousands of tokens
    _case([256, 252, 160, 240, 256, 196, 255, 128], None, 12, 64, gpu=True),
    _case([1024, 1020, 576, 990, 3, 768], None, 16, 72, gpu=True),
    _case([4096, 1, 1000, 257], None, 4, 128, gpu=True),
    _case([577, 1, 2, 50, 197, 257], [300, 7, 1, 50, 1025, 64], 6, 80, gpu=True),
    *(_case(MIX, None, 3, d, gpu=True) for d in (32, 48, 96, 128)),
]


def assert_layout(out, q):
    assert out.shape == q.shape and out.dtype == q.dtype, f"{tuple(out.shape)} {out.dtype}"
    assert out.is_contiguous(), f"output must be a contiguous (total_q, H, d), got strides {out.stride()}"


# --------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("lens_q,lens_k,H,d", CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen(backend, dtype, atol, rtol, lens_q, lens_k, H, d, poison):
    require(backend, OP, dtype=dtype, head_dim=d)
    args = packed(lens_q, lens_k, H, d, dtype)
    # default scale in the call, d ** -0.5 for the oracle
    out = run_checked(OP, backend, args, poison, atol, rtol, oracle_args=args + (d ** -0.5,))
    assert_layout(out, args[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend, poison):
    require(backend, OP, dtype=torch.float32, head_dim=48)
    args = packed([10, 3, 20], [37, 1, 64], 2, 48, torch.float32)
    out = run_checked(OP, backend, args + (0.3,), poison, *TOLERANCES[torch.float32])
    default = reference.attention_varlen(*(a.double() if a.is_floating_point() else a for a in args[:5]), *args[5:])
    assert (out.double() - default).abs().max() > 1e-3, "scale argument ignored"


@pytest.mark.parametrize("lens_q,lens_k", [(MIX, None), ([10, 3, 20], [37, 1, 64]), ([5, 0, 17], None)])
def test_reference_is_per_sequence_sdpa(lens_q, lens_k):
    """The reference (fast path in float64, the float32 oracle mode) against an independent
    float64 einsum per sequence."""
    q, k, v, cu_q, cu_k, max_q, max_k = packed(lens_q, lens_k, 2, 48, torch.float64)
    want = []
    for (a, b), (c, e) in zip(zip(cu_q.tolist(), cu_q.tolist()[1:]), zip(cu_k.tolist(), cu_k.tolist()[1:])):
        s = torch.einsum("nhd,mhd->hnm", q[a:b], k[c:e]) * 48 ** -0.5
        want.append(torch.einsum("hnm,mhd->nhd", s.softmax(-1), v[c:e]))
    want = torch.cat(want)
    got = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    assert_close_rule(got, want, None, atol=1e-12, rtol=1e-12, name="float64")
    got = reference.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, upcast=True)  # float32 math
    atol, rtol = TOLERANCES[torch.float32]
    assert_close_rule(got, want, None, atol=atol, rtol=rtol, name="upcast")


@pytest.mark.parametrize("dtype,atol,rtol", [d for d in DTYPES if d.values[0] != torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_padded_attention_with_mask(backend, dtype, atol, rtol, poison):
    """Packed == padded: the sequences padded to the longest, padded SDPA with a key-padding
    mask, the valid rows kept. What a NaFlex model's padded batch (HF pixel_attention_mask)
    computes, without the padding tokens."""
    require(backend, OP, dtype=dtype, head_dim=64)
    lens, H, d = [37, 1, 120, 64], 2, 64
    q, k, v, cu, _, mx, _ = packed(lens, None, H, d, dtype)
    with poison():
        out = ops.attention_varlen(q, k, v, cu, cu, mx, mx, backend=backend)
    assert_all_written(out)
    B = len(lens)
    pad = lambda t: torch.stack([F.pad(t[a:a + n].double(), (0, 0, 0, 0, 0, mx - n))  # noqa: E731
                                 for a, n in zip(cu.tolist(), lens)]).transpose(1, 2)  # (B, H, mx, d)
    valid = torch.arange(mx, device=DEV)[None] < torch.tensor(lens, device=DEV)[:, None]  # (B, mx)
    padded = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    want = padded.transpose(1, 2)[valid]  # (total, H, d): the valid rows in packed order
    assert want.shape == out.shape and B == 4
    assert_close_rule(out, want, reference.attention_varlen(q, k, v, cu, cu, mx, mx), atol=atol, rtol=rtol,
                      name="packed vs padded")


def rope_table(*lead, total, d):
    """A per-token ``cat([sin, cos], -1)`` table (*lead, total, 2 d) of random angles (sin / cos
    differ within each rotation pair: a kernel reading the partner's entry fails); every 7th
    token gets sin 0, cos 1 (not rotated, as a class token)."""
    theta = torch.rand(*lead, total, d, device=DEV) * 6.3
    theta[..., ::7, :] = 0
    return torch.cat([theta.sin(), theta.cos()], -1)


ROPE_CASES = [
    _case(MIX, None, 2, 64), _case([7, 1, 33], None, 3, 80), _case([5, 0, 17], None, 2, 48),
    _case([29, 64], None, 2, 72), _case([2], None, 1, 32),
    _case([256, 252, 160, 240, 1, 196], None, 12, 64, gpu=True), _case([1024, 3, 576], None, 16, 128, gpu=True),
]


@pytest.mark.parametrize("layout,per_head", [("interleaved", False), ("half", False), ("interleaved", True),
                                             ("half", True)], ids=["interleaved", "half", "interleaved-perhead",
                                                                   "half-perhead"])
@pytest.mark.parametrize("lens_q,lens_k,H,d", ROPE_CASES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen_rope(backend, dtype, atol, rtol, lens_q, lens_k, H, d, layout, per_head, poison):
    """RoPE per packed token (shared or per-head table, both pair layouts, a per-head table as a
    strided (H, total, 2 d) view of a (total, H, 2 d) buffer). The contract rounds the rotated
    q / k to q's dtype before q k^T, so the oracle starts from them (as the fixed-length RoPE test)."""
    features = ("attention_varlen.rope",) + (("attention_varlen.rope_per_head",) if per_head else ())
    require(backend, OP, dtype=dtype, head_dim=d, features=features)
    q, k, v, cu, _, mx, _ = packed(lens_q, lens_k, H, d, dtype)
    total = q.shape[0]
    rope = rope_table(*((H,) if per_head else ()), total=total, d=d).to(dtype)
    if per_head:  # (H, total, 2 d) as a transposed view of a (total, H, 2 d) buffer
        rope = rope.transpose(0, 1).contiguous().transpose(0, 1)
    half = layout == "half"
    with poison():
        out = ops.attention_varlen(q, k, v, cu, cu, mx, mx, rope=rope, rope_half=half, backend=backend)
    qr, kr = reference.apply_rope_tokens(q, rope, half), reference.apply_rope_tokens(k, rope, half)
    check_op(OP, backend, (qr, kr, v, cu, cu, mx, mx, d ** -0.5), out, atol, rtol)
    assert_layout(out, q)


def test_rope_is_per_sequence_rope():
    """Packed RoPE == the fixed-length attention's RoPE on each sequence alone (float64 reference)."""
    q, k, v, cu, _, mx, _ = packed([1, 50, 9, 33], None, 2, 48, torch.float64)
    for per_head, half in ((False, False), (True, True)):
        rope = rope_table(*((2,) if per_head else ()), total=q.shape[0], d=48).double()
        out = reference.attention_varlen(q, k, v, cu, cu, mx, mx, rope=rope, rope_half=half)
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            view = lambda t: t[a:b].transpose(0, 1)[None]  # noqa: E731 - (1, H, n, d)
            one = reference.attention(view(q), view(k), view(v), rope=rope[..., a:b, :], rope_half=half)
            # apply_rope rotates in float32 whatever the input dtype: float32 slack
            assert_close_rule(out[a:b], one[0].transpose(0, 1), None, atol=1e-6, rtol=1e-6, name=f"rows {a}:{b}")


# --------------------------------------------------------------------------- the Triton kernel
def test_kernel_equals_fixed_length_kernel_per_sequence():
    """The varlen kernel runs the fixed-length kernel's kv loop: at one launch config each
    sequence's rows are bit-identical to the fixed-length kernel on that sequence alone."""
    require("triton", OP, dtype=torch.float16, head_dim=48)
    fixed = importlib.import_module("fastvit.kernels.attention")
    vk = _varlen_kernels()
    q, k, v, cu, _, mx, _ = packed([1, 70, 3, 130], None, 2, 48, torch.float16)
    for cfg in vk._configs()[:2] + vk._configs()[4:5]:
        out = vk.attention_varlen_fwd(q, k, v, cu, cu, mx, mx, config=cfg)
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            view = lambda t: t[a:b].transpose(0, 1)[None]  # noqa: E731 - (1, H, n, d)
            one = fixed.attention_fwd(view(q), view(k), view(v), config=cfg)
            assert torch.equal(out[a:b], one[0].transpose(0, 1)), f"config {cfg}, rows {a}:{b}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_launch_config(dtype, poison):
    """Every config of ``_configs()`` (the autotuner's candidates come from it) on a mix whose
    lengths hit no tile boundary; on a GPU a config that does not fit is skipped there
    (tests/test_aot.py says which fit)."""
    require("triton", OP, dtype=dtype, head_dim=48)
    vk = _varlen_kernels()
    args = packed([1, 17, 70, 3, 130, 64], None, 1, 48, dtype)
    atol, rtol = TOLERANCES[dtype]
    ran = 0
    for cfg in vk._configs():
        try:
            with poison():
                out = vk.attention_varlen_fwd(*args, config=cfg)
        except Exception as e:  # only a GPU resource refusal
            if type(e).__name__ == "OutOfResources":
                continue
            raise
        check_op(OP, "triton", args + (48 ** -0.5,), out, atol, rtol, name=f"config {cfg}")
        ran += 1
    assert ran >= len(vk._configs()) // 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_mixes(backend, poison):
    """Seeded random mixes (1 to 300 tokens, an empty sequence now and then, self and cross
    attention, head dims 16..128), on triton each at a random launch config."""
    require(backend, OP, dtype=torch.float32, head_dim=64)
    rng = random.Random("fastvit-varlen-sweep")
    dtypes = [dt for dt in (torch.float32, torch.float16, torch.bfloat16) if skip_reason(backend, OP, dtype=dt) is None]
    configs = _varlen_kernels()._configs() if backend == "triton" else [None]
    cases = 12 if not HAS_CUDA else 60
    failures, ran = [], 0
    for i in range(cases):
        B = rng.randint(1, 5)
        lens_q = [rng.choice([0, 1, 2, rng.randint(3, 300)]) if rng.random() < 0.3 else rng.randint(1, 300)
                  for _ in range(B)]
        lens_q[rng.randrange(B)] = max(lens_q[0], 1)
        lens_k = None if rng.random() < 0.6 else [rng.randint(1, 200) for _ in range(B)]
        if sum(lens_q) > (500 if not HAS_CUDA else 4000):
            lens_q = [min(n, 90) for n in lens_q]
        d, H, dtype, cfg = rng.choice([16, 32, 40, 64, 80, 128]), rng.randint(1, 3), rng.choice(dtypes), \
            rng.choice(configs)
        if skip_reason(backend, OP, dtype=dtype, head_dim=d):
            continue
        args = packed(lens_q, lens_k, H, d, dtype)
        atol, rtol = TOLERANCES[dtype]
        try:
            with poison():
                out = ops.attention_varlen(*args, backend=backend) if cfg is None else \
                    _varlen_kernels().attention_varlen_fwd(*args, config=cfg)
            check_op(OP, backend, args + (d ** -0.5,), out, atol, rtol)
            ran += 1
        except AssertionError as e:
            failures.append(f"case {i}: q {lens_q} k {lens_k} H {H} d {d} {dtype} {cfg}: {str(e).splitlines()[0]}")
        except Exception as e:
            if type(e).__name__ != "OutOfResources":
                raise
    assert not failures, "\n".join(failures)
    assert ran >= cases // 2


def test_empty_inputs():
    """No tokens (no sequences, or only empty ones): an empty (0, H, d) output on every backend."""
    for backend in BACKENDS:
        if skip_reason(backend, OP, dtype=torch.float32, head_dim=32):
            continue
        for lens in ([], [0, 0]):
            cu, mx = ops.varlen_offsets(lens, device=DEV)
            q = torch.randn(0, 2, 32, device=DEV)
            out = ops.attention_varlen(q, q, q, cu, cu, mx, mx, backend=backend)
            assert out.shape == (0, 2, 32), (backend, lens)


# --------------------------------------------------------------------------- offsets and validation
def test_varlen_offsets():
    cu, mx = ops.varlen_offsets([3, 0, 5, 1], device=DEV)
    assert cu.dtype == torch.int32 and cu.device.type == DEV.type and cu.tolist() == [0, 3, 3, 8, 9] and mx == 5
    cu, mx = ops.varlen_offsets(torch.tensor([2, 7]))
    assert cu.tolist() == [0, 2, 9] and mx == 7
    assert ops.varlen_offsets([])[0].tolist() == [0]
    with pytest.raises(ValueError, match=r"seqlens\[1\]: expected a length >= 0, got -2"):
        ops.varlen_offsets([3, -2])
    with pytest.raises(TypeError, match=r"seqlens\[0\]: expected an int, got float"):
        ops.varlen_offsets([3.0])
    with pytest.raises(ValueError, match="seqlens: expected a 1-D integer tensor"):
        ops.varlen_offsets(torch.ones(2, 2))


def test_offsets_are_checked_once_per_tensor(monkeypatch):
    """Offsets from varlen_offsets are never read back; another tensor is read once, then its
    facts are cached until it changes in place (its version counter)."""
    q, k, v, cu, _, mx, _ = packed([4, 9], None, 1, 16, torch.float32)
    other = cu.clone()
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    for _ in range(3):
        ops.attention_varlen(q, k, v, cu, cu, mx, mx, backend="torch")
    assert reads == [], "varlen_offsets' tensor was read back"
    for _ in range(3):
        ops.attention_varlen(q, k, v, other, other, mx, mx, backend="torch")
    assert len(reads) == 1, f"{len(reads)} reads of one offsets tensor"
    other[1] = 11  # in place: 11 > 9 = max_seqlen
    with pytest.raises(ValueError, match=r"max_seqlen_q: expected an int >= the longest sequence \(11, sequence 0\)"):
        ops.attention_varlen(q, k, v, other, other, mx, 9, backend="torch")


def test_offsets_made_in_inference_mode():
    """Inference tensors have no version counter: checked once, then cached by identity."""
    with torch.inference_mode():
        q, k, v, cu, _, mx, _ = packed([4, 9], None, 1, 16, torch.float32)
        other = cu.clone()
        for _ in range(2):
            out = ops.attention_varlen(q, k, v, other, other, mx, mx, backend="torch")
        assert out.shape == q.shape
        with pytest.raises(ValueError, match="max_seqlen_k: expected an int >= the longest sequence"):
            ops.attention_varlen(q, k, v, other, other, mx, 3, backend="torch")


class _NoLaunch:
    """Stands in for the @triton.jit kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_poison_reaches_the_triton_launcher_output(poison, monkeypatch):
    """With its kernel launch removed, the launcher's own allocation stays NaN under poison() and
    the oracle check fails: the poisoned tests above can see an unwritten row."""
    require("triton", OP, dtype=torch.float32, head_dim=16)
    monkeypatch.setattr(_varlen_kernels(), "_attn_varlen_fwd", _NoLaunch())
    args = packed([3, 9], None, 2, 16, torch.float32)
    with poison():
        out = ops.attention_varlen(*args, backend="triton")
    assert torch.isnan(out).all()
    with pytest.raises(AssertionError, match="never written"):
        check_op(OP, "triton", args + (16 ** -0.5,), out, *TOLERANCES[torch.float32])


def _bad(**over):
    """A valid call (2 sequences of 5 and 8 tokens, H 2, d 16) with ``over`` replacing arguments."""
    def call(backend):
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(13, 3, 2, 16, generator=g)
        kw = dict(q=qkv[:, 0], k=qkv[:, 1], v=qkv[:, 2], cu_seqlens_q=torch.tensor([0, 5, 13], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32), max_seqlen_q=8, max_seqlen_k=8)
        kw.update({k: (v(kw) if callable(v) else v) for k, v in over.items()})
        return ops.attention_varlen(**kw, backend=backend)
    return call


_I32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
VALIDATION = [
    ("decreasing", _bad(cu_seqlens_q=_I32(0, 9, 4, 13), cu_seqlens_k=_I32(0, 4, 9, 13)), ValueError,
     r"cu_seqlens_q: expected non-decreasing offsets .*got cu_seqlens_q\[2\] = 4 < cu_seqlens_q\[1\] = 9"),
    ("first-not-0", _bad(cu_seqlens_k=_I32(2, 5, 13)), ValueError,
     r"cu_seqlens_k: expected cu_seqlens_k\[0\] == 0, got"),
    ("int64", _bad(cu_seqlens_q=torch.tensor([0, 5, 13])), TypeError,
     "cu_seqlens_q: expected dtype int32.*got torch.int64"),
    ("float-offsets", _bad(cu_seqlens_k=torch.tensor([0.0, 5, 13])), TypeError, "cu_seqlens_k: expected dtype int32"),
    ("list-offsets", _bad(cu_seqlens_q=[0, 5, 13]), TypeError, "cu_seqlens_q: expected a torch.Tensor, got list"),
    ("2d-offsets", _bad(cu_seqlens_q=_I32(0, 5, 13)[None]), ValueError,
     r"cu_seqlens_q: expected a 1-D tensor .*got shape \(1, 3\)"),
    ("total-q", _bad(q=lambda kw: kw["q"][:12], cu_seqlens_k=_I32(0, 5, 12), k=lambda kw: kw["k"][:12],
                     v=lambda kw: kw["v"][:12], cu_seqlens_q=_I32(0, 5, 13)), ValueError,
     r"cu_seqlens_q: expected cu_seqlens_q\[-1\] == q.shape\[0\] = 12 .*got cu_seqlens_q\[-1\] = 13"),
    ("total-k", _bad(cu_seqlens_k=_I32(0, 5, 11)), ValueError,
     r"cu_seqlens_k: expected cu_seqlens_k\[-1\] == k.shape\[0\] = 13 .*got cu_seqlens_k\[-1\] = 11"),
    ("B-mismatch", _bad(cu_seqlens_k=_I32(0, 13)), ValueError,
     r"cu_seqlens_k: expected shape \(3,\) \(B \+ 1 as cu_seqlens_q\), got shape \(2,\)"),
    ("max-q-small", _bad(max_seqlen_q=7), ValueError,
     r"max_seqlen_q: expected an int >= the longest sequence \(8, sequence 1\), got 7"),
    ("max-k-small", _bad(max_seqlen_k=5), ValueError, r"max_seqlen_k: expected an int >= the longest sequence \(8"),
    ("max-float", _bad(max_seqlen_q=8.0), TypeError, "max_seqlen_q: expected an int, got float"),
    ("max-bool", _bad(max_seqlen_k=True), TypeError, "max_seqlen_k: expected an int, got bool"),
    ("max-negative", _bad(max_seqlen_q=-1), ValueError, "max_seqlen_q: expected an int >= 0, got -1"),
    ("no-keys", _bad(cu_seqlens_k=_I32(0, 0, 13), max_seqlen_k=13), ValueError,
     "cu_seqlens_k: expected at least one key for every sequence with queries, got sequence 0 with 0 keys and 5"),
    ("q-4d", _bad(q=lambda kw: kw["q"][None]), ValueError, r"q: expected a 3-D tensor, got shape \(1, 13, 2, 16\)"),
    ("k-heads", _bad(k=lambda kw: kw["k"][:, :1]), ValueError, r"k: expected shape \(total_k, 2, 16\) matching q"),
    ("v-shape", _bad(v=lambda kw: kw["v"][:, :, :8]), ValueError, r"v: expected shape \(13, 2, 16\)"),
    ("k-dtype", _bad(k=lambda kw: kw["k"].half()), TypeError, "k: expected dtype torch.float32 .as q., got dtype"),
    ("q-int", _bad(q=lambda kw: kw["q"].int()), TypeError, "q: expected dtype float32, float16 or bfloat16"),
    ("q-stride", _bad(q=lambda kw: kw["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "q: expected a last dim with stride 1"),
    ("head-dim", _bad(q=torch.randn(13, 1, 260), k=torch.randn(13, 1, 260), v=torch.randn(13, 1, 260)), ValueError,
     "q: expected head dim <= 256, got head dim 260"),
    ("offsets-device", _bad(cu_seqlens_q=lambda kw: kw["cu_seqlens_q"].to("meta"),
                            cu_seqlens_k=lambda kw: kw["cu_seqlens_k"].to("meta")), ValueError,
     "cu_seqlens_q: expected device cpu .as q., got device meta"),
    ("scale", _bad(scale="0.1"), TypeError, "scale: expected a float or None, got str"),
    ("bias", _bad(bias=torch.zeros(2, 5, 5)), ValueError, "bias: expected None .attention_varlen takes no logit bias"),
    ("rope-shape", _bad(rope=torch.zeros(12, 32)), ValueError, r"rope: expected shape \(13, 32\) or \(2, 13, 32\)"),
    ("rope-heads", _bad(rope=torch.zeros(3, 13, 32)), ValueError, r"rope: expected shape \(13, 32\) or \(2, 13, 32\)"),
    ("rope-dtype", _bad(rope=torch.zeros(13, 32, dtype=torch.int32)), TypeError, "rope: expected dtype float32"),
    ("rope-half", _bad(rope=torch.zeros(13, 32), rope_half=1), TypeError, "rope_half: expected a bool, got int"),
    ("rope-odd-d", _bad(q=torch.randn(13, 1, 15), k=torch.randn(13, 1, 15), v=torch.randn(13, 1, 15),
                        rope=torch.zeros(13, 30)), ValueError,
     "q: expected an even head dim with rope, got head dim 15"),
    ("rope-cross", _bad(k=lambda kw: kw["k"][:12], v=lambda kw: kw["v"][:12], cu_seqlens_k=_I32(0, 5, 12),
                        rope=torch.zeros(13, 32)), ValueError,
     r"k: expected total_k == total_q = 13 with rope \(self attention"),
    ("rope-offsets", _bad(cu_seqlens_k=_I32(0, 6, 13), rope=torch.zeros(13, 32)), ValueError,
     "cu_seqlens_k: expected the offsets of cu_seqlens_q with rope .self attention., got sequence 0 with 6 keys and 5"),
]
test_validation_errors = validation_errors_test(VALIDATION)


def test_cuda_backend_declares_no_varlen_kernel():
    """The reason is named from the cuda backend's limits; auto never picks it (triton, then torch)."""
    why = backends.reasons("cuda", OP, torch.device("cuda"), dtype=torch.float16, head_dim=64)
    assert "cuda has no attention_varlen kernel" in why or "torch.cuda.is_available() is False" in why
    assert OP not in backends.limits("cuda").ops and OP in backends.limits("triton").ops
    assert OP in backends.limits("torch").ops


# --------------------------------------------------------------------------- autograd and compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients(backend):
    """Gradients through the custom op (the reference formula differentiated at the inputs)
    against float64 autograd of the reference."""
    require(backend, OP, dtype=torch.float32, head_dim=32)
    q, k, v, cu_q, cu_k, mq, mk = packed([3, 40, 1], [7, 33, 2], 2, 32, torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    w = torch.randn(q.shape, device=DEV)
    (ops.attention_varlen(*leaves, cu_q, cu_k, mq, mk, 0.2, backend=backend) * w).sum().backward()
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    (reference.attention_varlen(*ref, cu_q, cu_k, mq, mk, 0.2) * w.double()).sum().backward()
    for name, a, b in zip("qkv", leaves, ref):
        assert_close_rule(a.grad, b.grad, None, atol=1e-5, rtol=1e-5, name=f"d{name}")
    # with RoPE (self attention): the table's gradient too
    if skip_reason(backend, OP, dtype=torch.float32, head_dim=32, features=("attention_varlen.rope",)):
        return
    q, k, v, cu, _, mx, _ = packed([3, 40, 1], None, 2, 32, torch.float32)
    table = rope_table(total=q.shape[0], d=32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, table)]
    (ops.attention_varlen(*leaves[:3], cu, cu, mx, mx, rope=leaves[3], backend=backend) * w[:q.shape[0]]).sum() \
        .backward()
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v, table)]
    (reference.attention_varlen(*ref[:3], cu, cu, mx, mx, rope=ref[3]) * w[:q.shape[0]].double()).sum().backward()
    for name, a, b in zip(("q", "k", "v", "rope"), leaves, ref):
        assert_close_rule(a.grad, b.grad, None, atol=1e-5, rtol=1e-5, name=f"d{name} with rope")


_COMPILE_SCRIPT = r"""
import torch
from fastvit import ops

torch.manual_seed(0)
lens = [1, 37, 5, 64]
cu, mx = ops.varlen_offsets(lens)
w = torch.randn(3 * 2 * 16, 24) * 0.2


theta = torch.rand(sum(lens), 16) * 6.3
table = torch.cat([theta.sin(), theta.cos()], -1)  # RoPE per packed token


def f(x, cu, mx, backend, rope=None):
    qkv = (x @ w.t()).view(x.shape[0], 3, 2, 16)   # (total, 3, H, d)
    out = ops.attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, mx, mx, rope=rope, backend=backend)
    return out.reshape(x.shape[0], 32).square().sum(-1)


x = torch.randn(sum(lens), 24)
for backend in {backends!r}:
    eager = f(x, cu, mx, backend, table)  # eager first: the backend module is imported outside the trace
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, cu, mx, backend, table)
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    eager = f(x, cu, mx, backend)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, cu, mx, backend)  # a graph break raises
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True, backend="aot_eager")(xg, cu, mx, backend).sum().backward()
    xr = x.clone().requires_grad_(True)
    f(xr, cu, mx, "torch").sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-4)
print("ok")
"""


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) through attention_varlen (torch backend traced, triton as
    the opaque custom op with its fake), with and without RoPE, forward and backward, in a fresh
    process."""
    names = [b for b in ("torch", "triton") if skip_reason(b, OP, dtype=torch.float32, head_dim=16,
                                                           features=("attention_varlen.rope",)) is None]
    script = _COMPILE_SCRIPT.replace("{backends!r}", repr(names))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reruns_bit_identical(dtype):
    """50 reruns of a NaFlex-like mix give bit-identical outputs (no atomics, fixed tiles)."""
    require("triton", OP, dtype=dtype, head_dim=64)
    args = packed([256, 1, 197, 3, 255, 1024], None, 12, 64, dtype)
    first = ops.attention_varlen(*args, backend="triton")
    for _ in range(50):
        assert torch.equal(ops.attention_varlen(*args, backend="triton"), first)

"""Shared test helpers: the one oracle, the DESIGN.md tolerance rule, the one poisoning context,
the one awkward shape set, and error reports that say where.

Every op test (``tests/test_op_<op>.py``) is written against these:

* :data:`BACKENDS` x a shape set below x :data:`DTYPES` (``(dtype, atol, rtol)`` tuples);
  :func:`require` skips a backend that cannot run the case here, with the reason string of
  :func:`fastvit.backends.reasons` (triton bf16 in the interpreter, cuda without a GPU, ...).
* :func:`poisoned`: every ``torch.empty`` (Python or ATen ``at::empty`` in C++) made while it is
  active is filled with NaN, so an element a backend forgets to write is NaN afterwards
  (:func:`assert_all_written`). ``tests/conftest.py`` hands it out as the ``poison`` fixture.
* :func:`check_op`: the one oracle. The reference (:mod:`fastvit.reference`) runs on the inputs
  upcast one precision step (float64 for float32 outputs, float32 for 16-bit outputs) and the
  output is held to the DESIGN.md rule :func:`assert_close_rule`.
* The steps every op file repeats: :func:`run_checked` (the op run poisoned, then
  :func:`check_op`), :func:`run_plain_gemm_fallback` (the same on cuda's plain-GEMM paths),
  :func:`validation_errors_test` (an op file's ``test_validation_errors`` from its table),
  :func:`run_sweep` (a seeded random sweep from the op's case generator); for linear / mlp the
  shared epilogue arguments and ids (:func:`epilogue_args`, :func:`epilogue_cases`).

Only torch, the standard library, pytest and :mod:`fastvit` (which never imports triton) are
imported here: ``benchmarks/harness.py`` loads this file by path for :func:`assert_close_rule`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch

from fastvit import backends, ops, reference

HAS_CUDA = torch.cuda.is_available()
# Where every op test runs: the GPU when there is one (triton compiles, cuda runs), else the CPU
# (torch, and triton through its interpreter: TRITON_INTERPRET=1 is set by conftest).
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = backends.BACKENDS  # ('triton', 'cuda', 'torch'): every op test runs on each


# --------------------------------------------------------------------------- error reports
def check_model_on_backend(model_from_timm: Callable[[], torch.nn.Module], backend: str, what: str,
                           attention_features: Tuple[str, ...], act: Optional[str], img: int = 32) -> None:
    """A tiny converted model's logits on ``backend`` against the torch backend (fp32, batch 2,
    ``img`` x ``img``); skips with the backend's own reason when one of the model's ops (attention
    with ``attention_features``, head dim 16; mlp with ``act``) cannot run there."""
    for op, props in (("patch_embed", {}), ("attention", {"head_dim": 16, "features": attention_features}),
                      ("linear", {"act": None}), ("mlp", {"act": act}), ("layer_norm", {})):
        why = skip_reason(backend, op, DEV, dtype=torch.float32, **props)
        if why:
            pytest.skip(why)
    m = model_from_timm().to(DEV)
    x = torch.randn(2, 3, img, img, device=DEV)
    with torch.no_grad():
        want = m.set_backend("torch")(x)
        got = m.set_backend(backend)(x)
    assert_close_rule(got, want, None, atol=1e-4, rtol=1e-4, name=f"{backend} {what} logits")


_COMPILE_SCRIPT = """
import torch
from fastvit import VisionTransformer

torch.manual_seed(0)
m = VisionTransformer(**{kwargs!r}, backend="torch").eval()
with torch.no_grad():
    for p in m.parameters():
        p.add_(torch.randn_like(p) * {scale!r})
for size in {sizes!r}:
    x = torch.randn(2, 3, size, size)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)  # a graph break raises
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
"""


def check_compiles_fullgraph(model_kwargs: Dict, sizes: Sequence[int], scale: float = 1.0) -> None:
    """``torch.compile(fullgraph=True)`` of ``VisionTransformer(**model_kwargs)`` (torch backend,
    parameters perturbed by ``scale`` x N(0, 1)) gives eager's output at each image size, in a fresh
    process that imports only torch and fastvit (as tests/test_compile.py)."""
    import subprocess
    import sys

    script = _COMPILE_SCRIPT.format(kwargs=dict(model_kwargs), scale=scale, sizes=tuple(sizes))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def load_setup_py():
    """The repository's setup.py as a module (importing it defines its helpers; only running it
    as a script installs)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    spec = importlib.util.spec_from_file_location("_fastvit_setup", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def error_report(out: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (out.double() - ref.double()).abs()
    flat = int(torch.nan_to_num(diff, nan=float("inf")).argmax()) if diff.numel() else 0
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    if not diff.numel():
        return f"empty output, shape {tuple(out.shape)}"
    return (f"max abs err {diff.max().item():.3e} at {idx} (out {out.double().flatten()[flat].item():.6g}, "
            f"ref {ref.double().flatten()[flat].item():.6g}), mean abs err {diff.mean().item():.3e}, "
            f"ref max {ref.double().abs().max().item():.3e}, shape {tuple(out.shape)}")


def assert_all_written(out: torch.Tensor, name: str = "out") -> None:
    """The output was NaN-poisoned before the kernel ran: every element must have been written."""
    bad = torch.isnan(out)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {out.numel()} elements never written (first at {first})")


def assert_close_rule(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: Optional[torch.Tensor] = None,
                      atol: float = 0.0, name: str = "out", rtol: float = 0.0) -> None:
    """DESIGN.md rule: |out - ref32| <= 2 * |ref_lowp - ref32| + one rounding step of out.dtype
    (+ atol + rtol * max|ref32|), errors as max norms over the tensor.

    ``ref32`` is the higher-precision reference (float32 for 16-bit outputs, float64 for float32
    outputs); ``ref_lowp`` the torch reference run in out's dtype (omit it and only the rounding
    step, ``atol`` and ``rtol`` apply).
    """
    assert out.shape == ref32.shape, f"{name}: shape {tuple(out.shape)} vs reference {tuple(ref32.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output; " + error_report(out, ref32)
    if not out.numel():
        return
    scale = ref32.double().abs().max().item()
    rounding = torch.finfo(out.dtype).eps * max(scale, 1e-6)
    base = 0.0 if ref_lowp is None else (ref_lowp.double() - ref32.double()).abs().max().item()
    err = (out.double() - ref32.double()).abs().max().item()
    tol = 2 * base + rounding + atol + rtol * scale
    assert err <= tol, f"{name}: error {err:.3e} > tolerance {tol:.3e} (2 x torch {base:.3e} + rounding " \
                       f"{rounding:.3e} + atol {atol:.1e} + rtol {rtol:.1e} x {scale:.3e}); " + error_report(out, ref32)


# --------------------------------------------------------------------------- dtypes and tolerances
# (dtype, atol, rtol): the slack on top of the DESIGN.md rule. 16-bit outputs get the rule alone.
# float32 outputs are compared with a float64 oracle; products and sums in another order than
# torch's (tiles, split reductions, exp2 for exp) may differ by more than two torch errors plus
# one ulp, so they also get 1e-5 absolute + 1e-5 of the output scale (the old triton and cuda
# fp32 tolerances, whichever was larger).
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (0.0, 0.0),
    torch.bfloat16: (0.0, 0.0),
}
DTYPES = [pytest.param(dt, atol, rtol, id=str(dt).replace("torch.", "")) for dt, (atol, rtol) in TOLERANCES.items()]


# --------------------------------------------------------------------------- backends
def skip_reason(backend: str, op: str, device: torch.device = DEV, **props) -> Optional[str]:
    """Why ``backend`` cannot run ``op`` here with ``props`` (dtype, head_dim, act), or None."""
    why = backends.reasons(backend, op, torch.device(device), **props)
    return f"{backend} cannot run {op} on {torch.device(device).type}: " + "; ".join(why) if why else None


def require(backend: str, op: str, device: torch.device = DEV, **props) -> None:
    """Skip the test, with fastvit.backends.reasons' words, when ``backend`` cannot run it here."""
    why = skip_reason(backend, op, device, **props)
    if why:
        pytest.skip(why)


# --------------------------------------------------------------------------- poisoning
@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """Fill every uninitialised allocation with NaN while active.

    ``torch.use_deterministic_algorithms(True)`` with
    ``torch.utils.deterministic.fill_uninitialized_memory = True`` makes ATen's ``empty`` kernels
    (``torch.empty`` / ``empty_like`` / ``new_empty`` / ``empty_strided`` from Python, ``at::empty``
    from C++ extensions, ``resize_`` growth) write NaN into float memory: the outputs a Triton
    launcher, the C++ extension or the reference allocate start as NaN, on every backend.
    ``warn_only``: an op without a deterministic implementation warns instead of raising (this
    context is about poisoning; determinism is tested by rerunning). CUDA needs
    ``CUBLAS_WORKSPACE_CONFIG`` before the first cuBLAS call for this mode (set by conftest).
    """
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


# --------------------------------------------------------------------------- the one oracle
def _float(t):
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _cast(args: Sequence, dtype: torch.dtype) -> list:
    return [a.to(dtype) if _float(a) else a for a in args]


def _contract_inputs(op: str, args: Sequence) -> list:
    """The inputs as the contract reads them: patch_embed casts the image to weight.dtype in the
    load, so the oracle starts from the cast image too."""
    args = list(args)
    if op == "patch_embed":
        args[0] = args[0].to(args[1].dtype)
    return args


def oracle(op: str, args: Sequence, out_dtype: torch.dtype):
    """The reference of ``op`` on ``args`` upcast one precision step above ``out_dtype``: float64
    for float32 outputs, float32 for 16-bit outputs. Same structure as the op's output."""
    hi = torch.float64 if out_dtype == torch.float32 else torch.float32
    return getattr(reference, op)(*_cast(_contract_inputs(op, args), hi))


def check_op(op: str, backend: str, args: Sequence, out, atol: float, rtol: float, name: str = "out") -> None:
    """Assert ``out`` (= ``ops.<op>(*args, backend=backend)``, run poisoned) is fully written and
    within the DESIGN.md rule of the oracle.

    The rule's baseline is the torch backend run in out's dtype. For the torch backend itself,
    which *is* that baseline, the baseline is the correctly rounded oracle instead: the torch
    path must be as good as one rounding of the exact result allows (the rule then says: within
    two half-ulps plus one ulp of the output scale, + atol / rtol). Tests run under the
    ``full_precision`` fixture, so torch's 16-bit GEMMs accumulate in float32 on a GPU too.

    Tuple outputs (attention_probs) are checked element by element; a float32 side output
    (probs) gets the float32 slack of :data:`TOLERANCES`.
    """
    outs = out if isinstance(out, tuple) else (out,)
    dtypes = [o.dtype for o in outs]
    refs = oracle(op, args, dtypes[0])
    refs = refs if isinstance(refs, tuple) else (refs,)
    if backend == "torch":
        # an identically zero oracle (LayerNorm of one element, no bias) has no rounding step:
        # there the literal rule applies, torch being its own baseline
        bases = [r.to(dt) if r.count_nonzero() else o for r, dt, o in zip(refs, dtypes, outs)]
    else:
        bases = reference_run(op, args)
        bases = bases if isinstance(bases, tuple) else (bases,)
    assert len(outs) == len(refs), f"{name}: {len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r, b) in enumerate(zip(outs, refs, bases)):
        label = name if len(outs) == 1 else f"{name}[{i}]"
        assert o.dtype == b.dtype, f"{label}: dtype {o.dtype}, expected {b.dtype}"
        assert_all_written(o, label)
        a, rt = (atol, rtol) if i == 0 else TOLERANCES[o.dtype]
        assert_close_rule(o, r.to(torch.float64) if r.dtype == torch.float64 else r.float(), b, atol=a,
                          name=label, rtol=rt)


def reference_run(op: str, args: Sequence):
    """The torch backend in the inputs' own precision (the DESIGN.md rule's baseline)."""
    return getattr(reference, op)(*args)


# --------------------------------------------------------------------------- inputs
def randn(*shape, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0, device=DEV) -> torch.Tensor:
    """Random normal (scaled, shifted in float32, then cast), on the test device."""
    return (torch.randn(*shape, device=device) * scale + shift).to(dtype)


def maybe(flag, make: Callable[[], torch.Tensor]) -> Optional[torch.Tensor]:
    return make() if flag else None


def realistic_init_(model: torch.nn.Module) -> torch.nn.Module:
    """Weights of realistic scale for a whole-model test, in place: LayerNorm weights near 1, every
    other parameter small (0.05 x normal). Returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


# --------------------------------------------------------------------------- the shared shape set
# DESIGN.md 5.2: N in {1, 2, 50, 197, 257, 577}; head dim in {32, 48, 64, 80, 96, 128}; odd
# batch; embed dims not a multiple of the block; images not square; patches 8 / 14 / 16 / 32.
# Small cases run everywhere (the Triton interpreter included: few heads, N <= 257); GPU-only
# cases (the full shapes the old per-backend GPU files ran) carry @pytest.mark.gpu.
SEQ_LENS = (1, 2, 50, 197, 257, 577)
HEAD_DIMS = (32, 48, 64, 80, 96, 128)


def _param(values: tuple, gpu: bool, id: str):
    return pytest.param(*values, id=id, marks=(pytest.mark.gpu,) if gpu else ())


def _attention(B, H, N, Nkv, d, gpu=False):
    return _param((B, H, N, Nkv, d), gpu, f"B{B}-H{H}-N{N}-Nkv{Nkv}-d{d}" + ("-gpu" if gpu else ""))


# (B, H, N, N_kv, d). N == N_kv: q, k, v are strided views of one packed (B, N, 3, H, d) buffer.
ATTENTION_SHAPES = [
    *(_attention(3 if N < 100 else 1, 1, N, N, d) for N in SEQ_LENS[:-1] for d in HEAD_DIMS),
    _attention(2, 3, 37, 21, 48),   # N_kv < N, 3 heads
    _attention(3, 2, 10, 130, 40),  # N_kv > N, d not a multiple of 16
    _attention(2, 3, 33, 33, 64),
    # GPU: the old cuda grid (B 3, H 2, N / N_kv pairs x d incl. 40) ...
    *(_attention(3, 2, N, Nkv, d, gpu=True) for N, Nkv in [(1, 1), (2, 2), (50, 50), (197, 197), (257, 257),
                                                            (577, 577), (10, 130)]
      for d in HEAD_DIMS + (40,)),
    # ... and full model shapes: ViT-B/16 @224, ViT-L/14, ViT-B/16 @384, DeiT-S, d 80, long, d 96, 48, 32
    *(_attention(*s, gpu=True) for s in [(8, 12, 197, 197, 64), (4, 16, 257, 257, 64), (2, 12, 577, 577, 64),
                                          (16, 6, 198, 198, 64), (2, 16, 257, 257, 80), (2, 8, 1025, 1025, 128),
                                          (3, 12, 50, 50, 96), (2, 24, 197, 197, 48), (4, 8, 65, 65, 32)]),
]

# (B, H, N, N_kv, d) for attention_probs (materialises (B, H, N, N_kv) float32)
ATTENTION_PROBS_SHAPES = [
    _attention(3, 2, 1, 1, 32), _attention(3, 2, 50, 50, 80), _attention(1, 2, 197, 197, 64),
    _attention(2, 4, 10, 10, 32), _attention(2, 1, 20, 45, 48), _attention(1, 1, 257, 257, 128),
    *(_attention(*s, gpu=True) for s in [(8, 12, 197, 197, 64), (2, 12, 577, 577, 64), (3, 2, 10, 130, 96)]),
]


def _linear(lead, K, N, gpu=False):
    return _param((lead, K, N), gpu, f"{'x'.join(map(str, lead))}-K{K}-N{N}" + ("-gpu" if gpu else ""))


# (leading dims of x, K, N): none a block multiple in the small ones
LINEAR_SHAPES = [
    _linear((1,), 8, 5), _linear((50,), 40, 120), _linear((197,), 96, 288), _linear((97,), 200, 33),
    _linear((3, 5), 48, 80), _linear((1,), 100, 77), _linear((3, 7), 24, 40),
    # GPU: ViT-B blocks (qkv, proj, fc1, fc2 at batch 8), ViT-L fc1, classifier head, the old cuda shapes
    *(_linear(*s, gpu=True) for s in [((8 * 197,), 768, 2304), ((8 * 197,), 768, 768), ((8 * 197,), 768, 3072),
                                       ((8 * 197,), 3072, 768), ((4 * 257,), 1024, 4096), ((7,), 1024, 1000),
                                       ((2, 197), 192, 576), ((7,), 768, 3072)]),
]


def _mlp(lead, D, hidden, D_out, gpu=False):
    return _param((lead, D, hidden, D_out), gpu,
                  f"{'x'.join(map(str, lead))}-D{D}-H{hidden}-O{D_out}" + ("-gpu" if gpu else ""))


# (leading dims of x, D, hidden, D_out)
MLP_SHAPES = [
    _mlp((3,), 32, 128, 32), _mlp((1, 197), 48, 100, 48), _mlp((2, 5), 16, 64, 16), _mlp((7,), 40, 72, 24),
    *(_mlp(*s, gpu=True) for s in [((2, 50), 96, 384, 96), ((8, 197), 768, 3072, 768), ((4, 257), 1024, 4096, 1024)]),
]


def _ln(shape, sliced=False, gpu=False):
    return _param((shape, sliced), gpu, "x".join(map(str, shape)) + ("-sliced" if sliced else "") +
                  ("-gpu" if gpu else ""))


# (shape, sliced): sliced rows have a stride larger than D
LAYER_NORM_SHAPES = [
    _ln((1, 1)), _ln((3, 7, 48)), _ln((5, 768)), _ln((2, 5000)), _ln((4, 9, 33)), _ln((1, 33)), _ln((5, 100), True),
    *(_ln(s, sl, gpu=True) for s, sl in [((8 * 197, 768), False), ((4 * 257, 1024), False), ((3, 1664), False),
                                          ((5, 6000), False), ((3, 197, 768), False), ((2, 50, 4099), False)]),
]


def _pe(B, C, H, W, patch, D, T, pad, pos, bias, x_dtype, channels_last, gpu=False):
    ph, pw = patch
    id_ = (f"B{B}-C{C}-{H}x{W}-p{ph}x{pw}-D{D}-T{T}" + ("-pad" if pad else "") + ("" if pos else "-nopos") +
           ("" if bias else "-nobias") + (f"-x{x_dtype}" if x_dtype else "") + ("-cl" if channels_last else "") +
           ("-gpu" if gpu else ""))
    return _param((B, C, H, W, patch, D, T, pad, pos, bias, x_dtype, channels_last), gpu, id_)


# (B, C, H, W, (ph, pw), D, T prefix rows, pad, pos_embed, bias, image dtype (None: the model's;
# 'float32' / 'float16' / 'uint8' pixels 0..255), channels_last image)
PATCH_EMBED_SHAPES = [
    _pe(1, 3, 32, 48, (16, 16), 40, 1, False, True, True, "float32", False),   # non-square grid, class token
    _pe(3, 3, 28, 42, (14, 14), 24, 2, False, True, True, "float32", False),   # P 14, odd batch, cls + dist
    _pe(2, 1, 33, 20, (8, 8), 16, 0, True, True, True, "float32", False),      # padding, no prefix
    _pe(2, 3, 64, 32, (32, 32), 20, 5, False, True, True, "float32", False),   # P 32, cls + 4 registers
    _pe(2, 4, 16, 24, (8, 8), 8, 0, False, False, False, "float32", True),     # channels_last, no bias / pos
    _pe(3, 3, 32, 48, (16, 16), 96, 1, False, True, True, None, False),
    _pe(1, 3, 30, 45, (16, 16), 96, 0, True, False, False, None, False),       # pad both sides, nothing else
    _pe(2, 3, 28, 42, (14, 14), 96, 5, False, True, True, "float32", True),
    _pe(5, 1, 24, 16, (8, 4), 96, 0, False, True, True, None, False),          # non-square patch
    _pe(2, 4, 20, 20, (5, 5), 96, 2, True, False, True, "float16", False),     # fp16 image, pad, odd patch
    _pe(3, 3, 32, 48, (16, 16), 40, 1, False, True, True, "uint8", False),     # uint8 pixels (normalisation folded)
    _pe(2, 3, 30, 45, (16, 16), 24, 0, True, True, True, "uint8", True),       # uint8, pad, channels_last
    # GPU: full ViT images
    *(_pe(8, 3, img, img, (P, P), D, T, False, True, True, "float32", False, gpu=True)
      for P, img, D, T in [(16, 224, 768, 1), (14, 224, 1024, 5), (16, 384, 768, 2), (32, 224, 768, 1)]),
    _pe(8, 3, 224, 224, (16, 16), 768, 1, False, True, True, "uint8", False, gpu=True),
]


# --------------------------------------------------------------------------- the op tests' common steps
def run_checked(op: str, backend: str, args: Sequence, poison, atol: float, rtol: float,
                oracle_args: Optional[Sequence] = None):
    """``ops.<op>(*args, backend=backend)`` run poisoned, then :func:`check_op` against the oracle;
    returns the output (for the op's own shape / layout checks). ``oracle_args``: the arguments the
    oracle gets instead of ``args``, where the call leaves one to its default (attention's scale)."""
    with poison():
        out = getattr(ops, op)(*args, backend=backend)
    check_op(op, backend, args if oracle_args is None else oracle_args, out, atol, rtol)
    return out


def run_plain_gemm_fallback(op: str, args: Sequence, poison, monkeypatch, atol: float, rtol: float):
    """:func:`run_checked` on the cuda backend with FASTVIT_CUDA_PLAIN_GEMM=1: its paths for when
    cuBLASLt has no algorithm for an epilogue (plain GEMM + elementwise epilogue)."""
    monkeypatch.setenv("FASTVIT_CUDA_PLAIN_GEMM", "1")
    return run_checked(op, "cuda", args, poison, atol, rtol)


def validation_errors_test(table: Sequence[tuple]) -> Callable:
    """An op file's ``test_validation_errors``: each ``(case id, call(backend), exception type,
    message pattern)`` of ``table`` on every backend. Bind it in the op file as
    ``test_validation_errors = validation_errors_test(VALIDATION)``."""

    @pytest.mark.parametrize("case,call,exc,pattern", table, ids=[c[0] for c in table])
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_validation_errors(backend, case, call, exc, pattern):
        """Validation runs in the op layer before a backend is chosen: the same message on every
        backend, even one that cannot run here."""
        with pytest.raises(exc, match=pattern):
            call(backend)

    return test_validation_errors


# --------------------------------------------------------------------------- linear / mlp epilogues
def epilogue_id(epilogue: tuple) -> str:
    """The test id of a linear / mlp epilogue ``(act, bias, gamma, residual, ln)``."""
    act, bias, gamma, res, ln = epilogue
    return "-".join([act or "noact", "b" if bias else "nob", "g" if gamma else "nog", "r" if res else "nor",
                     f"ln{ln}" if ln else "noln"])


def epilogue_args(lead: tuple, d_in: int, d_out: int, dtype: torch.dtype, act, gamma: bool, residual: bool, ln,
                  eps: float) -> tuple:
    """The trailing ``(act, gamma, residual, ln_weight, ln_bias, eps)`` arguments of linear and mlp
    (``ln``: None, "w" or "wb"): gamma near 0.5, LN weight near 1 over ``d_in``, residual (*lead, d_out)."""
    return (act, maybe(gamma, lambda: randn(d_out, dtype=dtype, scale=0.5, shift=0.5)),
            maybe(residual, lambda: randn(*lead, d_out, dtype=dtype)),
            maybe(ln, lambda: randn(d_in, dtype=dtype, scale=0.5, shift=1.0)),
            maybe(ln == "wb", lambda: randn(d_in, dtype=dtype, scale=0.5)), eps)


def epilogue_cases(epilogues: Sequence[tuple], shapes: Sequence) -> list:
    """(epilogue, *shape) params for every epilogue x shape, with the ids and marks that two
    separate parametrizations would give."""
    return [pytest.param(e, *sh.values, id=f"{epilogue_id(e)}-{sh.id}", marks=sh.marks)
            for e in epilogues for sh in shapes]


def shapes_named(shapes: Sequence, ids: Sequence[str]) -> list:
    """The params of ``shapes`` whose ids are in ``ids``; every id must name one."""
    picked = [sh for sh in shapes if sh.id in ids]
    assert len(picked) == len(ids), f"{sorted(set(ids) - {sh.id for sh in picked})}: not in the shape set"
    return picked


# --------------------------------------------------------------------------- seeded random sweeps
def run_sweep(op: str, backend: str, make_case: Callable, poison, cases: int = 200) -> None:
    """``cases`` seeded random cases of ``op`` on ``backend``, poisoned, checked by the oracle;
    failures are collected and reported together with their case. Skipped (:func:`require`)
    where ``backend`` cannot run ``op`` here at all.

    ``make_case(rng, dtype)`` returns ``(description, args, props, extra_check)``: the op's
    arguments, the properties its backend reasons need (head_dim, act) and an optional extra
    assertion on the output. The dtype is drawn from those ``backend`` runs here (bf16 never in
    the interpreter); a case ``backend`` declines (e.g. a head dim past its limit) is counted and
    skipped. On triton each case also forces a random launch config from the kernel's full
    ``_configs()`` list (:func:`forced_triton_config`), so every tile shape's masking meets odd
    sizes.
    """
    require(backend, op)
    dtypes = [dt for dt in TOLERANCES if skip_reason(backend, op, dtype=dt) is None]
    if not dtypes:
        pytest.skip(skip_reason(backend, op, dtype=torch.float32) or f"{backend} runs no dtype of {op} here")
    rng = random.Random(f"fastvit-sweep-{op}")  # seeded per op: reruns see the same cases
    torch.manual_seed(1234)
    failures: List[str] = []
    declined: Dict[str, int] = {}
    ran = 0
    for i in range(cases):
        dtype = rng.choice(dtypes)
        desc, args, props, extra = make_case(rng, dtype)
        cfg_u = rng.random()
        why = skip_reason(backend, op, dtype=dtype, **props)
        if why:
            declined[why] = declined.get(why, 0) + 1
            continue
        atol, rtol = TOLERANCES[dtype]
        try:
            with forced_triton_config(backend, op, cfg_u) as cfg:
                with poison():
                    out = getattr(ops, op)(*args, backend=backend)
            check_op(op, backend, args, out, atol, rtol)
            if extra is not None:
                extra(out)
            ran += 1
        except AssertionError as e:
            failures.append(f"case {i}: {desc} {dtype} config {cfg}\n    {str(e).splitlines()[0]}")
        except _ConfigDoesNotFit:
            declined["launch config does not fit this GPU"] = declined.get("launch config does not fit this GPU", 0) + 1
    assert not failures, f"{len(failures)} of {cases} {op} cases failed on {backend}:\n" + "\n".join(failures[:10])
    assert ran >= cases // 2, f"only {ran} of {cases} cases ran on {backend}; declined: {declined}"


class _ConfigDoesNotFit(Exception):
    pass


# the Tunable each op's launcher asks for its config (fastvit.kernels.<file>.<attr>)
_TRITON_TUNABLES = {
    "attention": ("attention", "TUNE_FWD"), "attention_probs": ("attention", "TUNE_PROBS"),
    "layer_norm": ("layer_norm", "TUNE"), "linear": ("linear", "TUNE"), "mlp": ("linear", "TUNE"),
    "patch_embed": ("patch_embed", "TUNE"),
}


@contextlib.contextmanager
def forced_triton_config(backend: str, op: str, u: float):
    """On the triton backend, force the launch config ``_configs()[int(u * len)]`` of ``op``'s
    kernel while active (yields it; None on other backends). On a GPU a config that does not fit
    (shared memory, registers) is declined, not failed: tests/test_aot.py covers which fit."""
    if backend != "triton":
        yield None
        return
    import importlib

    file, attr = _TRITON_TUNABLES[op]
    mod = importlib.import_module(f"fastvit.kernels.{file}")
    tunable = getattr(mod, attr)
    configs = mod._configs()
    cfg = configs[min(int(u * len(configs)), len(configs) - 1)]
    tunable.pick = lambda key, device, run: cfg  # instance attribute shadows the method
    try:
        yield cfg
    except Exception as e:  # only a GPU resource refusal is a decline
        if type(e).__name__ == "OutOfResources":
            raise _ConfigDoesNotFit(str(e)) from e
        raise
    finally:
        del tunable.pick


# --------------------------------------------------------------------------- model parity helpers
def randomise_params(model, std: float = 0.05, std_for=None):
    """Move every parameter of ``model`` off its init (seeded): LayerScale, biases, tables and
    latent queries are constants at init in timm / HF and would hide a wrong mapping.
    ``std_for``: {substring of a parameter name: its std} for parameters that need another scale."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = next((v for k, v in (std_for or {}).items() if k in name), std)
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, what: str, tol: float) -> float:
    """max |out - ref| / max |ref| < ``tol`` (shapes equal); returns the error."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-12)
    assert err < tol, f"{what}: max relative error {err:.2e} >= {tol:.0e}"
    return err

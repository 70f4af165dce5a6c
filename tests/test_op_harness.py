"""Self-tests of the op-test harness (tests/utils.py, the ``poison`` fixture): the checks the
op tests rely on can fail.

* Poisoning: while ``poison()`` is active every uninitialised allocation is NaN - torch.empty
  and friends from Python, ATen's dispatcher entry (what ``at::empty`` in a C++ extension
  reaches), ``resize_`` growth - on the test device; the outputs a Triton launcher allocates
  stay NaN when its kernel launch is removed, and so do the torch backend's when its ATen call is
  replaced by an allocation; the previous deterministic-mode state comes back afterwards.
* The oracle: ``check_op`` rejects an output a few ulps off, an unwritten element, a wrong
  dtype, and accepts the backend's real output.
* Skips: ``require`` uses fastvit.backends.reasons' words.
"""

import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from fastvit import backends, ops, reference
from utils import DEV, TOLERANCES, assert_all_written, check_op, poisoned, require, skip_reason

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_poison_fills_every_empty_with_nan(dtype, poison):
    assert poison is poisoned
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    ref = torch.zeros(3, 5, dtype=dtype, device=DEV)
    with poison():
        made = {
            "torch.empty": torch.empty(7, 33, dtype=dtype, device=DEV),
            "empty_like": torch.empty_like(ref),
            "new_empty": ref.new_empty(4, 9),
            "empty_strided": torch.empty_strided((4, 6), (1, 4), dtype=dtype, device=DEV),
            # the dispatcher entry every C++ at::empty goes through
            "aten.empty": torch.ops.aten.empty.memory_format([5, 11], dtype=dtype, device=DEV),
            "transposed view": torch.empty(2, 9, 3, 16, dtype=dtype, device=DEV).transpose(1, 2),
        }
        grown = torch.zeros(4, dtype=dtype, device=DEV)
        grown.resize_(4096)  # C++ storage growth
        made["resize_ growth"] = grown[4:]
    for name, t in made.items():
        assert torch.isnan(t).all(), f"{name}: not NaN-filled under poison()"
        with pytest.raises(AssertionError, match="never written"):
            assert_all_written(t, name)
    after = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    assert after == before, "poison() must restore the deterministic-mode state"


def test_poison_restores_state_after_an_exception(poison):
    with pytest.raises(RuntimeError, match="boom"):
        with poison():
            raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` launches nothing."""

    calls = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _NoLaunch.calls += 1
        return launch


def _small_args(op):
    r = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    qkv = r(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
    return {
        "patch_embed": (r(2, 3, 16, 24), r(8, 3, 8, 8), r(8), r(6, 8), r(1, 8), False),
        "attention": (*qkv, None),
        "attention_probs": (*qkv, None),
        "layer_norm": (r(3, 7, 20), r(20), r(20), 1e-6),
        "linear": (r(3, 7, 20), r(12, 20), r(12), "gelu", r(12), r(3, 7, 12), r(20), r(20), 1e-6),
        "mlp": (r(3, 7, 20), r(32, 20), r(32), r(12, 32), r(12), "gelu", r(12), r(3, 7, 12), r(20), r(20), 1e-6),
    }[op]


# the @triton.jit kernels each op's launcher runs (fastvit.kernels.<file>.<name>)
_KERNELS = {
    "patch_embed": [("patch_embed", "_patch_embed_fwd")],
    "attention": [("attention", "_attn_fwd")],
    "attention_probs": [("attention", "_attn_probs_fwd")],
    "layer_norm": [("layer_norm", "_ln_fwd")],
    "linear": [("linear", "_linear_fwd"), ("layer_norm", "_ln_fwd")],  # + the LN prologue's row stats
    "mlp": [("linear", "_linear_fwd"), ("layer_norm", "_ln_fwd")],
}


@pytest.mark.parametrize("op", list(_KERNELS))
def test_poison_reaches_triton_launcher_outputs(op, poison, monkeypatch):
    """With its kernel launch removed, a Triton launcher returns its own allocation untouched:
    under poison() every element is NaN and the op tests' check fails."""
    require("triton", op, dtype=torch.float32, head_dim=16, act="gelu")
    for file, name in _KERNELS[op]:
        monkeypatch.setattr(importlib.import_module(f"fastvit.kernels.{file}"), name, _NoLaunch())
    _NoLaunch.calls = 0
    args = _small_args(op)
    with poison():
        out = getattr(ops, op)(*args, backend="triton")
    assert _NoLaunch.calls > 0, "the launcher did not reach the (removed) kernel"
    for i, t in enumerate(out if isinstance(out, tuple) else (out,)):
        assert torch.isnan(t).all(), f"{op} output {i}: allocated without NaN under poison()"
    with pytest.raises(AssertionError, match="never written"):
        check_op(op, "triton", args, out, 1e-5, 1e-5)


@pytest.mark.parametrize("op,fn,fake", [
    ("layer_norm", "layer_norm", lambda x, *a, **k: torch.empty_like(x)),
    # SDPA replaced by an allocation (the reference's layout copy keeps its NaNs)
    ("attention", "scaled_dot_product_attention", lambda q, k, v, **kw: torch.empty(q.shape, device=q.device)),
    ("linear", "linear", lambda x, w, b=None: x.new_empty(*x.shape[:-1], w.shape[0])),
])
def test_poison_reaches_torch_backend_outputs(op, fn, fake, poison, monkeypatch):
    monkeypatch.setattr(F, fn, fake)
    args = _small_args(op)
    with poison():
        out = getattr(ops, op)(*args, backend="torch")
    assert torch.isnan(out).all(), f"{op}: torch backend output allocated without NaN under poison()"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_check_op_fails_on_wrong_outputs(dtype):
    """The oracle accepts the real output and rejects one off by 8 ulps (float32: 1e-4, past its
    slack) at one element, an unwritten element and a wrong dtype - also for the torch backend,
    held to the rounded oracle."""
    atol, rtol = TOLERANCES[dtype]
    x = torch.randn(4, 64, device=DEV).to(dtype)
    w = torch.randn(48, 64, device=DEV).to(dtype) * 0.125
    args = (x, w, None, "gelu", None, None, None, None, 1e-6)
    good = reference.linear(*args)
    for backend in ("triton", "torch"):
        check_op("linear", backend, args, good, atol, rtol)
        bad = good.clone()
        i = good.float().abs().argmax()
        bad.view(-1)[i] = good.view(-1)[i].float() * (1 + max(8 * torch.finfo(dtype).eps, 1e-4))
        with pytest.raises(AssertionError, match="error .* > tolerance"):
            check_op("linear", backend, args, bad, atol, rtol)
        hole = good.clone()
        hole[2, 5] = float("nan")
        with pytest.raises(AssertionError, match="1 of 192 elements never written"):
            check_op("linear", backend, args, hole, atol, rtol)
    other = torch.float16 if dtype != torch.float16 else torch.float32
    with pytest.raises(AssertionError, match="dtype"):
        check_op("linear", "triton", args, good.to(other), atol, rtol)


def test_require_skips_with_the_backends_reasons():
    why = backends.reasons("cuda", "attention_probs", torch.device("cpu"))
    assert why and skip_reason("cuda", "attention_probs", torch.device("cpu")).endswith("; ".join(why))
    assert skip_reason("torch", "attention", torch.device("cpu"), dtype=torch.bfloat16, head_dim=64) is None
    with pytest.raises(pytest.skip.Exception, match=re.escape("; ".join(why))):
        require("cuda", "attention_probs", torch.device("cpu"))

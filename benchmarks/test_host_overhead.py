"""Host (Python) cost per op call and per model forward: what a CPU can measure.

On a GPU, eager batch-1 inference is bound by host time: the Python and dispatcher work before
each kernel launch. These cases measure it here, as ratios measured in the same process:

* ``host:<op>``: the op layer (:mod:`fastvit.ops`, torch backend, a repeated call signature, so
  the cached plan is used) against the bare ATen calls it wraps, on tiny tensors where the
  arithmetic is negligible. Goal (issue: GPU readiness): <= 1.3x. Each row records which
  op-call signature ran (``fastvit.signature.IMPL``: the C++ one, or the slower Python fallback).
* ``host:triton-launch:<op>``: the triton backend's launch path with the kernel launch itself
  stubbed out (validation cache, plan, launcher: keys, config lookup, allocation, grid), in
  microseconds (Triton's own launcher cost can only be measured on a GPU; not done yet).
* ``host:model``: a ViT-B/16 batch-1 forward with every Triton kernel launch stubbed (CPU
  tensors, interpreter mode, nothing computed) against timm's eager forward of the same op
  sequence (ViT-B/16's 12 blocks) at width 32 on the CPU, where each ATen kernel computes almost
  nothing: timm's host time plus tiny kernels. (The ``meta`` device is not used: its ops run Python
  meta functions, ~40x timm's CPU time.)

Times are minima over interleaved repeats (the least disturbed run of each side), never
asserted: the ratios are printed at the end of the session and stored in the benchmark JSON.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from typing import Callable, Dict, List

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import ops, signature

HOST_RESULTS: List[Dict[str, object]] = []


def _per_call_us(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - t0) / number / 1e3


def compare(candidate: Callable[[], object], baseline: Callable[[], object], number: int = 2000,
            repeats: int = 7) -> Dict[str, float]:
    """Minimum per-call microseconds of each, measured in alternation, and their ratio.

    One intra-op thread: on tiny tensors a thread pool only adds wake-up noise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        candidate(), baseline()  # first call: plans, lazy imports
        best_c = best_b = float("inf")
        for _ in range(repeats):
            best_b = min(best_b, _per_call_us(baseline, number))
            best_c = min(best_c, _per_call_us(candidate, number))
    finally:
        torch.set_num_threads(threads)
    return {"us": best_c, "baseline_us": best_b, "ratio": best_c / best_b}


def _record(benchmark, case: str, what: str, baseline: str, res: Dict[str, float]) -> None:
    row = dict(case=case, impl=what, baseline=baseline, **{k: round(v, 3) for k, v in res.items()},
               signature=signature.IMPL.split(" ")[0])
    benchmark.extra_info.update(row)
    HOST_RESULTS.append(row)


def _tiny():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(1, 4, 16), w=r(16, 16), b=r(16), lnw=r(16), lnb=r(16), w1=r(64, 16), b1=r(64), w2=r(16, 64),
                b2=r(16), qkv=r(1, 4, 3, 2, 8).permute(2, 0, 3, 1, 4))


def _op_cases():
    t = _tiny()
    x, w, b, lnw, lnb = t["x"], t["w"], t["b"], t["lnw"], t["lnb"]
    q, k, v = t["qkv"].unbind(0)
    w1, b1, w2, b2 = t["w1"], t["b1"], t["w2"], t["b2"]
    return {
        "linear": (lambda: ops.linear(x, w, b, backend="torch"), lambda: F.linear(x, w, b), "F.linear"),
        "attention": (lambda: ops.attention(q, k, v, backend="torch"),
                      lambda: F.scaled_dot_product_attention(q, k, v), "F.scaled_dot_product_attention"),
        "layer_norm": (lambda: ops.layer_norm(x, lnw, lnb, 1e-6, backend="torch"),
                       lambda: F.layer_norm(x, (16,), lnw, lnb, 1e-6), "F.layer_norm"),
        "mlp": (lambda: ops.mlp(x, w1, b1, w2, b2, "gelu", residual=x, backend="torch"),
                lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2) + x, "F.linear, F.gelu, F.linear, add"),
    }


@pytest.mark.parametrize("op", ["linear", "attention", "layer_norm", "mlp"])
def test_op_layer_host_overhead(benchmark, op):
    """fastvit.ops.<op> (torch backend) vs the ATen calls it makes, same tiny tensors."""
    candidate, baseline, base_name = _op_cases()[op]
    with torch.inference_mode():
        # short interleaved chunks: on a shared VM a slow spell spoils a few chunks, not a side
        res = compare(candidate, baseline, number=400, repeats=50)
        benchmark.pedantic(candidate, rounds=3, iterations=100)
    _record(benchmark, f"host:{op}", "fastvit.ops (torch)", base_name, res)


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed_triton_launches():
    """Replace every Triton kernel of fastvit.kernels by :class:`_NoLaunch` (host cost only)."""
    mods = [importlib.import_module(f"fastvit.kernels.{m}") for m in ("attention", "linear", "layer_norm",
                                                                      "patch_embed")]
    saved = []
    for mod in mods:
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.startswith("_") and name.endswith("_fwd") and hasattr(obj, "fn"):
                saved.append((mod, name, obj))
                setattr(mod, name, _NoLaunch())
    try:
        yield
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _triton_ready():
    pytest.importorskip("triton")
    if fastvit.backends.reasons("triton", "linear", torch.device("cpu"), dtype=torch.float32):
        pytest.skip("the triton backend cannot take CPU tensors here (TRITON_INTERPRET unset)")


@pytest.mark.parametrize("op", ["linear", "attention", "layer_norm", "mlp"])
def test_triton_launch_path_host_cost(benchmark, op):
    """fastvit.ops.<op>(backend='triton') with the kernel launch stubbed: our Python per call."""
    _triton_ready()
    t = _tiny()
    x, w, b, lnw, lnb = t["x"], t["w"], t["b"], t["lnw"], t["lnb"]
    q, k, v = t["qkv"].unbind(0)
    calls = {
        "linear": lambda: ops.linear(x, w, b, ln_weight=lnw, ln_bias=lnb, backend="triton"),
        "attention": lambda: ops.attention(q, k, v, backend="triton"),
        "layer_norm": lambda: ops.layer_norm(x, lnw, lnb, 1e-6, backend="triton"),
        "mlp": lambda: ops.mlp(x, t["w1"], t["b1"], t["w2"], t["b2"], "gelu", residual=x, backend="triton"),
    }
    base = _op_cases()[op][1]
    with torch.inference_mode(), stubbed_triton_launches():
        res = compare(calls[op], base, number=200, repeats=3)
        benchmark.pedantic(calls[op], rounds=3, iterations=20)
    _record(benchmark, f"host:triton-launch:{op}", "fastvit.ops (triton, launch stubbed)", "ATen call (computing)",
            res)


# ViT-B/16's op sequence (12 blocks, class token, same layers) at a width where arithmetic is
# negligible: a CPU run of it is timm's host time plus tiny kernels
_TINY_B = dict(embed_dim=32, num_heads=2, img_size=32)


def test_model_host_time_vs_timm(benchmark):
    """ViT-B/16 batch 1: fastvit (triton, launches stubbed, full width) vs timm eager on CPU running
    the same op sequence at width 32 (5 tokens), whose kernels cost ~nothing. The meta device is no
    baseline: its ops run Python meta functions (timm on meta measured ~40x slower than on CPU)."""
    _triton_ready()
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, **_TINY_B).eval()
    fast = fastvit.create_model("vit_base_patch16_224", backend="triton").eval()
    x = torch.randn(1, 3, 224, 224)
    xt = torch.randn(1, 3, 32, 32)
    assert len(ref.blocks) == len(fast.blocks) == 12
    with torch.inference_mode(), stubbed_triton_launches():
        res = compare(lambda: fast(x), lambda: ref(xt), number=5, repeats=5)
        benchmark.pedantic(lambda: fast(x), rounds=2, iterations=3)
    _record(benchmark, "host:model vit_base_patch16_224 bs1", "fastvit (triton, launches stubbed)",
            "timm eager, same ops at width 32, CPU", res)

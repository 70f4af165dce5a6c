"""Measurement machinery shared by the benchmark suites.

* :func:`env_info` - device, torch, triton, commit, mode: recorded in every result.
* :func:`measure_peaks` - a bf16 GEMM peak and a device-to-device copy bandwidth, measured once
  per session in the same process as the kernels they normalise (MFU, roofline).
* :func:`bench` - warm-up, calibration, timed rounds through pytest-benchmark's ``pedantic``
  with CUDA events inside each round (device time, the number the report uses), inputs rotated
  so that repeated calls do not measure the L2 cache.
* :func:`rotation` - how many input sets to rotate through.

On a machine without CUDA everything runs in *smoke mode*: tiny shapes, float32, few rounds,
host timers. Those numbers exist to prove the suites work; they are not GPU claims and every
result says so (``extra_info["smoke"]``, ``extra_info["note"]``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "HAS_CUDA",
    "SMOKE_NOTE",
    "grid_name",
    "is_smoke",
    "env_info",
    "measure_peaks",
    "rotation",
    "bench",
    "peak_memory",
    "dtype_name",
    "DTYPES",
    "RESULTS",
    "record",
    "check_output",
    "compute_speedups",
]

HAS_CUDA = torch.cuda.is_available()
SMOKE_NOTE = ("CPU smoke run: tiny shapes, float32, host timer; these numbers prove the suite runs "
              "and are NOT GPU performance claims")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_GRIDS = ("smoke", "default", "full")


def grid_name() -> str:
    """Which shape grid runs: ``FASTVIT_BENCH_GRID`` (smoke / default / full), else smoke without
    CUDA and default with it. 'full' is the whole cross product of the issue (long: hours)."""
    g = os.environ.get("FASTVIT_BENCH_GRID", "").strip().lower() or ("default" if HAS_CUDA else "smoke")
    if g not in _GRIDS:
        raise ValueError(f"FASTVIT_BENCH_GRID: expected one of {_GRIDS}, got {g!r}")
    if g != "smoke" and not HAS_CUDA:
        raise ValueError(f"FASTVIT_BENCH_GRID={g!r} needs a CUDA device; this machine has none (use 'smoke')")
    return g


def is_smoke() -> bool:
    return grid_name() == "smoke"


def dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dt]


@functools.lru_cache(maxsize=None)
def _commit() -> str:
    env = os.environ.get("FASTVIT_COMMIT")
    if env:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git; set FASTVIT_COMMIT)"


@functools.lru_cache(maxsize=None)
def env_info() -> Dict[str, Any]:
    """Device name, capability, L2 size, torch / triton / CUDA versions, commit, grid."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # the suites still run the torch paths without triton
        triton_version = f"unavailable ({type(e).__name__})"
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "commit": _commit(),
        "grid": grid_name(),
        "smoke": is_smoke(),
    }
    if HAS_CUDA:
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    l2_bytes=int(getattr(p, "L2_cache_size", 50 * 2 ** 20)), gpu_mem_gb=round(p.total_memory / 2 ** 30, 1))
    else:
        import platform

        info.update(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    capability=None, sm_count=None, l2_bytes=int(os.environ.get("FASTVIT_BENCH_CPU_CACHE", 32 * 2 ** 20)))
    if info["smoke"]:
        info["note"] = SMOKE_NOTE
    return info


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def _median_ms_events(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def measure_peaks() -> Dict[str, Any]:
    """Measured ceilings of this device, once per process.

    GPU: a bf16 8192^3 GEMM through torch.matmul (cuBLAS) on random data (median of 10 after 3
    warm-ups) and a 2 GiB device-to-device copy counting bytes read + written. CPU (smoke): the
    same on float32 1024^3 / 64 MiB, labelled as not a GPU claim.
    """
    g = torch.Generator(device="cuda" if HAS_CUDA else "cpu").manual_seed(1234)
    if HAS_CUDA:
        n, dt, dev = 8192, torch.bfloat16, "cuda"
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        for _ in range(3):
            a @ b
        ms = _median_ms_events(lambda: a @ b, 10)
        src = torch.empty(2 ** 30, device=dev, dtype=torch.float16).normal_(generator=g)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        copy_ms = _median_ms_events(lambda: dst.copy_(src), 10)
        nbytes = 2 * src.numel() * src.element_size()
        del a, b, src, dst
        torch.cuda.empty_cache()
        what = "bf16 8192^3 torch.matmul; 2 GiB device copy (read + write)"
    else:
        n, dt = 1024, torch.float32
        a = torch.randn(n, n, dtype=dt, generator=g)
        b = torch.randn(n, n, dtype=dt, generator=g)
        a @ b
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            t.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(t)
        src = torch.randn(16 * 2 ** 20, generator=g)
        dst = torch.empty_like(src)
        dst.copy_(src)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            t.append((time.perf_counter() - t0) * 1e3)
        copy_ms = statistics.median(t)
        nbytes = 2 * src.numel() * src.element_size()
        what = "CPU fp32 1024^3 matmul; 64 MiB copy (smoke only, not a GPU claim)"
    return {
        "gemm_peak_tflops": 2.0 * n ** 3 / (ms * 1e-3) / 1e12,
        "copy_gbps": nbytes / (copy_ms * 1e-3) / 1e9,
        "peaks_measured_with": what,
    }


def rotation(bytes_per_set: int, l2_bytes: int, mem_budget: int = 4 * 2 ** 30, cap: int = 256) -> int:
    """Number of input sets to rotate through so one pass over them is >= 3x the L2 size.

    One set already larger than 3x L2 -> 1 (no rotation needed); never more than ``cap`` sets or
    ``mem_budget`` bytes in total.
    """
    if bytes_per_set <= 0:
        return 1
    want = math.ceil(3 * l2_bytes / bytes_per_set)
    return int(max(1, min(want, cap, max(1, mem_budget // bytes_per_set))))


def peak_memory(fn: Callable[[], Any]) -> Dict[str, Optional[float]]:
    """Peak CUDA memory during one call of ``fn``: absolute peak and the part above what was
    already allocated (workspace + outputs), in MiB. None on CPU."""
    if not HAS_CUDA:
        return {"peak_mem_mib": None, "peak_extra_mem_mib": None}
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    _sync()
    peak = torch.cuda.max_memory_allocated()
    del out
    return {"peak_mem_mib": round(peak / 2 ** 20, 2), "peak_extra_mem_mib": round((peak - before) / 2 ** 20, 2)}


def bench(benchmark, fn: Callable[..., Any], arg_sets: Sequence[Sequence[Any]], *,
          target_ms: Optional[float] = None, max_rounds: Optional[int] = None) -> Dict[str, Any]:
    """Time ``fn(*arg_sets[i])``, rotating i, and return device-time statistics.

    The caller has already run ``fn`` once (warm-up: autotuning, compilation, lazy init) and
    checked its output. Then:

    1. calibration: a few synchronised calls give a per-call estimate ``t``;
    2. each timed *round* launches ``calls`` back-to-back calls (enough for >= 0.5 ms of GPU
       work, so launch gaps of tiny kernels are amortised as in a real pipeline) between two
       CUDA events, then synchronises; pytest-benchmark records the round's host time, the
       events the device time;
    3. the median over rounds of (event time / calls) is ``median_ms``.

    With ``--benchmark-disable`` pytest-benchmark calls the round once and nothing is timed;
    the returned dict is then empty.
    """
    smoke = is_smoke()
    target_ms = (5.0 if smoke else 100.0) if target_ms is None else target_ms
    max_rounds = (3 if smoke else 30) if max_rounds is None else max_rounds
    n_sets = len(arg_sets)
    state = {"i": 0}

    def call():
        args = arg_sets[state["i"] % n_sets]
        state["i"] += 1
        return fn(*args)

    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(call, rounds=1, iterations=1)
        return {}

    # calibration (synchronised, host clock): also a second warm-up for lazy paths
    t_est = []
    for _ in range(2 if smoke else 3):
        _sync()
        t0 = time.perf_counter()
        call()
        _sync()
        t_est.append((time.perf_counter() - t0) * 1e3)
    t = max(min(t_est), 1e-3)
    calls = 1 if smoke else int(min(200, max(1, math.ceil(0.5 / t))))
    rounds = int(min(max_rounds, max(3 if smoke else 5, math.ceil(target_ms / (t * calls)))))

    samples: List[float] = []

    if HAS_CUDA:
        def one_round():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(calls):
                call()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) / calls)
        timer = "cuda_events"
    else:
        def one_round():
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
            samples.append((time.perf_counter() - t0) * 1e3 / calls)
        timer = "perf_counter"

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    samples.sort()
    q1, q3 = samples[len(samples) // 4], samples[(3 * len(samples)) // 4]
    return {
        "median_ms": statistics.median(samples),
        "min_ms": samples[0],
        "iqr_ms": q3 - q1,
        "rounds": rounds,
        "calls_per_round": calls,
        "input_sets": n_sets,
        "timer": timer,
    }


# 'case::impl' -> extra_info of that result (the session store the speedups are computed from)
RESULTS: Dict[str, Dict[str, Any]] = {}


def record(benchmark, *, case: str, impl: str, stats: Dict[str, Any], flops: Optional[float] = None,
           nbytes: Optional[float] = None, images: Optional[int] = None, mem: Optional[Dict[str, Any]] = None,
           **fields) -> Dict[str, Any]:
    """Fill ``benchmark.extra_info`` with the rates derived from the device-time median.

    Args:
        case: key shared by all impls of one shape (speedups are computed within it).
        impl: 'fastvit-triton', 'eager', 'sdpa-flash', 'timm', ... (baselines never start with
            'fastvit').
        stats: :func:`bench`'s result (empty when benchmarking is disabled: nothing is recorded).
        flops, nbytes: explicit counts from :mod:`benchmarks.flops` for one call.
        images: images per call (model benchmarks) -> img/s.
        mem: :func:`peak_memory`'s result.
        fields: shape description (op, model, B, N, dtype, ...).
    """
    info = benchmark.extra_info
    info.update(fields)
    info.update(case=case, impl=impl)
    env = env_info()
    info.update({k: env[k] for k in ("device", "torch", "triton", "commit", "grid", "smoke")})
    if env["smoke"]:
        info["note"] = SMOKE_NOTE
    if not stats:
        return info
    pk = measure_peaks()
    info.update(stats)
    info.update(mem or {})
    info.update(gemm_peak_tflops=round(pk["gemm_peak_tflops"], 2), copy_gbps=round(pk["copy_gbps"], 1))
    sec = stats["median_ms"] * 1e-3
    if flops is not None:
        info["flops"] = flops
        info["tflops"] = flops / sec / 1e12
        info["mfu"] = info["tflops"] / pk["gemm_peak_tflops"]
    if nbytes is not None:
        info["bytes"] = nbytes
        info["gbps"] = nbytes / sec / 1e9
    if flops is not None and nbytes is not None:
        floor = max(flops / (pk["gemm_peak_tflops"] * 1e12), nbytes / (pk["copy_gbps"] * 1e9)) * 1e3
        info["floor_ms"] = floor
        info["pct_of_floor"] = floor / stats["median_ms"]  # 1.0 = at the roofline
    if images is not None:
        info["images"] = images
        info["img_per_s"] = images / sec
    RESULTS.setdefault(f"{case}::{impl}", info)
    return info


@functools.lru_cache(maxsize=None)
def load_test_utils():
    """tests/utils.py (the DESIGN.md tolerance rule), loaded by path: a top-level ``tests``
    package installed by some other distribution must not shadow the repository's folder."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "utils.py")
    spec = importlib.util.spec_from_file_location("_fastvit_tests_utils", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_output(out: torch.Tensor, ref32: torch.Tensor, ref_lowp: Optional[torch.Tensor], *,
                 baseline: bool, name: str) -> None:
    """Assert the timed thing computed the right function (never its speed).

    fastvit impls follow the DESIGN.md rule: error vs the float32 reference <= 2 x the error of
    the torch reference run in the same precision + one rounding step. Baselines (eager, SDPA,
    timm, HF, compiled references) are sanity-checked with twice that margin: the point is
    that the same function was timed, not to grade PyTorch. float32 runs (smoke mode) allow
    1e-4 x max|ref| for accumulation-order differences.
    """
    assert_close_rule = load_test_utils().assert_close_rule
    atol = 0.0
    if out.dtype == torch.float32:
        atol = 1e-4 * max(ref32.float().abs().max().item(), 1e-6)
    if baseline and ref_lowp is not None:
        atol += 2 * (ref_lowp.float() - ref32.float()).abs().max().item()
    assert_close_rule(out, ref32.float(), ref_lowp, atol=atol, name=name)


def compute_speedups(entries: Sequence[Dict[str, Any]]) -> None:
    """Add ``speedup_vs`` (other impl -> other median / this median) to every result, and for
    fastvit results ``best_baseline`` / ``speedup_vs_best_baseline``, within each case. In place.

    ``entries`` are extra_info dicts; only those with a ``case`` and a ``median_ms`` count.
    """
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for info in entries:
        if info.get("case") and info.get("median_ms"):
            groups.setdefault(info["case"], []).append(info)
    for group in groups.values():
        base = [o for o in group if not o["impl"].startswith("fastvit")]
        for info in group:
            others = {o["impl"]: o["median_ms"] / info["median_ms"] for o in group if o["impl"] != info["impl"]}
            info["speedup_vs"] = {k: round(v, 4) for k, v in sorted(others.items())}
            if base and info["impl"].startswith("fastvit"):
                best = min(base, key=lambda o: o["median_ms"])
                info["best_baseline"] = best["impl"]
                info["speedup_vs_best_baseline"] = round(best["median_ms"] / info["median_ms"], 4)

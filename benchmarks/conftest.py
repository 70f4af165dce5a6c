"""Benchmark session set-up: interpreter mode, banner, the session results store, speedups.

Speedups are ratios of device-time medians measured in this process: every result is filed in
``RESULTS`` under its case key (op / model + shape + dtype) and impl name; when the session
writes its JSON (``--benchmark-json``) each entry gets ``speedup_vs`` = {other impl: other
median / this median} over all impls of its case that ran, whatever the test order. The same
table is printed at the end of the run.
"""

import os

import torch

if not torch.cuda.is_available():
    # must precede the first import of triton-decorated kernels (as in tests/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from benchmarks import harness  # noqa: E402


def pytest_report_header(config):
    lines = [f"fastvit benchmarks: grid={harness.grid_name()} device={harness.env_info()['device']} "
             f"torch={torch.__version__} triton={harness.env_info()['triton']} commit={harness.env_info()['commit']}"]
    if harness.is_smoke():
        lines.append("*** " + harness.SMOKE_NOTE + " ***")
    return lines


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not harness.HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def peaks():
    """Measured GEMM peak and copy bandwidth of this device (once per session)."""
    return harness.measure_peaks()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    entries = [b.get("extra_info", {}) for b in output_json.get("benchmarks", [])]
    harness.compute_speedups(entries)
    output_json["fastvit"] = {"env": harness.env_info(), "peaks": harness.measure_peaks() if entries else None}


def _host_summary(tr) -> None:
    from benchmarks.test_host_overhead import HOST_RESULTS

    if not HOST_RESULTS:
        return
    tr.section("fastvit host cost per call (min over interleaved repeats, this machine)")
    for r in HOST_RESULTS:
        tr.write_line(f"{r['case']:<40} {r['impl']:<38} {r['us']:9.2f} us  vs {r['baseline']} {r['baseline_us']:.2f} us"
                      f"  = {r['ratio']:.2f}x  (signature: {r['signature']})")


def _data_summary(tr) -> None:
    from benchmarks.test_data_path import DATA_RESULTS

    if not DATA_RESULTS:
        return
    tr.section("fastvit data path (one core, this machine; 224 px ViT input)")
    for r in DATA_RESULTS:
        if r["case"].startswith("data:decode"):
            tr.write_line(f"{r['case']:<24} float {r['float_img_s']:8.1f}  exact {r['exact_img_s']:8.1f}  fast "
                          f"{r['fast_img_s']:8.1f} img/s  fast / float {r['fast_vs_float']:.2f}x  ({r['fast_backend']})"
                          f"  bytes to device {r['bytes_to_device_float']} -> {r['bytes_to_device_uint8']}"
                          f"  fast-exact mean |diff| {r['fast_mean_abs_diff']:.2f}")
        elif r["case"].startswith("data:embed"):
            tr.write_line(f"{r['case']}: end-to-end {r['e2e_img_s']:.1f} img/s vs the model alone {r['model_img_s']:.1f}"
                          f" = {r['e2e_vs_model']:.3f} ({r['workers']} decode workers)")
        else:
            tr.write_line(f"{r['case']}: {r['photos']} photos, cosine fast vs exact mean {r['cos_mean']:.6f}, worst "
                          f"{r['cos_worst']:.6f} ({r['worst']}); between different photos mean "
                          f"{r['cos_between_photos_mean']:.4f}, max {r['cos_between_photos_max']:.4f}; pixel mean "
                          f"|diff| {r['pixel_mean_abs_diff']:.2f}")


def _serve_summary(tr) -> None:
    import sys

    mod = sys.modules.get("benchmarks.test_serve_load")  # absent when skipped (no serve extra) or not collected
    if mod is None or not mod.SERVE_RESULTS:
        return
    from benchmarks.serve_load import format_table

    tr.section(f"fastvit serve load ({mod.MODEL}, {mod.SERVE_RESULTS[0]['device']}, loopback)")
    for line in format_table(mod.SERVE_RESULTS).splitlines():
        tr.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _host_summary(terminalreporter)
    _data_summary(terminalreporter)
    _serve_summary(terminalreporter)
    results = list(harness.RESULTS.values())
    if not results:
        return
    harness.compute_speedups(results)
    tr = terminalreporter
    tr.section("fastvit speedups (median device time, same process)")
    if harness.is_smoke():
        tr.write_line("*** " + harness.SMOKE_NOTE + " ***")
    for info in results:
        if not info["impl"].startswith("fastvit"):
            continue
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in info.get("speedup_vs", {}).items() if not k.startswith("fastvit"))
        rate = f"{info['tflops']:.3g} TFLOP/s" if info.get("tflops") is not None else ""
        if info.get("img_per_s") is not None:
            rate = f"{info['img_per_s']:.4g} img/s"
        tr.write_line(f"{info['case']:<48} {info['impl']:<18} {info['median_ms']:.4f} ms {rate:>16}  vs {sp or '-'}")

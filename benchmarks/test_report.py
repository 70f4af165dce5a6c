"""The report works on real pytest-benchmark JSON, the formulas hold, NOTES.md is in sync.

The JSON comes from a real run of a subset of the suites in a subprocess (smoke mode on a CPU
machine, whatever the grid on a GPU one is set to: the subset is picked by name).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import flops as FL
from benchmarks import report
from benchmarks.harness import HAS_CUDA, rotation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one attention case with every baseline, one MLP case, one small model case without the
# (slow in the interpreter) triton model path
SUBSET = ("(attention-tiny-B1-N17 or mlp-mlp-tiny-B1 or model-tiny_vit-B1) and not (model and fastvit-triton)")


def _run_subset(tmp_path, *extra, subset=SUBSET):
    env = dict(os.environ, FASTVIT_BENCH_GRID="smoke", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_bench_kernels.py",
           "benchmarks/test_bench_models.py", "-k", subset, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU smoke subset is what CI runs; on a GPU gpu_run.sh runs the report")
def test_report_on_real_benchmark_json(tmp_path):
    js = tmp_path / "cpu_smoke.json"
    p = _run_subset(tmp_path, f"--benchmark-json={js}")
    assert p.returncode == 0, f"benchmark subset failed (rc {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}"
    assert "NOT GPU performance claims" in p.stdout, "smoke banner missing from the run's output"
    data = json.loads(js.read_text())
    infos = {b["extra_info"]["case"] + " " + b["extra_info"]["impl"]: b["extra_info"] for b in data["benchmarks"]}
    att = infos["attention|tiny|B1|N17|fp32 fastvit-torch"]
    for key in ("median_ms", "tflops", "gbps", "mfu", "floor_ms", "device", "torch", "triton", "commit",
                "gemm_peak_tflops", "copy_gbps", "note"):
        assert key in att, f"extra_info lacks {key!r}: {sorted(att)}"
    assert att["smoke"] is True and "NOT GPU" in att["note"]
    # the session hook computed speedups against every baseline that ran in the same process
    assert {"eager", "sdpa-math"} <= set(att["speedup_vs"]), att["speedup_vs"]
    assert att["speedup_vs"]["eager"] == pytest.approx(infos["attention|tiny|B1|N17|fp32 eager"]["median_ms"]
                                                       / att["median_ms"], rel=1e-3)
    model = infos["model|tiny_vit|B1|fp32 fastvit-torch"]
    assert model["img_per_s"] == pytest.approx(1e3 / model["median_ms"], rel=1e-6)
    assert "timm" in model["speedup_vs"] and "hf-sdpa" in model["speedup_vs"]
    assert data["fastvit"]["env"]["smoke"] is True

    assert report.main([str(js)]) == 0
    md = (tmp_path / "cpu_smoke.md").read_text()
    assert "CPU smoke run" in md and "not** GPU performance claims" in md
    assert "| attention tiny B1 N17 fp32 |" in md and "| tiny_vit bs1 fp32 | fastvit-torch |" in md
    assert "not measured" in md  # the H100 targets cannot be judged from a smoke run
    for suffix in ("speedup", "throughput", "roofline"):
        png = tmp_path / f"cpu_smoke_{suffix}.png"
        assert png.is_file() and png.stat().st_size > 5000, f"{png} missing or empty"
        assert f"cpu_smoke_{suffix}.png" in md


@pytest.mark.skipif(HAS_CUDA, reason="CPU CI check")
def test_suites_run_with_benchmark_disable(tmp_path):
    p = _run_subset(tmp_path, "--benchmark-disable", subset="attention-tiny-B1-N17 or model-tiny_vit-B1-fp32-timm")
    assert p.returncode == 0, f"--benchmark-disable run failed:\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}"
    assert " passed" in p.stdout


def _r(**kw):
    base = dict(kind="kernel", model="vit_b", B=256, N=197, dtype="bf16", variant="")
    base.update(kw)
    return base


def test_targets_verdicts():
    rs = [_r(op="attention", impl="fastvit-triton", median_ms=1.0, case="a"),
          _r(op="attention", impl="sdpa-flash", median_ms=1.2, case="a"),
          _r(op="attention", impl="sdpa-cudnn", median_ms=0.9, case="a"),
          _r(op="mlp", variant="mlp", impl="fastvit-triton", median_ms=1.0, mfu=0.5, case="m"),
          _r(op="mlp", variant="mlp", impl="eager", median_ms=1.2, case="m")]
    rows = {r[0]: r for r in report.targets(rs)}
    att = rows["attention B256 H12 N197 d64 bf16 vs best SDPA backend"]
    assert att[1].startswith("0.90x") and att[3] == "missed by 10%"  # best SDPA is cudnn, not flash
    assert rows["fused MLP M=256*197 768->3072->768 bf16 vs eager"][3] == "met"
    assert rows["fused MLP: % of measured GEMM peak"][1] == "50.0%"
    assert rows["fused MLP: % of measured GEMM peak"][3] == "missed by 29%"
    assert rows["ViT-B/16 bs256 bf16: fastvit vs timm eager"][3] == "not measured"


def test_report_rejects_non_benchmark_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="pytest-benchmark JSON"):
        report.load(str(bad))


def test_flop_formulas():
    # DESIGN.md: ViT-B/16 at 224 is 35.2 GFLOP per image (timm: 17.6 GMACs)
    assert FL.model_flops_per_image(768, 12, 12, 224, 16) == pytest.approx(35.2e9, rel=5e-3)
    a = FL.attention_cost(256, 12, 197, 64)
    assert a.flops == 4 * 256 * 12 * 197 * 197 * 64 and a.bytes == 4 * 256 * 12 * 197 * 64 * 2
    m = FL.mlp_cost(256 * 197, 768, 3072)
    assert m.flops == 4 * 256 * 197 * 768 * 3072
    assert FL.floor_ms(FL.Cost(1e12, 1.0), 1000.0, 1000.0) == pytest.approx(1.0)  # compute bound: 1 TFLOP @ 1 PF/s
    assert FL.floor_ms(FL.Cost(1.0, 1e9), 1000.0, 1000.0) == pytest.approx(1.0)  # memory bound: 1 GB @ 1 TB/s


def test_rotation_exceeds_l2():
    l2 = 50 * 2 ** 20
    assert rotation(2 * 2 ** 30, l2) == 1
    n = rotation(2 ** 20, l2)
    assert n * 2 ** 20 >= 3 * l2 and (n - 1) * 2 ** 20 < 3 * l2
    assert rotation(1, l2, cap=16) == 16


def test_notes_carry_the_computed_floor_table():
    notes = open(os.path.join(ROOT, "benchmarks", "NOTES.md")).read()
    assert FL.render_table() in notes, "benchmarks/NOTES.md floor table is stale: paste `python -m benchmarks.flops`"

"""benchmarks/gpu_run.sh, the plan for a lent GPU's few minutes, checked where CI runs: without one.

* The header's budget rows (call, step, cap, estimate) are what the script enforces; each call's
  caps must sum to under the call's budget (GPU_RUN_BUDGET, itself under the device tool's
  600 s), and the two command lines of the plan must run exactly the steps budgeted for them.
* A CPU dry run (GPU_RUN_ALLOW_CPU=1) of a short step list goes through the step machinery:
  a skipped step (build), a time-boxed pytest step (gputests, collect-only without a GPU), a
  time-boxed script step (sanitize_smoke in the interpreter), a step without input (report),
  every step's line with its time in the summary, and the packing of the logs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
TOOL_LIMIT_S = 600  # the device tool's limit for one command
STEP_LINE = r"^{step}\s+(ok|skipped|FAILED|TIMEOUT)\s+(\d+)s\s+\(cap (\d+)s\)"


def _header() -> str:
    lines = []
    with open(SCRIPT) as f:
        next(f)  # shebang
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line)
    return "".join(lines)


def _budget_rows():
    """(call, step, cap, est) for every '# budget' row of the header."""
    rows = re.findall(r"^# budget\s+(\d)\s+(\w+)\s+(\d+)\s+(\d+)\s+\S", _header(), flags=re.M)
    return [(int(c), s, int(cap), int(est)) for c, s, cap, est in rows]


def _script_default(var: str) -> int:
    m = re.search(r"\$\{" + var + r":-(\d+)\}", open(SCRIPT).read())
    assert m, f"{var}'s default not found in {SCRIPT}"
    return int(m.group(1))


def test_header_budgets_fit_each_call():
    rows = _budget_rows()
    assert rows, "no '# budget' rows in the header of gpu_run.sh"
    budget = _script_default("GPU_RUN_BUDGET")
    assert budget < TOOL_LIMIT_S
    calls = {}
    for call, step, cap, est in rows:
        assert 0 < est <= cap, f"call {call} step {step}: estimate {est}s over its cap {cap}s"
        calls.setdefault(call, []).append((step, cap, est))
    assert sorted(calls) == [1, 2], f"expected the plan's two calls, got {sorted(calls)}"
    for call, steps in calls.items():
        caps = sum(cap for _, cap, _ in steps)
        assert caps < budget, f"call {call}: caps sum to {caps}s, over GPU_RUN_BUDGET {budget}s: " \
                              f"{[(s, c) for s, c, _ in steps]}"
    # the script looks a step's cap up by name: a step in both calls must have one cap
    caps_by_step = {}
    for _, step, cap, _ in rows:
        assert caps_by_step.setdefault(step, cap) == cap, f"step {step}: two different caps in the header"
    all_steps = re.search(r"^ALL_STEPS=\(([^)]*)\)", open(SCRIPT).read(), flags=re.M).group(1).split()
    assert set(all_steps) == set(caps_by_step), f"steps without a budget row: {set(all_steps) - set(caps_by_step)}"
    # the header's command lines run the steps budgeted for their call, in that order
    for call, steps in calls.items():
        m = re.search(rf"^#\s+call {call}: .*gpu_run\.sh \$OUT ([a-z ]+)$", _header(), flags=re.M)
        assert m, f"no command line for call {call} in the header"
        assert m.group(1).split() == [s for s, _, _ in steps], f"call {call}: command line and budget rows differ"


def _run(out_dir, steps, **env):
    e = dict(os.environ, GPU_RUN_ALLOW_CPU="1", PYTHON=sys.executable,
             TRITON_CACHE_DIR=str(out_dir / "cache" / "triton"), FASTVIT_CACHE_DIR=str(out_dir / "cache" / "fastvit"),
             FASTVIT_CUDA_CACHE=str(out_dir / "cache" / "cuda"), TORCHINDUCTOR_CACHE_DIR=str(out_dir / "cache" / "ind"))
    e.update(env)
    return subprocess.run(["bash", SCRIPT, str(out_dir / "out"), *steps], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs the real steps, not a dry run")
def test_cpu_dry_run_lists_every_step_with_its_time(tmp_path):
    steps = ["install", "build", "gputests", "sanitize", "report"]
    p = _run(tmp_path, steps, GPU_RUN_PACK="1")
    out = tmp_path / "out"
    summary = (out / "gpu_run_summary.txt").read_text()
    assert p.returncode == 0, f"rc {p.returncode}\n{summary}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    status = {}
    for step in steps:
        m = re.search(STEP_LINE.format(step=step), summary, flags=re.M)
        assert m, f"no line with a time for step {step} in the summary:\n{summary}"
        status[step] = m.group(1)
    assert status == {"install": "ok", "build": "skipped", "gputests": "ok", "sanitize": "ok", "report": "skipped"}
    assert re.search(r"^gpu_run: done in \d+s", summary, flags=re.M)
    assert "sanitize_smoke: 0 failure(s)" in summary  # the log's tail follows the step line
    # packed: what the device tool returns is the summary, the tarball (and .md / .json files)
    names = sorted(os.listdir(out))
    assert len(names) == 2 and names[0].endswith("_logs.tar.gz") and names[1] == "gpu_run_summary.txt", names
    with tarfile.open(out / names[0]) as t:
        assert {"gputests.log", "sanitize.log"} <= set(t.getnames())


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the build step runs")
def test_steps_past_the_budget_are_skipped_and_listed(tmp_path):
    p = _run(tmp_path, ["build", "sanitize"], GPU_RUN_BUDGET="1")
    summary = (tmp_path / "out" / "gpu_run_summary.txt").read_text()
    assert p.returncode == 0, summary
    assert re.search(STEP_LINE.format(step="build") + r".*no GPU", summary, flags=re.M), summary
    assert re.search(STEP_LINE.format(step="sanitize") + r".*budget left", summary, flags=re.M), summary


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    p = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "env", "bogus"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "unknown step 'bogus'" in p.stdout
    assert not (tmp_path / "out").exists()

"""``fastvit serve`` under load: a real server process (ViT-Ti/16 at 224, random weights, on
cuda when there is one, else the CPU) and the async client of :mod:`benchmarks.serve_load` at
1, 8, 32 and 128 concurrent clients on loopback. Numbers are printed at the end of the session
and stored in the benchmark JSON; nothing is asserted on speed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from typing import Dict, List

import pytest
import torch

from benchmarks import harness

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from benchmarks.serve_load import format_table, load_test  # noqa: E402

SERVE_RESULTS: List[Dict[str, object]] = []
MODEL = "vit_tiny_patch16_224"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_load(benchmark):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    proc = subprocess.Popen([sys.executable, "-m", "fastvit", "serve", "--model", MODEL, "--port", str(port),
                             "--devices", device, "--max-batch-size", "64", "--max-delay-ms", "5",
                             "--log-level", "warning"] + (["--dtype", "bfloat16"] if device == "cuda" else []),
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "fastvit serve did not start"
            time.sleep(0.2)
        # a short run on a CPU; the GPU pass sends more requests per level
        requests = None if device == "cuda" else 32
        rows = load_test(url, (1, 8, 32, 128), requests)
    finally:
        proc.terminate()
        proc.wait(60)
    info = harness.env_info()
    for r in rows:
        row = dict(r, case=f"serve:{MODEL}:{device}:c{r['concurrency']}", device=info["device"],
                   commit=info["commit"])
        SERVE_RESULTS.append(row)
    benchmark.extra_info.update({"serve_rows": rows, "device": info["device"], "model": MODEL})
    benchmark.extra_info["table"] = format_table(rows)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)

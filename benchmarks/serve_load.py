"""Load test of a running ``fastvit serve`` (or any server of the same API): real sockets, an async
HTTP client, a fixed number of clients each sending its next request when the last is answered.

Per concurrency level: requests/s and images/s, p50 / p95 / p99 latency, errors, and the mean
batch size the server formed (from its ``/metrics``, the difference over the level).

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 [--concurrency 1,8,32,128]
        [--requests 256] [--images-per-request 1] [--image photo.jpg] [--endpoint embeddings]
        [--api-key KEY] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["load_test", "run_level", "default_image", "format_table", "main"]


def default_image() -> bytes:
    """A 451 x 300 JPEG photo (scikit-image's chelsea, quality 90): a typical upload to embed."""
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _batch_stats(text: str) -> Dict[str, float]:
    out = {"count": 0.0, "sum": 0.0}
    for line in text.splitlines():
        for k in out:
            if line.startswith(f"fastvit_batch_size_{k} "):
                out[k] = float(line.rsplit(" ", 1)[1])
    return out


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[i]


async def run_level(client, concurrency: int, requests: int, body: Dict, endpoint: str,
                    images_per_request: int) -> Dict[str, float]:
    """``requests`` requests from ``concurrency`` clients at once -> the level's numbers."""
    before = _batch_stats((await client.get("/metrics")).text)
    latencies: List[float] = []
    errors: Dict[str, int] = {}
    left = requests

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            try:
                r = await client.post(endpoint, json=body)
                status = str(r.status_code)
            except Exception as e:  # a transport error is a result of the load test, not its failure
                status = type(e).__name__
            if status == "200":
                latencies.append(time.perf_counter() - t0)
            else:
                errors[status] = errors.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    after = _batch_stats((await client.get("/metrics")).text)
    batches = after["count"] - before["count"]
    lat = sorted(latencies)
    return {
        "concurrency": concurrency, "requests": requests, "ok": len(lat), "errors": errors, "seconds": wall,
        "req_s": len(lat) / wall, "img_s": len(lat) * images_per_request / wall,
        "p50_ms": 1e3 * _percentile(lat, 50), "p95_ms": 1e3 * _percentile(lat, 95),
        "p99_ms": 1e3 * _percentile(lat, 99),
        "mean_batch": (after["sum"] - before["sum"]) / batches if batches else float("nan"),
    }


async def _load_test(url: str, levels: Sequence[int], requests: Optional[int], image: bytes, endpoint: str,
                     images_per_request: int, api_key: Optional[str], warmup: int) -> List[Dict[str, float]]:
    import httpx

    uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    body = {"input": [uri] * images_per_request}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as client:
        await run_level(client, 1, warmup, body, endpoint, images_per_request)
        return [await run_level(client, c, max(requests, c) if requests else max(64, 2 * c), body, endpoint,
                                images_per_request) for c in levels]


def load_test(url: str, levels: Sequence[int] = (1, 8, 32, 128), requests: Optional[int] = None,
              image: Optional[bytes] = None, endpoint: str = "/v1/embeddings", images_per_request: int = 1,
              api_key: Optional[str] = None, warmup: int = 8) -> List[Dict[str, float]]:
    """The numbers of each concurrency level: ``max(requests, level)`` requests per level, default
    ``max(64, 2 x level)``."""
    return asyncio.run(_load_test(url, levels, requests, image or default_image(), endpoint, images_per_request,
                                  api_key, warmup))


def format_table(rows: Sequence[Dict[str, float]]) -> str:
    lines = ["| clients | requests | req/s | img/s | p50 ms | p95 ms | p99 ms | mean batch | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        err = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "0"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['req_s']:.1f} | {r['img_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['mean_batch']:.2f} | {err} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="1,8,32,128", help="comma-separated client counts")
    p.add_argument("--requests", type=int,
                   help="requests per level, at least one per client (default max(64, 2 x clients))")
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--image", help="the image file every request sends (default: a 451 x 300 JPEG photo)")
    p.add_argument("--endpoint", default="embeddings", choices=("embeddings", "classify"))
    p.add_argument("--api-key")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",")]
    if any(c < 1 for c in levels) or a.images_per_request < 1:
        raise SystemExit(f"{p.prog}: --concurrency and --images-per-request expected >= 1, got {a.concurrency} / "
                         f"{a.images_per_request}")
    image = open(a.image, "rb").read() if a.image else None
    rows = load_test(a.url, levels, a.requests, image, "/v1/" + a.endpoint, a.images_per_request, a.api_key)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

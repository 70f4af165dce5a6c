"""Turn a pytest-benchmark JSON of the fastvit suites into a markdown report and plots.

    python -m benchmarks.report benchmarks/results/<device>_<date>.json [more.json ...]
                                [--out DIR] [--name NAME] [--no-plots]

Several JSONs (e.g. the kernel and the model suites of one run) make one report. Writes next to
the first JSON (or into ``--out``), named after it (or ``--name``): ``<stem>.md`` (environment, issue targets met or
missed, per-case summary, every result) and ``<stem>_speedup.png`` (fastvit vs the best baseline
per shape), ``<stem>_throughput.png`` (img/s vs batch per model), ``<stem>_roofline.png``
(kernels against the GEMM peak and copy bandwidth measured in the same run).

All times are the device-time medians the suites put in ``extra_info["median_ms"]`` (CUDA
events on GPU); pytest-benchmark's own host-side statistics are ignored except as a fallback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .harness import compute_speedups

__all__ = ["load", "render_markdown", "targets", "plot_all", "main"]


# --------------------------------------------------------------------------- loading
def load(path: str) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Results (one extra_info dict per benchmark, with ``name``) and the run's metadata."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError(f"path: expected a pytest-benchmark JSON (with a 'benchmarks' list), got {path!r}")
    results = []
    for b in data["benchmarks"]:
        info = dict(b.get("extra_info") or {})
        if not info.get("case") or not info.get("impl"):
            continue  # not one of ours
        if not info.get("median_ms"):
            st = b.get("stats") or {}
            if "median" not in st:
                continue
            info["median_ms"] = st["median"] * 1e3  # host time of a synchronised round: fallback only
            info["timer"] = "pytest-benchmark host (fallback)"
        info["name"] = b.get("name", "")
        results.append(info)
    compute_speedups(results)  # same as the session hook; also fills JSONs written without it
    meta = dict(data.get("fastvit") or {})
    meta["datetime"] = data.get("datetime")
    meta.setdefault("env", {})
    if results and not meta["env"]:
        meta["env"] = {k: results[0].get(k) for k in ("device", "torch", "triton", "commit", "grid", "smoke")}
    if not meta.get("peaks") and results and results[0].get("gemm_peak_tflops"):
        meta["peaks"] = {"gemm_peak_tflops": results[0]["gemm_peak_tflops"], "copy_gbps": results[0]["copy_gbps"]}
    return results, meta


# --------------------------------------------------------------------------- targets of issue 5
def _find(results, **kw) -> List[Dict[str, Any]]:
    return [r for r in results if all(r.get(k) == v for k, v in kw.items())]


def _best_fastvit(rs: Sequence[Dict[str, Any]], eager_only: bool = True) -> Optional[Dict[str, Any]]:
    rs = [r for r in rs if r["impl"].startswith("fastvit") and
          (not eager_only or r["impl"] in ("fastvit-triton", "fastvit-cuda", "fastvit-torch"))]
    return min(rs, key=lambda r: r["median_ms"]) if rs else None


def targets(results: List[Dict[str, Any]]) -> List[Tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows for the H100 bf16 targets of issue 5 (reported,
    never asserted). A target whose inputs did not run says 'not measured'."""
    rows = []

    def ratio_row(label, fast, base, goal):
        if fast is None or base is None:
            rows.append((label, "-", f">= {goal:.2f}x", "not measured"))
            return
        r = base["median_ms"] / fast["median_ms"]
        rows.append((label, f"{r:.2f}x ({fast['impl']} {fast['median_ms']:.3f} ms vs {base['impl']} "
                     f"{base['median_ms']:.3f} ms)", f">= {goal:.2f}x", "met" if r >= goal else
                     f"missed by {(goal - r) / goal:.0%}"))

    def value_row(label, value, goal, fmt, higher=True, unit=""):
        if value is None:
            rows.append((label, "-", f"{'>=' if higher else '<='} {fmt.format(goal)}{unit}", "not measured"))
            return
        ok = value >= goal if higher else value <= goal
        miss = (goal - value) / goal if higher else (value - goal) / goal
        rows.append((label, fmt.format(value) + unit, f"{'>=' if higher else '<='} {fmt.format(goal)}{unit}",
                     "met" if ok else f"missed by {miss:.0%}"))

    m256 = _find(results, kind="model", model="vit_b16", B=256, dtype="bf16")
    f = _best_fastvit(m256)
    ratio_row("ViT-B/16 bs256 bf16: fastvit vs timm eager", f, next(iter(_find(m256, impl="timm")), None), 1.3)
    ratio_row("ViT-B/16 bs256 bf16: fastvit vs timm + torch.compile", f,
              next(iter(_find(m256, impl="timm-compile")), None), 1.1)
    value_row("ViT-B/16 bs256 bf16: fastvit MFU", f["mfu"] * 100 if f else None, 55, "{:.1f}", unit="%")
    m1 = _find(results, kind="model", model="vit_b16", B=1, dtype="bf16")
    g = next(iter(_find(m1, impl="fastvit-cudagraph")), None)
    value_row("ViT-B/16 bs1 bf16 CUDA graph latency", g["median_ms"] if g else None, 0.6, "{:.3f}", higher=False,
              unit=" ms")
    ratio_row("ViT-B/16 bs1 bf16: CUDA graph vs timm eager", g, next(iter(_find(m1, impl="timm")), None), 2.0)
    a = _find(results, kind="kernel", op="attention", model="vit_b", B=256, N=197, dtype="bf16")
    sd = [r for r in a if r["impl"].startswith("sdpa-")]
    ratio_row("attention B256 H12 N197 d64 bf16 vs best SDPA backend", _best_fastvit(a),
              min(sd, key=lambda r: r["median_ms"]) if sd else None, 1.0)
    a2 = _best_fastvit(_find(results, kind="kernel", op="attention", model="vit_b", B=256, N=1025, dtype="bf16"))
    value_row("attention B256 H12 N1025 d64 bf16 TFLOP/s", a2["tflops"] if a2 else None, 300, "{:.0f}")
    mm = _find(results, kind="kernel", op="mlp", variant="mlp", model="vit_b", B=256, N=197, dtype="bf16")
    fm = _best_fastvit(mm)
    ratio_row("fused MLP M=256*197 768->3072->768 bf16 vs eager", fm, next(iter(_find(mm, impl="eager")), None), 1.15)
    value_row("fused MLP: % of measured GEMM peak", fm["mfu"] * 100 if fm else None, 70, "{:.1f}", unit="%")
    pe = _find(results, kind="kernel", op="patch_embed", model="vit_b", B=256, N=197, dtype="bf16")
    ratio_row("patch_embed ViT-B/16 bs256 bf16 vs timm PatchEmbed + cat + pos", _best_fastvit(pe),
              next(iter(_find(pe, impl="eager")), None), 2.0)
    return rows


# --------------------------------------------------------------------------- markdown
def _f(v, fmt="{:.3f}", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return fmt.format(v)


def _shape(r) -> str:
    if r.get("kind") == "model":
        return f"{r['model']} bs{r['B']} {r['dtype']}"
    v = f"-{r['variant']}" if r.get("variant") else ""
    return f"{r['op']}{v} {r['model']} B{r['B']} N{r['N']} {r['dtype']}"


def _table(title: str, header: Sequence[str], align: str, rows: Sequence[Sequence[Any]]) -> List[str]:
    """A markdown section: ``## title``, a table of ``rows`` under ``header`` (``align``: 'l' or 'r'
    per column), a blank line."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [f"## {title}", "", line(header), line("---" if a == "l" else "---:" for a in align),
            *(line(r) for r in rows), ""]


def _kernel_summary_row(rs: List[Dict[str, Any]]) -> List[str]:
    """One case's best fastvit backend against its best baseline."""
    f = _best_fastvit(rs)
    base = [r for r in rs if not r["impl"].startswith("fastvit")]
    b = min(base, key=lambda r: r["median_ms"]) if base else None
    return [_shape(rs[0]), f["impl"] if f else "-", _f(f and f["median_ms"], "{:.4f}"),
            _f(f and f.get("tflops"), "{:.1f}"), _f(f and f.get("gbps"), "{:.0f}"),
            _f(f and f.get("pct_of_floor") and 100 * f["pct_of_floor"], "{:.0f}%"),
            b["impl"] if b else "-", _f(b and b["median_ms"], "{:.4f}"),
            _f(f and b and b["median_ms"] / f["median_ms"], "{:.2f}x")]


def _model_row(r: Dict[str, Any]) -> List[str]:
    sp = r.get("speedup_vs", {})
    return [_shape(r), r["impl"], _f(r["median_ms"]), _f(r.get("img_per_s"), "{:.0f}"),
            _f(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"), _f(r.get("peak_mem_mib"), "{:.0f}"),
            *(_f(sp.get(base), "{:.2f}x") for base in ("timm", "timm-compile", "hf-sdpa"))]


def _kernel_row(r: Dict[str, Any]) -> List[str]:
    return [_shape(r), r["impl"], _f(r["median_ms"], "{:.4f}"), _f(r.get("iqr_ms"), "{:.4f}"),
            _f(r.get("tflops"), "{:.2f}"), _f(r.get("gbps"), "{:.0f}"), _f(r.get("mfu") and 100 * r["mfu"], "{:.1f}%"),
            _f(r.get("peak_extra_mem_mib"), "{:.1f}"), _f(r.get("speedup_vs_best_baseline"), "{:.2f}x")]


def render_markdown(results: List[Dict[str, Any]], meta: Dict[str, Any], plots: Sequence[str] = ()) -> str:
    env, pk = meta.get("env") or {}, meta.get("peaks") or {}
    out = ["# fastvit benchmark report", ""]
    if env.get("smoke"):
        out += ["> **CPU smoke run** - tiny shapes, float32, host timer. These numbers prove that the suites "
                "and this report work; they are **not** GPU performance claims.", ""]
    out += [f"- device: {env.get('device')}", f"- torch {env.get('torch')}, triton {env.get('triton')}, "
            f"commit {env.get('commit')}, grid {env.get('grid')}, run {meta.get('datetime')}",
            f"- measured in this run: GEMM peak {_f(pk.get('gemm_peak_tflops'), '{:.4g}')} TFLOP/s, copy "
            f"bandwidth {_f(pk.get('copy_gbps'), '{:.4g}')} GB/s ({pk.get('peaks_measured_with', '')})",
            "- times: median per call over timed rounds of back-to-back calls ("
            + ", ".join(sorted({str(r.get("timer")) for r in results})) + "), inputs rotated beyond L2; "
            "speedup = baseline median / fastvit median, both from this run", ""]
    out += _table("Issue 5 targets (H100, bf16)", ("target", "measured", "goal", "verdict"), "llll", targets(results))

    kernels = [r for r in results if r.get("kind") == "kernel"]
    models = [r for r in results if r.get("kind") == "model"]
    if kernels:
        by_case = defaultdict(list)
        for r in kernels:
            by_case[r["case"]].append(r)
        out += _table("Kernels: best fastvit backend vs best baseline",
                      ("shape", "fastvit", "ms", "TFLOP/s", "GB/s", "% of floor", "best baseline", "ms", "speedup"),
                      "llrrrrlrr", [_kernel_summary_row(rs) for rs in by_case.values()])
    if models:
        out += _table("Models: throughput",
                      ("model", "impl", "ms / batch", "img/s", "MFU", "peak mem MiB", "vs timm", "vs timm-compile",
                       "vs hf-sdpa"), "llrrrrrrr", [_model_row(r) for r in models])
    if kernels:
        out += _table("All kernel results",
                      ("shape", "impl", "ms", "IQR ms", "TFLOP/s", "GB/s", "MFU", "peak extra MiB",
                       "speedup vs best baseline"), "llrrrrrrr", [_kernel_row(r) for r in kernels])
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots] + [""]
    if not results:
        out += ["No fastvit benchmark results in this file.", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------- plots
def plot_all(results: List[Dict[str, Any]], meta: Dict[str, Any], out_prefix: str) -> List[str]:
    """Write the speedup, throughput and roofline PNGs; returns their paths (only non-empty plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smoke = bool((meta.get("env") or {}).get("smoke"))
    tag = " [CPU SMOKE - not GPU numbers]" if smoke else f" [{(meta.get('env') or {}).get('device', '')}]"
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        paths.append(f"{out_prefix}_{name}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    # 1. speedup of each fastvit impl vs the best baseline, per shape
    cases = defaultdict(dict)
    for r in results:
        if r["impl"].startswith("fastvit") and r.get("speedup_vs_best_baseline"):
            cases[_shape(r)][r["impl"]] = r["speedup_vs_best_baseline"]
    if cases:
        impls = sorted({i for v in cases.values() for i in v})
        names = list(cases)
        fig, ax = plt.subplots(figsize=(min(30, max(6, 0.3 * len(names) * len(impls) + 2)), 5.5))
        w = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            xs = [i + j * w for i in range(len(names))]
            ax.bar(xs, [cases[n].get(impl, float("nan")) for n in names], width=w, label=impl)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log", base=2)  # ratios: 2x faster and 2x slower are the same distance from 1
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs best baseline (x)")
        ax.set_title("fastvit vs best baseline per shape" + tag, fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "speedup")

    # 2. img/s vs batch per model
    series = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("kind") == "model" and r.get("img_per_s"):
            series[f"{r['model']} {r['dtype']}"][r["impl"]].append((r["B"], r["img_per_s"]))
    if series:
        n = len(series)
        cols = min(n, 3)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
        for ax, (title, by_impl) in zip(axes.flat, series.items()):
            for impl, pts in sorted(by_impl.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel("img/s")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("throughput vs batch" + tag, fontsize=10)
        save(fig, "throughput")

    # 3. roofline of the kernels against the ceilings measured in the same run
    pk = meta.get("peaks") or {}
    pts = [r for r in results if r.get("kind") == "kernel" and r.get("intensity") and r.get("tflops")]
    if pts and pk.get("gemm_peak_tflops") and pk.get("copy_gbps"):
        peak, bw = pk["gemm_peak_tflops"], pk["copy_gbps"] / 1e3  # TFLOP/s, TB/s
        lo = min(r["intensity"] for r in pts) / 2
        hi = max(r["intensity"] for r in pts) * 2
        xs = [lo * (hi / lo) ** (i / 199) for i in range(200)]
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.plot(xs, [min(peak, bw * x) for x in xs], "k-", lw=1.2,
                label=f"roof: {peak:.0f} TFLOP/s, {bw * 1e3:.0f} GB/s (measured)")
        groups = defaultdict(list)
        for r in pts:
            groups[r["impl"] if r["impl"].startswith("fastvit") else "baselines"].append(r)
        for name, rs in sorted(groups.items()):
            ax.scatter([r["intensity"] for r in rs], [r["tflops"] for r in rs], s=18, label=name,
                       alpha=0.5 if name == "baselines" else 0.9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP / minimal byte)")
        ax.set_ylabel("achieved TFLOP/s")
        ax.set_title("kernel roofline" + tag, fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "roofline")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON(s) written with --benchmark-json")
    ap.add_argument("--out", default=None, help="output folder (default: next to the first JSON)")
    ap.add_argument("--name", default=None, help="output file stem (default: the first JSON's)")
    ap.add_argument("--no-plots", action="store_true", help="markdown only")
    args = ap.parse_args(argv)
    results: List[Dict[str, Any]] = []
    meta: Dict[str, Any] = {}
    for path in args.json:
        if not os.path.isfile(path):
            ap.error(f"json: expected an existing file, got {path!r}")
        rs, m = load(path)
        results += rs
        meta = meta or m
        if not meta.get("peaks") and m.get("peaks"):
            meta["peaks"] = m["peaks"]
    compute_speedups(results)  # across files too: a case's impls may sit in different JSONs
    out_dir = args.out or os.path.dirname(os.path.abspath(args.json[0]))
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, args.name or os.path.splitext(os.path.basename(args.json[0]))[0])
    plots = [] if args.no_plots else plot_all(results, meta, prefix)
    md = render_markdown(results, meta, plots)
    with open(prefix + ".md", "w") as f:
        f.write(md)
    print(f"wrote {prefix}.md" + "".join(f"\nwrote {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())

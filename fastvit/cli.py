"""The ``fastvit`` command: ``info``, ``demo``, ``bench`` (more subcommands register in ``build_parser``)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import platform
import sys
import time
from typing import List, Optional

__all__ = ["main", "build_parser"]


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def cmd_info(args) -> int:
    import torch

    import fastvit

    print(f"fastvit      {fastvit.__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    for pkg in ("torch", "triton", "timm", "transformers", "safetensors"):
        print(f"{pkg:<12} {_version(pkg)}")
    print(f"CUDA (torch) {torch.version.cuda or 'none'}; devices: {torch.cuda.device_count()}")
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        print(f"  cuda:{i}     {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    print(f"FASTVIT_BACKEND={os.environ.get('FASTVIT_BACKEND', '')!r} TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '')!r}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    print("backends:")
    for dev in devices:
        for name, (ok, reason) in fastvit.available_backends(torch.device(dev)).items():
            print(f"  {dev:<7} {name:<7} {'yes' if ok else 'no ':<4} {reason or ''}")
    return 0


def _demo_images(size: int):
    """The two scikit-image photos (cat 'chelsea', 'astronaut') as a (2, 3, size, size) float batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from skimage import data

    imgs = []
    for arr in (data.chelsea(), data.astronaut()):
        h, w = arr.shape[:2]
        s = min(h, w)
        arr = arr[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(255)
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
        imgs.append((t - mean) / 0.5)
    return torch.stack(imgs), ["chelsea", "astronaut"]


def _time(fn, min_time: float = 0.3, max_iters: int = 20) -> float:
    fn()  # warm-up (and autotuning)
    n, t0 = 0, time.perf_counter()
    while n < max_iters and (n == 0 or time.perf_counter() - t0 < min_time):
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def run_demo(model_name: str = "vit_tiny_patch16_224", out: Optional[str] = "demo_out", interpret: bool = True,
             seed: int = 0) -> List[dict]:
    """Build ``model_name`` (random weights, seeded), run every available backend on the demo
    photos, compare each with the float32 reference and return rows (backend, device, dtype,
    max_err, img_per_s). Writes pictures to ``out`` when fastvit.viz is present."""
    import torch

    import fastvit
    from fastvit import backends

    if interpret and not torch.cuda.is_available() and "fastvit.kernels" not in sys.modules:
        # the CPU machine has no GPU: show the Triton kernels running in Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.manual_seed(seed)
    model = fastvit.create_model(model_name).eval()
    size = model.patch_embed.img_size[0]
    x, names = _demo_images(size)
    with torch.no_grad():  # float32 reference: the torch backend on the CPU
        ref = model.set_backend("torch")(x).float()
    runs = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        runs += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    rows = []
    for dev, dtype in runs:
        device = torch.device(dev)
        m = model.to(device=device, dtype=dtype)
        xd = x.to(device=device, dtype=dtype)
        for name, (ok, reason) in backends.available_backends(device).items():
            if not ok:
                rows.append(dict(backend=name, device=dev, dtype=str(dtype).replace("torch.", ""), max_err=None,
                                 img_per_s=None, note=reason))
                continue
            m.set_backend(name)
            with torch.no_grad():
                y = m(xd)
                if dev == "cuda":
                    torch.cuda.synchronize()
                err = (y.float().cpu() - ref).abs().max().item()

                def step():
                    m(xd)
                    if dev == "cuda":
                        torch.cuda.synchronize()

                slow = dev == "cpu" and name == "triton"  # interpreter: one timed pass is enough
                sec = _time(step, min_time=0.0 if slow else 0.3, max_iters=1 if slow else 20)
            rows.append(dict(backend=name, device=dev, dtype=str(dtype).replace("torch.", ""), max_err=err,
                             img_per_s=xd.shape[0] / sec,
                             note="Triton interpreter (CPU), not a speed claim" if slow else ""))
    model.to(device="cpu", dtype=torch.float32).set_backend(None)
    if out:
        os.makedirs(out, exist_ok=True)
        try:
            from . import viz
        except ImportError:
            viz = None
        if viz is not None and hasattr(viz, "render_all"):
            for i, n in enumerate(names):
                viz.render_all(model, x[i], os.path.join(out, n))
    return rows


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    rows = run_demo(args.model, args.out, interpret=not args.no_interpret)
    print(f"fastvit demo: {args.model} (random weights, seed 0) on the scikit-image photos chelsea, astronaut")
    print(f"{'backend':<8} {'device':<6} {'dtype':<9} {'max |err| vs fp32 ref':>22} {'img/s':>9}  note")
    for r in rows:
        err = "-" if r["max_err"] is None else f"{r['max_err']:.2e}"
        ips = "-" if r["img_per_s"] is None else f"{r['img_per_s']:.1f}"
        print(f"{r['backend']:<8} {r['device']:<6} {r['dtype']:<9} {err:>22} {ips:>9}  {r['note'] or ''}")
    if args.out:
        print(f"pictures: {os.path.abspath(args.out)}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    bad = [r for r in rows if r["max_err"] is not None and r["max_err"] > (1e-3 if r["dtype"] == "float32" else 5e-2)]
    if bad:
        print(f"ERROR: backends disagree with the reference: {[r['backend'] for r in bad]}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    import subprocess

    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q"] + (["--benchmark-json", args.json] if args.json else [])
    if args.report:
        cmd = [sys.executable, "-m", "benchmarks.report", args.report]
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit", description="Fast drop-in Vision Transformer inference.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="versions, devices, backends and why a backend is unavailable")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("demo", help="run every available backend on embedded photos, check vs the reference")
    s.add_argument("--model", default="vit_tiny_patch16_224", help="a name from fastvit.list_models()")
    s.add_argument("--out", default="demo_out", help="folder for the pictures ('' for none)")
    s.add_argument("--no-interpret", action="store_true", help="on CPU, skip the Triton interpreter run")
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("bench", help="run `pytest benchmarks` (or turn a JSON result into a report)")
    s.add_argument("--json", help="write pytest-benchmark JSON here")
    s.add_argument("--report", metavar="JSON", help="write the markdown table and plots for this JSON")
    s.set_defaults(func=cmd_bench)
    from .classify import add_classify_parser
    from .viz import add_viz_parser
    from .weights import add_convert_parser

    add_viz_parser(sub)
    add_classify_parser(sub)
    add_convert_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

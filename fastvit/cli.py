"""The ``fastvit`` command: ``info``, ``demo``, ``bench``, ``convert``, ``viz``, ``classify``, ``embed``
(the last three register from their own modules in ``build_parser``)."""

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

    from .backends import available_backends
    from .version import __version__

    print(f"fastvit      {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    for label, pkg in (("torch", "torch"), ("triton", "triton"), ("timm", "timm"), ("transformers", "transformers"),
                       ("safetensors", "safetensors"), ("torchvision", "torchvision"),
                       ("opencv", "opencv-python-headless"), ("pillow", "pillow")):
        print(f"{label:<12} {_version(pkg)}")
    print(f"CUDA (torch) {torch.version.cuda or 'none'}; devices: {torch.cuda.device_count()}")
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        print(f"  cuda:{i}     {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    print(f"FASTVIT_BACKEND={os.environ.get('FASTVIT_BACKEND', '')!r} TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '')!r}")
    from .signature import IMPL

    print(f"op signature {IMPL}")
    from .data.decode import fast_backend

    print(f"image decode --preprocess fast: {fast_backend()} (opencv-python-headless is the faster one)")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    print("backends:")
    for dev in devices:
        for name, (ok, reason) in available_backends(torch.device(dev)).items():
            print(f"  {dev:<7} {name:<7} {'yes' if ok else 'no ':<4} {reason or ''}")
    print("op features (attention bias / RoPE, gated activations):")
    for name, line in feature_support().items():
        print(f"  {name:<7} {line}")
    return 0


def feature_support() -> dict:
    """Backend name -> what it lacks of the optional op features and activations, from its LIMITS
    (the words auto fallback uses: a call needing a missing one goes to the next backend)."""
    from . import backends
    from .facts import ACTIVATIONS, ATTENTION_FEATURES

    out = {}
    for name in backends.BACKENDS:
        lim = backends.limits(name)
        if lim is None:
            out[name] = "not importable here"
            continue
        missing = [f"{op}.{f}" for op in ("attention", "attention_probs") if op in lim.ops
                   for f in ATTENTION_FEATURES if f"{op}.{f}" not in lim.features]
        missing += [f"act {a!r}" for a in ACTIVATIONS if a not in lim.acts]
        out[name] = "all" if not missing else "lacks " + ", ".join(missing)
    return out


def _demo_photos():
    """The two photos scikit-image ships (the cat 'chelsea', 'astronaut') as uint8 HWC arrays."""
    from skimage import data

    return [data.chelsea(), data.astronaut()], ["chelsea", "astronaut"]


def sincos_pos_embed(grid, dim: int, temperature: float = 10000.0):
    """Fixed 2-D sine-cosine position embedding (MAE / big_vision style), (gh * gw, dim).

    The demo has no trained checkpoint offline; with this embedding its position-similarity
    picture shows the 2-D structure a trained ViT learns, instead of noise. ``temperature`` sets
    the lowest frequency (10000 as MAE; the demo uses 30 so similarity falls off within a 14 x 14
    grid and the picture has contrast)."""
    import torch

    gh, gw = grid
    if dim % 4:
        raise ValueError(f"dim: expected a multiple of 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    yy, xx = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    out = [f(c.reshape(-1, 1) * omega) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, 1).float()


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
    max_err, img_per_s). Writes the pictures of :func:`fastvit.viz.render_all` to ``out``."""
    import torch

    from . import backends
    from .factory import create_model

    if interpret and not torch.cuda.is_available() and "fastvit.kernels" not in sys.modules:
        # the CPU machine has no GPU: show the Triton kernels running in Triton's interpreter
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .preprocess import Preprocessor

    torch.manual_seed(seed)
    model = create_model(model_name).eval()
    if model.pos_embed is not None:
        with torch.no_grad():
            n = 0 if model.no_embed_class else model.num_prefix_tokens
            model.pos_embed[0, n:] = sincos_pos_embed(model.patch_embed.grid_size, model.embed_dim, temperature=30.0)
    pre = Preprocessor.for_model(model)
    photos, names = _demo_photos()
    x = pre(photos)  # (2, 3, H, W), resized, centre-cropped, normalised
    # The interpreter executes Triton kernels in Python: it checks one photo at 112 px (a 7 x 7
    # grid through the same weights, position embedding resampled) so the demo stays short.
    x_small = torch.nn.functional.interpolate(x[:1], size=(112, 112), mode="bilinear", antialias=True)
    model.dynamic_img_size = True
    with torch.no_grad():  # float32 references: the torch backend on the CPU
        model.set_backend("torch")
        refs = {"full": model(x).float(), "small": model(x_small).float()}
    runs = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        runs += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
    rows = []
    for dev, dtype in runs:
        device = torch.device(dev)
        m = model.to(device=device, dtype=dtype)
        for name, (ok, reason) in backends.available_backends(device).items():
            row = dict(backend=name, device=dev, dtype=str(dtype).replace("torch.", ""), max_err=None,
                       img_per_s=None, note=reason)
            rows.append(row)
            if not ok:
                continue
            interp = dev == "cpu" and name == "triton"
            which = "small" if interp else "full"
            xd = (x_small if interp else x).to(device=device, dtype=dtype)
            m.set_backend(name)

            def step():
                out = m(xd)
                if dev == "cuda":
                    torch.cuda.synchronize()
                return out

            with torch.no_grad():
                t0 = time.perf_counter()
                y = step()
                sec = time.perf_counter() - t0 if interp else _time(step)
            row.update(max_err=(y.float().cpu() - refs[which]).abs().max().item(), img_per_s=xd.shape[0] / sec,
                       note="Triton interpreter on the CPU, 1 photo at 112 px: a correctness check, not a speed"
                       if interp else "")
    model.dynamic_img_size = False
    model.to(device="cpu", dtype=torch.float32).set_backend(None)
    if out:
        os.makedirs(out, exist_ok=True)
        from . import viz

        for photo, n in zip(photos, names):
            viz.render_all(model, photo, os.path.join(out, n), preprocessor=pre)
    return rows


def cmd_demo(args) -> int:
    t0 = time.perf_counter()
    rows = run_demo(args.model, args.out, interpret=not args.no_interpret)
    print(f"fastvit demo: {args.model} (random weights, seed 0, sin-cos position embedding) on the scikit-image "
          "photos chelsea, astronaut")
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


def cmd_convert(args) -> int:
    from .factory import convert

    dst = convert(args.src, args.dst, model_name=args.model)
    print(f"wrote {os.path.join(dst, 'model.safetensors')} and {os.path.join(dst, 'config.json')}")
    return 0


def add_convert_parser(sub) -> None:
    """Register ``fastvit convert SRC DST`` on an argparse subparsers object."""
    s = sub.add_parser("convert", help="write a timm / Hugging Face checkpoint as a fastvit folder")
    s.add_argument("src", help="HF / timm / fastvit folder, hub name 'org/name', or a state-dict file")
    s.add_argument("dst", help="output folder (model.safetensors + config.json)")
    s.add_argument("--model", help="architecture for a state-dict file (a name of fastvit.list_models())")
    s.set_defaults(func=cmd_convert)


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
    from .embed_cli import add_embed_parser
    from .serve.cli import add_serve_parser
    from .viz import add_viz_parser

    add_viz_parser(sub)
    add_classify_parser(sub)
    add_embed_parser(sub)
    add_convert_parser(sub)
    add_serve_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

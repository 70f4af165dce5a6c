"""Command-line plumbing the jobs share (``classify``, ``embed``, ``serve``): the model options,
the data-path options, the device choice and loading the model they name."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["DTYPES", "PREPROCESS_MODES", "DECODE_CHOICES", "add_model_args", "add_data_args", "check_model_args",
           "cli_device", "cli_model", "data_options"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PREPROCESS_MODES = ("exact", "fast")
DECODE_CHOICES = ("cpu", "cuda")


def add_model_args(s, what: str, preprocess_default: str = "exact") -> None:
    """The options ``classify`` and ``embed`` share: inputs, model, batching, device, progress,
    and the data path (:func:`add_data_args`)."""
    s.add_argument("paths", nargs="*", help="image files and / or folders (walked recursively, sorted)")
    s.add_argument("--list", action="append", default=[], metavar="FILE", dest="list_files",
                   help="a text file of image paths, one a line ('#' comments); repeatable; its entries "
                        "come after PATHS, in file order")
    s.add_argument("--checkpoint", help="model folder, hub name 'org/name', or a state-dict file (with --model)")
    s.add_argument("--model", help="preset name (fastvit.list_models()), needed for state-dict files; alone: "
                                   "random weights (seed 0), for trying the pipeline")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    s.add_argument("--backend", help="triton, cuda or torch (default: auto)")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu; under torchrun "
                                    "cuda:LOCAL_RANK)")
    s.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes decoding images (0: in the main process)")
    s.add_argument("--no-progress", action="store_true", help=f"no progress bar while {what}")
    add_data_args(s, preprocess_default)


def add_data_args(s, preprocess_default: str = "exact") -> None:
    """``--preprocess exact|fast`` and ``--decode cpu|cuda``."""
    s.add_argument("--preprocess", default=preprocess_default, choices=PREPROCESS_MODES,
                   help="exact: bit-exact with the checkpoint's processor (timm / Hugging Face); fast: JPEG "
                        "DCT-domain downscaling at decode + uint8 area resize, several times faster on large "
                        f"photos (distance to exact in the README; default {preprocess_default})")
    s.add_argument("--decode", default="cpu", choices=DECODE_CHOICES,
                   help="cpu: decode in the worker processes; cuda: workers only read bytes, JPEGs are decoded "
                        "in batches by nvJPEG on the GPU (other formats on the CPU)")


def check_model_args(args, prog: str) -> None:
    if args.checkpoint is None and args.model is None:
        raise SystemExit(f"{prog}: expected --checkpoint (and --model for a state-dict file) or --model alone for "
                         "random weights, got neither")
    if not args.paths and not args.list_files:
        raise SystemExit(f"{prog}: expected image files, folders or --list FILE, got none")
    if args.batch_size < 1:
        raise SystemExit(f"{prog}: --batch-size expected >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise SystemExit(f"{prog}: --workers expected >= 0, got {args.workers}")


def data_options(args, prog: str, device: str) -> dict:
    """``preprocess`` / ``decode`` keyword arguments of the jobs, checked against the device."""
    if args.decode == "cuda" and not str(device).startswith("cuda"):
        raise SystemExit(f"{prog}: --decode cuda expected a CUDA device, got --device {device}")
    return dict(preprocess=args.preprocess, decode=args.decode)


def cli_device(args, world: int) -> str:
    """``--device``, else cuda when available (``cuda:LOCAL_RANK`` under torchrun), else cpu."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device


def cli_model(args, prog: str):
    """(model, preprocessor) of ``--checkpoint`` / ``--model``; a preset alone gets random weights
    (seed 0: the same model on every rank and every rerun) and a notice on stderr."""
    from .factory import load_model

    if args.checkpoint is None:
        print(f"{prog}: no --checkpoint, so {args.model} has random weights (seed 0)", file=sys.stderr)
        torch.manual_seed(0)
    return load_model(args.checkpoint, args.model, backend=args.backend)



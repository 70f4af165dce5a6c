"""Classify files and folders of images: DataLoader workers, progress bar, CSV / JSONL output,
and ``torchrun --nproc-per-node N -m fastvit classify ...`` to shard the inputs over processes.

Sharding is strided (rank r takes inputs r, r + N, ...), each result carries its input index,
and the shards are merged with ``all_gather_object`` and sorted back into input order, so the
output is the same whatever N is.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess import IMAGE_EXTENSIONS, Preprocessor, topk_predictions

__all__ = ["expand_inputs", "ImageFiles", "classify", "write_results", "add_classify_parser", "cmd_classify"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def expand_inputs(paths: Sequence[str]) -> List[str]:
    """Files as given, folders walked recursively (sorted, image extensions only), in argument order."""
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for root, dirs, files in os.walk(p):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"inputs: expected existing image files or folders, got {p!r}")
    if not out:
        raise ValueError(f"inputs: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {list(paths)}")
    return out


class ImageFiles(Dataset):
    """(index, image (3, H, W) float32) for each of ``files[indices]``, preprocessed in the worker."""

    def __init__(self, files: Sequence[str], preprocessor: Preprocessor, indices: Optional[Sequence[int]] = None):
        self.files = list(files)
        self.indices = list(range(len(self.files))) if indices is None else list(indices)
        self.pre = preprocessor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        return idx, self.pre.process(self.files[idx])


def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world


def classify(inputs: Sequence[str], model, preprocessor: Preprocessor, batch_size: int = 32, topk: int = 5,
             num_workers: int = 0, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             progress: bool = False) -> List[Dict[str, Any]]:
    """Top-k predictions for every image in ``inputs`` (files / folders), in input order.

    Inside an initialised ``torch.distributed`` group each rank classifies its shard and every
    rank returns the merged list.

    Returns:
        one dict per image: ``{"path", "topk": [{"index", "label", "prob"}, ...]}``.
    """
    if batch_size < 1 or topk < 1:
        raise ValueError(f"batch_size / topk: expected >= 1, got {batch_size} / {topk}")
    if not model.num_classes:
        raise ValueError("model: expected a classifier (num_classes > 0), got a model without a head")
    files = expand_inputs(inputs)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device=device, dtype=dtype).eval()
    dtype = next(model.parameters()).dtype
    data = ImageFiles(files, preprocessor, range(rank, len(files), world))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a dependency
        tqdm = None
    bar = tqdm(total=len(files), unit="img", disable=not progress or rank != 0, file=sys.stderr,
               desc="classify") if tqdm else None
    mine: List[Dict[str, Any]] = []
    with torch.inference_mode():
        for idx, x in loader:
            logits = model(x.to(device=device, dtype=dtype, non_blocking=True))
            for i, top in zip(idx.tolist(), topk_predictions(logits, topk, preprocessor.id2label)):
                mine.append({"index": i, "path": files[i], "topk": top})
            if bar is not None:
                bar.update(len(idx) * world)  # rank 0 sees its shard; the others run at the same pace
    if bar is not None:
        bar.close()
    if dist and world > 1:
        print(f"fastvit classify: rank {rank} of {world} classified {len(mine)} of {len(files)} images",
              file=sys.stderr)
        parts: List[Any] = [None] * world
        torch.distributed.all_gather_object(parts, mine)
        mine = [r for part in parts for r in part]
    mine.sort(key=lambda r: r["index"])
    if [r["index"] for r in mine] != list(range(len(files))):
        raise RuntimeError(f"classify: merged {len(mine)} results for {len(files)} inputs")
    return [{"path": r["path"], "topk": r["topk"]} for r in mine]


def write_results(results: Sequence[Dict[str, Any]], path: str) -> str:
    """``.csv`` (path, top1_index, top1_label, top1_prob, top2_...) or ``.jsonl`` (one object per image)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".jsonl"):
        raise ValueError(f"output: expected a .csv or .jsonl file name, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        if ext == ".jsonl":
            for r in results:
                f.write(json.dumps(r) + "\n")
        else:
            k = max((len(r["topk"]) for r in results), default=0)
            w = csv.writer(f)
            w.writerow(["path"] + [f"top{j + 1}_{c}" for j in range(k) for c in ("index", "label", "prob")])
            for r in results:
                w.writerow([r["path"]] + [v for t in r["topk"] for v in (t["index"], t["label"], f"{t['prob']:.6g}")])
    return path


# --------------------------------------------------------------------------- command line
def add_classify_parser(sub) -> None:
    """Register ``fastvit classify PATH... --checkpoint ...``."""
    s = sub.add_parser("classify", help="top-k classes for image files / folders (torchrun for many processes)")
    s.add_argument("paths", nargs="+", help="image files and / or folders (walked recursively)")
    s.add_argument("--checkpoint", help="model folder, hub name 'org/name', or a state-dict file (with --model)")
    s.add_argument("--model", help="preset name (fastvit.list_models()), needed for state-dict files")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    s.add_argument("--backend", help="triton, cuda or torch (default: auto)")
    s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    s.add_argument("--topk", type=int, default=5)
    s.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    s.add_argument("--output", "-o", help="results file, .csv or .jsonl (default: print to stdout)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_classify)


def cmd_classify(args) -> int:
    from .factory import load_model

    if args.checkpoint is None and args.model is None:
        raise SystemExit("fastvit classify: expected --checkpoint (and --model for a state-dict file), got neither")
    if args.output:
        ext = os.path.splitext(args.output)[1].lower()
        if ext not in (".csv", ".jsonl"):
            raise SystemExit(f"fastvit classify: --output expected a .csv or .jsonl file, got {args.output!r}")
    rank, world = _dist_info()
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        # NCCL moves the gathered results through the GPUs; gloo serves CPU-only runs
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        started = True
    device = args.device or ("cuda" if use_cuda else "cpu")
    if use_cuda and world > 1:
        device = f"cuda:{torch.cuda.current_device()}"
    try:
        if args.checkpoint is None:
            print(f"fastvit classify: no --checkpoint, so {args.model} has random weights (seed 0)", file=sys.stderr)
            torch.manual_seed(0)  # the same random model on every rank
        model, pre = load_model(args.checkpoint, args.model, backend=args.backend)
        results = classify(args.paths, model, pre, batch_size=args.batch_size, topk=args.topk,
                           num_workers=args.workers, device=device, dtype=_DTYPES[args.dtype],
                           progress=not args.no_progress)
        if rank == 0:
            if args.output:
                write_results(results, args.output)
                print(f"wrote {len(results)} results to {args.output}", file=sys.stderr)
            else:
                for r in results:
                    print(r["path"] + "\t" + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["topk"]))
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0

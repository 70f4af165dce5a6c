"""Classify files and folders of images: DataLoader workers, progress bar, CSV / JSONL output,
and ``torchrun --nproc-per-node N -m fastvit classify ...`` to shard the inputs over processes.

Sharding is strided (rank r takes inputs r, r + N, ...), each result carries its input index,
and the shards are merged with ``all_gather_object`` and sorted back into input order, so the
output is the same whatever N is. A file that cannot be read or decoded is skipped and reported
with its reason (``Results.skipped``); every other image gets its result.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .cliargs import DTYPES, add_model_args, check_model_args, cli_device, cli_model, data_options
from .imagefiles import ImageFiles, batches_of, dist_info, expand_inputs, input_model, progress_bar, run_batches
from .preprocess import Preprocessor, topk_predictions

__all__ = ["expand_inputs", "ImageFiles", "Results", "classify", "write_results", "write_skipped",
           "add_classify_parser", "add_model_args", "cli_model", "cmd_classify"]

_DTYPES = DTYPES  # older name
_dist_info = dist_info  # older name


class Results(list):
    """The per-image results (a list, in input order) and ``skipped``: ``[{"path", "reason"}, ...]``,
    the inputs that could not be read or decoded, in input order."""

    def __init__(self, results=(), skipped=()):
        super().__init__(results)
        self.skipped: List[Dict[str, str]] = list(skipped)


def classify(inputs: Sequence[str], model, preprocessor: Preprocessor, batch_size: int = 32, topk: int = 5,
             num_workers: int = 0, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             progress: bool = False, list_files: Sequence[str] = (), preprocess: str = "exact",
             decode: str = "cpu") -> Results:
    """Top-k predictions for every readable image in ``inputs`` (files / folders, then the entries
    of ``list_files``), in input order.

    ``preprocess``: 'exact' (bit-exact with the checkpoint's processor) or 'fast' (see
    :meth:`Preprocessor.load`); ``decode``: 'cpu' (DataLoader workers) or 'cuda' (batched nvJPEG).
    Images travel to the device as uint8; the model normalises them (its input normalisation is
    set from ``preprocessor``).

    Inside an initialised ``torch.distributed`` group each rank classifies its shard and every
    rank returns the merged list.

    Returns:
        :class:`Results`: one dict per good image ``{"path", "topk": [{"index", "label", "prob"}, ...]}``;
        ``.skipped`` lists the files that could not be read or decoded ``{"path", "reason"}``.
    """
    if batch_size < 1 or topk < 1:
        raise ValueError(f"batch_size / topk: expected >= 1, got {batch_size} / {topk}")
    if not model.num_classes:
        raise ValueError("model: expected a classifier (num_classes > 0), got a model without a head")
    files = expand_inputs(inputs, list_files)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device=device, dtype=dtype).eval()
    dtype = next(model.parameters()).dtype
    to_float = input_model(model, preprocessor)
    bar = progress_bar(len(files), "classify", progress and rank == 0)
    mine: List[Dict[str, Any]] = []
    bad: List[Dict[str, Any]] = []

    def step(n):
        if bar is not None:
            bar.update(n * world)  # rank 0 sees its shard; the others run at the same pace

    batches = batches_of(range(rank, len(files), world), batch_size)
    for idx, logits, skipped in run_batches(model, files, preprocessor, batches, device, dtype, num_workers, step,
                                            mode=preprocess, decode=decode, normalize=to_float):
        if logits is not None:
            for i, top in zip(idx, topk_predictions(logits, topk, preprocessor.id2label)):
                mine.append({"index": i, "path": files[i], "topk": top})
        bad += [{"index": i, "path": files[i], "reason": r} for i, r in skipped]
    if bar is not None:
        bar.close()
    if dist and world > 1:
        print(f"fastvit classify: rank {rank} of {world} classified {len(mine)} of {len(files)} images"
              + (f" ({len(bad)} skipped)" if bad else ""), file=sys.stderr)
        parts: List[Any] = [None] * world
        torch.distributed.all_gather_object(parts, (mine, bad))
        mine = [r for part in parts for r in part[0]]
        bad = [r for part in parts for r in part[1]]
    mine.sort(key=lambda r: r["index"])
    bad.sort(key=lambda r: r["index"])
    if sorted([r["index"] for r in mine] + [r["index"] for r in bad]) != list(range(len(files))):
        raise RuntimeError(f"classify: merged {len(mine)} results and {len(bad)} skipped for {len(files)} inputs")
    return Results([{"path": r["path"], "topk": r["topk"]} for r in mine],
                   [{"path": r["path"], "reason": r["reason"]} for r in bad])


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


def write_skipped(skipped: Sequence[Dict[str, Any]], path: str) -> str:
    """The skipped inputs as JSON lines ``{"path", "reason"}`` (written atomically). Returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for r in skipped:
            f.write(json.dumps({"path": r["path"], "reason": r["reason"]}) + "\n")
    os.replace(tmp, path)
    return path


def report_skipped(prog: str, skipped: Sequence[Dict[str, Any]], where: Optional[str] = None, show: int = 20) -> None:
    """Tell stderr which inputs were skipped and why (the first ``show`` of them, and where the rest are)."""
    if not skipped:
        return
    print(f"{prog}: skipped {len(skipped)} unreadable input(s)" + (f", listed in {where}" if where else "") + ":",
          file=sys.stderr)
    for r in skipped[:show]:
        print(f"  {r['path']}: {r['reason']}", file=sys.stderr)
    if len(skipped) > show:
        print(f"  ... and {len(skipped) - show} more", file=sys.stderr)


# --------------------------------------------------------------------------- command line
def add_classify_parser(sub) -> None:
    """Register ``fastvit classify PATH... --checkpoint ...``."""
    s = sub.add_parser("classify", help="top-k classes for image files / folders (torchrun for many processes)")
    add_model_args(s, "classifying", preprocess_default="exact")
    s.add_argument("--topk", type=int, default=5)
    s.add_argument("--output", "-o", help="results file, .csv or .jsonl (default: print to stdout); skipped "
                                          "inputs go to <name>.skipped.jsonl beside it")
    s.set_defaults(func=cmd_classify)


def cmd_classify(args) -> int:
    prog = "fastvit classify"
    check_model_args(args, prog)
    if args.output:
        ext = os.path.splitext(args.output)[1].lower()
        if ext not in (".csv", ".jsonl"):
            raise SystemExit(f"{prog}: --output expected a .csv or .jsonl file, got {args.output!r}")
    rank, world = dist_info()
    device = cli_device(args, world)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        # NCCL moves the gathered results through the GPUs; gloo serves CPU-only runs
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        started = True
    try:
        model, pre = cli_model(args, prog)
        results = classify(args.paths, model, pre, batch_size=args.batch_size, topk=args.topk,
                           num_workers=args.workers, device=device, dtype=DTYPES[args.dtype],
                           progress=not args.no_progress, list_files=args.list_files,
                           **data_options(args, prog, device))
        if rank == 0:
            where = None
            if args.output:
                write_results(results, args.output)
                print(f"wrote {len(results)} results to {args.output}", file=sys.stderr)
                if results.skipped:
                    where = write_skipped(results.skipped, os.path.splitext(args.output)[0] + ".skipped.jsonl")
            else:
                for r in results:
                    print(r["path"] + "\t" + ", ".join(f"{t['label']} ({t['prob']:.3f})" for t in r["topk"]))
            report_skipped(prog, results.skipped, where)
    finally:
        if started:
            torch.distributed.destroy_process_group()
    return 0

"""Bulk image embeddings that never lose work: ``fastvit embed`` and its Python API.

``embed_to_dir`` writes the embeddings of an ordered list of images (files, folders walked in
sorted order, list files) as shards in an output folder::

    OUT_DIR/manifest.json            what the run is: inputs hash, model fingerprint, embedding, ...
    OUT_DIR/shard-00000.safetensors  "embeddings" (rows, D) float32 + "index" (rows,) int64 input indices
    OUT_DIR/shard-00000.json         sidecar: paths in row order, input indices, skipped files with reasons,
                                     data size and sha256; written last, it marks the shard finished
    OUT_DIR/skipped.jsonl            every unreadable input {"index", "path", "reason"}, in input order
    OUT_DIR/summary.json             totals (inputs, embedded, skipped, shards) and this run's time and img/s

(``.npy`` shards with ``fmt="npy"``: the array alone, the indices in the sidecar.)

* **Deterministic**: shard i holds inputs ``[i * shard_size, (i + 1) * shard_size)`` of the ordered
  list, and batches never cross a shard, so a shard's bytes depend only on the inputs, the model
  and the options (on the same device, backend and batch size), not on the number of processes or
  on what ran before.
* **Resumable**: each file is written to a temporary name and moved into place with
  ``os.replace``, data first, sidecar last; a rerun over the same inputs and folder keeps every
  shard whose sidecar matches the run and recomputes the rest, giving the same files as an
  uninterrupted run. A folder holding another run (other inputs, model or options) is refused
  with the differences named, unless ``overwrite=True`` (``--overwrite``) starts it afresh.
* **Never aborts on a bad file**: a missing, empty, truncated or undecodable image is skipped,
  listed with its reason in the shard's sidecar and in ``skipped.jsonl``, and counted.
* **Many processes** (``torchrun --nproc-per-node 8 -m fastvit embed ...``, or any launcher that
  sets ``RANK`` / ``WORLD_SIZE``): rank r writes shards r, r + W, r + 2W, ...; no process group
  is needed. The process that finds every shard finished writes ``skipped.jsonl`` and
  ``summary.json`` (each rank also leaves ``summary-rank{r}-of-{W}.json``).

What is embedded (``embedding=``): ``"pooled"`` is ``model.forward_head(features, pre_logits=True)``
(the pooled, normalised token); ``"projected"`` is the model's head when the model is a CLIP /
SigLIP-style image tower whose head is a projection (see :func:`has_projection`: a true
``has_projection``, ``head_type == "projection"``, or a bias-free linear head as Hugging Face
CLIP's ``visual_projection``); ``"logits"`` is a classifier's
head; ``"auto"`` (default) is "projected" when the model has a projection, else "pooled".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .imagefiles import batches_of, dist_info, expand_inputs, progress_bar, read_list_file, run_batches
from .naflex import batch_runner
from .preprocess import Preprocessor

__all__ = ["EMBEDDINGS", "FORMATS", "RunMismatch", "has_projection", "embedding_fn", "iter_embeddings",
           "embed_to_dir", "load_embeddings", "add_embed_parser", "cmd_embed"]

EMBEDDINGS = ("auto", "pooled", "projected", "logits")
FORMATS = ("safetensors", "npy")
LAYOUT = 1  # version of the folder layout; part of the run key
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
# Fields of the manifest that make two runs the same run: a finished shard is reused only when
# all of them match. Batch size, workers, device and backend are recorded but not compared (a
# resumed run may use another GPU or a smaller batch; its new shards then may differ in the last bits).
_KEY_FIELDS = ("layout", "inputs", "inputs_sha256", "shard_size", "format", "embedding", "normalize", "dtype",
               "model_fingerprint", "preprocess")


class RunMismatch(ValueError):
    """The output folder holds another run (other inputs, model or options)."""


# --------------------------------------------------------------------------- what is embedded
def has_projection(model) -> bool:
    """Whether ``model``'s head is an embedding projection (CLIP / SigLIP-style image tower) rather
    than a classifier. A model says so explicitly with ``has_projection`` (attribute, property or
    method) or ``head_type == "projection"``; otherwise a ``head`` that is an ``nn.Linear`` without
    bias counts as a projection (Hugging Face CLIP's ``visual_projection``, as
    :func:`fastvit.factory.hf_outputs` reads it: classifier heads have a bias)."""
    flag = getattr(model, "has_projection", None)
    if callable(flag):
        flag = flag()
    if flag is not None:
        return bool(flag)
    if getattr(model, "head_type", None) is not None:
        return model.head_type == "projection"
    head = getattr(model, "head", None)
    return isinstance(head, nn.Linear) and head.bias is None


def _describe_head(model) -> str:
    n = getattr(model, "num_classes", 0)
    return f"a {n}-class classifier head" if n else "no head (num_classes=0)"


def embedding_fn(model, embedding: str = "auto") -> Tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(images (B, 3, H, W) -> embeddings (B, D), the resolved embedding name) for ``model``.

    Raises ValueError naming what the model has when it lacks what ``embedding`` asks for.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding: expected one of {EMBEDDINGS}, got {embedding!r}")
    proj = has_projection(model)
    name = type(model).__name__
    if embedding == "auto":
        embedding = "projected" if proj else "pooled"
    if embedding == "projected" and not proj:
        raise ValueError(f"embedding: 'projected' needs a model whose head is a projection (a CLIP / SigLIP-style "
                         f"image tower), got a {name} with {_describe_head(model)}; use 'pooled' (pre-logits "
                         "features)" + (" or 'logits'" if getattr(model, "num_classes", 0) else ""))
    if embedding == "logits":
        if proj:
            raise ValueError(f"embedding: 'logits' needs a classifier, got a {name} whose head is a projection; "
                             "use 'projected' or 'pooled'")
        if not getattr(model, "num_classes", 0):
            raise ValueError(f"embedding: 'logits' needs a classifier head, got a {name} with "
                             f"{_describe_head(model)}; use 'pooled'")
    pre_logits = embedding == "pooled"

    def fn(x: torch.Tensor) -> torch.Tensor:
        out = model.forward_head(model.forward_features(x), pre_logits=pre_logits)
        if out.dim() != 2:
            raise ValueError(f"embedding {embedding!r}: expected (B, D) per image batch, got shape "
                             f"{tuple(out.shape)} (global_pool={getattr(model, 'global_pool', None)!r}: a model "
                             "that does not pool returns tokens)")
        return out

    return fn, embedding


def _finish(out: torch.Tensor, normalize: bool) -> torch.Tensor:
    """float32 (B, D), L2-normalised along D when asked."""
    out = out.float()
    return F.normalize(out, dim=-1) if normalize else out


def _prepare(model, device, dtype):
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device=device, dtype=dtype).eval()
    return model, device, next(model.parameters()).dtype


# --------------------------------------------------------------------------- Python API
def iter_embeddings(model, preprocessor: Preprocessor, paths: Sequence[str], batch_size: int = 32,
                    embedding: str = "auto", normalize: bool = False, num_workers: int = 0,
                    device: Optional[str] = None, dtype: Optional[torch.dtype] = None, expand: bool = True,
                    on_skip: Optional[Callable[[str, str], None]] = None, max_tokens: Optional[int] = None
                    ) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """Embed images batch by batch: yields ``(paths, embeddings (b, D) float32 on the CPU)``.

    Args:
        paths: image files and folders (walked recursively, sorted), or with ``expand=False`` the
            exact ordered list of files (no disk access up front).
        embedding: 'auto', 'pooled', 'projected' or 'logits' (see the module docstring).
        normalize: L2-normalise each embedding.
        on_skip: called ``on_skip(path, reason)`` for each file that cannot be read or decoded;
            by default a warning. Such files are left out of the batches (b <= batch_size).
        max_tokens: NaFlex models (a NaFlexPreprocessor): at most this many tokens per packed
            forward (a batch of mixed sizes is cut into runs; see :func:`fastvit.naflex.packed_batches`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    files = expand_inputs(paths) if expand else list(paths)
    model, device, dtype = _prepare(model, device, dtype)
    fn, embedding = embedding_fn(model, embedding)
    run = batch_runner(model, preprocessor, embedding, max_tokens, run_batches)
    for idx, out, bad in run(fn, files, preprocessor, batches_of(range(len(files)), batch_size), device,
                             dtype, num_workers):
        for i, reason in bad:
            if on_skip is not None:
                on_skip(files[i], reason)
            else:
                warnings.warn(f"iter_embeddings: skipped {files[i]!r}: {reason}", stacklevel=2)
        if out is not None:
            yield [files[i] for i in idx], _finish(out, normalize).cpu()


def _inputs_sha256(files: Sequence[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(os.fsencode(f) + b"\n")
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """sha256 of the model's architecture (module tree, pooling), parameter names, shapes, dtypes and
    4096 evenly spaced values of each tensor: cheap on a big model, and any other checkpoint differs."""
    h = hashlib.sha256()
    h.update(f"{type(model).__name__}\n{getattr(model, 'global_pool', None)!r}\n{model}\n".encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096].contiguous().cpu()
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\n".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _run_key(manifest: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: manifest[k] for k in _KEY_FIELDS}, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent / old or complete: a temporary
    file beside it, flushed to disk, then ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class _Layout:
    """Names and slices of a run's shards."""

    def __init__(self, out_dir: str, n: int, shard_size: int, fmt: str):
        self.out_dir, self.n, self.size, self.fmt = out_dir, n, shard_size, fmt
        self.num = -(-n // shard_size)
        self.width = max(5, len(str(self.num - 1)))

    def name(self, i: int) -> str:
        return f"shard-{i:0{self.width}d}"

    def data(self, i: int) -> str:
        return os.path.join(self.out_dir, f"{self.name(i)}.{self.fmt}")

    def sidecar(self, i: int) -> str:
        return os.path.join(self.out_dir, f"{self.name(i)}.json")

    def range(self, i: int) -> range:
        return range(i * self.size, min((i + 1) * self.size, self.n))

    def finished(self, i: int, run_key: str) -> Optional[dict]:
        """The sidecar of shard i when the shard is finished for this run (sidecar of this run,
        data file of the recorded size), else None."""
        meta = _read_json(self.sidecar(i))
        if not meta or meta.get("run_key") != run_key:
            return None
        try:
            return meta if os.path.getsize(self.data(i)) == meta["bytes"] else None
        except (OSError, KeyError):
            return None


def _encode(emb: torch.Tensor, indices: Sequence[int], fmt: str) -> bytes:
    if fmt == "safetensors":
        from safetensors.torch import save

        # one metadata key only: safetensors writes a metadata map in hash order, which would
        # make the bytes differ from run to run
        return save({"embeddings": emb.contiguous(), "index": torch.tensor(list(indices), dtype=torch.int64)},
                    metadata={"format": "pt"})
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, emb.numpy(), allow_pickle=False)
    return buf.getvalue()


def _check_manifest(out_dir: str, manifest: Dict[str, Any], overwrite: bool) -> None:
    """Check that the folder's manifest is this run's, or (new folder, or ``overwrite``) write it
    and remove the reports of the run it replaces."""
    path = os.path.join(out_dir, MANIFEST)
    old = _read_json(path)
    if old is not None and old.get("run_key") == manifest["run_key"]:
        return
    if old is not None and not overwrite:
        diff = [k for k in _KEY_FIELDS if old.get(k) != manifest[k]] or ["run_key"]
        raise RunMismatch(f"out_dir: {out_dir!r} holds another embedding run (differs in {', '.join(diff)}); pass "
                          "overwrite=True (--overwrite) to start afresh there, or choose another folder")
    _atomic_write(path, (json.dumps(manifest, indent=1) + "\n").encode())
    for name in (SKIPPED, SUMMARY):
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass


_SHARD_FILE = re.compile(r"shard-(\d+)\.(safetensors|npy|json)(\.tmp-\d+)?$")


def _clean(layout: _Layout, rank: int, world: int) -> None:
    """Remove this process's leftovers: temporary files of a killed run, and shard files no shard
    of this run has (another format, or beyond the last shard of a replaced run). Each process
    touches only the shard numbers it owns (i % world == rank)."""
    for f in os.listdir(layout.out_dir):
        m = _SHARD_FILE.match(f)
        if not m or int(m.group(1)) % world != rank:
            continue
        i, ext, tmp = int(m.group(1)), m.group(2), m.group(3)
        if tmp or i >= layout.num or ext not in (layout.fmt, "json") or f"{layout.name(i)}." not in f:
            try:
                os.remove(os.path.join(layout.out_dir, f))
            except OSError:
                pass


@contextlib.contextmanager
def _lock(out_dir: str):
    """An exclusive lock on ``out_dir/.lock`` while finishing a run (unlocked where flock is unavailable)."""
    try:
        import fcntl

        f = open(os.path.join(out_dir, ".lock"), "a")
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # some network filesystems refuse locks
            pass
        yield
    finally:
        f.close()


def _aggregate(ranks: List[Dict[str, Any]]) -> Dict[str, Any]:
    seconds = max((r["seconds"] for r in ranks), default=0.0)
    done = sum(r["embedded"] for r in ranks)
    return dict(processes=len(ranks), seconds=round(seconds, 3), embedded=done,
                skipped=sum(r["skipped"] for r in ranks),
                shards_written=sum(r["shards_written"] for r in ranks),
                shards_reused=sum(r["shards_reused"] for r in ranks),
                img_per_s=round(done / seconds, 2) if seconds > 0 else None)


def _finish_run(layout: _Layout, manifest: Dict[str, Any], world: int, own: Dict[str, Any]) -> Optional[dict]:
    """When every shard is finished: write skipped.jsonl and summary.json; return the summary (else None)."""
    with _lock(layout.out_dir):
        metas = []
        for i in range(layout.num):
            meta = layout.finished(i, manifest["run_key"])
            if meta is None:
                return None
            metas.append(meta)
        skipped = [s for m in metas for s in m["skipped"]]
        _atomic_write(os.path.join(layout.out_dir, SKIPPED), "".join(json.dumps(s) + "\n" for s in skipped).encode())
        ranks = [own]
        if world > 1:
            ranks = [_read_json(os.path.join(layout.out_dir, f"summary-rank{r}-of-{world}.json")) for r in range(world)]
            ranks = [r for r in ranks if r is not None]
        summary = dict(complete=True, inputs=layout.n, embedded=sum(m["rows"] for m in metas), skipped=len(skipped),
                       shards=layout.num, dim=metas[0]["dim"], format=layout.fmt, embedding=manifest["embedding"],
                       normalize=manifest["normalize"], skipped_file=SKIPPED, run=_aggregate(ranks), ranks=ranks)
        _atomic_write(os.path.join(layout.out_dir, SUMMARY), (json.dumps(summary, indent=1) + "\n").encode())
        return summary


def embed_to_dir(model, preprocessor: Preprocessor, paths: Sequence[str], out_dir: str, *,
                 list_files: Sequence[str] = (), expand: bool = True, batch_size: int = 32,
                 embedding: str = "auto", normalize: bool = False, fmt: str = "safetensors",
                 shard_size: int = 10000, num_workers: int = 0, device: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, rank: Optional[int] = None, world_size: Optional[int] = None,
                 overwrite: bool = False, progress: bool = False, model_id: Optional[str] = None,
                 log: bool = True, max_tokens: Optional[int] = None) -> Dict[str, Any]:
    """Embed every image of ``paths`` (+ ``list_files``) into shards in ``out_dir`` (see the module
    docstring for the layout and the guarantees); this process's share only when ``world_size > 1``.

    Args:
        paths: files and folders (walked recursively, sorted); with ``expand=False`` the exact list of files.
        list_files: text files of image paths, one a line, appended after ``paths``.
        embedding: 'auto', 'pooled', 'projected' or 'logits'.
        normalize: L2-normalise each embedding.
        fmt: 'safetensors' or 'npy'.
        shard_size: images per shard (the last shard may be shorter).
        rank, world_size: this process's share (shards rank, rank + world_size, ...); default from
            the ``RANK`` / ``WORLD_SIZE`` environment (torchrun), else 0 / 1.
        overwrite: start afresh in a folder that holds another run (a folder holding this run is
            resumed either way, so a command line with ``--overwrite`` can be rerun safely).
        model_id: how the user named the model (recorded in the manifest; not compared).
        log: one line at the start and a summary at the end on stderr.
        max_tokens: NaFlex models: at most this many tokens per packed forward (see :func:`iter_embeddings`).

    Returns:
        this process's summary: shards (its share), shards_reused, shards_written, embedded,
        skipped, seconds, img_per_s; ``complete`` (every shard of the run finished) and, when
        complete, ``totals`` (the summary.json of the whole run).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size / shard_size: expected >= 1, got {batch_size} / {shard_size}")
    if rank is None or world_size is None:
        env_rank, env_world = dist_info()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank / world_size: expected 0 <= rank < world_size, got {rank} / {world_size}")
    if expand:
        files = expand_inputs(paths, list_files)
    else:
        files = list(paths) + [p for lf in list_files for p in read_list_file(lf)]
    if not files:
        raise ValueError("paths: expected at least one image, got none")
    model, device, dtype = _prepare(model, device, dtype)
    fn, embedding = embedding_fn(model, embedding)
    run = batch_runner(model, preprocessor, embedding, max_tokens, run_batches)
    os.makedirs(out_dir, exist_ok=True)
    layout = _Layout(out_dir, len(files), shard_size, fmt)
    manifest: Dict[str, Any] = dict(
        layout=LAYOUT, inputs=len(files), inputs_sha256=_inputs_sha256(files), shard_size=shard_size, format=fmt,
        embedding=embedding, normalize=bool(normalize), dtype=str(dtype).replace("torch.", ""),
        model_fingerprint=model_fingerprint(model), preprocess=json.loads(json.dumps(preprocessor.to_dict())),
        shards=layout.num, model=model_id, batch_size=batch_size)
    from .version import __version__

    manifest["fastvit_version"] = __version__
    manifest["run_key"] = run_key = _run_key(manifest)
    _check_manifest(out_dir, manifest, overwrite)

    mine = list(range(rank, layout.num, world_size))
    _clean(layout, rank, world_size)
    # a shard of a replaced run carries the old run key: it is not finished for this run
    todo = [i for i in mine if layout.finished(i, run_key) is None]
    who = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    n_todo = sum(len(layout.range(i)) for i in todo)
    if log:
        print(f"fastvit embed: {who}{len(mine) - len(todo)} of {len(mine)} shards already done in {out_dir}, "
              f"{len(todo)} to do ({n_todo} images)", file=sys.stderr)

    stats = dict(rank=rank, world_size=world_size, device=str(device), batch_size=batch_size,
                 backend=getattr(model, "backend", None), shards=len(mine), shards_reused=len(mine) - len(todo),
                 shards_written=0, embedded=0, skipped=0, seconds=0.0, img_per_s=None)
    t0 = time.perf_counter()
    if todo:
        h, w = preprocessor.output_size or model.patch_embed.img_size
        with torch.no_grad():  # D for a shard without a single readable image
            dim = fn(torch.zeros(1, 3, h, w, device=device, dtype=dtype)).shape[1]
        bar = progress_bar(n_todo, "embed", progress and rank == 0)
        for i in todo:  # a recomputed shard loses its finished mark first
            try:
                os.remove(layout.sidecar(i))
            except OSError:
                pass
        batches = [b for i in todo for b in batches_of(layout.range(i), batch_size)]
        cur, outs, rows, bad, seen = None, [], [], [], 0
        for idx, out, skipped in run(fn, files, preprocessor, batches, device, dtype, num_workers,
                                     bar.update if bar is not None else None):
            first = idx[0] if idx else skipped[0][0]
            if cur is None:
                cur = first // shard_size
            if out is not None:
                outs.append(out)
                rows += idx
            bad += skipped
            seen += len(idx) + len(skipped)
            if skipped and bar is not None:
                bar.set_postfix(skipped=stats["skipped"] + len(bad), refresh=False)
            if seen == len(layout.range(cur)):
                emb = _finish(torch.cat(outs), normalize).cpu() if outs else torch.zeros(0, dim)
                data = _encode(emb, rows, fmt)
                _atomic_write(layout.data(cur), data)
                meta = dict(layout=LAYOUT, shard=cur, file=os.path.basename(layout.data(cur)), format=fmt,
                            run_key=run_key, inputs_sha256=manifest["inputs_sha256"], start=layout.range(cur).start,
                            stop=layout.range(cur).stop, rows=len(rows), dim=int(emb.shape[1]), dtype="float32",
                            embedding=embedding, normalize=bool(normalize), bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), paths=[files[j] for j in rows], indices=rows,
                            skipped=[dict(index=j, path=files[j], reason=r) for j, r in bad])
                _atomic_write(layout.sidecar(cur), (json.dumps(meta, indent=1) + "\n").encode())
                stats["shards_written"] += 1
                stats["embedded"] += len(rows)
                stats["skipped"] += len(bad)
                cur, outs, rows, bad, seen = None, [], [], [], 0
        if bar is not None:
            bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["img_per_s"] = round(stats["embedded"] / stats["seconds"], 2) if stats["seconds"] > 0 else None
    if world_size > 1:
        _atomic_write(os.path.join(out_dir, f"summary-rank{rank}-of-{world_size}.json"),
                      (json.dumps(stats, indent=1) + "\n").encode())
    totals = _finish_run(layout, manifest, world_size, stats)
    if log:
        print(f"fastvit embed: {who}{stats['embedded']} images embedded, {stats['skipped']} skipped, in "
              f"{stats['seconds']:.1f} s ({stats['img_per_s'] or 0:.1f} img/s); {stats['shards_written']} shards "
              f"written, {stats['shards_reused']} already done", file=sys.stderr)
        if totals is not None:
            print(f"fastvit embed: all {totals['shards']} shards done: {totals['embedded']} of {totals['inputs']} "
                  f"images embedded ({totals['dim']}-d {embedding}{', L2-normalised' if normalize else ''}), "
                  f"{totals['skipped']} skipped" + (f" (listed in {os.path.join(out_dir, SKIPPED)})"
                                                    if totals["skipped"] else "")
                  + f"; summary in {os.path.join(out_dir, SUMMARY)}", file=sys.stderr)
    return dict(stats, complete=totals is not None, totals=totals)


def load_embeddings(out_dir: str) -> Tuple[List[str], torch.Tensor]:
    """(paths, embeddings (N, D) float32) of a finished ``embed_to_dir`` folder, in input order."""
    manifest = _read_json(os.path.join(out_dir, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"out_dir: expected {os.path.join(out_dir, MANIFEST)} (a fastvit embed folder)")
    layout = _Layout(out_dir, manifest["inputs"], manifest["shard_size"], manifest["format"])
    paths: List[str] = []
    parts = []
    for i in range(layout.num):
        meta = layout.finished(i, manifest["run_key"])
        if meta is None:
            raise FileNotFoundError(f"out_dir: shard {i} of {layout.num} is not finished in {out_dir!r} "
                                    "(rerun fastvit embed to complete it)")
        if layout.fmt == "safetensors":
            from safetensors.torch import load_file

            parts.append(load_file(layout.data(i))["embeddings"])
        else:
            import numpy as np

            parts.append(torch.from_numpy(np.load(layout.data(i), allow_pickle=False)))
        paths += meta["paths"]
    return paths, torch.cat(parts)


# --------------------------------------------------------------------------- command line
def add_embed_parser(sub) -> None:
    """Register ``fastvit embed PATH... -o OUT_DIR``."""
    from .classify import add_model_args

    s = sub.add_parser("embed", help="embeddings of image files / folders into resumable shards (torchrun for many "
                                     "processes)")
    add_model_args(s, "embedding")
    s.add_argument("--out-dir", "-o", required=True, help="output folder (shards, sidecars, skipped.jsonl, "
                                                          "summary.json); rerun with it to resume")
    s.add_argument("--embedding", default="auto", choices=EMBEDDINGS,
                   help="pooled: forward_head(pre_logits=True); projected: a CLIP / SigLIP-style tower's "
                        "projection head; logits: a classifier's head; auto: projected if the model has one, "
                        "else pooled")
    s.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    s.add_argument("--format", default="safetensors", choices=FORMATS, help="shard file format")
    s.add_argument("--shard-size", type=int, default=10000, help="images per shard (the unit of resumption)")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="NaFlex models: at most this many tokens per packed forward (images of mixed sizes in one "
                        "sequence; a batch is cut into runs within the budget)")
    s.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds another run (other inputs, model or options); "
                        "a folder of this same run is resumed either way")
    s.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from .classify import DTYPES, check_model_args, cli_device, cli_model

    prog = "fastvit embed"
    check_model_args(args, prog)
    if args.shard_size < 1:
        raise SystemExit(f"{prog}: --shard-size expected >= 1, got {args.shard_size}")
    rank, world = dist_info()
    device = cli_device(args, world)
    model, pre = cli_model(args, prog)
    try:
        embed_to_dir(model, pre, args.paths, args.out_dir, list_files=args.list_files, batch_size=args.batch_size,
                     embedding=args.embedding, normalize=args.normalize, fmt=args.format,
                     shard_size=args.shard_size, num_workers=args.workers, device=device, dtype=DTYPES[args.dtype],
                     rank=rank, world_size=world, overwrite=args.overwrite, progress=not args.no_progress,
                     max_tokens=args.max_tokens,
                     model_id=" ".join(f"--{k} {v}" for k, v in (("checkpoint", args.checkpoint),
                                                                ("model", args.model)) if v))
    except (RunMismatch, FileNotFoundError) as e:
        raise SystemExit(f"{prog}: {e}") from None
    except ValueError as e:
        if str(e).startswith(("embedding:", "inputs:", "max_tokens:")):
            raise SystemExit(f"{prog}: {e}") from None
        raise
    return 0

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

``embed_shards`` is the same for the datasets people hold at scale: webdataset tar shards (as
img2dataset writes them) and parquet files (brace patterns such as ``shards/{00000..00999}.tar``
expanded here), or slices of a file list, with one output shard per input shard in the format of
``fmt`` ('parquet', 'safetensors', 'npy', 'clip-retrieval'); the layout, the sidecars and the
resumption rule are :mod:`fastvit.data.writers`', the readers :mod:`fastvit.data.sources`'. It is
the local engine (one process, or rank r of a torchrun launch taking shards r, r + W, ...);
:mod:`fastvit.ray` is the Ray Data engine over the same readers and writers. :func:`embed_batch`
is one plain batch function (bytes / images in, (B, D) out) for Spark's ``predict_batch_udf`` or
a Daft UDF; :class:`ModelSpec` is a picklable description of the model that each engine process
builds once.

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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.writers import RunMismatch
from .imagefiles import batches_of, dist_info, expand_inputs, input_model, progress_bar, read_list_file, run_batches
from .naflex import batch_runner
from .preprocess import Preprocessor

__all__ = ["EMBEDDINGS", "FORMATS", "ALL_FORMATS", "RunMismatch", "ModelSpec", "has_projection", "embedding_fn",
           "embed_batch", "iter_embeddings", "embed_to_dir", "embed_shards", "load_embeddings"]

EMBEDDINGS = ("auto", "pooled", "projected", "logits")
FORMATS = ("safetensors", "npy")  # embed_to_dir's (layout 1)
ALL_FORMATS = ("parquet", "safetensors", "npy", "clip-retrieval")  # the sharded runs' (layout 2)
# `fastvit embed`'s --preprocess default (README "Images in" says why)
EMBED_PREPROCESS = "fast"
LAYOUT = 1  # version of the folder layout; part of the run key
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
# Fields of the manifest that make two runs the same run: a finished shard is reused only when
# all of them match. Batch size, workers, device and backend are recorded but not compared (a
# resumed run may use another GPU or a smaller batch; its new shards then may differ in the last bits).
_KEY_FIELDS = ("layout", "inputs", "inputs_sha256", "shard_size", "format", "embedding", "normalize", "dtype",
               "model_fingerprint", "preprocess")


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


def model_input(x: torch.Tensor, device, dtype) -> torch.Tensor:
    """A decoded batch (B, 3, H, W) on the model's device: float images in the model dtype, uint8
    pixels as they are (a model with its input normalisation set normalises them itself)."""
    cuda = torch.device(device).type == "cuda"
    if x.dtype == torch.uint8:
        return x.to(device=device, non_blocking=cuda)
    return x.to(device=device, dtype=dtype, non_blocking=cuda)


def _share(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """This process's (rank, world size): the arguments, else RANK / WORLD_SIZE (torchrun), checked."""
    if rank is None or world_size is None:
        env_rank, env_world = dist_info()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank / world_size: expected 0 <= rank < world_size, got {rank} / {world_size}")
    return rank, world_size


def _prepare(model, device, dtype):
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model = model.to(device=device, dtype=dtype).eval()
    return model, device, next(model.parameters()).dtype


# --------------------------------------------------------------------------- Python API
def iter_embeddings(model, preprocessor: Preprocessor, paths: Sequence[str], batch_size: int = 32,
                    embedding: str = "auto", normalize: bool = False, num_workers: int = 0,
                    device: Optional[str] = None, dtype: Optional[torch.dtype] = None, expand: bool = True,
                    on_skip: Optional[Callable[[str, str], None]] = None, preprocess: str = "exact",
                    decode: str = "cpu", max_tokens: Optional[int] = None
                    ) -> Iterator[Tuple[List[str], torch.Tensor]]:
    """Embed images batch by batch: yields ``(paths, embeddings (b, D) float32 on the CPU)``.

    Args:
        paths: image files and folders (walked recursively, sorted), or with ``expand=False`` the
            exact ordered list of files (no disk access up front).
        embedding: 'auto', 'pooled', 'projected' or 'logits' (see the module docstring).
        normalize: L2-normalise each embedding.
        on_skip: called ``on_skip(path, reason)`` for each file that cannot be read or decoded;
            by default a warning. Such files are left out of the batches (b <= batch_size).
        preprocess: 'exact' or 'fast' (:meth:`fastvit.Preprocessor.load`).
        decode: 'cpu' (in the workers) or 'cuda' (batched nvJPEG on the model's GPU).
        max_tokens: NaFlex models (a NaFlexPreprocessor): at most this many tokens per packed
            forward (a batch of mixed sizes is cut into runs; see :func:`fastvit.naflex.packed_batches`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    files = expand_inputs(paths) if expand else list(paths)
    model, device, dtype = _prepare(model, device, dtype)
    to_float = input_model(model, preprocessor)
    fn, embedding = embedding_fn(model, embedding)
    run = batch_runner(model, preprocessor, embedding, max_tokens, run_batches)
    for idx, out, bad in run(fn, files, preprocessor, batches_of(range(len(files)), batch_size), device,
                             dtype, num_workers, mode=preprocess, decode=decode, normalize=to_float):
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
                 log: bool = True, preprocess: str = "exact", decode: str = "cpu",
                 max_tokens: Optional[int] = None) -> Dict[str, Any]:
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
        preprocess: 'exact' or 'fast' (:meth:`fastvit.Preprocessor.load`); decode: 'cpu' or 'cuda'.
            Both are part of the run: a folder made with others is another run.
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
    rank, world_size = _share(rank, world_size)
    if expand:
        files = expand_inputs(paths, list_files)
    else:
        files = list(paths) + [p for lf in list_files for p in read_list_file(lf)]
    if not files:
        raise ValueError("paths: expected at least one image, got none")
    model, device, dtype = _prepare(model, device, dtype)
    to_float = input_model(model, preprocessor)
    fn, embedding = embedding_fn(model, embedding)
    run = batch_runner(model, preprocessor, embedding, max_tokens, run_batches)
    os.makedirs(out_dir, exist_ok=True)
    layout = _Layout(out_dir, len(files), shard_size, fmt)
    manifest: Dict[str, Any] = dict(
        layout=LAYOUT, inputs=len(files), inputs_sha256=_inputs_sha256(files), shard_size=shard_size, format=fmt,
        embedding=embedding, normalize=bool(normalize), dtype=str(dtype).replace("torch.", ""),
        model_fingerprint=model_fingerprint(model),
        preprocess=json.loads(json.dumps(dict(preprocessor.to_dict(), mode=preprocess, decode=decode))),
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
                                     bar.update if bar is not None else None, mode=preprocess,
                                     decode=decode, normalize=to_float):
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


def load_embeddings(out_dir: str, with_sources: bool = False):
    """The embeddings of a finished ``fastvit embed`` folder, any layout, in input order.

    Returns:
        ``(keys, embeddings (N, D))``: for an image-folder run (``embed_to_dir``) the paths and
        float32; for a sharded run (tar / parquet / file-list slices, any format) the samples' keys
        in shard order and the stored dtype (float32 or float16). ``with_sources=True`` adds the
        input shard of each row: ``(keys, sources, embeddings)``.
    """
    manifest = _read_json(os.path.join(out_dir, MANIFEST))
    if manifest is None:
        raise FileNotFoundError(f"out_dir: expected {os.path.join(out_dir, MANIFEST)} (a fastvit embed folder)")
    if manifest.get("layout") == 2:
        from .data.writers import load_run

        keys, sources, emb = load_run(out_dir, manifest)
        emb = torch.from_numpy(emb)
        return (keys, sources, emb) if with_sources else (keys, emb)
    layout = _Layout(out_dir, manifest["inputs"], manifest["shard_size"], manifest["format"])
    paths: List[str] = []
    sources: List[str] = []
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
        sources += [f"inputs[{meta['start']}:{meta['stop']}]"] * len(meta["paths"])
    emb = torch.cat(parts)
    return (paths, sources, emb) if with_sources else (paths, emb)


# --------------------------------------------------------------------------- one batch
def embed_batch(model, images_or_bytes, preprocessor: Optional[Preprocessor] = None, embedding: str = "auto",
                normalize: bool = False, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                on_error: str = "raise", preprocess: str = "exact") -> torch.Tensor:
    """Embeddings of one batch, float32 (B, D) on the CPU: the plain function a Spark
    ``predict_batch_udf`` or a Daft UDF wraps (see the README).

    Args:
        images_or_bytes: preprocessed images, a float tensor / array (B, 3, H, W) (uint8 pixels for a
            model with its input normalisation set); or a sequence
            (list, numpy object array, pandas / arrow column as a list) of encoded image bytes, PIL
            images, paths or uint8 arrays, preprocessed here with ``preprocessor``.
        preprocessor: the checkpoint's (``fastvit.factory.load_model``); needed unless the input
            is already preprocessed.
        on_error: 'raise' (ValueError naming the first unreadable image) or 'nan' (its row is NaN).
        preprocess: 'exact' or 'fast' decoding of encoded images (:meth:`Preprocessor.load`); the
            images reach the model as uint8 and the model's input normalisation is set from
            ``preprocessor``.
    """
    from .data.sources import decode_sample, reason_of

    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error: expected 'raise' or 'nan', got {on_error!r}")
    model, device, dtype = _prepare(model, device, dtype)
    to_float = input_model(model, preprocessor) if preprocessor is not None else None
    fn, _ = embedding_fn(model, embedding)

    def run(x: torch.Tensor) -> torch.Tensor:
        x = model_input(x, device, dtype)
        if to_float is not None and x.dtype == torch.uint8:
            x = to_float(x)
        with torch.no_grad():
            return _finish(fn(x), normalize).cpu()

    x = images_or_bytes
    if hasattr(x, "dtype") and hasattr(x, "shape") and getattr(x, "ndim", 0) == 4 and str(x.dtype) != "object":
        x = torch.as_tensor(x)
        if not x.is_floating_point() and not (x.dtype == torch.uint8 and getattr(model, "input_norm", None)):
            raise TypeError(f"images_or_bytes: expected a float (B, 3, H, W) batch (or uint8 for a model with its "
                            f"input normalisation set), got dtype {x.dtype}")
        return run(x)
    items = list(x)
    if preprocessor is None:
        raise ValueError("preprocessor: expected the checkpoint's Preprocessor to decode encoded images / paths, "
                         "got None")
    rows: List[Optional[torch.Tensor]] = []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray, memoryview)):
            _, t, reason = decode_sample(str(i), bytes(item), None, preprocessor, preprocess)
        else:
            try:
                float_exact = preprocess == "exact" and not preprocessor.uint8_exact
                t, reason = preprocessor.process(item) if float_exact else preprocessor.load(item, preprocess), None
            except Exception as e:  # decoders raise many types
                t, reason = None, reason_of(e)
        if t is None and on_error == "raise":
            raise ValueError(f"images_or_bytes: item {i} is not a readable image ({reason})")
        rows.append(t)
    good = [t for t in rows if t is not None]
    if not good:
        h, w = preprocessor.output_size or model.patch_embed.img_size
        with torch.no_grad():
            dim = fn(torch.zeros(1, 3, h, w, device=device, dtype=dtype)).shape[1]
        return torch.full((len(rows), dim), float("nan"))
    out = run(torch.stack(good))
    if len(good) == len(rows):
        return out
    full = torch.full((len(rows), out.shape[1]), float("nan"))
    full[torch.tensor([t is not None for t in rows])] = out
    return full


@dataclass(frozen=True)
class ModelSpec:
    """What to load, picklable: every engine process (a Ray actor, a Spark executor) builds its own
    model from it, once.

    Fields:
        checkpoint: model folder, hub name or state-dict file (as ``--checkpoint``).
        model: preset name (as ``--model``); alone: random weights, seed 0 (the same in every process).
        dtype: model dtype name ('float32', 'float16', 'bfloat16').
        backend: 'triton', 'cuda' or 'torch' (None: auto).
        embedding: 'auto', 'pooled', 'projected' or 'logits'.
        normalize: L2-normalise each embedding.
        device: torch device (None: cuda when available, else cpu).
    """

    checkpoint: Optional[str] = None
    model: Optional[str] = None
    dtype: str = "float32"
    backend: Optional[str] = None
    embedding: str = "auto"
    normalize: bool = False
    device: Optional[str] = None

    def __post_init__(self):
        from .classify import DTYPES

        if self.checkpoint is None and self.model is None:
            raise ValueError("model_spec: expected a checkpoint or a model name, got neither")
        if self.dtype not in DTYPES:
            raise ValueError(f"model_spec.dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"model_spec.embedding: expected one of {EMBEDDINGS}, got {self.embedding!r}")

    def load(self) -> Tuple[nn.Module, Preprocessor]:
        """(model on its device in eval mode, preprocessor)."""
        from .classify import DTYPES
        from .factory import load_model

        if self.checkpoint is None:
            torch.manual_seed(0)
        model, pre = load_model(self.checkpoint, self.model, backend=self.backend)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return model.to(device=device, dtype=DTYPES[self.dtype]).eval(), pre


class ShardProgress:
    """Progress of a sharded run on stderr: a tqdm bar over shards (done / total) with img/s and
    skipped, shared by every engine; a no-op when disabled or tqdm is missing."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str = "embed"):
        self.bar, self.images, self.skipped, self.t0 = None, 0, 0, time.perf_counter()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # progress is a nicety, not a dependency
                return
            self.bar = tqdm(total=total, initial=done, unit="shard", file=sys.stderr, desc=desc, dynamic_ncols=True)

    def update(self, images: int = 0, skipped: int = 0, shards: int = 0) -> None:
        self.images += images
        self.skipped += skipped
        if self.bar is not None:
            dt = time.perf_counter() - self.t0
            self.bar.set_postfix(img_s=f"{self.images / dt:.1f}" if dt > 0 else "-", skipped=self.skipped,
                                 refresh=False)
            self.bar.update(shards)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _decode_on_device(chunk, preprocessor: Preprocessor, device, mode: str):
    """Samples ``(key, bytes, reason)`` -> ``(key, image on device, None)`` or ``(key, None,
    reason)`` in order, the readable ones decoded together (:func:`fastvit.data.decode.decode_batch`)."""
    from .data.decode import decode_batch

    ok = [i for i, (_, data, reason) in enumerate(chunk) if reason is None and data is not None]
    decoded = dict(zip(ok, decode_batch([chunk[i][1] for i in ok], preprocessor, device, mode))) if ok else {}
    out = []
    for i, (key, data, reason) in enumerate(chunk):
        y = decoded.get(i)
        if y is None:
            out.append((key, None, reason or "no image bytes"))
        elif isinstance(y, torch.Tensor):
            out.append((key, y, None))
        else:
            out.append((key, None, str(y)))
    return out


def run_manifest(model, preprocessor: Preprocessor, shards, fmt: str, embedding: str, normalize: bool,
                 dtype: torch.dtype, embedding_dtype: str, shard_size: int, model_id: Optional[str],
                 engine: str, batch_size: int, preprocess: str = "exact", decode: str = "cpu") -> Dict[str, Any]:
    """The manifest fields of a sharded run (:class:`fastvit.data.writers.OutputRun`); the
    preprocessing mode and the decoder are part of the run (other pixels, other embeddings)."""
    from .version import __version__

    return dict(format=fmt, embedding=embedding, normalize=bool(normalize), dtype=str(dtype).replace("torch.", ""),
                embedding_dtype=embedding_dtype, model_fingerprint=model_fingerprint(model),
                preprocess=json.loads(json.dumps(dict(preprocessor.to_dict(), mode=preprocess, decode=decode))),
                shard_size=shard_size if shards and shards[0].kind == "files" else None, model=model_id,
                engine=engine, batch_size=batch_size, fastvit_version=__version__)


def _log_start(who: str, mine, todo, out_dir: str) -> None:
    print(f"fastvit embed: {who}{len(mine) - len(todo)} of {len(mine)} shards already done in {out_dir}, "
          f"{len(todo)} to do", file=sys.stderr)


def log_end(who: str, stats: Dict[str, Any], totals: Optional[dict], out_dir: str) -> None:
    """The end-of-run lines on stderr, the same for every engine."""
    print(f"fastvit embed: {who}{stats['embedded']} images embedded, {stats['skipped']} skipped, in "
          f"{stats['seconds']:.1f} s ({stats['img_per_s'] or 0:.1f} img/s); {stats['shards_written']} shards "
          f"written, {stats['shards_reused']} already done", file=sys.stderr)
    if totals is not None:
        print(f"fastvit embed: all {totals['shards']} shards done: {totals['embedded']} of {totals['samples']} "
              f"samples embedded ({totals['dim']}-d {totals['embedding']}"
              f"{', L2-normalised' if totals['normalize'] else ''}, {totals['format']}), {totals['skipped']} skipped"
              + (f" (listed in {os.path.join(out_dir, SKIPPED)})" if totals["skipped"] else "")
              + f"; summary in {os.path.join(out_dir, SUMMARY)}", file=sys.stderr)


def _embedding_dim(fn, preprocessor: Preprocessor, model, device, dtype) -> int:
    h, w = preprocessor.output_size or model.patch_embed.img_size
    with torch.no_grad():
        return int(fn(torch.zeros(1, 3, h, w, device=device, dtype=dtype)).shape[1])


def embed_shards(model, preprocessor: Preprocessor, paths: Sequence[str], out_dir: str, *,
                 list_files: Sequence[str] = (), fmt: str = "parquet", embedding_dtype: str = "float32",
                 image_column: Optional[str] = None, key_column: Optional[str] = None, batch_size: int = 32,
                 embedding: str = "auto", normalize: bool = False, shard_size: int = 10000, num_workers: int = 0,
                 device: Optional[str] = None, dtype: Optional[torch.dtype] = None, rank: Optional[int] = None,
                 world_size: Optional[int] = None, overwrite: bool = False, progress: bool = False,
                 model_id: Optional[str] = None, log: bool = True, preprocess: str = "exact",
                 decode: str = "cpu") -> Dict[str, Any]:
    """Embed the samples of tar / parquet shards (or slices of an image file list) into one output
    shard per input shard in ``out_dir`` (layout in :mod:`fastvit.data.writers`); the local engine,
    this process's share (shards rank, rank + W, ...) under torchrun.

    Args:
        paths: tar / parquet shards (brace patterns expanded), or image files / folders.
        fmt: 'parquet', 'safetensors', 'npy' or 'clip-retrieval'.
        embedding_dtype: 'float32' or 'float16', the stored embeddings' dtype.
        image_column, key_column: parquet columns (see :class:`fastvit.data.sources.Shard`).
        num_workers: decoding threads (0: in the calling thread).
        preprocess: 'exact' or 'fast' (:meth:`Preprocessor.load`); decode: 'cpu' (the threads) or
            'cuda' (each batch's JPEGs decoded together by nvJPEG on the model's GPU).
        other arguments: as :func:`embed_to_dir`.

    Returns:
        this process's stats (shards, shards_reused, shards_written, embedded, skipped, seconds,
        img_per_s), ``complete`` and, when complete, ``totals`` (summary.json).
    """
    from .data.sources import decode_sample, iter_samples, resolve_shards
    from .data.writers import FORMATS as SHARD_FORMATS, OutputRun

    if fmt not in SHARD_FORMATS:
        raise ValueError(f"fmt: expected one of {SHARD_FORMATS}, got {fmt!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    rank, world_size = _share(rank, world_size)
    shards = resolve_shards(paths, list_files, shard_size, image_column, key_column)
    model, device, dtype = _prepare(model, device, dtype)
    if decode == "cuda" and device.type != "cuda":
        raise ValueError(f"decode: 'cuda' decodes on the GPU and needs a CUDA device, got device {device}")
    to_float = input_model(model, preprocessor)
    fn, embedding = embedding_fn(model, embedding)
    run = OutputRun(out_dir, shards, run_manifest(model, preprocessor, shards, fmt, embedding, normalize, dtype,
                                                  embedding_dtype, shard_size, model_id, "local", batch_size,
                                                  preprocess, decode), overwrite=overwrite)
    mine = shards[rank::world_size]
    run.clean(mine)
    todo = run.todo(mine)
    who = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    if log:
        _log_start(who, mine, todo, out_dir)
    stats = dict(engine="local" if world_size == 1 else "torchrun", rank=rank, world_size=world_size,
                 device=str(device), batch_size=batch_size, backend=getattr(model, "backend", None), shards=len(mine),
                 shards_reused=len(mine) - len(todo), shards_written=0, embedded=0, skipped=0, seconds=0.0,
                 img_per_s=None)
    t0 = time.perf_counter()
    if todo:
        dim = _embedding_dim(fn, preprocessor, model, device, dtype)
        bar = ShardProgress(len(mine), len(mine) - len(todo), progress and rank == 0)
        pool = None
        if num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(num_workers)  # PIL decodes without the GIL
        try:
            for shard in todo:
                run.begin(shard)
                keys, outs, skipped, samples = [], [], [], 0
                chunk: List[tuple] = []
                it = iter_samples(shard)
                while True:
                    chunk = [s for _, s in zip(range(batch_size), it)]
                    if not chunk:
                        break
                    if decode == "cuda":
                        items = _decode_on_device(chunk, preprocessor, device, preprocess)
                    elif pool is not None:
                        items = pool.map(lambda s: decode_sample(*s, preprocessor, preprocess), chunk)
                    else:
                        items = (decode_sample(*s, preprocessor, preprocess) for s in chunk)
                    good = []
                    for key, x, reason in items:
                        samples += key is not None
                        if x is None:
                            skipped.append((key, reason))
                        else:
                            good.append((key, x))
                    if good:
                        x = model_input(torch.stack([x for _, x in good]), device, dtype)
                        if to_float is not None and x.dtype == torch.uint8:
                            x = to_float(x)
                        with torch.no_grad():
                            out = fn(x)
                        outs.append(_finish(out, normalize).cpu())
                        keys += [k for k, _ in good]
                    bar.update(images=len(good), skipped=len(chunk) - len(good))
                emb = torch.cat(outs) if outs else torch.zeros(0, dim)
                run.write(shard, keys, emb.numpy(), skipped, dim, samples)
                stats["shards_written"] += 1
                stats["embedded"] += len(keys)
                stats["skipped"] += len(skipped)
                bar.update(shards=1)
        finally:
            if pool is not None:
                pool.shutdown()
            bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["img_per_s"] = round(stats["embedded"] / stats["seconds"], 2) if stats["seconds"] > 0 else None
    totals = run.finish(stats, world_size)
    if log:
        log_end(who, stats, totals, out_dir)
    return dict(stats, complete=totals is not None, totals=totals)

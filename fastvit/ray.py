"""Embeddings on Ray Data: ``pip install "fastvit[ray]"`` (Ray >= 2.51).

* :class:`Embedder`: the callable class for ``Dataset.map_batches``; each actor builds its model
  once, in ``__init__``, from a picklable :class:`fastvit.embed.ModelSpec` (as vLLM's Ray Data
  predictor does), takes batches with an image column (decoded images (B, 3, H, W), or
  encoded bytes it decodes itself) and adds an ``embedding`` column (B, D) float32.
* :func:`embed_dataset`: a Ray dataset with an image-bytes column -> the same dataset with
  ``embedding`` and ``skip_reason`` columns: CPU decode tasks feed the model actors
  (``compute=ray.data.ActorPoolStrategy(size=actors)``, ``num_gpus`` each) through Ray's
  streaming executor.
* :func:`embed_shards_ray`: ``fastvit embed ... --engine ray``: the shards of
  :func:`fastvit.data.sources.resolve_shards` read and decoded in CPU tasks, embedded by the actors,
  and written by the driver through :class:`fastvit.data.writers.OutputRun`, one output shard per
  input shard, exactly as the local engine writes them.

Nothing is lost or duplicated: every row carries its shard and its position in the shard, and a
shard is written only when the rows of all its positions have come back (a position that comes
back twice, from a task Ray retried after an actor died, fills the same slot). A finished shard
has its sidecar, so a rerun after the driver died skips it and computes only the rest.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

try:
    import ray
    import ray.data
except ImportError as e:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError('fastvit.ray needs Ray Data: pip install "fastvit[ray]"') from e

from .data.sources import Shard, decode_sample, input_dtype, iter_samples, resolve_shards
from .data.writers import OutputRun
from .data.decode import decode_batch
from .embed import (ModelSpec, ShardProgress, _embedding_dim, _finish, _log_start, embedding_fn, log_end,
                    model_input, run_manifest)
from .imagefiles import input_model
from .preprocess import Preprocessor

__all__ = ["Embedder", "embed_dataset", "embed_shards_ray", "ModelSpec"]

SKIP = "skip_reason"  # column: "" for an embedded row, else why the row has no embedding (NaN)
_END = "(end of shard)"


class Embedder:
    """A model actor for ``Dataset.map_batches(Embedder, compute=ray.data.ActorPoolStrategy(...))``.

    Args:
        model_spec: what to load (the model is built here, once per actor, on the actor's GPU
            when it has one).
        image_column: the input column: decoded (B, 3, H, W) images (``load_input``'s), or encoded
            image bytes (decoded here, with the checkpoint's preprocessing).
        preprocessor: overrides the checkpoint's (for bytes input).
        preprocess: 'exact' or 'fast' decoding of bytes input (:meth:`fastvit.Preprocessor.load`).
        decode: how bytes input is decoded here: 'cpu' (one by one) or 'cuda' (the batch's JPEGs
            together by nvJPEG on the actor's GPU, :func:`fastvit.data.decode.decode_batch`).

    A batch (dict of numpy arrays) comes back without ``image_column`` and with ``embedding``
    float32 (B, D) and ``skip_reason`` (str, "" when embedded); a row already carrying a
    ``skip_reason`` or whose bytes are not a readable image gets a NaN row and its reason.
    """

    def __init__(self, model_spec: ModelSpec, image_column: str = "image",
                 preprocessor: Optional[Preprocessor] = None, preprocess: str = "exact", decode: str = "cpu"):
        if not isinstance(model_spec, ModelSpec):
            raise TypeError(f"model_spec: expected a fastvit.embed.ModelSpec, got {type(model_spec).__name__}")
        self.spec, self.column = model_spec, image_column
        self.model, pre = model_spec.load()
        self.pre = preprocessor if preprocessor is not None else pre
        self.mode, self.decode = preprocess, decode
        self.to_float = input_model(self.model, self.pre)
        self.fn, self.embedding = embedding_fn(self.model, model_spec.embedding)
        p = next(self.model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.dim = _embedding_dim(self.fn, self.pre, self.model, self.device, self.dtype)

    def embed(self, x: torch.Tensor) -> np.ndarray:
        """Decoded images (b, 3, H, W) -> float32 (b, D): the one model call of a batch."""
        x = model_input(x, self.device, self.dtype)
        if self.to_float is not None and x.dtype == torch.uint8:
            x = self.to_float(x)
        with torch.no_grad():
            out = self.fn(x)
        return _finish(out, self.spec.normalize).cpu().numpy()

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self.column not in batch:
            raise ValueError(f"image_column: expected a column {self.column!r} in the batch, got {sorted(batch)}")
        images = batch[self.column]
        n = len(images)
        reasons = [str(r) if r is not None else "" for r in batch[SKIP]] if SKIP in batch else [""] * n
        if isinstance(images, np.ndarray) and images.dtype != object and images.ndim == 4:
            ok = np.array([not r for r in reasons], dtype=bool)
            x = torch.from_numpy(np.ascontiguousarray(images[ok])) if ok.any() else None
        elif self.decode == "cuda":
            idx = [i for i, data in enumerate(images) if not reasons[i] and data is not None]
            for i, data in enumerate(images):
                if not reasons[i] and data is None:
                    reasons[i] = "no image bytes"
            decoded = decode_batch([bytes(images[i]) for i in idx], self.pre, self.device, self.mode) if idx else []
            good = []
            for i, y in zip(idx, decoded):
                if isinstance(y, torch.Tensor):
                    good.append(y)
                else:
                    reasons[i] = str(y)
            ok = np.array([not r for r in reasons], dtype=bool)
            x = torch.stack(good) if good else None
        else:
            good = []
            for i, data in enumerate(images):
                if reasons[i]:
                    continue
                _, t, reason = decode_sample(None, None if data is None else bytes(data), None, self.pre, self.mode)
                if t is None:
                    reasons[i] = reason
                else:
                    good.append(t)
            ok = np.array([not r for r in reasons], dtype=bool)
            x = torch.stack(good) if good else None
        out = np.full((n, self.dim), np.nan, dtype=np.float32)
        if x is not None:
            out[ok] = self.embed(x)
        result = {k: v for k, v in batch.items() if k != self.column}
        result["embedding"] = out
        result[SKIP] = np.array(reasons, dtype=object)
        return result


def _decode_batch(batch: Dict[str, np.ndarray], preprocessor: Preprocessor, image_column: str,
                  size, mode: str = "exact") -> Dict[str, np.ndarray]:
    """A CPU task: encoded bytes -> decoded images (B, 3, H, W), uint8 pixels (float32 for a
    processor without an exact uint8 result: :func:`fastvit.data.sources.input_dtype`), zeros + a
    skip_reason where unreadable."""
    images = batch[image_column]
    n = len(images)
    reasons = [str(r) if r is not None else "" for r in batch[SKIP]] if SKIP in batch else [""] * n
    out = np.zeros((n, 3) + tuple(size), dtype=input_dtype(preprocessor, mode))
    for i, data in enumerate(images):
        if reasons[i]:
            continue
        _, t, reason = decode_sample(None, None if data is None else bytes(data), None, preprocessor, mode)
        if t is None:
            reasons[i] = reason
        else:
            out[i] = t.numpy()
    result = {k: v for k, v in batch.items() if k != image_column}
    result[image_column] = out
    result[SKIP] = np.array(reasons, dtype=object)
    return result


def _decode_memory(batch_size: int, size, itemsize: int = 1) -> int:
    """Bytes a decode task asks Ray for: its decoded batches (the one it builds and the one
    it hands on) and a worker's own footprint (torch, fastvit and the decoders: ~370 MiB as Ray
    Data measured it on the CPU). Being stated, it also keeps Ray Data from fusing the decode tasks
    into the model actors when they hold no GPU (it fuses only stages that ask for the same
    resources), so decoding scales with the cluster's CPUs rather than with the actor count, on a
    CPU cluster as on a GPU one."""
    return int(2 * batch_size * 3 * size[0] * size[1] * itemsize + (512 << 20))


def embed_dataset(ds: "ray.data.Dataset", model_spec: ModelSpec, *, image_column: str = "image",
                  batch_size: int = 32, actors: Optional[int] = None, num_gpus: float = 1, cpus_per_actor: float = 1,
                  decode: str = "cpu", preprocessor: Optional[Preprocessor] = None, embedder_cls: type = Embedder,
                  preprocess: str = "exact") -> "ray.data.Dataset":
    """``ds`` (a column ``image_column`` of encoded image bytes) -> the lazy dataset of the same rows
    with ``embedding`` float32 (D,) (NaN for an unreadable image) and ``skip_reason`` (str).

    Args:
        model_spec: the model every actor builds (:class:`fastvit.embed.ModelSpec`).
        batch_size: images per model call.
        actors: model actors, a fixed pool (default: one per ``num_gpus`` of the cluster's GPUs,
            else 1).
        num_gpus: GPUs per actor (0 on a CPU cluster); cpus_per_actor: its CPUs.
        decode: 'cpu' decodes in Ray tasks on CPU workers before the actors; 'actor' in the actor, one
            image at a time; 'cuda' in the actor, each batch's JPEGs together by nvJPEG on its GPU.
        preprocess: 'exact' or 'fast' (:meth:`fastvit.Preprocessor.load`).
        preprocessor: the checkpoint's preprocessing (default: loaded once in the driver from
            ``model_spec``, for decode='cpu').
        embedder_cls: :class:`Embedder` or a subclass of it.
    """
    if not isinstance(model_spec, ModelSpec):
        raise TypeError(f"model_spec: expected a fastvit.embed.ModelSpec, got {type(model_spec).__name__}")
    if decode not in ("cpu", "actor", "cuda"):
        raise ValueError(f"decode: expected 'cpu', 'actor' or 'cuda', got {decode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if not (isinstance(embedder_cls, type) and issubclass(embedder_cls, Embedder)):
        raise TypeError(f"embedder_cls: expected Embedder or a subclass of it, got {embedder_cls!r}")
    if decode == "cpu":
        if preprocessor is None:
            preprocessor = dataclasses.replace(model_spec, device="cpu").load()[1]
        size = _fixed_size(preprocessor)
        ds = ds.map_batches(_decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                            memory=_decode_memory(batch_size, size, input_dtype(preprocessor, preprocess).itemsize),
                            fn_kwargs=dict(preprocessor=preprocessor, image_column=image_column, size=size,
                                           mode=preprocess))
    return _embed_stage(ds, model_spec, image_column, batch_size, actors, num_gpus, cpus_per_actor, preprocessor,
                        embedder_cls, preprocess, "cuda" if decode == "cuda" else "cpu")


def _fixed_size(preprocessor: Preprocessor):
    if preprocessor.output_size is None:
        raise ValueError("decode: 'cpu' batches decoded images, which needs a preprocessor with a fixed output "
                         "size (crop_size or an (H, W) size); use decode='actor'")
    return preprocessor.output_size


def _embed_stage(ds, model_spec: ModelSpec, image_column: str, batch_size: int, actors: Optional[int],
                 num_gpus: float, cpus_per_actor: float, preprocessor: Optional[Preprocessor], embedder_cls: type,
                 preprocess: str = "exact", decode: str = "cpu"):
    """The model actors' stage of the pipeline (a fixed pool of ``actors``)."""
    if actors is None:
        gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
        actors = max(1, int(gpus // num_gpus)) if num_gpus > 0 and gpus else 1
    if actors < 1:
        raise ValueError(f"actors: expected >= 1, got {actors}")
    return ds.map_batches(embedder_cls, batch_size=batch_size, batch_format="numpy",
                          fn_constructor_kwargs=dict(model_spec=model_spec, image_column=image_column,
                                                     preprocessor=preprocessor, preprocess=preprocess, decode=decode),
                          compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus, num_cpus=cpus_per_actor)


def _read_shards(batch: Dict[str, np.ndarray], shards: Sequence[Shard], chunk: int, preprocessor: Preprocessor,
                 mode: str = "exact", decode: str = "cpu"):
    """A CPU task per shard: its samples read and decoded ``chunk`` at a time, as rows (shard, pos,
    key, has_key, decoded image (3, H, W), skip_reason, end), then one end row whose pos is the
    sample count. Reading and decoding share the task so that each task holds one shard (Ray Data
    bundles a fused stage's inputs to the largest batch size of its parts). With ``decode='cuda'``
    the rows carry the encoded bytes, decoded by the actors on their GPUs."""
    size = _fixed_size(preprocessor)
    dt = input_dtype(preprocessor, mode)
    for s in batch["shard"]:
        s = int(s)
        it = iter_samples(shards[s])
        pos = 0
        while True:
            rows = [r for _, r in zip(range(chunk), it)]
            if not rows:
                break
            n = len(rows)
            out = dict(shard=np.full(n, s, np.int64), pos=np.arange(pos, pos + n, dtype=np.int64),
                       key=np.array([k if k is not None else "" for k, _, _ in rows], dtype=object),
                       has_key=np.array([k is not None for k, _, _ in rows], dtype=bool),
                       image=np.array([d for _, d, _ in rows] + [None], dtype=object)[:n],
                       skip_reason=np.array([r or "" for _, _, r in rows], dtype=object),
                       end=np.zeros(n, dtype=bool))
            yield out if decode == "cuda" else _decode_batch(out, preprocessor, "image", size, mode)
            pos += n
        end_image = np.array([None], dtype=object) if decode == "cuda" else np.zeros((1, 3) + tuple(size), dt)
        yield dict(shard=np.array([s], np.int64), pos=np.array([pos], np.int64), key=np.array([""], dtype=object),
                   has_key=np.array([False]), image=end_image,
                   skip_reason=np.array([_END], dtype=object), end=np.array([True]))


def embed_shards_ray(model_spec: ModelSpec, paths: Sequence[str], out_dir: str, *, list_files: Sequence[str] = (),
                     fmt: str = "parquet", embedding_dtype: str = "float32", image_column: Optional[str] = None,
                     key_column: Optional[str] = None, shard_size: int = 10000, batch_size: int = 32,
                     address: Optional[str] = None, actors: Optional[int] = None,
                     gpus_per_actor: Optional[float] = None, cpus_per_actor: float = 1, overwrite: bool = False,
                     progress: bool = False, model_id: Optional[str] = None, log: bool = True,
                     embedder_cls: type = Embedder, preprocess: str = "exact", decode: str = "cpu") -> Dict[str, Any]:
    """``fastvit embed ... --engine ray``: the shards of ``paths`` into ``out_dir``, the same files
    as :func:`fastvit.embed.embed_shards` writes (and resumes), computed on a Ray cluster.

    Args:
        model_spec: the model (the driver loads it once on the CPU for the run's fingerprint).
        address: the cluster (``ray.init(address=...)``) when Ray is not initialised yet; None
            starts a local one. A cluster this call started is shut down at the end.
        actors, gpus_per_actor, cpus_per_actor: the model actor pool (default: one actor per
            GPU with 1 GPU each on a cluster with GPUs, else one CPU actor).
        preprocess: 'exact' or 'fast'; decode: 'cpu' (in the read tasks on CPU workers) or 'cuda'
            (the read tasks pass bytes, each actor decodes its batches by nvJPEG on its GPU).
        other arguments: as :func:`fastvit.embed.embed_shards`.

    Returns:
        the run's stats (shards, shards_reused, shards_written, embedded, skipped, seconds,
        startup_seconds, img_per_s), ``complete`` and ``totals`` (summary.json).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    shards = resolve_shards(paths, list_files, shard_size, image_column, key_column)
    model, pre = dataclasses.replace(model_spec, device="cpu").load()
    fn, embedding = embedding_fn(model, model_spec.embedding)
    p = next(model.parameters())
    dim = _embedding_dim(fn, pre, model, p.device, p.dtype)
    if decode not in ("cpu", "cuda"):
        raise ValueError(f"decode: expected 'cpu' or 'cuda', got {decode!r}")
    run = OutputRun(out_dir, shards, run_manifest(model, pre, shards, fmt, embedding, model_spec.normalize, p.dtype,
                                                  embedding_dtype, shard_size, model_id, "ray", batch_size,
                                                  preprocess, decode), overwrite=overwrite)
    del model
    run.clean(shards)
    todo = run.todo()
    if log:
        _log_start("", shards, todo, out_dir)
    stats: Dict[str, Any] = dict(engine="ray", rank=0, world_size=1, batch_size=batch_size, shards=len(shards),
                                 shards_reused=len(shards) - len(todo), shards_written=0, embedded=0, skipped=0,
                                 seconds=0.0, startup_seconds=0.0, img_per_s=None)
    started = False
    t0 = time.perf_counter()
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            started = True
        stats["startup_seconds"] = round(time.perf_counter() - t0, 3)
        try:
            _run_on_ray(run, todo, model_spec, pre, dim, batch_size, actors, gpus_per_actor, cpus_per_actor,
                        progress, embedder_cls, stats, preprocess, decode)
        finally:
            if started:
                ray.shutdown()
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    stats["img_per_s"] = round(stats["embedded"] / stats["seconds"], 2) if stats["seconds"] > 0 else None
    totals = run.finish(stats)
    if log:
        log_end("", stats, totals, out_dir)
    return dict(stats, complete=totals is not None, totals=totals)


def _run_on_ray(run: OutputRun, todo: List[Shard], spec: ModelSpec, pre: Preprocessor, dim: int, batch_size: int,
                actors: Optional[int], gpus_per_actor: Optional[float], cpus_per_actor: float, progress: bool,
                embedder_cls: type, stats: Dict[str, Any], preprocess: str = "exact", decode: str = "cpu") -> None:
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, progress
    if gpus_per_actor is None:
        gpus_per_actor = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    for s in todo:
        run.begin(s)
    stats.update(actors=actors, gpus_per_actor=gpus_per_actor)
    ds = ray.data.from_items([{"shard": i} for i in range(len(todo))], override_num_blocks=len(todo))
    ds = ds.map_batches(_read_shards, batch_size=1, batch_format="numpy", num_cpus=1,
                        memory=_decode_memory(batch_size, _fixed_size(pre), input_dtype(pre, preprocess).itemsize),
                        fn_kwargs=dict(shards=todo, chunk=batch_size, preprocessor=pre, mode=preprocess,
                                       decode=decode))
    ds = _embed_stage(ds, spec, "image", batch_size, actors, gpus_per_actor, cpus_per_actor, pre, embedder_cls,
                      preprocess, decode)
    bar = ShardProgress(stats["shards"], stats["shards_reused"], progress)
    pending: Dict[int, dict] = {}
    try:
        # unprefetched: the driver only files rows and writes a shard the moment its last row is back
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            emb = batch["embedding"]
            for j in range(len(batch["shard"])):
                s, pos = int(batch["shard"][j]), int(batch["pos"][j])
                st = pending.setdefault(s, dict(rows={}, count=None))
                if batch["end"][j]:
                    st["count"] = pos
                else:
                    reason = str(batch[SKIP][j] or "")
                    key = str(batch["key"][j]) if batch["has_key"][j] else None
                    # a position seen twice (a retried task) fills the same slot: nothing is duplicated
                    st["rows"][pos] = (key, None if reason else emb[j], reason or None)
                if st["count"] is not None and len(st["rows"]) == st["count"]:
                    _write(run, todo[s], st["rows"], dim, stats, bar)
                    del pending[s]
    finally:
        bar.close()
        ctx.enable_progress_bars = bars
    if pending:
        raise RuntimeError(f"ray engine: shards {sorted(todo[s].name for s in pending)} came back incomplete "
                           "(rows missing); rerun to compute them")


def _write(run: OutputRun, shard: Shard, rows: Dict[int, tuple], dim: int, stats: Dict[str, Any],
           bar: ShardProgress) -> None:
    keys, embs, skipped, samples = [], [], [], 0
    for pos in sorted(rows):
        key, emb, reason = rows[pos]
        samples += key is not None
        if emb is None:
            skipped.append((key, reason))
        else:
            keys.append(key)
            embs.append(emb)
    run.write(shard, keys, np.stack(embs) if embs else np.zeros((0, dim), np.float32), skipped, dim, samples)
    stats["shards_written"] += 1
    stats["embedded"] += len(keys)
    stats["skipped"] += len(skipped)
    bar.update(images=len(keys), skipped=len(skipped), shards=1)


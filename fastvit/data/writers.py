"""Where the embeddings of a sharded run go: one output per input shard, visible only when complete.

An output folder of a sharded run (``layout`` 2; ``fastvit.embed.embed_to_dir``'s folders are
layout 1)::

    OUT/manifest.json       the run: model fingerprint, options, run_key, the shard list
    OUT/{name}.parquet      format 'parquet': columns key (string), source (string), embedding
                            (fixed-size list of float32 or float16), one row per embedded sample
    OUT/{name}.safetensors  format 'safetensors': "embeddings" (rows, D); the keys in the sidecar
    OUT/{name}.npy          format 'npy': the (rows, D) array; the keys in the sidecar
    OUT/img_emb/img_emb_{i}.npy + OUT/metadata/metadata_{i}.parquet
                            format 'clip-retrieval': clip-retrieval's layout, row-aligned (i = the
                            shard's index in the run; metadata columns key, source)
    OUT/{name}.json         the shard's sidecar, written last: its source's identity, the data
                            files' sizes and sha256, rows, dim, skipped samples with their reasons
    OUT/skipped.jsonl       every skipped sample {"shard", "source", "key", "reason"}, shard order
    OUT/summary.json        totals and the run's engine, time and img/s

``name`` is the input shard's stem (``00042`` for ``00042.tar``) or ``shard-00000`` for a slice of a
file list. Every file is written to a temporary name and moved into place with ``os.replace``, the
sidecar last, so a shard is finished exactly when its sidecar names this run (``run_key``), the
same input shard, and data files of the recorded sizes: a rerun keeps those and redoes the rest,
whichever engine wrote them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .sources import Shard

__all__ = ["FORMATS", "EMBEDDING_DTYPES", "LAYOUT", "OutputRun", "atomic_write", "read_json", "read_shard",
           "shard_files"]

FORMATS = ("parquet", "safetensors", "npy", "clip-retrieval")
EMBEDDING_DTYPES = ("float32", "float16")
LAYOUT = 2
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
SUMMARY = "summary.json"
# manifest fields that make two runs the same run (a finished shard is kept only when all match);
# the shard list is not among them: a rerun over more shards extends the run
KEY_FIELDS = ("layout", "format", "embedding", "normalize", "dtype", "embedding_dtype", "model_fingerprint",
              "preprocess", "shard_size")


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either absent / old or complete: a temporary file beside
    it, flushed to disk, then ``os.replace``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def shard_files(fmt: str, shard: Shard) -> List[str]:
    """The data files of ``shard`` in format ``fmt``, relative to the output folder."""
    if fmt == "clip-retrieval":
        return [f"img_emb/img_emb_{shard.index}.npy", f"metadata/metadata_{shard.index}.parquet"]
    return [f"{shard.name}.{fmt}"]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError('the parquet and clip-retrieval formats need pyarrow: pip install "fastvit[data]"') from e
    return pa, pq


def _parquet_bytes(table) -> bytes:
    pa, pq = _pyarrow()
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _encode(fmt: str, shard: Shard, keys: Sequence[str], emb: np.ndarray) -> List[bytes]:
    """The bytes of ``shard_files(fmt, shard)``: ``emb`` (rows, D) in its dtype, ``keys`` row-aligned."""
    if fmt == "safetensors":
        from safetensors.numpy import save

        return [save({"embeddings": np.ascontiguousarray(emb)}, metadata={"format": "np"})]
    if fmt == "npy":
        return [_npy_bytes(emb)]
    pa, _ = _pyarrow()
    keys_col = pa.array(list(keys), type=pa.string())
    source_col = pa.array([shard.source] * len(keys), type=pa.string())
    if fmt == "clip-retrieval":
        return [_npy_bytes(emb), _parquet_bytes(pa.table({"key": keys_col, "source": source_col}))]
    flat = pa.array(np.ascontiguousarray(emb).reshape(-1))
    col = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
    return [_parquet_bytes(pa.table({"key": keys_col, "source": source_col, "embedding": col}))]


def read_shard(out_dir: str, meta: Dict[str, Any]) -> Tuple[List[str], np.ndarray]:
    """(keys, embeddings (rows, D) in the stored dtype) of a finished shard, from its sidecar ``meta``."""
    fmt, files = meta["format"], [os.path.join(out_dir, f) for f in meta["files"]]
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return list(meta["keys"]), load_file(files[0])["embeddings"]
    if fmt == "npy":
        return list(meta["keys"]), np.load(files[0], allow_pickle=False)
    _, pq = _pyarrow()
    if fmt == "clip-retrieval":
        return pq.read_table(files[1], columns=["key"]).column("key").to_pylist(), np.load(files[0],
                                                                                          allow_pickle=False)
    table = pq.read_table(files[0], columns=["key", "embedding"])
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False) if len(col) else np.zeros(0, np.dtype(meta["dtype"]))
    return table.column("key").to_pylist(), values.reshape(len(col), dim)


def run_key(manifest: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: manifest.get(k) for k in KEY_FIELDS}, sort_keys=True).encode()).hexdigest()


class RunMismatch(ValueError):
    """The output folder holds another run (other model or options)."""


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


_TMP = re.compile(r"^(.*)\.tmp-\d+$")


class OutputRun:
    """The output folder of one sharded run: which shards are finished, writing one, finishing the run.

    Args:
        out_dir: the folder (created).
        shards: the run's shards (:func:`fastvit.data.sources.resolve_shards`).
        manifest: the run's options (every ``KEY_FIELDS`` entry but ``layout``) and anything to record.
        overwrite: start afresh in a folder that holds another run, else :class:`RunMismatch`.
    """

    def __init__(self, out_dir: str, shards: Sequence[Shard], manifest: Dict[str, Any], overwrite: bool = False):
        fmt = manifest["format"]
        if fmt not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")
        if manifest["embedding_dtype"] not in EMBEDDING_DTYPES:
            raise ValueError(f"embedding_dtype: expected one of {EMBEDDING_DTYPES}, got "
                             f"{manifest['embedding_dtype']!r}")
        self.out_dir, self.shards, self.fmt = out_dir, list(shards), fmt
        self.manifest = dict(manifest, layout=LAYOUT)
        self.manifest["run_key"] = self.key = run_key(self.manifest)
        self.manifest["shards"] = [dict(name=s.name, source=s.source) for s in self.shards]
        self.manifest["num_shards"] = len(self.shards)
        os.makedirs(out_dir, exist_ok=True)
        if fmt == "clip-retrieval":
            for d in ("img_emb", "metadata"):
                os.makedirs(os.path.join(out_dir, d), exist_ok=True)
        self._check_manifest(overwrite)

    def _check_manifest(self, overwrite: bool) -> None:
        path = os.path.join(self.out_dir, MANIFEST)
        old = read_json(path)
        if old is not None and old.get("run_key") != self.key and not overwrite:
            diff = [k for k in KEY_FIELDS if old.get(k) != self.manifest.get(k)] or ["run_key"]
            raise RunMismatch(f"out_dir: {self.out_dir!r} holds another embedding run (differs in {', '.join(diff)}); "
                              "pass overwrite=True (--overwrite) to start afresh there, or choose another folder")
        if old != self.manifest:
            atomic_write(path, _json_bytes(self.manifest))
        if old is not None and old.get("run_key") != self.key:
            for name in (SKIPPED, SUMMARY):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.out_dir, name))

    # ------------------------------------------------------------------ one shard
    def sidecar(self, shard: Shard) -> str:
        return os.path.join(self.out_dir, f"{shard.name}.json")

    def finished(self, shard: Shard) -> Optional[dict]:
        """The sidecar of ``shard`` when it is finished for this run (this run's key, this input
        shard, data files of the recorded sizes), else None."""
        meta = read_json(self.sidecar(shard))
        if not meta or meta.get("run_key") != self.key or meta.get("identity") != shard.identity():
            return None
        try:
            for f, info in meta["files"].items():
                if os.path.getsize(os.path.join(self.out_dir, f)) != info["bytes"]:
                    return None
        except (OSError, KeyError, TypeError, AttributeError):
            return None
        return meta

    def todo(self, shards: Optional[Iterable[Shard]] = None) -> List[Shard]:
        """The shards (default: all) not finished yet, in order."""
        return [s for s in (self.shards if shards is None else shards) if self.finished(s) is None]

    def clean(self, shards: Iterable[Shard]) -> None:
        """Remove the temporary files a killed writer left for ``shards`` (only those: processes
        writing other shards of the run may be writing theirs now)."""
        mine = {os.path.normpath(f) for s in shards for f in shard_files(self.fmt, s) + [f"{s.name}.json"]}
        for d in ("", "img_emb", "metadata"):
            folder = os.path.join(self.out_dir, d)
            if not os.path.isdir(folder):
                continue
            for f in os.listdir(folder):
                m = _TMP.match(f)
                if m and os.path.normpath(os.path.join(d, m.group(1))) in mine:
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, f))

    def begin(self, shard: Shard) -> None:
        """A shard about to be (re)computed loses its finished mark first."""
        with contextlib.suppress(OSError):
            os.remove(self.sidecar(shard))

    def write(self, shard: Shard, keys: Sequence[str], embeddings: np.ndarray,
              skipped: Sequence[Tuple[Optional[str], str]], dim: int, samples: int) -> dict:
        """Write ``shard``'s data files then its sidecar.

        Args:
            keys: the embedded samples' keys, in shard order.
            embeddings: float32 (rows, D), row-aligned with ``keys`` (cast to the run's embedding dtype).
            skipped: ``(key or None, reason)`` of every sample (or shard fault) left out, in shard order.
            dim: D (for a shard without one readable image).
            samples: samples read from the shard (embedded + skipped ones with a key).
        Returns:
            the sidecar.
        """
        dtype = np.dtype(self.manifest["embedding_dtype"])
        emb = np.asarray(embeddings, dtype=np.float32).reshape(len(keys), dim).astype(dtype)
        files = shard_files(self.fmt, shard)
        blobs = _encode(self.fmt, shard, keys, emb)
        for f, data in zip(files, blobs):
            atomic_write(os.path.join(self.out_dir, f), data)
        meta = dict(layout=LAYOUT, run_key=self.key, shard=shard.name, index=shard.index, source=shard.source,
                    identity=shard.identity(), format=self.fmt,
                    files={f: dict(bytes=len(b), sha256=hashlib.sha256(b).hexdigest()) for f, b in zip(files, blobs)},
                    rows=len(keys), dim=int(dim), dtype=dtype.name, samples=int(samples),
                    embedding=self.manifest["embedding"], normalize=self.manifest["normalize"],
                    skipped=[dict(key=k, reason=r) for k, r in skipped])
        if self.fmt in ("safetensors", "npy"):
            meta["keys"] = list(keys)
        atomic_write(self.sidecar(shard), _json_bytes(meta))
        return meta

    # ------------------------------------------------------------------ the whole run
    def finish(self, stats: Dict[str, Any], world_size: int = 1) -> Optional[dict]:
        """When every shard is finished: write skipped.jsonl and summary.json and return the
        summary, else None. ``stats`` is this process's (engine, shards_written, embedded, seconds,
        ...); with ``world_size > 1`` every rank's ``summary-rank{r}-of-{W}.json`` is read."""
        if world_size > 1:
            atomic_write(os.path.join(self.out_dir, f"summary-rank{stats['rank']}-of-{world_size}.json"),
                         _json_bytes(stats))
        with _lock(self.out_dir):
            metas = []
            for s in self.shards:
                meta = self.finished(s)
                if meta is None:
                    return None
                metas.append(meta)
            skipped = [dict(shard=m["shard"], source=m["source"], **k) for m in metas for k in m["skipped"]]
            atomic_write(os.path.join(self.out_dir, SKIPPED), "".join(json.dumps(s) + "\n" for s in skipped).encode())
            ranks = [stats]
            if world_size > 1:
                ranks = [read_json(os.path.join(self.out_dir, f"summary-rank{r}-of-{world_size}.json"))
                         for r in range(world_size)]
                ranks = [r for r in ranks if r is not None]
            seconds = max((r["seconds"] for r in ranks), default=0.0)
            done = sum(r["embedded"] for r in ranks)
            run = dict(engine=stats.get("engine"), processes=len(ranks), seconds=round(seconds, 3), embedded=done,
                       skipped=sum(r["skipped"] for r in ranks),
                       shards_written=sum(r["shards_written"] for r in ranks),
                       shards_reused=sum(r["shards_reused"] for r in ranks),
                       img_per_s=round(done / seconds, 2) if seconds > 0 else None)
            summary = dict(complete=True, layout=LAYOUT, shards=len(metas), samples=sum(m["samples"] for m in metas),
                           embedded=sum(m["rows"] for m in metas), skipped=len(skipped),
                           dim=metas[0]["dim"] if metas else None, format=self.fmt,
                           embedding=self.manifest["embedding"], normalize=self.manifest["normalize"],
                           embedding_dtype=self.manifest["embedding_dtype"], skipped_file=SKIPPED, run=run, ranks=ranks)
            atomic_write(os.path.join(self.out_dir, SUMMARY), _json_bytes(summary))
            return summary


def load_run(out_dir: str, manifest: Dict[str, Any]) -> Tuple[List[str], List[str], np.ndarray]:
    """(keys, sources, embeddings (N, D) in the stored dtype) of a finished layout-2 folder, in shard order."""
    keys: List[str] = []
    sources: List[str] = []
    parts = []
    names = manifest["shards"]
    for i, s in enumerate(names):
        meta = read_json(os.path.join(out_dir, f"{s['name']}.json"))
        ok = meta is not None and meta.get("run_key") == manifest["run_key"] and meta.get("source") == s["source"]
        if ok:
            try:
                ok = all(os.path.getsize(os.path.join(out_dir, f)) == v["bytes"] for f, v in meta["files"].items())
            except OSError:
                ok = False
        if not ok:
            raise FileNotFoundError(f"out_dir: shard {s['name']} ({i} of {len(names)}) is not finished in "
                                    f"{out_dir!r} (rerun fastvit embed to complete it)")
        k, e = read_shard(out_dir, meta)
        keys += k
        sources += [s["source"]] * len(k)
        parts.append(e)
    dtype = np.dtype(manifest["embedding_dtype"])
    emb = np.concatenate(parts) if parts else np.zeros((0, 0), dtype)
    return keys, sources, emb

"""Where the images of a bulk job come from: shards, and the samples of a shard.

A run's inputs resolve (:func:`resolve_shards`) to an ordered list of :class:`Shard`, each one of

* ``files``: a fixed slice of an ordered list of image files (folders walked in sorted order, list
  files), ``shard_size`` files each, as ``fastvit embed`` has always cut them;
* ``tar``: a webdataset tar shard as img2dataset writes it (``{key}.jpg|png|webp`` + ``{key}.json``
  + ``{key}.txt``): the key is the member path up to the first dot of its basename, consecutive
  members with one key make a sample, extensions are compared in lowercase (the ``webdataset``
  package's own grouping);
* ``parquet``: a parquet file with an image column (encoded bytes, a path, or Hugging Face's
  ``{"bytes", "path"}`` image struct) and a key column.

:func:`iter_samples` yields a shard's samples ``(key, bytes or None, reason or None)`` in shard
order and never raises for a bad sample or an unreadable shard: a sample without an image, an
unreadable file, a truncated tar or parquet file are yielded with ``bytes=None`` and the reason
(``key=None`` for what is wrong with the shard itself rather than one sample).

:func:`load_input` is the one decode of these bytes into the model's input; every engine calls it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..imagefiles import expand_inputs
from ..preprocess import IMAGE_EXTENSIONS, Preprocessor

__all__ = ["Shard", "Sample", "expand_braces", "resolve_shards", "iter_samples", "load_input", "decode_sample",
           "reason_of", "input_dtype",
           "kind_of", "TAR_EXTENSIONS", "IMAGE_SUFFIXES", "IMAGE_COLUMNS"]

Sample = Tuple[Optional[str], Optional[bytes], Optional[str]]  # (key, encoded image or None, reason or None)

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
# a tar sample's image member, by preference when a sample has several (img2dataset writes one)
IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
# the image column of a parquet file when --image-column is not given, first present wins
# (img2dataset's parquet output names it after the encoding; Hugging Face datasets use "image")
IMAGE_COLUMNS = ("jpg", "png", "webp", "image", "img", "image_bytes", "bytes", "image_path", "path")
_PARQUET_BATCH = 256  # rows read at a time: a shard is streamed, never held whole


@dataclass(frozen=True)
class Shard:
    """One unit of work and of output: an input shard, or a slice of an ordered file list.

    Fields:
        kind: 'files', 'tar' or 'parquet'.
        source: the tar / parquet path, or ``inputs[start:stop]`` for a slice of the file list.
        index: position in the run's shard list (clip-retrieval's ``img_emb_{index}.npy``).
        name: the output file stem, unique in the run (the tar / parquet stem, or ``shard-00000``).
        files: the slice's image paths (kind 'files').
        image_column, key_column: parquet columns (None: chosen from the file, see ``IMAGE_COLUMNS``;
            the key defaults to ``key``, else the row number).
    """

    kind: str
    source: str
    index: int
    name: str
    files: Tuple[str, ...] = ()
    image_column: Optional[str] = None
    key_column: Optional[str] = None

    def identity(self) -> dict:
        """What makes a finished output shard this shard's: its source and (files) the slice's
        paths or (tar / parquet) the file's size now, so a replaced input shard is recomputed."""
        ident = dict(kind=self.kind, source=self.source)
        if self.kind == "files":
            h = hashlib.sha256()
            for f in self.files:
                h.update(os.fsencode(f) + b"\n")
            ident["files_sha256"] = h.hexdigest()
        else:
            try:
                ident["bytes"] = os.path.getsize(self.source)
            except OSError:
                ident["bytes"] = None
            ident.update(image_column=self.image_column, key_column=self.key_column)
        return ident


# --------------------------------------------------------------------------- inputs -> shards
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?")


def expand_braces(pattern: str) -> List[str]:
    """Brace patterns as the shell and webdataset write them: ``shards/{00000..00099}.tar`` (numeric
    ranges, zero-padded to the width of the bounds when one is padded, optional step ``{0..10..2}``)
    and ``{a,b,c}`` alternatives, several groups multiplying out left to right. A pattern without
    braces, or a brace group that is neither, is returned as it is.

    Raises ValueError for a range step of 0.
    """
    m = _BRACE.search(pattern)
    while m is not None and not (_RANGE.fullmatch(m.group(1)) or "," in m.group(1)):
        m = _BRACE.search(pattern, m.end())
    if m is None:
        return [pattern]
    body = m.group(1)
    r = _RANGE.fullmatch(body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        step = abs(int(r.group(3))) if r.group(3) else 1
        if step == 0:
            raise ValueError(f"paths: expected a non-zero step in the brace range {{{body}}} of {pattern!r}")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in r.group(1, 2))
        width = max(len(r.group(1)), len(r.group(2))) if padded else 0
        items = [str(i).zfill(width) for i in (range(a, b + 1, step) if a <= b else range(a, b - 1, -step))]
    else:
        items = body.split(",")
    head, tails = pattern[:m.start()], expand_braces(pattern[m.end():])
    return [head + item + tail for item in items for tail in tails]


def kind_of(path: str) -> str:
    """'tar', 'parquet' or 'files' (an image file or folder), by the name."""
    low = path.lower()
    if low.endswith(TAR_EXTENSIONS):
        return "tar"
    if low.endswith(".parquet"):
        return "parquet"
    return "files"


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for ext in TAR_EXTENSIONS + (".parquet",):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def resolve_shards(paths: Sequence[str] = (), list_files: Sequence[str] = (), shard_size: int = 10000,
                   image_column: Optional[str] = None, key_column: Optional[str] = None) -> List[Shard]:
    """The run's shards, in order, from the command line's inputs.

    Args:
        paths: tar shards and parquet files (brace patterns expanded here, so a quoted pattern works
            as an unquoted one), or image files and folders (walked recursively, sorted).
        list_files: text files of image paths, one a line (after ``paths``).
        shard_size: images per slice of a file list.
        image_column, key_column: parquet columns (see :class:`Shard`).

    A tar or parquet path that does not exist is kept: reading it yields its reason, so one missing
    shard of a thousand costs that shard only. Raises ValueError when files and shards are mixed,
    when a shard is named twice, or when nothing is given; FileNotFoundError for a missing image file
    or folder (as before).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size: expected >= 1, got {shard_size}")
    expanded = [q for p in paths for q in expand_braces(os.fspath(p))]
    shards = [p for p in expanded if kind_of(p) != "files"]
    if shards and (len(shards) != len(expanded) or list_files):
        other = next((p for p in expanded if kind_of(p) == "files"), None) or f"list {list_files[0]}"
        raise ValueError("paths: expected either tar / parquet shards or image files / folders / list files, got "
                         f"both ({shards[0]!r} and {other!r})")
    if shards:
        seen = set()
        for p in shards:
            if os.path.abspath(p) in seen:
                raise ValueError(f"paths: shard {p!r} is named twice (its samples would be embedded twice)")
            seen.add(os.path.abspath(p))
        stems = [_stem(p) for p in shards]
        unique = len(set(stems)) == len(stems)
        width = max(5, len(str(len(shards) - 1)))
        return [Shard(kind=kind_of(p), source=p, index=i, name=s if unique else f"{i:0{width}d}-{s}",
                      image_column=image_column if kind_of(p) == "parquet" else None,
                      key_column=key_column if kind_of(p) == "parquet" else None)
                for i, (p, s) in enumerate(zip(shards, stems))]
    files = expand_inputs(expanded, list_files) if expanded or list_files else []
    if not files:
        raise ValueError("paths: expected image files, folders, list files, tar or parquet shards, got none")
    num = -(-len(files) // shard_size)
    width = max(5, len(str(num - 1)))
    return [Shard(kind="files", source=f"inputs[{i * shard_size}:{min((i + 1) * shard_size, len(files))}]", index=i,
                  name=f"shard-{i:0{width}d}", files=tuple(files[i * shard_size:(i + 1) * shard_size]))
            for i in range(num)]


# --------------------------------------------------------------------------- shard -> samples
_ADDRESS = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>| ?'?<_io\.\w+ name=[^>]*>'?")


def reason_of(e: BaseException) -> str:
    """``Type: message`` of an exception (its cause when it wraps one), without object addresses,
    so a reason reads the same in every run and every process."""
    from .decode import DecodeError

    if isinstance(e, DecodeError):  # already a reason, "Type: message" included
        return str(e)
    e = e.__cause__ if e.__cause__ is not None else e
    msg = _ADDRESS.sub("", str(e)).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def iter_samples(shard: Shard) -> Iterator[Sample]:
    """The samples of ``shard`` in shard order: ``(key, encoded image bytes, None)`` or
    ``(key, None, reason)``; ``(None, None, reason)`` for a fault of the shard itself (unreadable,
    truncated). Never raises for bad data."""
    if shard.kind == "files":
        yield from _file_samples(shard.files)
    elif shard.kind == "tar":
        yield from _tar_samples(shard.source)
    elif shard.kind == "parquet":
        yield from _parquet_samples(shard.source, shard.image_column, shard.key_column)
    else:
        raise ValueError(f"shard.kind: expected 'files', 'tar' or 'parquet', got {shard.kind!r}")


def _read_file(path: str) -> Tuple[Optional[bytes], Optional[str]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, reason_of(e)
    return (data, None) if data else (None, "empty file (0 bytes)")


def _file_samples(files: Sequence[str]) -> Iterator[Sample]:
    for path in files:
        data, reason = _read_file(path)
        yield path, data, reason


def _split_key(name: str) -> Tuple[Optional[str], Optional[str]]:
    """(key, extension) of a tar member: the path up to the first dot of its basename, and the rest."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2)) if m else (None, None)


def _tar_group(key: str, members: dict) -> Sample:
    for suffix in IMAGE_SUFFIXES:
        if suffix in members:
            return key, members[suffix], None
    has = ", ".join(sorted(members)) or "nothing"
    return key, None, f"no image ({'/'.join(IMAGE_SUFFIXES[:4])}/...) in the sample, it has: {has}"


def _tar_samples(path: str) -> Iterator[Sample]:
    key, members, n = None, {}, 0
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                name = info.name
                if not info.isreg():
                    continue
                # webdataset skips its own metadata members (``__key__`` style names)
                if re.match(r"__[^/]*__($|/)", name):
                    continue
                k, ext = _split_key(name)
                if k is None:
                    continue
                ext = ext.lower()
                data = tar.extractfile(info).read()
                if k != key:
                    if key is not None:
                        yield _tar_group(key, members)
                        n += 1
                    key, members = k, {}
                members.setdefault(ext, data)
            end_ok = _tar_end_marked(raw, path)
    except Exception as e:  # tarfile / gzip / OSError: the shard is unreadable from here on
        if key is not None:
            yield key, None, f"the tar shard is unreadable inside this sample ({reason_of(e)})"
        yield None, None, f"unreadable tar shard after {n} samples: {reason_of(e)}"
        return
    if key is not None:
        if end_ok:
            yield _tar_group(key, members)
        else:
            yield key, None, "the tar shard ends inside this sample (no end-of-archive marker: truncated?)"
    if not end_ok:
        yield None, None, f"truncated tar shard: no end-of-archive marker after {n + (key is not None)} samples"


def _tar_end_marked(raw, path: str) -> bool:
    """Whether an uncompressed tar ends with its end-of-archive zero blocks. tarfile's streaming
    reader takes a file cut at a member boundary for a complete archive; this tells them apart.
    Compressed tars are checked by their decompressor (a cut stream raises)."""
    if not path.lower().endswith(".tar"):
        return True
    try:
        size = os.fstat(raw.fileno()).st_size
        if size < 1024:
            return False
        raw.seek(size - 1024)
        return raw.read(1024) == bytes(1024)
    except OSError:
        return False


def _pick_column(names: Sequence[str], image_column: Optional[str]) -> Optional[str]:
    if image_column is not None:
        return image_column if image_column in names else None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _parquet_value(value, base: str) -> Tuple[Optional[bytes], Optional[str]]:
    """An image cell: bytes, a path (relative to the parquet file's folder), or {"bytes", "path"}."""
    if isinstance(value, dict):  # Hugging Face datasets' Image feature
        if value.get("bytes"):
            return bytes(value["bytes"]), None
        value = value.get("path")
    if value is None:
        return None, "no image (null in the image column)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (bytes(value), None) if len(value) else (None, "empty image bytes (0 bytes)")
    if isinstance(value, str):
        return _read_file(value if os.path.isabs(value) else os.path.join(base, value))
    return None, f"image column holds {type(value).__name__}, expected bytes, a path or {{'bytes', 'path'}}"


def _parquet_samples(path: str, image_column: Optional[str], key_column: Optional[str]) -> Iterator[Sample]:
    n = 0
    try:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        img = _pick_column(names, image_column)
        if img is None:
            want = repr(image_column) if image_column else f"one of {IMAGE_COLUMNS}"
            yield None, None, f"no image column {want} in the parquet file; it has {names} (--image-column)"
            return
        key = key_column if key_column is not None else ("key" if "key" in names else None)
        if key is not None and key not in names:
            yield None, None, f"no key column {key!r} in the parquet file; it has {names} (--key-column)"
            return
        base = os.path.dirname(os.path.abspath(path))
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[img] + ([key] if key and key != img else [])):
            values = batch.column(img).to_pylist()
            keys = batch.column(key).to_pylist() if key else [None] * len(values)
            for k, v in zip(keys, values):
                data, reason = _parquet_value(v, base)
                yield (str(k) if k is not None else f"{n:09d}"), data, reason
                n += 1
    except ImportError as e:
        yield None, None, f"reading parquet needs pyarrow: pip install \"fastvit[data]\" ({reason_of(e)})"
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a corrupt or cut file
        yield None, None, f"unreadable parquet shard after {n} samples: {reason_of(e)}"


# --------------------------------------------------------------------------- bytes -> model input
# what load_input returns, which the engines' decoded batches hold (Ray's decode tasks allocate them)
def input_dtype(preprocessor: Preprocessor, mode: str = "exact") -> np.dtype:
    """The dtype :func:`load_input` returns: uint8 pixels, or float32 for a processor whose exact
    output is float (``rescale_first``) in exact mode."""
    return np.dtype(np.float32) if mode == "exact" and not preprocessor.uint8_exact else np.dtype(np.uint8)


def load_input(data: bytes, preprocessor: Preprocessor, mode: str = "exact") -> torch.Tensor:
    """Encoded image bytes -> the model's input (3, H, W) with the checkpoint's geometry: uint8
    pixels (:meth:`Preprocessor.load` in ``mode``; the model normalises them), or the float32 of
    :meth:`Preprocessor.process` for a processor without an exact uint8 result in exact mode. The
    one decode of every bulk engine; raises (:class:`fastvit.data.decode.DecodeError`, PIL's
    errors) for bytes that are no readable image, which the callers record with :func:`reason_of`."""
    if input_dtype(preprocessor, mode) == np.float32:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return preprocessor.process(im)
    return preprocessor.load(data, mode)


def decode_sample(key: Optional[str], data: Optional[bytes], reason: Optional[str], preprocessor: Preprocessor,
                  mode: str = "exact") -> Tuple[Optional[str], Optional[torch.Tensor], Optional[str]]:
    """A sample of :func:`iter_samples` -> ``(key, image (3, H, W), None)`` or ``(key, None, reason)``:
    :func:`load_input` with its failure turned into the reason."""
    if reason is not None or data is None:
        return key, None, reason or "no image bytes"
    try:
        return key, load_input(data, preprocessor, mode), None
    except Exception as e:  # decoders raise many types (OSError, ValueError, SyntaxError, ...)
        return key, None, reason_of(e)

"""Image files in, model outputs out: the data side shared by ``fastvit classify`` and ``fastvit embed``.

* :func:`expand_inputs` turns files, folders (walked recursively, sorted) and list files (one
  image path a line) into one ordered list: the same arguments give the same order on every run.
* :class:`ImageFiles` decodes and preprocesses in DataLoader workers and never raises on a bad
  file: it returns a marker with the reason, and :func:`collate` drops the markers from the batch
  and reports them, so one unreadable file among a million costs that file only.
* :func:`run_batches` moves the batches to the device (pinned memory, non-blocking copies on
  CUDA) and yields ``(indices, outputs, skipped)``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess import IMAGE_EXTENSIONS, Preprocessor

__all__ = ["expand_inputs", "read_list_file", "ImageFiles", "collate", "make_loader", "run_batches", "dist_info",
           "batches_of", "progress_bar", "Skipped"]

Skipped = Tuple[int, str]  # (input index, reason)


def read_list_file(path: str) -> List[str]:
    """Image paths of a list file, one a line, in file order; blank lines and ``#`` comments are ignored.

    Entries are taken as files without touching the disk (a million-line list costs no ``stat``
    calls): a missing or unreadable entry is skipped with its reason when it is decoded.
    Relative entries are relative to the current directory, as paths on the command line.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list: expected a text file of image paths, got {path!r}")
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


def expand_inputs(paths: Sequence[str] = (), list_files: Sequence[str] = ()) -> List[str]:
    """One ordered list of image files: ``paths`` in argument order (files as given, folders walked
    recursively in sorted order, image extensions only), then the entries of each list file.

    Raises FileNotFoundError for a path that does not exist and ValueError when nothing is found.
    """
    out: List[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs.sort()
                out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"inputs: expected existing image files or folders, got {p!r}")
    for lf in list_files:
        out += read_list_file(lf)
    if not out:
        raise ValueError(f"inputs: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in "
                         f"{list(paths) + [f'list {lf}' for lf in list_files]}")
    return out


def _reason(e: BaseException) -> str:
    msg = str(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class ImageFiles(Dataset):
    """Item i: ``(index, image (3, H, W) float32, None)`` for ``files[indices[i]]``, decoded and
    preprocessed in the worker, or ``(index, None, reason)`` when the file cannot be read or decoded
    (missing, empty, truncated, not an image, ...). It never raises for a bad file."""

    def __init__(self, files: Sequence[str], preprocessor: Preprocessor, indices: Optional[Sequence[int]] = None):
        self.files = files
        self.indices = range(len(self.files)) if indices is None else indices
        self.pre = preprocessor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        idx = self.indices[i]
        path = self.files[idx]
        try:
            if os.stat(path).st_size == 0:
                return idx, None, "empty file (0 bytes)"
            return idx, self.pre.process(path), None
        except Exception as e:  # decoders raise many types (OSError, ValueError, SyntaxError, ...)
            # load_image wraps the decoder's error, which says what is wrong more plainly
            return idx, None, _reason(e.__cause__ if e.__cause__ is not None else e)


def collate(items) -> Tuple[List[int], Optional[torch.Tensor], List[Skipped]]:
    """Items of :class:`ImageFiles` -> ``(indices of the good images, images (B, 3, H, W) or None
    when none is good, [(index, reason), ...] of the bad ones)``."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    sizes = {tuple(x.shape) for _, x in good}
    if len(sizes) > 1:
        raise ValueError(f"images: preprocessed sizes differ {sorted(sizes)}; the preprocessor needs a crop_size "
                         "or an (H, W) size to batch images")
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


def make_loader(files: Sequence[str], preprocessor: Preprocessor, batches: Iterable[Sequence[int]],
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``files`` yielding :func:`collate` batches, one per entry of ``batches``
    (lists of input indices, in order)."""
    return DataLoader(ImageFiles(files, preprocessor), batch_sampler=list(batches), num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=False)


def batches_of(indices: Sequence[int], batch_size: int) -> List[List[int]]:
    """``indices`` cut into consecutive batches of ``batch_size`` (the last one shorter)."""
    indices = list(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], files: Sequence[str], preprocessor: Preprocessor,
                batches: Iterable[Sequence[int]], device: torch.device, dtype: torch.dtype, num_workers: int = 0,
                on_batch: Optional[Callable[[int], None]] = None
                ) -> Iterator[Tuple[List[int], Optional[torch.Tensor], List[Skipped]]]:
    """Run ``fn`` (images (B, 3, H, W) on ``device`` in ``dtype`` -> outputs (B, ...)) over the
    batches of input indices ``batches`` and yield ``(indices, outputs on the device, skipped)``
    per batch, in order; outputs is None when every file of the batch was bad. ``on_batch(n)`` is
    called with the number of inputs of each batch (good + bad), e.g. for a progress bar."""
    cuda = device.type == "cuda"
    loader = make_loader(files, preprocessor, batches, num_workers=num_workers, pin_memory=cuda)
    for idx, x, bad in loader:
        out = None
        if x is not None:
            # no_grad around the call only: a context held across ``yield`` would leak into the caller
            with torch.no_grad():
                out = fn(x.to(device=device, dtype=dtype, non_blocking=cuda))
        if on_batch is not None:
            on_batch(len(idx) + len(bad))
        yield idx, out, bad


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr counting images (shows img/s), or None when disabled or tqdm is missing."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, not a dependency
        return None
    return tqdm(total=total, unit="img", file=sys.stderr, desc=desc, dynamic_ncols=True)


def dist_info() -> Tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK`` / ``WORLD_SIZE`` (0, 1 when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK / WORLD_SIZE: expected 0 <= RANK < WORLD_SIZE, got {rank} / {world}")
    return rank, world

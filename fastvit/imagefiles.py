"""Image files in, model outputs out: the data side shared by ``fastvit classify`` and ``fastvit embed``.

* :func:`expand_inputs` turns files, folders (walked recursively, sorted) and list files (one
  image path a line) into one ordered list: the same arguments give the same order on every run.
* :class:`ImageFiles` decodes and preprocesses in DataLoader workers (to uint8 pixels, or only
  reads the bytes for GPU decode) and never raises on a bad file: it returns a marker with the
  reason, and :func:`collate` drops the markers from the batch and reports them, so one
  unreadable file among a million costs that file only.
* :func:`run_batches` moves the batches to the device (pinned memory, the copy of the next batch
  overlapping the current one's compute on CUDA) and yields ``(indices, outputs, skipped)``.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .preprocess import IMAGE_EXTENSIONS, Preprocessor

__all__ = ["expand_inputs", "read_list_file", "ImageFiles", "collate", "make_loader", "run_batches", "dist_info",
           "batches_of", "progress_bar", "Skipped", "DECODES", "input_model"]

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


DECODES = ("cpu", "cuda")


class ImageFiles(Dataset):
    """Item i: ``(index, image, None)`` for ``files[indices[i]]``, read and decoded in the worker,
    or ``(index, None, reason)`` when the file cannot be read or decoded (missing, empty,
    truncated, not an image, ...). It never raises for a bad file.

    The image is uint8 (3, H, W) with the checkpoint's geometry (:meth:`Preprocessor.load` in
    ``mode``), the model normalising it inside; the float32 (3, H, W) of :meth:`Preprocessor.process`
    for a processor without an exact uint8 result in exact mode (``rescale_first``); or, with
    ``decode='cuda'``, the file's bytes as a uint8 (n,) tensor, decoded later on the GPU.
    """

    def __init__(self, files: Sequence[str], preprocessor: Preprocessor, indices: Optional[Sequence[int]] = None,
                 mode: str = "exact", decode: str = "cpu"):
        from .data.decode import MODES

        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if decode not in DECODES:
            raise ValueError(f"decode: expected one of {DECODES}, got {decode!r}")
        self.files = files
        self.indices = range(len(self.files)) if indices is None else indices
        self.pre = preprocessor
        self.mode = mode
        self.decode = decode
        self.float_exact = mode == "exact" and not preprocessor.uint8_exact

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        from .data.decode import DecodeError, read_bytes

        idx = self.indices[i]
        path = self.files[idx]
        try:
            data = read_bytes(path)
            if self.decode == "cuda":
                return idx, torch.frombuffer(bytearray(data), dtype=torch.uint8), None
            if self.float_exact:
                return idx, self.pre.process(path), None
            return idx, self.pre.load(data, self.mode), None
        except DecodeError as e:
            return idx, None, str(e)
        except Exception as e:  # decoders raise many types (OSError, ValueError, SyntaxError, ...)
            # load_image wraps the decoder's error, which says what is wrong more plainly
            return idx, None, _reason(e.__cause__ if e.__cause__ is not None else e)


def collate(items, pin: bool = False) -> Tuple[List[int], Optional[torch.Tensor], List[Skipped]]:
    """Items of :class:`ImageFiles` -> ``(indices of the good images, images (B, 3, H, W) or None
    when none is good, [(index, reason), ...] of the bad ones)``; for byte items (GPU decode) the
    images are the list of byte tensors. ``pin``: stack into pinned memory (main process only)."""
    from .data.batches import stack_images

    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    if good and good[0][1].dim() == 1:  # encoded bytes
        return [i for i, _ in good], [x for _, x in good], bad
    images = stack_images([x for _, x in good], pin=pin) if good else None
    return [i for i, _ in good], images, bad


class _Collate:
    """collate, pinning when it runs in the main process (workers return shared memory, which the
    device feeder stages into pinned memory instead)."""

    def __init__(self, pin: bool):
        self.pin = pin

    def __call__(self, items):
        from torch.utils.data import get_worker_info

        return collate(items, pin=self.pin and get_worker_info() is None)


def _worker_init(_):
    # one worker, one core: OpenCV would otherwise start a thread per core in every worker
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    torch.set_num_threads(1)


def make_loader(files: Sequence[str], preprocessor: Preprocessor, batches: Iterable[Sequence[int]],
                num_workers: int = 0, pin_memory: bool = False, mode: str = "exact", decode: str = "cpu"
                ) -> DataLoader:
    """A DataLoader over ``files`` yielding :func:`collate` batches, one per entry of ``batches``
    (lists of input indices, in order); ``pin_memory``: batches stacked in pinned memory."""
    return DataLoader(ImageFiles(files, preprocessor, mode=mode, decode=decode), batch_sampler=list(batches),
                      num_workers=num_workers, collate_fn=_Collate(pin_memory and decode == "cpu"),
                      worker_init_fn=_worker_init if num_workers else None, persistent_workers=False)


def batches_of(indices: Sequence[int], batch_size: int) -> List[List[int]]:
    """``indices`` cut into consecutive batches of ``batch_size`` (the last one shorter)."""
    indices = list(indices)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def input_model(model, preprocessor: Preprocessor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """Make ``model`` take the uint8 batches of :func:`run_batches` normalised as ``preprocessor``
    says: its input normalisation is set to the preprocessor's (the preprocessor a job is given
    defines the normalisation, as when the job normalised on the CPU; a different one already on
    the model is replaced, with a warning). Returns None, or for a model without
    ``set_input_normalization`` the function that normalises a uint8 batch on its device (pass it
    to :func:`run_batches` as ``normalize``)."""
    import warnings

    want = (tuple(preprocessor.mean), tuple(preprocessor.std), float(preprocessor.rescale_factor))
    if hasattr(model, "set_input_normalization"):
        have = getattr(model, "input_norm", None)
        if have is not None and have != want:
            warnings.warn(f"model: its input normalisation {have} is replaced by the preprocessor's {want} (mean, "
                          "std, rescale) for this run", stacklevel=3)
        if have != want:
            model.set_input_normalization(*want)
        return None
    dtype = next(model.parameters()).dtype

    def normalize(x: torch.Tensor) -> torch.Tensor:
        mean, std, r = (torch.tensor(v, dtype=torch.float32, device=x.device) for v in want)
        return ((x.float() * r - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(dtype)

    return normalize


def run_batches(fn: Callable[[torch.Tensor], torch.Tensor], files: Sequence[str], preprocessor: Preprocessor,
                batches: Iterable[Sequence[int]], device: torch.device, dtype: torch.dtype, num_workers: int = 0,
                on_batch: Optional[Callable[[int], None]] = None, mode: str = "exact", decode: str = "cpu",
                stats: Optional[dict] = None, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Iterator[Tuple[List[int], Optional[torch.Tensor], List[Skipped]]]:
    """Run ``fn`` (images (B, 3, H, W) on ``device`` -> outputs (B, ...)) over the batches of input
    indices ``batches`` and yield ``(indices, outputs on the device, skipped)`` per batch, in
    order; outputs is None when every file of the batch was bad. ``on_batch(n)`` is called with
    the number of inputs of each batch (good + bad), e.g. for a progress bar.

    Images reach ``fn`` as uint8 (3, H, W) pixels (the model normalises them: see
    :meth:`fastvit.VisionTransformer.set_input_normalization`), or as float in ``dtype`` for a
    processor whose exact output is float. ``mode``: 'exact' or 'fast' preprocessing;
    ``decode``: 'cpu' (in the DataLoader workers) or 'cuda' (workers read bytes, one batched
    nvJPEG decode per batch on ``device``). The host-to-device copy of batch i + 1 overlaps the
    compute of batch i (:class:`fastvit.data.batches.DeviceBatches`). ``stats`` (a dict) receives
    ``copies`` and ``bytes`` sent to the device. ``normalize``: applied to uint8 batches on the
    device before ``fn``, for models that do not take uint8 (see :func:`input_model`).
    """
    from .data.batches import DeviceBatches, stack_images
    from .data.decode import decode_batch

    device = torch.device(device)
    cuda = device.type == "cuda"
    if decode == "cuda" and not cuda:
        raise ValueError(f"decode: 'cuda' decodes on the GPU and needs a CUDA device, got device {device}")
    loader = make_loader(files, preprocessor, batches, num_workers=num_workers, pin_memory=cuda, mode=mode,
                         decode=decode)

    def host_batches():
        for idx, x, bad in loader:
            yield (idx, bad), x

    feed = host_batches() if decode == "cuda" else DeviceBatches(host_batches(), device, dtype)
    for (idx, bad), x in feed:
        if decode == "cuda" and x is not None:
            decoded = decode_batch(x, preprocessor, device, mode)
            keep = [(i, y) for i, y in zip(idx, decoded) if isinstance(y, torch.Tensor)]
            bad = sorted(bad + [(i, str(y)) for i, y in zip(idx, decoded) if not isinstance(y, torch.Tensor)])
            idx = [i for i, _ in keep]
            x = torch.stack([y for _, y in keep]) if keep else None
        out = None
        if x is not None:
            # no_grad around the call only: a context held across ``yield`` would leak into the caller
            if normalize is not None and x.dtype == torch.uint8:
                x = normalize(x)
            with torch.no_grad():
                out = fn(x)
        if on_batch is not None:
            on_batch(len(idx) + len(bad))
        yield idx, out, bad
    if stats is not None and isinstance(feed, DeviceBatches):
        stats.update(copies=feed.copies, bytes=feed.bytes)


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

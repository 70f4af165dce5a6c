"""``fastvit.warmup``: compile and autotune every kernel a model will launch, before it matters.

Autotuning benchmarks candidate configs and synchronises the device, which must not happen
inside a CUDA-graph capture (or in a latency-critical first request). ``warmup`` runs the
model once per batch size on random images so that every (kernel, shape key) the model will
use has its config chosen (tuned, or read from the on-disk cache) and its code compiled.
Afterwards, capture and replay hit only in-memory choices.
"""

from __future__ import annotations

import sys
import time
from typing import Dict, Iterable, Optional, Tuple, Union

import torch

__all__ = ["warmup"]


def _tuned_counts() -> Dict[str, int]:
    autotune = sys.modules.get("fastvit.kernels.autotune")  # only if the triton backend was loaded
    if autotune is None:
        return {}
    return {t.name: t.stats.get("tuned", 0) for t in autotune.TUNABLES}


def warmup(
    model: torch.nn.Module,
    batch_sizes: Union[int, Iterable[int]] = (1,),
    dtype: Optional[torch.dtype] = None,
    img_size: Optional[Tuple[int, int]] = None,
    in_chans: Optional[int] = None,
    input_dtype: Optional[torch.dtype] = None,
) -> Dict[str, object]:
    """Run ``model`` on random images of each batch size so every kernel is compiled and tuned.

    Args:
        model: a :class:`fastvit.VisionTransformer` (or any module taking (B, C, H, W) images)
            already on its device, in its dtype and backend.
        batch_sizes: the batch sizes that will be served (an int or an iterable of ints).
        dtype: the dtype the model runs in; must match its parameters (convert the model
            first). Default: the parameters' dtype.
        img_size: (H, W) of the images; default the model's ``patch_embed.img_size``.
        in_chans: image channels; default read from the patch projection weight.
        input_dtype: the served images' dtype: ``dtype`` (default) or torch.uint8 (pixels; the
            model needs its input normalisation, :meth:`VisionTransformer.set_input_normalization`).

    Returns:
        {"batch_sizes": [...], "img_size": (H, W), "in_chans": C, "seconds": wall time, "tuned": {kernel: new tunings},
         "autotune": whether tuning was enabled}.
    """
    if isinstance(batch_sizes, int):
        batch_sizes = (batch_sizes,)
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: expected positive ints, got {batch_sizes}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model: expected a module with parameters, got one without")
    if dtype is None:
        dtype = param.dtype
    if dtype != param.dtype:
        raise ValueError(f"dtype: expected the model's parameter dtype {param.dtype} (convert the model first), "
                         f"got {dtype}")
    input_dtype = dtype if input_dtype is None else input_dtype
    if input_dtype not in (dtype, torch.uint8):
        raise ValueError(f"input_dtype: expected the model dtype {dtype} or torch.uint8, got {input_dtype}")
    pe = getattr(model, "patch_embed", None)
    if img_size is None:
        if pe is None or not hasattr(pe, "img_size"):
            raise ValueError("img_size: expected (H, W) for a model without patch_embed.img_size, got None")
        img_size = tuple(pe.img_size)
    if in_chans is None:
        proj = getattr(pe, "proj", None)
        in_chans = int(proj.weight.shape[1]) if proj is not None and not hasattr(pe, "backbone") else 3
    before = _tuned_counts()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in batch_sizes:
                if input_dtype == torch.uint8:
                    x = torch.randint(0, 256, (b, in_chans, *img_size), device=param.device, dtype=torch.uint8)
                else:
                    x = torch.randn(b, in_chans, *img_size, device=param.device, dtype=dtype)
                model(x)
        if param.device.type == "cuda":
            torch.cuda.synchronize(param.device)
    finally:
        model.train(was_training)
    after = _tuned_counts()
    autotune = sys.modules.get("fastvit.kernels.autotune")
    return {
        "batch_sizes": batch_sizes,
        "img_size": tuple(img_size),
        "in_chans": in_chans,
        "input_dtype": input_dtype,
        "seconds": time.perf_counter() - t0,
        "tuned": {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)},
        "autotune": bool(autotune is not None and autotune.autotune_enabled() and param.device.type == "cuda"),
    }

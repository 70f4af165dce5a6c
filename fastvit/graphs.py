"""``fastvit.compile``: one-call small-batch inference with a CUDA graph per batch bucket.

At batch 1-32 a ViT forward is bound by host time (Python + one launch per kernel). Replaying a
captured CUDA graph costs one launch. :func:`compile` warms the model up at every bucket size
(so every kernel is tuned, compiled and loaded before any capture), captures one graph per
bucket, and then serves a batch of B images by copying them into the smallest bucket >= B
(zero rows pad the rest), replaying, and returning the first B rows. Batches larger than every
bucket, other image sizes, CPU tensors, or inputs requiring grad run the model eagerly.

The bucketing and padding logic is pure (tested on a CPU); capture and replay need a GPU.
"""

from __future__ import annotations

import bisect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .warmup import warmup

__all__ = ["compile", "GraphedModel", "bucket_for", "pad_to"]


def _buckets(batch_sizes: Iterable[int]) -> List[int]:
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_sizes: expected positive ints, got {list(batch_sizes)}")
    return sizes


def bucket_for(batch: int, buckets: Sequence[int]) -> Optional[int]:
    """The smallest bucket >= ``batch`` in the sorted ``buckets``, or None when it is larger than all."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


def pad_to(x: torch.Tensor, size: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (B, ...) as (size, ...): rows B.. are zero. Writes into ``out`` (a graph's static
    input) when given, else into a new tensor."""
    B = x.shape[0]
    if B > size:
        raise ValueError(f"x: expected at most {size} rows for this bucket, got {B}")
    if out is None:
        out = x.new_empty((size,) + tuple(x.shape[1:]))
    out[:B].copy_(x)
    if B < size:
        out[B:].zero_()
    return out


class GraphedModel(torch.nn.Module):
    """A model served from CUDA graphs, one per batch bucket (built by :func:`compile`)."""

    def __init__(self, model: torch.nn.Module, buckets: Sequence[int], img_size: Tuple[int, int], in_chans: int,
                 dtype: torch.dtype):
        """``dtype``: the dtype of the served images (the static inputs'): the model's, or uint8."""
        super().__init__()
        self.model = model
        self.buckets = list(buckets)
        self.img_size = tuple(img_size)
        self.in_chans = in_chans
        self.dtype = dtype
        self._graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.fallback_reason: Optional[str] = None

    def capture(self, pool=None) -> None:
        """Capture one graph per bucket (the model must have run eagerly at every bucket)."""
        param = next(self.model.parameters())
        device = param.device
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        # largest first: smaller graphs reuse the pool's blocks
        for b in sorted(self.buckets, reverse=True):
            static_in = torch.zeros(b, self.in_chans, *self.img_size, device=device, dtype=self.dtype)
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.inference_mode():
                self.model(static_in)  # one more eager run on the capture stream (lazy state)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # capture on the stream that just ran eagerly: per-stream state (the cuda backend's
            # cuBLASLt workspace) already exists there, so nothing is allocated inside the capture
            with torch.inference_mode(), torch.cuda.graph(graph, pool=pool, stream=stream):
                static_out = self.model(static_in)
            self._graphs[b] = (graph, static_in, static_out)

    def _eligible(self, x: torch.Tensor) -> Optional[int]:
        if not self._graphs or not isinstance(x, torch.Tensor) or x.device.type != "cuda" or x.dim() != 4:
            return None
        if tuple(x.shape[1:]) != (self.in_chans,) + self.img_size or x.dtype != self.dtype:
            return None
        if torch.is_grad_enabled() and x.requires_grad:
            return None
        return bucket_for(x.shape[0], self.buckets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the model's output for those B images (a fresh tensor)."""
        b = self._eligible(x)
        if b is None:
            return self.model(x)
        graph, static_in, static_out = self._graphs[b]
        pad_to(x, b, out=static_in)
        graph.replay()
        return static_out[: x.shape[0]].clone()  # the static buffer is overwritten by the next replay


def compile(model: torch.nn.Module, batch_sizes: Iterable[int] = (1, 2, 4, 8, 16, 32),
            dtype: Optional[torch.dtype] = None, img_size: Optional[Tuple[int, int]] = None,
            in_chans: Optional[int] = None, input_dtype: Optional[torch.dtype] = None) -> GraphedModel:
    """Warm ``model`` up at every bucket size and capture one CUDA graph per bucket.

    Args:
        model: a :class:`fastvit.VisionTransformer` on its device, in its dtype and backend, in
            eval mode (it is put in eval mode).
        batch_sizes: the buckets; a batch of B runs in the smallest bucket >= B.
        dtype: the model's parameter dtype (checked; convert the model first).
        img_size, in_chans: the served image shape, default the model's.
        input_dtype: the served images' dtype: the model's (default) or torch.uint8 (pixels, the
            normalisation folded into the model: the graphs' static inputs are uint8, a quarter of
            the bytes; inputs of another dtype run eagerly).

    Returns:
        A :class:`GraphedModel` (call it like the model). Without a CUDA device it runs the model
        eagerly and says why in ``fallback_reason``.
    """
    buckets = _buckets(batch_sizes)
    info = warmup(model, buckets, dtype=dtype, img_size=img_size, in_chans=in_chans, input_dtype=input_dtype)
    graphed = GraphedModel(model.eval(), buckets, info["img_size"], info["in_chans"], info["input_dtype"])
    param = next(model.parameters())
    if param.device.type != "cuda":
        graphed.fallback_reason = f"parameters on {param.device.type}: CUDA graphs need a CUDA device; runs eagerly"
        return graphed
    graphed.capture()
    return graphed

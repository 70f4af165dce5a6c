"""Dynamic batching: requests in, batches out, results split back.

Every admitted image is one :class:`_Item` on one asyncio queue. Per model replica a collector
task takes the first waiting item, then more until ``max_batch_size`` images or ``max_delay_ms``
after the first, stacks them and hands the batch to the replica's own worker thread (the model
never runs on the event loop); the output rows go back to each item's future. Replicas pull
from the same queue, so a free replica takes the next batch.

Admission counts images not yet answered (waiting or in a running batch): past ``max_queue`` a
request is refused whole (:class:`QueueFull`, the server's 503), never half-queued. A cancelled
item (its client went away) leaves the count at once and is dropped when a collector meets it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ["Batcher", "Replica", "QueueFull", "WorkerDead"]


class QueueFull(Exception):
    """More images waiting than ``max_queue``: come back later."""


class WorkerDead(RuntimeError):
    """The model worker thread of every replica has stopped."""


class Replica:
    """One model copy on one device, run by its own thread.

    ``fn``: images (B, 3, H, W) on the CPU -> outputs (B, D) on the CPU. An exception of ``fn``
    fails that batch only; a fatal one (the thread itself stops: ``BaseException``, or a CUDA
    error, after which the device context is unusable) kills the worker: :attr:`alive` turns
    False and every batch given to it fails with :class:`WorkerDead`.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "cpu"):
        self.fn = fn
        self.name = name
        self.died: Optional[str] = None
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"fastvit-serve-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.died is None

    def submit(self, x: torch.Tensor) -> cf.Future:
        fut: cf.Future = cf.Future()
        if not self.alive:
            fut.set_exception(WorkerDead(f"model worker {self.name} is dead: {self.died}"))
            return fut
        self._jobs.put((fut, x))
        return fut

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        fut = None
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                fut, x = job
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    out = self.fn(x)
                except Exception as e:
                    fut.set_exception(e)
                    if "CUDA error" in str(e):
                        self.died = f"{type(e).__name__}: {e}"
                        return
                else:
                    fut.set_result(out)
                fut = None
        except BaseException as e:
            # the thread ends here; /health and every later request say why
            self.died = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            logging.getLogger("fastvit.serve").error("model worker %s died: %s", self.name, self.died)
        finally:
            if self.died is None:
                self.died = "stopped"
            why = WorkerDead(f"model worker {self.name} is dead: {self.died}")
            if fut is not None and not fut.done():
                fut.set_exception(why)
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job[0].set_running_or_notify_cancel():
                    job[0].set_exception(why)


async def _get_within(q: asyncio.Queue, seconds: float):
    if hasattr(asyncio, "timeout"):  # 3.11+: a get that times out leaves the item in the queue
        async with asyncio.timeout(seconds):
            return await q.get()
    return await asyncio.wait_for(q.get(), seconds)


class _Item:
    __slots__ = ("x", "future", "t0")

    def __init__(self, x: torch.Tensor, future: asyncio.Future):
        self.x = x
        self.future = future
        self.t0 = time.perf_counter()


class Batcher:
    """Gather images of all requests into batches for the replicas.

    Args:
        replicas: the model replicas (one per device).
        max_batch_size: images per batch at most.
        max_delay_ms: how long the first image of a batch waits for company.
        max_queue: images admitted and not answered at most.
        on_batch: called ``on_batch(size, seconds)`` after each batch ran (metrics).
    """

    def __init__(self, replicas: Sequence[Replica], max_batch_size: int = 64, max_delay_ms: float = 5.0,
                 max_queue: int = 1024, on_batch: Optional[Callable[[int, float], None]] = None):
        if not replicas:
            raise ValueError("replicas: expected at least one model replica, got none")
        for arg, v in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if int(v) < 1:
                raise ValueError(f"{arg}: expected >= 1, got {v}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms: expected >= 0, got {max_delay_ms}")
        self.replicas = list(replicas)
        self.max_batch_size = int(max_batch_size)
        self.max_delay = max_delay_ms / 1000.0
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.pending = 0  # images admitted and not answered (reserved, waiting or running)
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: List[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._collect(r), name=f"fastvit-batcher-{r.name}")
                       for r in self.replicas]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        for r in self.replicas:
            r.close()

    @property
    def alive(self) -> bool:
        """Whether at least one replica's worker runs."""
        return any(r.alive for r in self.replicas)

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    # ------------------------------------------------------------------ admission
    def reserve(self, n: int) -> None:
        """Hold ``n`` places for a request's images (before they are decoded), or raise
        :class:`QueueFull` / :class:`WorkerDead`."""
        if not self.alive:
            raise WorkerDead("; ".join(f"model worker {r.name} is dead: {r.died}" for r in self.replicas))
        if self.pending + n > self.max_queue:
            raise QueueFull(f"{self.pending} images waiting, {n} more would exceed max_queue {self.max_queue}")
        self.pending += n

    def release(self, n: int) -> None:
        """Give back places :meth:`reserve` held that will not be :meth:`submit`-ted."""
        self.pending -= n

    def submit(self, images: Sequence[torch.Tensor]) -> List[asyncio.Future]:
        """Queue reserved images (3, H, W); per image a future of its output row (D,)."""
        loop = asyncio.get_running_loop()
        futures = []
        for x in images:
            fut = loop.create_future()
            fut.add_done_callback(self._done)
            self._queue.put_nowait(_Item(x, fut))
            futures.append(fut)
        return futures

    def _done(self, fut: asyncio.Future) -> None:
        # answered, failed or cancelled (client gone): the place is free either way
        self.pending -= 1

    # ------------------------------------------------------------------ collecting
    async def _take(self, batch: List[_Item], deadline: float) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while len(batch) < self.max_batch_size:
            try:
                item = q.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    return
                try:
                    item = await _get_within(q, left)
                except (TimeoutError, asyncio.TimeoutError):
                    return
            if not item.future.done():
                batch.append(item)

    async def _collect(self, replica: Replica) -> None:
        loop = asyncio.get_running_loop()
        q = self._queue
        while True:
            first = await q.get()
            if first.future.done():
                continue
            batch = [first]
            await self._take(batch, loop.time() + self.max_delay)
            batch = [it for it in batch if not it.future.done()]
            if not batch:
                continue
            if not replica.alive:
                # hand the images to a live replica; none left: fail them
                if self.alive:
                    for it in batch:
                        q.put_nowait(it)
                    return
                why = WorkerDead(f"model worker {replica.name} is dead: {replica.died}")
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(why)
                continue
            await self._run(replica, batch)

    async def _run(self, replica: Replica, batch: List[_Item]) -> None:
        t0 = time.perf_counter()
        try:
            x = torch.stack([it.x for it in batch])
            out = await asyncio.wrap_future(replica.submit(x))
        except Exception as e:
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - t0)
        for it, row in zip(batch, out):
            if not it.future.done():
                it.future.set_result(row)

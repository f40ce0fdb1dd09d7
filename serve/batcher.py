"""Requests wait in a bounded queue; batches of them run in one worker thread through ``Pipeline.run_batch``.

A batch takes queued calls in arrival order until it holds ``max_images`` images or its first call has waited
``wait_s``; a call with more images than that runs alone. Calls that cannot share UNet steps (other sizes,
steps, schedulers) are grouped by ``run_batch`` itself. One worker thread: on a CPU each call already uses
every core, and a GPU runs one batch at a time best.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sdrt.runtime.errors import InternalError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``queue_size`` calls already (HTTP 503)."""


@dataclass(eq=False)
class Job:
    call: dict  # Pipeline.__call__ keyword arguments
    images: int
    future: asyncio.Future  # the GenerationResult, or the call's own SdrtError (or another exception)
    queued_at: float = field(default_factory=time.perf_counter)
    queue_wait: float = 0.0  # seconds from submit to the start of its batch


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[dict]], list],
        max_images: int,
        wait_s: float,
        queue_size: int,
        on_batch: Callable[[list[Job]], None] | None = None,
    ):
        self.run_batch, self.max_images, self.wait_s, self.queue_size = run_batch, max_images, wait_s, queue_size
        self.on_batch = on_batch  # called with each batch as it starts (metrics)
        self.last_batch_s = 1.0  # how long the last batch took: the basis of Retry-After
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sdrt-serve-worker")

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, call: dict, images: int) -> Job:
        if len(self._queue) >= self.queue_size:
            raise QueueFull
        job = Job(call, images, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._arrived.set()
        return job

    def withdraw(self, job: Job) -> None:
        """Drop a job whose client left or timed out: a queued one frees its slot and never runs; a running
        one finishes unseen."""
        if job in self._queue:
            self._queue.remove(job)
        job.future.cancel()

    async def in_worker(self, fn: Callable, *args):
        """Run ``fn`` in the worker thread, between batches (the warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def run(self) -> None:
        """The batching loop; runs until cancelled."""
        while True:
            batch = [job for job in await self._next_batch() if not job.future.done()]
            if batch:
                await self._run(batch)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    async def _next_batch(self) -> list[Job]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.popleft()]
        images, deadline = batch[0].images, batch[0].queued_at + self.wait_s
        while images < self.max_images:
            if self._queue:
                if images + self._queue[0].images > self.max_images:
                    break
                batch.append(self._queue.popleft())
                images += batch[-1].images
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter()
        for job in batch:
            job.queue_wait = start - job.queued_at
        if self.on_batch is not None:
            self.on_batch(batch)
        try:
            results = await self.in_worker(self.run_batch, [job.call for job in batch])
        except Exception:  # outside any one call (run_batch keeps each call's own): the batch shares it, by id
            error = InternalError("the batch")
            log.exception("request %s: run_batch failed for a batch of %d calls", error.request_id, len(batch))
            results = [error] * len(batch)
        self.last_batch_s = time.perf_counter() - start
        for job, result in zip(batch, results):
            if not job.future.done():
                job.future.set_result(result)

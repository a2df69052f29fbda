"""The bounded queue and dynamic batcher: jobs wait on the event loop, batches run in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sdexport.runtime.result import GenerationCancelled, GenerationResult
from sdexport.serve.merge import Share, merged_args, split_result

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(step_index, num_steps)``, called from the worker thread after every step."""


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({limit} requests waiting, --max-queue {limit}); retry after "
                         f"{retry_after} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The server is warming up or draining; no new work is taken."""


class JobCancelled(Exception):
    """The job was cancelled (``reason``: "deadline", "disconnect" or "shutdown") before it finished."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled: {reason}")
        self.reason = reason


@dataclass
class Job:
    """One request waiting for, or running in, a batch. ``future`` resolves on the event loop."""

    share: Share
    key: Hashable | None
    future: asyncio.Future[Any]
    progress: Progress | None = None
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    batch_size: int = 0
    cancel_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_cancel: Callable[[], None] | None = None

    def cancel(self, reason: str) -> None:
        """Stop this job: dropped from the queue, or its batch stops at the next step if no other job needs it."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
            if self.on_cancel is not None:
                self.on_cancel()

    @property
    def live(self) -> bool:
        """Not cancelled and not finished."""
        return self.cancel_reason is None and not self.done.is_set()


@dataclass
class BatchReport:
    """What a finished batch tells the metrics: jobs, images, the result's timings (None if it failed), status."""

    jobs: list[Job]
    images: int
    seconds: float
    result: GenerationResult | None
    status: str


class Batcher:
    """Admits jobs into a bounded queue and runs compatible ones together, up to ``max_batch`` images.

    ``run(args)`` generates (a Pipeline's ``generate``); it runs in one of ``workers`` threads. The oldest
    waiting job waits at most ``window_s`` for compatible jobs; a job that waited longer (all workers busy) is
    batched with what is waiting at once.
    """

    def __init__(self, run: Callable[[Any], GenerationResult], *, max_queue: int, max_batch: int, window_s: float,
                 workers: int, on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self._run, self.max_queue, self.max_batch, self.window_s = run, max_queue, max_batch, window_s
        self.workers = workers
        self._on_batch = on_batch or (lambda report: None)
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.accepting = False
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sdexport-serve")
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_batch = 1.0

    def start(self) -> None:
        """Start the dispatcher on the running event loop (jobs are accepted once ``accepting`` is set)."""
        self._task = asyncio.get_running_loop().create_task(self._dispatch())

    def submit(self, share: Share, key: Hashable | None, progress: Progress | None = None) -> Job:
        """Queue a validated request; raise QueueFull or NotAccepting instead of queueing past the limits."""
        if not self.accepting or self._task is None:
            raise NotAccepting("the server is not accepting requests (warming up or shutting down)")
        waiting = sum(1 for job in self.pending if job.live)
        if waiting >= self.max_queue:
            batches = waiting / max(1, self.max_batch) / self.workers + 1
            raise QueueFull(self.max_queue, max(1, round(batches * self._seconds_per_batch)))
        job = Job(share, key, asyncio.get_running_loop().create_future(), progress, on_cancel=self._wakeup.set)
        self.pending.append(job)
        self._wakeup.set()
        return job

    @property
    def depth(self) -> int:
        """Jobs waiting for a worker."""
        return sum(1 for job in self.pending if job.live)

    async def _dispatch(self) -> None:
        free = asyncio.Semaphore(self.workers)
        loop = asyncio.get_running_loop()
        while True:
            await free.acquire()
            batch = await self._next_batch()
            self.running.extend(batch)
            done = loop.run_in_executor(self._executor, self._execute, batch)
            done.add_done_callback(lambda fut, jobs=batch: self._finish(jobs, fut, free))

    async def _next_batch(self) -> list[Job]:
        """The oldest live job plus compatible ones, waiting up to the window for more to arrive."""
        while True:
            self.pending = [job for job in self.pending if job.live]
            if self.pending:
                head = self.pending[0]
                batch = self._compatible(head)
                left = head.enqueued + self.window_s - time.monotonic()
                full = sum(job.share.images for job in batch) >= self.max_batch
                if head.key is None or full or left <= 0:
                    taken = {id(job) for job in batch}
                    self.pending = [job for job in self.pending if id(job) not in taken]
                    return batch
            else:
                left = None
            self._wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=left)

    def _compatible(self, head: Job) -> list[Job]:
        batch, images = [head], head.share.images
        if head.key is None:
            return batch
        for job in self.pending[1:]:
            if job.key == head.key and images + job.share.images <= self.max_batch:
                batch.append(job)
                images += job.share.images
        return batch

    def _execute(self, batch: list[Job]) -> list[GenerationResult]:
        """Worker thread: one Pipeline call for the batch; stops early when every job in it was cancelled."""
        now = time.monotonic()
        for job in batch:
            job.started, job.batch_size = now, sum(j.share.images for j in batch)

        def step(index: int, total: int, _timestep: float, _latents: Any) -> bool:
            alive = [job for job in batch if job.live]
            for job in alive:
                if job.progress is not None:
                    job.progress(index, total)
            return bool(alive)

        shares = [job.share for job in batch]
        return split_result(self._run(merged_args(shares, step)), shares)

    def _finish(self, batch: list[Job], fut: asyncio.Future[list[GenerationResult]], free: asyncio.Semaphore) -> None:
        """Event loop: resolve every job's future with its share, or the batch's error; free the worker."""
        free.release()
        self.running = [job for job in self.running if job not in batch]
        seconds = time.monotonic() - min(job.started or job.enqueued for job in batch)
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        error = fut.exception()
        results = None if error else fut.result()
        for index, job in enumerate(batch):
            job.done.set()
            if job.future.done():
                continue
            if job.cancel_reason is not None:
                job.future.set_exception(JobCancelled(job.cancel_reason))
            elif error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(results[index])
        status = "ok" if error is None else "cancelled" if isinstance(error, GenerationCancelled) else "error"
        images = sum(job.share.images for job in batch)
        self._on_batch(BatchReport(batch, images, seconds, results[0] if results else None, status))

    def cancel_all(self, reason: str) -> None:
        """Cancel every waiting and running job (the running batches stop at their next step)."""
        for job in [*self.pending, *self.running]:
            job.cancel(reason)
            if not job.future.done():
                job.future.set_exception(JobCancelled(reason))

    async def stop(self) -> None:
        """Stop taking jobs, cancel what is left, and wait for the worker threads to return."""
        self.accepting = False
        self.cancel_all("shutdown")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._executor.shutdown(wait=True))

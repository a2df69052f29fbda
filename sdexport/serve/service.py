"""The service behind the routes: a Pipeline, its batcher and metrics, readiness, and one request's life."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.result import GenerationResult, NonFiniteError, RequestError
from sdexport.serve.batcher import Batcher, JobCancelled, NotAccepting, Progress, QueueFull
from sdexport.serve.config import ServeConfig
from sdexport.serve.errors import ApiError
from sdexport.serve.merge import Share, batch_key
from sdexport.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A finished request: its result (its own images and seeds), the batch it ran in, its queue wait."""

    result: GenerationResult
    batch_images: int
    queue_seconds: float


class Service:
    """One Pipeline served: validation, admission into the batcher, deadlines, cancellation, readiness."""

    def __init__(self, pipe: Any, config: ServeConfig) -> None:
        self.pipe, self.config = pipe, config
        folder_max = int(pipe.ranges.batch[2])
        self.max_batch = min(config.max_batch, folder_max)
        self.max_n = min(config.max_n or folder_max, folder_max)
        self.batcher = Batcher(pipe.generate, max_queue=config.max_queue, max_batch=self.max_batch,
                               window_s=config.batch_window_ms / 1000, workers=config.workers,
                               on_batch=lambda report: self.metrics.observe_batch(report))
        self.metrics = Metrics(lambda: self.batcher.depth)
        self.ready = False
        self.draining = False

    async def start(self) -> None:
        """Start the batcher, warm the engines up (readyz stays false until done), then accept requests."""
        self.batcher.start()
        if self.config.warmup_steps:
            t0 = time.perf_counter()
            args = GenerationArgs(prompt="warm-up", num_inference_steps=self.config.warmup_steps, seed=0)
            await asyncio.get_running_loop().run_in_executor(None, self.pipe.generate, args)
            log.info("warmed up in %.2f s", time.perf_counter() - t0)
        self.batcher.accepting = True
        self.ready = True

    def begin_drain(self) -> None:
        """Stop taking new requests; the ones admitted keep running."""
        self.draining, self.ready = True, False
        self.batcher.accepting = False

    async def stop(self) -> None:
        """Cancel what is left and wait for the worker threads."""
        self.begin_drain()
        await self.batcher.stop()

    def validate(self, args: GenerationArgs) -> Share:
        """The library's own checks; RequestError -> 422 with its message."""
        try:
            request, _, _ = self.pipe.validate(args)
        except RequestError as exc:
            raise ApiError(422, str(exc), _named(str(exc), args)) from exc
        if request.num_images > self.max_n:
            raise ApiError(422, f"this request makes {request.num_images} images; the server allows at most "
                           f"{self.max_n} per request (--max-n, capped by the folder's batch range)", "n")
        return Share(args, request)

    def deadline(self, timeout: float | None) -> float:
        """Seconds this request may take: its ``timeout``, at most the server's."""
        return min(timeout or self.config.timeout_s, self.config.timeout_s)

    async def run(self, share: Share, timeout: float | None, request: Request | None,
                  progress: Progress | None = None) -> Outcome:
        """Queue the request, wait for its share of a batch; 504 past the deadline, cancelled on disconnect."""
        try:
            job = self.batcher.submit(share, batch_key(share.args, share.request), progress)
        except QueueFull as exc:
            raise ApiError(429, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
        except NotAccepting as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": "5"}) from exc
        seconds = self.deadline(timeout)
        waiter = asyncio.ensure_future(asyncio.shield(job.future))
        watchers = [waiter] + ([asyncio.ensure_future(_disconnected(request))] if request is not None else [])
        try:
            done, _ = await asyncio.wait(watchers, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.cancel("disconnect")
            raise
        finally:
            for task in watchers[1:]:
                task.cancel()
        if waiter not in done:
            reason = "disconnect" if done else "deadline"
            job.cancel(reason)
            waiter.cancel()
            raise ApiError(504 if reason == "deadline" else 499, f"the request took longer than its deadline of "
                           f"{seconds:g} s (timeout field, at most --timeout-s) and was cancelled"
                           if reason == "deadline" else "the client disconnected; the request was cancelled")
        return self._outcome(job, waiter)

    def _outcome(self, job: Any, waiter: asyncio.Future[Any]) -> Outcome:
        try:
            result = waiter.result()
        except JobCancelled as exc:
            raise ApiError(503 if exc.reason == "shutdown" else 504, f"the request was cancelled ({exc.reason})") \
                from exc
        except NonFiniteError as exc:
            raise ApiError(500, str(exc)) from exc
        except RequestError as exc:
            raise ApiError(422, str(exc)) from exc
        queued = (job.started or job.enqueued) - job.enqueued
        return Outcome(result, job.batch_size, queued)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the ASGI server sends http.disconnect once the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _named(message: str, args: GenerationArgs) -> str | None:
    """The generation argument a library message starts with, if any (the ``param`` of the error)."""
    head = message.split("=", 1)[0].split(" ", 1)[0].split(":", 1)[0]
    return head if hasattr(args, head) else None


"""Prometheus metrics of one server: requests by status, queue depth, batch sizes, stage latencies, images/s."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdexport.serve.batcher import BatchReport

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 60.0
"""images/s is averaged over this many seconds."""


class Metrics:
    """The server's metrics in their own registry (several apps in one process do not collide)."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("sdexport_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.queue = Gauge("sdexport_queue_depth", "requests waiting for a worker", registry=self.registry)
        self.queue.set_function(lambda: float(queue_depth()))
        self.batch_images = Histogram("sdexport_batch_images", "images per engine batch",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.batch_requests = Histogram("sdexport_batch_requests", "requests per engine batch",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.stage = Histogram("sdexport_stage_seconds", "seconds per stage: queue (wait), text_encoder, unet, "
                               "vae_encoder, vae_decoder, generate (the pipeline call), request (HTTP)", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("sdexport_images", "images generated", registry=self.registry)
        self.batches = Counter("sdexport_batches", "engine batches by outcome", ["status"], registry=self.registry)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        rate = Gauge("sdexport_images_per_second", f"images generated per second over the last {RATE_WINDOW_S:.0f} s",
                     registry=self.registry)
        rate.set_function(self.images_per_second)

    def observe_batch(self, report: BatchReport) -> None:
        """Record a finished batch: its size, its stages' times, its images."""
        self.batches.labels(report.status).inc()
        self.batch_images.observe(report.images)
        self.batch_requests.observe(len(report.jobs))
        for job in report.jobs:
            if job.started is not None:
                self.stage.labels("queue").observe(job.started - job.enqueued)
        if report.result is None:
            return
        timings = report.result.timings
        for name in ("text_encoder", "vae_encoder", "vae_decoder"):
            if getattr(timings, name):
                self.stage.labels(name).observe(getattr(timings, name))
        self.stage.labels("unet").observe(sum(timings.unet))
        self.stage.labels("generate").observe(timings.total)
        self.images.inc(report.images)
        with self._lock:
            self._recent.append((time.monotonic(), report.images))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        """Record an answered request."""
        self.requests.labels(endpoint, str(status)).inc()
        self.stage.labels("request").observe(seconds)

    def images_per_second(self) -> float:
        """Images finished over the last RATE_WINDOW_S seconds, per second."""
        horizon = time.monotonic() - RATE_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0][0] < horizon:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

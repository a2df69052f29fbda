"""Scale-out: the same FastAPI app as a Ray Serve deployment, one replica per GPU, autoscaling bounds from flags."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sdexport.serve.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaPlan:
    """How many replicas and what each asks Ray for: ``num_gpus=1`` is one replica per GPU; 0 for CPU replicas."""

    num_replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_gpus: float = 1.0
    num_cpus: float = 1.0

    def __post_init__(self) -> None:
        """Check the bounds; raise ValueError naming the value."""
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas={self.num_replicas} is not allowed: pass an integer >= 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= (self.max_replicas or 0):
            raise ValueError(f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}: need "
                             "0 <= min_replicas <= max_replicas, max_replicas >= 1")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError(f"num_gpus={self.num_gpus}, num_cpus={self.num_cpus}: pass numbers >= 0")

    def deployment_options(self, config: ServeConfig) -> dict[str, Any]:
        """``serve.deployment`` keyword arguments: resources, replica count or autoscaling, in-flight limit, drain."""
        options: dict[str, Any] = {
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            # The app queues and batches itself: let Ray hand a replica everything its own queue can hold.
            "max_ongoing_requests": config.max_queue + config.max_batch * config.workers,
            "graceful_shutdown_timeout_s": config.drain_s,
        }
        if self.max_replicas is not None:
            options["autoscaling_config"] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                             "target_ongoing_requests": max(1, config.max_batch)}
        else:
            options["num_replicas"] = self.num_replicas
        return options


def build_deployment(folder: str | os.PathLike[str], config: ServeConfig, plan: ReplicaPlan, *,
                     backend: str = "onnxruntime", engine_options: Mapping[str, Any] | None = None) -> Any:
    """A bound Ray Serve application whose replicas each run ``create_app(folder, ...)`` (loaded on the replica)."""
    from ray import serve

    source, options = str(folder), dict(engine_options or {})

    def build_app() -> Any:
        from sdexport.serve.app import create_app

        return create_app(source, config, backend=backend, engine_options=options)

    @serve.deployment(name="sdexport", **plan.deployment_options(config))
    @serve.ingress(build_app)
    class SdexportDeployment:
        """One replica: the sdexport FastAPI app over its own Pipeline (its GPU is CUDA_VISIBLE_DEVICES' first)."""

    return SdexportDeployment.bind()


def run_on_ray(folder: str | os.PathLike[str], config: ServeConfig, plan: ReplicaPlan, *,
               backend: str = "onnxruntime", engine_options: Mapping[str, Any] | None = None,
               address: str | None = None) -> int:
    """Join (or start) a Ray cluster, run the deployment on config.host:port until SIGTERM / SIGINT, then drain."""
    import ray
    from ray import serve

    ray.init(address=address)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_deployment(folder, config, plan, backend=backend, engine_options=engine_options),
                  name="sdexport", route_prefix="/")
        log.info("Ray Serve: sdexport on http://%s:%s", config.host, config.port)
        stop.wait()
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ray.shutdown()
    return 0

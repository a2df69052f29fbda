"""What a synthesis run is asked to do (SynthConfig) and what it did (Summary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdexport.synth.rows import Defaults


@dataclass(frozen=True)
class RayOptions:
    """Scale-out on Ray Data: the cluster address and the resources of each generation actor."""

    address: str = "auto"
    """``local`` (a fresh in-process instance on loopback), ``auto`` (the running cluster) or ``host:port``."""
    workers: int | None = None
    """Actors (one Pipeline each); default: the cluster's GPUs / gpus_per_worker, else 1."""
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    """Keep it below the CPUs per node on CPU-only clusters: an actor pool holding every CPU starves the read stage."""


@dataclass(frozen=True)
class SynthConfig:
    """A run: compiled folder + prompt table -> dataset folder. Re-running the same config resumes it."""

    folder: Path
    prompts: Path
    out: Path
    per_prompt: int = 1
    batch: int | None = None
    """Images per engine call (default: the folder's optimum batch)."""
    task: str = "auto"
    format: str = "imagefolder"
    seed: int = 0
    """The run seed: image i of row r gets a seed derived from (seed, r's id, i) unless the row has a seed."""
    defaults: Defaults = field(default_factory=Defaults)
    fail_fast: bool = False
    dry_run: bool = False
    shard_size: int = 1000
    backend: str = "onnxruntime"
    engine_options: dict[str, Any] = field(default_factory=dict)
    verify: bool = True
    ray: RayOptions | None = None


@dataclass
class Summary:
    """The outcome of a run (or of a dry run: the plan, nothing generated)."""

    rows: int
    bad_rows: int
    images: int
    already_done: int
    written: int = 0
    failed: int = 0
    seconds: float = 0.0
    plan: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Images written per second of wall time."""
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def plan_text(self) -> str:
        """The ``--dry-run`` report: one line per group of batches, then the totals."""
        totals = (f"{self.rows} rows ({self.bad_rows} bad), {self.images} images planned, {self.already_done} "
                  f"already done, {self.images - self.already_done} to make")
        return "\n".join([*self.plan, totals])

    def text(self) -> str:
        """A one-line report."""
        return (f"{self.rows} rows ({self.bad_rows} bad), {self.images} images planned, {self.already_done} already "
                f"done, {self.written} written, {self.failed} failed, {self.seconds:.1f} s, "
                f"{self.images_per_s:.2f} images/s")

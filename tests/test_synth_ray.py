"""sdexport synth on a local Ray instance (opt-in: pytest -m ray): the same bytes as a local run, and resume."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fakes.ray_local import local_ray
from fakes.synth_tables import metadata, snapshot, twenty_rows, write_table
from sdexport.synth import Defaults, RayOptions, SynthConfig, synthesize

pytestmark = pytest.mark.ray

@pytest.fixture(scope="module")
def ray_instance() -> Iterator[Any]:
    """A fresh loopback-only Ray instance with 2 CPUs and 2 logical GPUs (no GPU needed), shut down at the end."""
    pytest.importorskip("ray")
    with local_ray() as ray:
        yield ray


@pytest.fixture(scope="module")
def local_run(tiny_folder: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The 20-row table and its outputs from local (no Ray) runs in both formats."""
    root = tmp_path_factory.mktemp("synth-ray")
    table = write_table(root / "prompts.jsonl", twenty_rows())
    outs = {"table": table}
    for fmt in ("imagefolder", "webdataset"):
        outs[fmt] = root / f"local-{fmt}"
        synthesize(_config(tiny_folder("tiny-sd15"), table, outs[fmt], fmt, None))
    return outs


def _config(folder: Path, table: Path, out: Path, fmt: str, ray: RayOptions | None) -> SynthConfig:
    return SynthConfig(folder, table, out, per_prompt=2, batch=4, format=fmt, shard_size=16,
                       defaults=Defaults(steps=3), ray=ray)


# 2 CPU actors of 0.5 CPU each: an actor pool holding both CPUs would starve Ray Data's other stages
CPU_ACTORS = RayOptions("local", workers=2, cpus_per_worker=0.5)


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset"])
def test_ray_output_equals_the_local_run_byte_for_byte(fmt: str, ray_instance: Any, local_run: dict[str, Path],
                                                      tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    summary = synthesize(_config(tiny_folder("tiny-sd15"), local_run["table"], tmp_path / "ray", fmt, CPU_ACTORS))
    assert (summary.written, summary.failed) == (40, 0)
    assert snapshot(tmp_path / "ray") == snapshot(local_run[fmt])


def test_ray_resumes_a_partial_output_and_places_one_actor_per_logical_gpu(
        ray_instance: Any, local_run: dict[str, Path], tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "partial"
    shutil.copytree(local_run["imagefolder"], out)
    lines = (out / "train" / "metadata.jsonl").read_text().splitlines(keepends=True)
    (out / "train" / "metadata.jsonl").write_text("".join(lines[:13]))  # 27 images lost their lines
    for record in metadata(local_run["imagefolder"])[20:]:
        (out / "train" / record["file_name"]).unlink()
    gpus = RayOptions("local", gpus_per_worker=1, cpus_per_worker=0.5)  # 2 actors from the 2 logical GPUs
    summary = synthesize(_config(tiny_folder("tiny-sd15"), local_run["table"], out, "imagefolder", gpus))
    assert (summary.already_done, summary.written) == (13, 27)
    assert snapshot(out) == snapshot(local_run["imagefolder"])

"""Shared fixtures: tiny compiled folders built once per session, their diffusers sources and loaded Pipelines.

Set SDEXPORT_TEST_BUILDS=/some/dir to keep the tiny folders between sessions (builds are incremental).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

TESTS = Path(__file__).resolve().parent
# Importable by every test module: tests/fakes (shared fakes and test data, ``from fakes.schedulers import ...``)
# and benchmarks/harness (the benchmark harness, outside the installed package, which the bench tests cover).
for _folder in (TESTS, TESTS.parent / "benchmarks"):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_folder("tiny-sdxl")`` -> the compiled folder of that preset, built on first use."""
    from sdexport.export.build import BuildConfig, build

    keep = os.environ.get("SDEXPORT_TEST_BUILDS")
    root = Path(keep) if keep else tmp_path_factory.mktemp("tiny-folders")
    built: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in built:
            build(BuildConfig(model=preset, out=root / preset))
            built[preset] = root / preset
        return built[preset]

    return get


@pytest.fixture(scope="session")
def tiny_source() -> Callable[[str], Any]:
    """``tiny_source("tiny-sdxl")`` -> the loaded diffusers source (``.pipe``, ``.spec``) with the folder's weights."""
    from sdexport.export.load import inspect_source, load_source

    loaded: dict[str, Any] = {}

    def get(preset: str) -> Any:
        if preset not in loaded:
            loaded[preset] = load_source(inspect_source(preset))
        return loaded[preset]

    return get


@pytest.fixture(scope="session")
def tiny_pipe(tiny_folder: Callable[[str], Path]) -> Callable[[str], Any]:
    """``tiny_pipe("tiny-sdxl")`` -> a loaded runtime Pipeline (shared; the Pipeline is thread-safe)."""
    from sdexport.runtime.pipeline import Pipeline

    loaded: dict[str, Any] = {}

    def get(preset: str) -> Any:
        if preset not in loaded:
            loaded[preset] = Pipeline.load(tiny_folder(preset))
        return loaded[preset]

    return get


@pytest.fixture(scope="session")
def picture() -> Image.Image:
    """An 80x64 (HxW) RGB test picture: smooth gradients plus seeded noise (not a multiple-of-8 size on purpose)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:80, 0:64]
    base = np.stack([x * 4, y * 3, (x + y) * 2], axis=-1).astype(np.float64)
    noisy = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


@pytest.fixture(scope="session")
def mask() -> Image.Image:
    """A 72x56 mask: white (repaint) rectangle in the middle, black elsewhere."""
    array = np.zeros((72, 56), np.uint8)
    array[20:52, 12:44] = 255
    return Image.fromarray(array)


class ParityRun:
    """One generation by diffusers and by the runtime with the same weights and seeds; final latents and images."""

    def __init__(self, ref_latents: np.ndarray, ref_images: np.ndarray, latents: np.ndarray,
                 images: np.ndarray) -> None:
        self.ref_latents, self.ref_images, self.latents, self.images = ref_latents, ref_images, latents, images

    @property
    def latent_diff(self) -> float:
        """max |runtime - diffusers| over the final latents."""
        return float(np.abs(self.latents - self.ref_latents).max())

    @property
    def image_diff(self) -> float:
        """max |runtime - diffusers| over the decoded images as floats in [0, 1]."""
        return float(np.abs(self.images - self.ref_images).max())


@pytest.fixture(scope="session")
def parity_table() -> Any:
    """Rows (case, max |latent diff|, max |image diff|) of every parity check in the session.

    With SDEXPORT_PARITY_REPORT=path.md the rows are written there as a markdown table at the end of the session.
    """
    rows: list[tuple[str, float, float]] = []
    yield rows
    target = os.environ.get("SDEXPORT_PARITY_REPORT")
    if target and rows:
        lines = ["| case | max abs diff, final latents | max abs diff, image (x255) |", "|---|---:|---:|"]
        lines += [f"| {case} | {lat:.1e} | {img * 255:.3f} |" for case, lat, img in rows]
        Path(target).write_text("\n".join(lines) + "\n")


@pytest.fixture
def parity_run(request: pytest.FixtureRequest, tiny_source: Callable[[str], Any], tiny_pipe: Callable[[str], Any],
               parity_table: list[tuple[str, float, float]]) -> Callable[..., ParityRun]:
    """``parity_run(preset, task, seeds=[...], scheduler=..., pipe=None, source_pipe=None, runtime_kwargs=None,
    **kwargs)`` -> ParityRun.

    diffusers gets one CPU torch.Generator per image, the runtime the same seeds with ``rng="torch"``, so both draw
    identical noise. Both capture the final latents through their step callbacks and return [0, 1] float images.
    Every run is recorded in ``parity_table`` under the test's name.
    """
    from sdexport.export.parity import diffusers_pipeline, torch_generators

    def run(preset: str, task: str, seeds: list[int], scheduler: str | None = None,
            scheduler_config: dict[str, Any] | None = None, pipe: Any = None, source_pipe: Any = None,
            runtime_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> ParityRun:
        pipe = pipe or tiny_pipe(preset)  # another loaded Pipeline of the preset's folder (e.g. another backend)
        # source_pipe: the diffusers pipeline the folder was built from when it is not the preset's (in memory, with
        # an adapter); runtime_kwargs: arguments only the runtime takes (diffusers sets them on the pipeline).
        source_pipe = source_pipe if source_pipe is not None else tiny_source(preset).pipe
        oracle = diffusers_pipeline(source_pipe, pipe.spec, task, scheduler, scheduler_config)
        captured: list[np.ndarray] = []

        def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            captured.append(tensors["latents"].numpy().copy())
            return tensors

        ref = oracle(**kwargs, generator=torch_generators(seeds), output_type="np", callback_on_step_end=keep)
        ours_latents: list[np.ndarray] = []
        ours = pipe(**kwargs, **(runtime_kwargs or {}), seed=seeds, rng="torch", output_type="np_float",
                    scheduler=scheduler, scheduler_config=scheduler_config,
                    callback=lambda i, n, t, lat: ours_latents.append(lat.copy()))
        result = ParityRun(captured[-1], np.asarray(ref.images), ours_latents[-1], ours.images)
        parity_table.append((f"{task} {request.node.callspec.id if hasattr(request.node, 'callspec') else preset}",
                             result.latent_diff, result.image_diff))
        return result

    return run


@pytest.fixture(scope="session")
def folder_2x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny local diffusers folder whose VAE downsamples 2x (UNet sample_size 16: native 32 px), saved once."""
    from fakes.folders import save_tiny_2x_folder

    return save_tiny_2x_folder(tmp_path_factory.mktemp("source") / "tiny-2x")

"""End-to-end parity with diffusers on every registered backend that can run on this machine.

A backend's registry probe decides: one that cannot run here (tensorrt without an NVIDIA GPU) is reported as not
applicable with the probe's reason. A new backend registered in ``sdexport.engines`` arrives tested by this file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fakes.parity import IMAGE_ATOL, LATENT_ATOL
from sdexport.engines import backend_names, get_backend

# Backends that run the fp32 graphs with other kernels: TensorRT uses TF32 for fp32 layers by default.
TOLERANCES = {"tensorrt": (1e-2, 2 / 255)}
BUILD_OPTIONS: dict[str, dict[str, Any]] = {"tensorrt": {"shapes": "both"}}  # any size of the folder's range
PRESET = "tiny-sd15"


def _folder(name: str, tiny_folder: Callable[[str], Path], tmp_path: Path) -> Path:
    """The preset's folder; for a backend that compiles, a copy built with it (the graphs are reused)."""
    from sdexport.export.build import BuildConfig, build

    if not get_backend(name).compiles:
        return tiny_folder(PRESET)
    folder = tmp_path / PRESET
    shutil.copytree(tiny_folder(PRESET), folder)
    result = build(BuildConfig(model=PRESET, out=folder, backend=name, backend_options=BUILD_OPTIONS.get(name)))
    assert result.built == [] and result.manifest["backend"] == name
    return folder


@pytest.mark.parametrize("name", backend_names())
def test_txt2img_matches_diffusers_on_each_backend(name: str, parity_run: Any, tiny_folder: Callable[[str], Path],
                                                   tmp_path: Path) -> None:
    from sdexport.runtime.pipeline import Pipeline

    status = get_backend(name).status()
    if not status.available:
        pytest.skip(f"not applicable here ({name}'s probe): {status.detail}")
    pipe = Pipeline.load(_folder(name, tiny_folder, tmp_path), backend=name)
    assert pipe.backend == name
    run = parity_run(PRESET, "txt2img", seeds=[11, 12], pipe=pipe, prompt=["a red circle", "a blue square"],
                     negative_prompt=["blurry", ""], num_inference_steps=4)
    latent_atol, image_atol = TOLERANCES.get(name, (LATENT_ATOL, IMAGE_ATOL))
    assert run.latents.shape == run.ref_latents.shape
    assert run.latent_diff <= latent_atol, f"{name}: final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= image_atol, f"{name}: images differ by {run.image_diff * 255:.3g}/255"

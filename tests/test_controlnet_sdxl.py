"""ControlNet on SDXL: parity with diffusers' StableDiffusionXLControlNetPipeline on the tiny SDXL preset (CFG on /
off, guess mode, guidance window, size conditioning), and an SDXL ControlNet refused on an SD 1.5 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fakes.controlnet import control_picture, make_controlnet, parity
from fakes.parity import IMAGE_ATOL, LATENT_ATOL
from sdexport.errors import SourceError
from sdexport.export.build import BuildConfig, build
from sdexport.export.controlnet import ControlNetSpec, controlnet_pipeline

PRESET = "tiny-sdxl"
PICTURE = control_picture(8, 72, 56)


@pytest.fixture(scope="module")
def xl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny SDXL folder with one ControlNet, its runtime Pipeline and diffusers oracle."""
    import diffusers

    from sdexport.export.load import inspect_source, load_source
    from sdexport.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("controlnet-xl")
    source = load_source(inspect_source(PRESET))
    path = make_controlnet(source.pipe.unet, root / "net", seed=11)
    build(BuildConfig(model=PRESET, out=root / "folder", controlnets=[ControlNetSpec(str(path))]))
    pipe = Pipeline.load(root / "folder")
    oracle = controlnet_pipeline(source.pipe, pipe.spec, [diffusers.ControlNetModel.from_pretrained(path).eval()])
    return {"net": path, "pipe": pipe, "oracle": oracle}


CASES: list[tuple[str, dict[str, Any]]] = [
    ("cfg-batch", dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2)),
    ("no-cfg-scale", dict(prompt="a red circle", guidance_scale=1.0, controlnet_conditioning_scale=0.7)),
    ("guess-mode", dict(prompt="a red circle", negative_prompt="blurry", guess_mode=True)),
    ("window-sizes", dict(prompt="a red circle", control_guidance_start=0.5, original_size=(128, 96),
                          target_size=(64, 48))),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_sdxl_controlnet_matches_diffusers(xl: dict[str, Any], parity_table: list, kwargs: dict[str, Any]) -> None:
    common = {"image": PICTURE, "num_inference_steps": 4, **kwargs}
    count = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * kwargs.get(
        "num_images_per_prompt", 1)
    latent_diff, image_diff = parity(xl["pipe"], xl["oracle"], list(range(31, 31 + count)), common, common)
    parity_table.append((f"controlnet sdxl {kwargs}", latent_diff, image_diff))
    assert latent_diff <= LATENT_ATOL, f"final latents differ by {latent_diff:.3g}"
    assert image_diff <= IMAGE_ATOL, f"images differ by {image_diff * 255:.3g}/255"


def test_an_sdxl_controlnet_on_an_sd15_model_is_refused(xl: dict[str, Any], tmp_path: Path) -> None:
    from sdexport.export.build_plan import plan_build

    with pytest.raises(SourceError, match=r"is for sdxl \(SDXL.*\), the model is sd \(Stable Diffusion 1"):
        plan_build(BuildConfig(model="tiny-sd15", out=tmp_path / "out", controlnets=[ControlNetSpec(str(xl["net"]))]))
    assert not (tmp_path / "out").exists()  # refused before any work

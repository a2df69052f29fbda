"""ControlNet on SD 1.5: export (one graph per ControlNet, residual UNet), manifest, parity with diffusers'
StableDiffusionControlNetPipeline (single and multi-ControlNet, CFG on / off, guess mode, guidance window), bad
inputs, and LoRA hot swap on a ControlNet folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fakes.controlnet import control_picture, make_controlnet, parity
from fakes.parity import IMAGE_ATOL, LATENT_ATOL
from sdexport.errors import SourceError
from sdexport.export.build import BuildConfig, build
from sdexport.export.controlnet import ControlNetSpec, controlnet_pipeline
from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.control import Controls
from sdexport.runtime.result import RequestError

PRESET = "tiny-sd15"
BUILD_SCALE = 0.8  # the first ControlNet's scale given at build time: the runtime's default


@pytest.fixture(scope="module")
def cn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One folder with one ControlNet, one with two (built from a copy of the first), their oracles."""
    import diffusers

    from sdexport.export.load import inspect_source, load_source
    from sdexport.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("controlnet")
    source = load_source(inspect_source(PRESET))
    paths = [make_controlnet(source.pipe.unet, root / f"net{k}", seed=k + 1) for k in range(2)]
    specs = [ControlNetSpec.parse(f"{paths[0]}:{BUILD_SCALE}"), ControlNetSpec.parse(str(paths[1]))]
    one = build(BuildConfig(model=PRESET, out=root / "one", controlnets=specs[:1]))
    shutil.copytree(root / "one", root / "two")
    two = build(BuildConfig(model=PRESET, out=root / "two", controlnets=specs))
    nets = [diffusers.ControlNetModel.from_pretrained(p).eval() for p in paths]
    pipes = {"one": Pipeline.load(root / "one"), "two": Pipeline.load(root / "two")}
    oracles = {"one": controlnet_pipeline(source.pipe, pipes["one"].spec, nets[:1]),
               "two": controlnet_pipeline(source.pipe, pipes["two"].spec, nets)}
    return {"root": root, "paths": paths, "builds": {"one": one, "two": two}, "pipes": pipes, "oracles": oracles}


def test_each_controlnet_is_its_own_graph_and_the_unet_takes_residuals(cn: dict[str, Any]) -> None:
    one, two = cn["builds"]["one"], cn["builds"]["two"]
    assert one.built == ["text_encoder", "vae_encoder", "vae_decoder", "unet", "controlnet_0"]
    assert two.built == ["controlnet_1"]  # the copied folder's UNet and first ControlNet are reused
    manifest = two.manifest
    assert [(r["component"], r["conditioning_scale"]) for r in manifest["controlnets"]] == [
        ("controlnet_0", BUILD_SCALE), ("controlnet_1", 1.0)]
    components = manifest["model"]["components"]
    outputs = [t["name"] for t in components["controlnet_0"]["outputs"]]
    residuals = [t["name"] for t in components["unet"]["inputs"][3:]]
    assert outputs == [f"down_block_res_sample_{i}" for i in range(8)] + ["mid_block_res_sample"]
    assert residuals == [f"down_block_additional_residual_{i}" for i in range(8)] + ["mid_block_additional_residual"]
    assert components["unet"]["inputs"][-1]["dims"] == ["batch", 64, "latent_height/8", "latent_width/8"]
    assert "controlnet_1/model.onnx" in manifest["files"]
    assert all(manifest["components"][c]["validation"]["passed"] for c in ("unet", "controlnet_0", "controlnet_1"))


PICTURE = control_picture(5)
OTHER = control_picture(6)
CASES: list[tuple[str, str, dict[str, Any]]] = [
    # (id, folder, arguments for both sides); diffusers gets the build's default scale when the case gives none.
    ("cfg-batch-resized", "one", dict(prompt=["a red circle", "a blue square"], num_images_per_prompt=2, height=72,
                                      width=56)),
    ("no-cfg", "one", dict(prompt="a red circle", guidance_scale=1.0, controlnet_conditioning_scale=1.3)),
    ("guess-mode", "one", dict(prompt="a red circle", guess_mode=True)),
    ("guess-mode-no-cfg", "one", dict(prompt="a red circle", guess_mode=True, guidance_scale=1.0)),
    ("guidance-window", "one", dict(prompt="a red circle", control_guidance_start=0.25, control_guidance_end=0.5)),
    ("image-per-prompt", "one", dict(prompt=["a red circle", "a blue square"], image=[PICTURE, OTHER])),
    ("multi-two-scales", "two", dict(prompt="a red circle", image=[PICTURE, OTHER],
                                     controlnet_conditioning_scale=[0.6, 1.2])),
    ("multi-windows", "two", dict(prompt="a red circle", image=[PICTURE, OTHER], control_guidance_start=[0.0, 0.5],
                                  control_guidance_end=[0.75, 1.0])),
    ("multi-guess-no-cfg", "two", dict(prompt="a red circle", image=[PICTURE, OTHER], guess_mode=True,
                                       guidance_scale=1.0, controlnet_conditioning_scale=[1.1, 0.4])),
]


def _oracle_kwargs(folder: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    defaults = {"one": BUILD_SCALE, "two": [BUILD_SCALE, 1.0]}
    return {"image": PICTURE, "num_inference_steps": 4, "controlnet_conditioning_scale": defaults[folder], **kwargs}


@pytest.mark.parametrize(("folder", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_controlnet_matches_diffusers(cn: dict[str, Any], parity_table: list, folder: str,
                                      kwargs: dict[str, Any]) -> None:
    theirs = _oracle_kwargs(folder, kwargs)
    ours = {k: v for k, v in theirs.items() if k != "controlnet_conditioning_scale" or k in kwargs}
    count = (len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1) * kwargs.get(
        "num_images_per_prompt", 1)
    seeds = list(range(21, 21 + count))
    pipe, oracle = cn["pipes"][folder], cn["oracles"][folder]
    latent_diff, image_diff = parity(pipe, oracle, seeds, ours, theirs)
    parity_table.append((f"controlnet sd {folder} {kwargs}", latent_diff, image_diff))
    assert latent_diff <= LATENT_ATOL, f"final latents differ by {latent_diff:.3g}"
    assert image_diff <= IMAGE_ATOL, f"images differ by {image_diff * 255:.3g}/255"


def test_the_control_image_steers_the_result(cn: dict[str, Any]) -> None:
    def latents(image: Any, scale: float | None = None) -> np.ndarray:
        return cn["pipes"]["one"]("a red circle", image=image, num_inference_steps=3, seed=1, output_type="latent",
                                  controlnet_conditioning_scale=scale).images

    # 1000x the parity tolerance: the parity cases compare runs the control image really changes.
    assert np.abs(latents(PICTURE) - latents(OTHER)).max() > 1000 * LATENT_ATOL
    np.testing.assert_array_equal(latents(PICTURE, 0.0), latents(OTHER, 0.0))  # scale 0: no control at all


BAD: list[tuple[str, str, dict[str, Any], str]] = [
    ("missing-image", "one", dict(image=None), "pass image="),
    ("float-array-wrong-size", "one", dict(image=np.zeros((48, 64, 3), np.float32), height=64, width=64),
     "control image.*48x64"),
    ("image-too-large", "one", dict(image=control_picture(1, 512, 512)), "height=512"),
    ("latents-as-control", "one", dict(image=np.zeros((1, 4, 8, 8), np.float32)), "control image"),
    ("mask", "one", dict(mask_image=PICTURE), "mask_image"),
    ("window-reversed", "one", dict(control_guidance_start=0.6, control_guidance_end=0.4), "start < end"),
    ("scale-not-a-number", "one", dict(controlnet_conditioning_scale="high"), "controlnet_conditioning_scale"),
    ("multi-one-image", "two", dict(image=PICTURE), "list of 2 control images"),
    ("multi-three-images", "two", dict(image=[PICTURE] * 3), "has 3 entries"),
    ("multi-three-scales", "two", dict(image=[PICTURE, OTHER], controlnet_conditioning_scale=[1.0, 1.0, 1.0]),
     "list of 2 numbers"),
    ("images-per-prompt", "one", dict(prompt=["a", "b", "c"], image=[PICTURE, OTHER]), "one per prompt"),
]


@pytest.mark.parametrize(("folder", "kwargs", "match"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_control_inputs_are_refused_before_any_engine_runs(cn: dict[str, Any], folder: str,
                                                                kwargs: dict[str, Any], match: str) -> None:
    args = {"prompt": "a red circle", "image": PICTURE, "num_inference_steps": 2, **kwargs}
    with pytest.raises(RequestError, match=match):
        cn["pipes"][folder](**args)


def test_control_arguments_on_a_folder_without_controlnet_are_refused(cn: dict[str, Any]) -> None:
    from sdexport.export.load import inspect_source

    plain = inspect_source(PRESET).spec
    controls = Controls({}, plain)
    args = GenerationArgs(prompt="a red circle", image=PICTURE)
    assert controls.split(args) == (args, None)  # img2img: image= keeps its meaning
    with pytest.raises(RequestError, match="guess_mode, |no ControlNet"):
        controls.split(GenerationArgs(prompt="a red circle", guess_mode=True, control_guidance_end=0.5))


def test_controlnet_spec_parsing() -> None:
    assert ControlNetSpec.parse("lllyasviel/sd-controlnet-canny") == ControlNetSpec("lllyasviel/sd-controlnet-canny")
    assert ControlNetSpec.parse("./nets/depth:0.5") == ControlNetSpec("./nets/depth", 0.5)
    assert ControlNetSpec.parse("./nets/a:b") == ControlNetSpec("./nets/a:b")


def test_a_missing_controlnet_folder_is_refused(tmp_path: Path) -> None:
    from sdexport.export.build_plan import plan_build

    with pytest.raises(SourceError, match="no config.json"):
        plan_build(BuildConfig(model=PRESET, out=tmp_path / "out", controlnets=[ControlNetSpec(str(tmp_path))]))


def test_lora_hot_swap_on_a_controlnet_folder(cn: dict[str, Any], tmp_path: Path) -> None:
    import diffusers
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from sdexport.export.load import inspect_source, load_source
    from sdexport.export.lora import LoraSpec, fuse_loras
    donor = load_source(inspect_source(PRESET), modules=frozenset({"unet"})).pipe
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v", "conv1"])
    inject_adapter_in_model(config, donor.unet, adapter_name="make")
    layers = get_peft_model_state_dict(donor.unet, adapter_name="make")
    type(donor).save_lora_weights(str(tmp_path), unet_lora_layers=layers, weight_name="lora.safetensors",
                                  unet_lora_adapter_metadata=config.to_dict())
    lora = tmp_path / "lora.safetensors"

    pipe = cn["pipes"]["one"]
    before = pipe("a red circle", image=PICTURE, num_inference_steps=2, seed=4, output_type="latent")
    swap = pipe.set_loras([(lora, 0.7)])
    assert swap["changed"] == ["unet"]
    fused = load_source(inspect_source(PRESET))
    fuse_loras(fused.pipe, [LoraSpec(lora, 0.7)])
    net = diffusers.ControlNetModel.from_pretrained(cn["paths"][0]).eval()
    oracle = controlnet_pipeline(fused.pipe, pipe.spec, [net])
    kwargs = _oracle_kwargs("one", {"prompt": "a red circle"})
    latent_diff, image_diff = parity(pipe, oracle, [4], {"prompt": "a red circle", "image": PICTURE,
                                                         "num_inference_steps": 4}, kwargs)
    assert latent_diff <= LATENT_ATOL, f"final latents differ by {latent_diff:.3g}"
    assert image_diff <= IMAGE_ATOL
    pipe.set_loras([])
    after = pipe("a red circle", image=PICTURE, num_inference_steps=2, seed=4, output_type="latent")
    np.testing.assert_array_equal(before.images, after.images)


def test_run_and_parity_commands_on_a_controlnet_folder(cn: dict[str, Any], tmp_path: Path, capsys: Any) -> None:
    import json

    from PIL import Image

    from sdexport.cli import main

    PICTURE.save(tmp_path / "control.png")
    out = tmp_path / "out.png"
    assert main(["run", str(cn["root"] / "one"), "--prompt", "a red circle", "--image", str(tmp_path / "control.png"),
                 "--controlnet-scale", "0.5", "--control-guidance-end", "0.5", "--guess-mode", "true", "--steps", "2",
                 "--seed", "3", "-q", "--out", str(out)]) == 0
    with Image.open(out) as image:
        params = json.loads(image.text["parameters"])
        assert image.size == PICTURE.size
    assert params["task"] == "txt2img" and params["controlnet_conditioning_scale"] == [0.5]
    assert params["control_guidance_end"] == [0.5] and params["guess_mode"] is True
    capsys.readouterr()
    assert main(["parity", str(cn["root"] / "one"), "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "controlnet_0" in report["components"]
    assert all(d < 1e-3 for outputs in report["components"].values() for d in outputs.values())
    assert list(report["end_to_end"]) == ["controlnet"]
    assert report["end_to_end"]["controlnet"]["latents"] <= LATENT_ATOL
    assert report["end_to_end"]["controlnet"]["image"] <= IMAGE_ATOL

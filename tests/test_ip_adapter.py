"""IP-Adapter: image encoder graph + adapter inside the UNet graph, against diffusers' load_ip_adapter on tiny models.

The adapter is random (diffusers' safetensors layout) with a tiny CLIPVisionModelWithProjection beside it; the
oracle is the same tiny SD 1.5 source with ``load_ip_adapter`` and ``set_ip_adapter_scale``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from fakes.parity import IMAGE_ATOL, LATENT_ATOL, SMALL_RANGES
from sdexport.cli import main
from sdexport.errors import SourceError
from sdexport.export.build import BuildConfig, build
from sdexport.export.ip_adapter import write_random_ip_adapter
from sdexport.export.load import inspect_source, load_source
from sdexport.runtime.pipeline import Pipeline
from sdexport.runtime.result import RequestError

PRESET = "tiny-sd15"
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, projection_dim=16)
EXACT = 1e-6  # the same graph with the adapter's branch scaled by 0 vs the plain graph: float noise only


def _ip_source(weights: Path, lora: Path | None = None, preset: str = PRESET) -> Any:
    """The oracle: a fresh tiny source with the adapter loaded by diffusers (and a LoRA fused first)."""
    pipe = load_source(inspect_source(preset)).pipe
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="x")
        pipe.fuse_lora(components=["unet"], lora_scale=1.0)
        pipe.unload_lora_weights()
    pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name)
    return pipe


def _adapted(preset: str, root: Path) -> dict[str, Any]:
    """A random adapter for ``preset``, the folder built with it, its Pipeline, the diffusers oracle, a picture."""
    unet = load_source(inspect_source(preset), modules=frozenset({"unet"})).pipe.unet
    weights = write_random_ip_adapter(root / "adapter", unet, VISION, seed=3)
    result = build(BuildConfig(model=preset, out=root / "folder", ip_adapter=weights, ranges=SMALL_RANGES))
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (80, 64, 3), dtype=np.uint8))  # resized + cropped to 32
    return {"root": root, "weights": weights, "folder": result.folder, "manifest": result.manifest,
            "pipe": Pipeline.load(result.folder), "source": _ip_source(weights, preset=preset), "picture": picture}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _adapted(PRESET, tmp_path_factory.mktemp("ip-adapter"))


CASES = [
    # (id, scale, diffusers/runtime arguments)
    ("cfg", 1.0, dict(prompt="a red circle", num_inference_steps=4)),
    ("no-cfg", 0.6, dict(prompt="a red circle", guidance_scale=1.0, num_inference_steps=4)),
    ("cfg-batch-negative", 0.5, dict(prompt="a red circle", negative_prompt="blurry", num_images_per_prompt=2,
                                     height=72, width=56, num_inference_steps=4)),
]


@pytest.mark.parametrize(("scale", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_ip_adapter_matches_diffusers(setup: dict[str, Any], parity_run: Any, scale: float,
                                      kwargs: dict[str, Any]) -> None:
    setup["source"].set_ip_adapter_scale(scale)  # diffusers' scale lives on the pipeline; ours is an argument
    seeds = list(range(21, 21 + kwargs.get("num_images_per_prompt", 1)))
    run = parity_run(PRESET, "txt2img", seeds=seeds, pipe=setup["pipe"], source_pipe=setup["source"],
                     runtime_kwargs={"ip_adapter_scale": scale}, ip_adapter_image=setup["picture"], **kwargs)
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"


def test_sdxl_ip_adapter_matches_diffusers(tmp_path_factory: pytest.TempPathFactory, parity_run: Any) -> None:
    xl = _adapted("tiny-sdxl", tmp_path_factory.mktemp("ip-adapter-xl"))
    xl["source"].set_ip_adapter_scale(0.7)
    run = parity_run("tiny-sdxl", "txt2img", seeds=[23], pipe=xl["pipe"], source_pipe=xl["source"],
                     runtime_kwargs={"ip_adapter_scale": 0.7}, ip_adapter_image=xl["picture"], prompt="a red circle",
                     num_inference_steps=4)
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"


def _latents(pipe: Any, **kwargs: Any) -> np.ndarray:
    return pipe(prompt="a red circle", num_inference_steps=3, seed=[4], output_type="latent", **kwargs).images


def test_scale_zero_and_no_image_equal_the_plain_model(setup: dict[str, Any], tiny_pipe: Any) -> None:
    plain = _latents(tiny_pipe(PRESET))  # the same base weights built without the adapter
    ours = setup["pipe"]
    assert np.abs(_latents(ours, ip_adapter_image=setup["picture"], ip_adapter_scale=0.0) - plain).max() <= EXACT
    assert np.abs(_latents(ours) - plain).max() <= EXACT
    changed = np.abs(_latents(ours, ip_adapter_image=setup["picture"], ip_adapter_scale=0.8) - plain).max()
    assert changed > 1e-2, "the image prompt did not change the result"


def test_folder_records_the_adapter_and_takes_the_scale_as_an_input(setup: dict[str, Any]) -> None:
    manifest = setup["manifest"]
    assert manifest["source"]["ip_adapter"]["path"] == str(setup["weights"])
    assert len(manifest["source"]["ip_adapter"]["sha256"]) == 64
    assert manifest["components"]["image_encoder"]["preprocess"]["size"] == VISION["image_size"]
    processors = manifest["components"]["unet"]["attention_processors"]
    cross = {k: v["class"].rsplit(".", 1)[1] for k, v in processors.items() if k.endswith("attn2")}
    assert cross and set(cross.values()) == {"IPAdapterAttnProcessor2_0"}
    graph = onnx.load(str(setup["folder"] / "unet" / "model.onnx"), load_external_data=False)
    assert [i.name for i in graph.graph.input][-2:] == ["image_embeds", "ip_adapter_scale"]


def test_parity_command_reloads_the_adapter(setup: dict[str, Any]) -> None:
    from sdexport.export.parity import component_parity, end_to_end_parity, load_oracle

    oracle = load_oracle(setup["manifest"])  # what `sdexport parity` compares with: the adapter loaded again
    components = component_parity(setup["folder"], setup["manifest"], oracle)
    assert max(components["image_encoder"].values()) <= 1e-4  # fp32 graph vs torch, the build's tolerance
    assert max(components["unet"].values()) <= 1e-4
    diffs = end_to_end_parity(setup["pipe"], oracle, "txt2img", steps=2)
    assert diffs["latents"] <= LATENT_ATOL and diffs["image"] <= IMAGE_ATOL, diffs


def test_image_prompts_run_with_torch_diffusers_transformers_onnx_blocked(setup: dict[str, Any]) -> None:
    from test_runtime_loading import BLOCKER

    script = BLOCKER + textwrap.dedent('''
        from PIL import Image
        from sdexport import Pipeline
        pipe = Pipeline.load(sys.argv[1])
        made = pipe("a cat", ip_adapter_image=Image.new("RGB", (40, 50), (10, 200, 30)), ip_adapter_scale=0.5,
                    num_inference_steps=2, seed=1, output_type="np")
        print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
                          "shape": list(made.images.shape)}))
    ''')
    proc = subprocess.run([sys.executable, "-c", script, str(setup["folder"])], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"loaded": [], "shape": [1, 64, 64, 3]}


def test_rebuild_with_the_same_adapter_reuses_everything(setup: dict[str, Any]) -> None:
    again = build(BuildConfig(model=PRESET, out=setup["folder"], ip_adapter=setup["weights"], ranges=SMALL_RANGES))
    assert again.up_to_date


def test_lora_swap_keeps_working_with_the_adapter(setup: dict[str, Any], parity_run: Any) -> None:
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    maker = load_source(inspect_source(PRESET), modules=frozenset({"unet"})).pipe
    torch.manual_seed(5)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]), maker.unet, "make")
    layers = get_peft_model_state_dict(maker.unet, adapter_name="make")
    type(maker).save_lora_weights(str(setup["root"]), unet_lora_layers=layers, weight_name="lora.safetensors")
    lora = setup["root"] / "lora.safetensors"
    pipe = Pipeline.load(setup["folder"])
    before = _latents(pipe, ip_adapter_image=setup["picture"])
    pipe.set_loras([(lora, 1.0)])
    oracle = _ip_source(setup["weights"], lora)
    run = parity_run(PRESET, "txt2img", seeds=[8], pipe=pipe, source_pipe=oracle, prompt="a red circle",
                     ip_adapter_image=setup["picture"], num_inference_steps=4)
    assert run.latent_diff <= LATENT_ATOL, f"LoRA + IP-Adapter latents differ by {run.latent_diff:.3g}"
    pipe.set_loras([])
    assert np.abs(_latents(pipe, ip_adapter_image=setup["picture"]) - before).max() <= EXACT


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(ip_adapter_scale=float("nan")), "ip_adapter_scale=nan"),
    (dict(ip_adapter_scale=11.0), "ip_adapter_scale=11.0"),
    (dict(ip_adapter_image=["a", "b"]), "one IP-Adapter"),
    (dict(ip_adapter_image=np.zeros((8, 8, 3), np.float32)), "uint8"),
])
def test_bad_image_prompts_are_refused(setup: dict[str, Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        setup["pipe"](prompt="a red circle", num_inference_steps=2, **kwargs)


def test_image_prompt_on_a_plain_folder_is_refused(setup: dict[str, Any], tiny_pipe: Any) -> None:
    with pytest.raises(RequestError, match="--ip-adapter"):
        tiny_pipe(PRESET)(prompt="a red circle", ip_adapter_image=setup["picture"], num_inference_steps=2)


def test_adapter_for_another_family_or_without_encoder_is_refused(setup: dict[str, Any], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    xl_unet = load_source(inspect_source("tiny-sdxl"), modules=frozenset({"unet"})).pipe.unet
    other = write_random_ip_adapter(tmp_path / "xl", xl_unet, VISION, seed=1)
    with pytest.raises(SourceError, match="cross-attends to 32"):
        build(BuildConfig(model=PRESET, out=tmp_path / "out", ip_adapter=other))
    lonely = tmp_path / "lonely" / "ip-adapter.safetensors"
    lonely.parent.mkdir()
    lonely.write_bytes(setup["weights"].read_bytes())
    code = main(["build", "--model", PRESET, "--out", str(tmp_path / "out"), "--ip-adapter", str(lonely)])
    assert code == 1
    assert "no image encoder" in capsys.readouterr().err

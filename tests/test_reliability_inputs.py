"""Bad inputs a new user (or an attacker) gives: each refused before any work, naming the value and what is allowed."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from sdexport.cli import main
from sdexport.errors import SdexportError, UsageError
from sdexport.export.lora import LoraSpec
from sdexport.runtime.latent_files import TaggedLatents, read_latents, sidecar
from sdexport.runtime.pipeline import Pipeline
from sdexport.runtime.result import RequestError

PRESET = "tiny-sd15"
FAST = dict(num_inference_steps=2, seed=1, output_type="latent")


@pytest.fixture
def pipe(tiny_pipe: Callable[[str], Pipeline], monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    """The shared tiny SD 1.5 Pipeline, with every engine call failing the test (refusals come before any work)."""
    pipeline = tiny_pipe(PRESET)

    def no_engine(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an engine ran before the bad input was refused")

    monkeypatch.setattr(Pipeline, "_runner", no_engine)
    return pipeline


def refused(pipe: Pipeline, pattern: str, **kwargs: Any) -> None:
    """The call raises RequestError whose message matches ``pattern``."""
    with pytest.raises(RequestError, match=pattern):
        pipe(**{"prompt": "a cat", **FAST, **kwargs})


def cli_refused(capsys: pytest.CaptureFixture[str], argv: list[str], pattern: str, code: int | None = None) -> str:
    """``sdexport ARGV`` exits non-zero with ``pattern`` on stderr and no traceback; returns stderr."""
    capsys.readouterr()
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse usage errors
        got = exc.code
    err = capsys.readouterr().err
    assert got != 0 and (code is None or got == code), (got, err)
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    return err


# -- prompts --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogates_in_the_api_are_refused(pipe: Pipeline, field: str) -> None:
    refused(pipe, rf"{field} has a character that is not valid Unicode .*'\\udcff' at position 1.*UTF-8",
            **{field: "a\udcff cat"})


def test_non_utf8_prompt_on_the_command_line_is_refused(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    prompt = os.fsdecode(b"a \xff cat")  # what Python makes of undecodable argv bytes
    cli_refused(capsys, ["run", str(tiny_folder(PRESET)), "--prompt", prompt, "--steps", "2",
                         "--out", str(tmp_path / "x.png")], r"prompt has a character that is not valid Unicode", 1)
    assert not (tmp_path / "x.png").exists()


# -- scheduler config and call values -------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "pattern"), [
    ({"beta_start": "x"}, r"'beta_start'='x' is not allowed; it must be a finite number"),
    ({"beta_start": float("nan")}, r"'beta_start'=nan is not allowed; it must be a finite number"),
    ({"num_train_timesteps": 0}, r"'num_train_timesteps'=0 is not allowed; it must be an integer > 0"),
    ({"num_train_timesteps": 10.5}, r"'num_train_timesteps'=10.5 is not allowed; it must be an integer"),
    ({"beta_end": -0.01}, r"'beta_end'=-0.01 is not allowed; it must be a finite number > 0"),
    ({"skip_prk_steps": "yes"}, r"'skip_prk_steps'='yes' is not allowed; it must be true or false"),
    ({"steps_offset": True}, r"'steps_offset'=True is not allowed; it must be an integer"),
])
def test_bad_scheduler_config_values_name_the_key(pipe: Pipeline, config: dict[str, Any], pattern: str) -> None:
    refused(pipe, pattern, scheduler_config=config)


@pytest.mark.parametrize("eta", ["abc", float("nan"), -0.5])
def test_bad_eta_is_named(pipe: Pipeline, eta: Any) -> None:
    refused(pipe, r"eta=.* is out of range; allowed: 0.0 <= eta <= 1.0", eta=eta, scheduler="ddim")


def test_a_callback_that_cannot_be_called_is_refused_before_any_work(pipe: Pipeline) -> None:
    refused(pipe, r"callback=5 is not callable", callback=5)


# -- masks and pictures ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_mask_is_refused(pipe: Pipeline, value: float) -> None:
    mask = np.full((64, 64), value, np.float32)
    refused(pipe, r"mask_image float array has NaN or Inf values", image=Image.new("RGB", (64, 64)), mask_image=mask)


def _png_bytes(tmp_path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    return (tmp_path / "full.png").read_bytes()


def test_a_truncated_pil_image_names_its_file(pipe: Pipeline, tmp_path: Path) -> None:
    data = _png_bytes(tmp_path)
    (tmp_path / "half.png").write_bytes(data[: len(data) // 2])
    refused(pipe, r"image: cannot decode '.*half.png' .*truncated or corrupt", image=Image.open(tmp_path / "half.png"),
            strength=0.5)


BAD_FILES: dict[str, Callable[[Path, bytes], None]] = {
    "corrupt.png": lambda p, png: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 40),
    "truncated.png": lambda p, png: p.write_bytes(png[: len(png) // 2]),
    "missing.png": lambda p, png: None,
    "folder.png": lambda p, png: p.mkdir(),
    "notes.png": lambda p, png: p.write_text("a text file named .png"),
    "corrupt.npy": lambda p, png: p.write_bytes(b"\x93NUMPY\x09\x00garbage"),
}


@pytest.mark.parametrize("flag", ["--image", "--mask"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_unreadable_image_files_are_named(tiny_folder: Callable[[str], Path], tmp_path: Path, name: str, flag: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    png = _png_bytes(tmp_path)
    BAD_FILES[name](tmp_path / name, png)
    good = tmp_path / "full.png"
    image = [] if flag == "--image" else ["--image", str(good)]
    cli_refused(capsys, ["run", str(tiny_folder(PRESET)), "--prompt", "a", *image, flag, str(tmp_path / name),
                         "--steps", "2", "--out", str(tmp_path / "out.png")], rf"cannot read '.*{re.escape(name)}'", 2)


# -- outputs --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("out", "pattern"), [
    ("/dev/null/x.png", r"output '/dev/null/x.png': cannot create its folder '/dev/null'"),
    ("{tmp}/x.gif", r"the suffix '.gif' names no format this writes; use one of \['.png', '.jpg', '.jpeg', '.webp'"),
    ("{tmp}", r"is a directory; name a file in it"),
])
def test_unusable_outputs_are_refused_before_loading(tmp_path: Path, out: str, pattern: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = out.format(tmp=tmp_path)
    if out == "{tmp}":
        target = str(tmp_path / "dir.png")
        (tmp_path / "dir.png").mkdir()
    # the folder does not exist: the output is checked first, before anything is loaded
    cli_refused(capsys, ["run", str(tmp_path / "no-folder"), "--prompt", "a", "--out", target], pattern, 1)


@pytest.mark.parametrize(("suffix", "magic"), [(".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF"), (".png", b"\x89PNG")])
def test_the_output_suffix_picks_the_format(tiny_folder: Callable[[str], Path], tmp_path: Path, suffix: str,
                                            magic: bytes) -> None:
    out = tmp_path / f"x{suffix}"
    assert main(["run", str(tiny_folder(PRESET)), "--prompt", "a", "--steps", "2", "--seed", "1", "-q",
                 "--no-progress", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(magic)
    with Image.open(out) as picture:
        assert picture.size == (64, 64)


# -- latents handed between folders ---------------------------------------------------------------------------------

def test_saved_latents_carry_their_latent_space(tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "lat.npy"
    assert main(["run", str(tiny_folder(PRESET)), "--prompt", "a", "--steps", "2", "--seed", "1", "-q",
                 "--no-progress", "--out", str(out)]) == 0
    tag = json.loads(sidecar(out).read_text())
    assert (tag["family"], tag["latent_channels"], tag["scaling_factor"], tag["vae_scale_factor"]) == (
        "sd", 4, 0.18215, 8)
    latents = read_latents(out)
    assert isinstance(latents, TaggedLatents) and latents.shape == (1, 4, 8, 8)
    assert latents.latent_space == (0.18215, 8, 4)


def test_sd15_latents_are_refused_by_an_sdxl_folder(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sd15.npy"
    assert main(["run", str(tiny_folder(PRESET)), "--prompt", "a", "--steps", "2", "--seed", "1", "-q",
                 "--no-progress", "--out", str(out)]) == 0
    cli_refused(capsys, ["run", str(tiny_folder("tiny-sdxl")), "--prompt", "a", "--image", str(out),
                         "--denoising-start", "0.8", "--steps", "4", "--out", str(tmp_path / "x.png")],
                r"these .*sd15.npy \(sd latents\) come from a folder with latent space \(0.18215, 8, 4\).*"
                r"this sdxl folder uses \(0.13025, 8, 4\)", 1)


def test_a_damaged_latent_sidecar_is_named(tmp_path: Path) -> None:
    np.save(tmp_path / "lat.npy", np.zeros((1, 4, 8, 8), np.float32))
    sidecar(tmp_path / "lat.npy").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read the latent-space sidecar '.*lat.npy.json'"):
        read_latents(tmp_path / "lat.npy")


# -- LoRAs ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", ["nan", "inf", "-inf"])
def test_lora_weight_that_is_not_finite_is_refused_at_parse(weight: str) -> None:
    with pytest.raises(UsageError, match=rf"LoRA 'good.safetensors': weight {weight.lstrip('-')}|-inf"):
        LoraSpec.parse(f"good.safetensors:{weight}")


def test_cli_lora_nan_exits_with_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_refused(capsys, ["build", "--model", PRESET, "--out", str(tmp_path / "b"), "--lora",
                         "good.safetensors:nan"], r"weight nan is not allowed; pass a finite number", 2)
    assert not (tmp_path / "b").exists()


@pytest.fixture
def good_lora(tmp_path: Path) -> Path:
    """A well-formed safetensors file (the refusals below happen before its tensors matter)."""
    path = tmp_path / "good.safetensors"
    save_file({"unet.x.lora_A.weight": np.zeros((1, 4), np.float32)}, str(path))
    return path


@pytest.mark.parametrize(("weight", "pattern"), [
    (float("nan"), r"weight nan is not allowed"), (float("inf"), r"weight inf is not allowed"),
    ("abc", r"weight 'abc' is not allowed"), (True, r"weight True is not allowed"),
])
def test_set_loras_refuses_bad_weights_naming_them(tiny_pipe: Callable[[str], Pipeline], good_lora: Path,
                                                   weight: Any, pattern: str) -> None:
    with pytest.raises(UsageError, match=rf"LoRA '.*good.safetensors': {pattern}"):
        tiny_pipe(PRESET).set_loras([(good_lora, weight)])


@pytest.mark.parametrize(("loras", "pattern"), [
    ("style.safetensors", r"pass a list of \(path, weight\) pairs"),
    ([("a.safetensors",)], r"loras\[0\]=.* pass a \(path, weight\) pair"),
    ([(3, 1.0)], r"loras\[0\]: path 3 is not a file path"),
])
def test_set_loras_refuses_malformed_lists(tiny_pipe: Callable[[str], Pipeline], loras: Any, pattern: str) -> None:
    with pytest.raises(UsageError, match=pattern):
        tiny_pipe(PRESET).set_loras(loras)


def test_set_loras_names_a_garbage_file(tiny_pipe: Callable[[str], Pipeline], tmp_path: Path) -> None:
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(SdexportError, match=r"LoRA file .*garbage.safetensors is not a readable .safetensors file"):
        tiny_pipe(PRESET).set_loras([(bad, 0.5)])


# -- source weights -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_garbage_weights_in_a_local_folder_name_the_file(folder_2x: Path, tmp_path: Path, suffix: str) -> None:
    import shutil

    from sdexport.errors import SourceError
    from sdexport.export.build import BuildConfig, build

    source = tmp_path / "source"
    shutil.copytree(folder_2x, source)
    (source / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (source / "unet" / f"diffusion_pytorch_model{suffix}").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(SourceError, match=rf"cannot load the unet weights of .*source \(diffusion_pytorch_model"
                                          rf"{re.escape(suffix)} in .*unet\).*truncated, corrupt or not a unet"):
        build(BuildConfig(model=str(source), out=tmp_path / "out", allow_pickle=suffix == ".bin"))

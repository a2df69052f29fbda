"""`sdexport run` (PNG with parameters, img2img / inpainting, latents hand-off) and `sdexport parity`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sdexport.cli import main


def _parameters(path: Path) -> dict[str, Any]:
    with Image.open(path) as image:
        return json.loads(image.text["parameters"])


def test_run_writes_pngs_with_their_parameters(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                               capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.png"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the step bar draws on terminals only
    code = main(["run", str(tiny_folder("tiny-sdxl")), "--prompt", "a red circle", "--seed", "7", "--steps", "3",
                 "--num-images", "2", "--height", "72", "--width", "56", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "3/3" in err and "<" in err  # the progress bar reached the last step and showed an ETA
    for index in range(2):
        path = tmp_path / f"out-{index}.png"
        params = _parameters(path)
        assert params["seed"] == 7 + index and params["prompt"] == ["a red circle"]
        assert params["num_inference_steps"] == 3 and params["scheduler"] == "EulerDiscreteScheduler"
        with Image.open(path) as image:
            assert image.size == (56, 72)


def test_run_inpaints_and_hands_latents_to_the_refiner(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                       picture: Image.Image, mask: Image.Image) -> None:
    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    args = ["--steps", "3", "--seed", "1", "--no-progress"]
    assert main(["run", str(tiny_folder("tiny-sd15-inpaint")), "--prompt", "a tiger", "--image",
                 str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--height", "72", "--width", "56",
                 "--out", str(tmp_path / "inpainted.png"), *args]) == 0
    assert _parameters(tmp_path / "inpainted.png")["task"] == "inpaint"

    assert main(["run", str(tiny_folder("tiny-sdxl")), "--prompt", "a tiger", "--denoising-end", "0.7",
                 "--out", str(tmp_path / "base.npy"), *args]) == 0
    assert np.load(tmp_path / "base.npy").shape == (1, 4, 8, 8)
    assert main(["run", str(tiny_folder("tiny-sdxl-refiner")), "--prompt", "a tiger", "--image",
                 str(tmp_path / "base.npy"), "--denoising-start", "0.7", "--out", str(tmp_path / "refined.png"),
                 *args]) == 0
    params = _parameters(tmp_path / "refined.png")
    assert params["task"] == "img2img" and params["denoising_start"] == 0.7 and params["family"] == "sdxl-refiner"


def test_run_reports_invalid_requests_as_errors(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                capsys: Any) -> None:
    code = main(["run", str(tiny_folder("tiny-sd15")), "--prompt", "x", "--height", "60", "--out",
                 str(tmp_path / "x.png")])
    assert code == 1
    assert "height=60 is not allowed: this folder was built for height 32..256 px" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_parity_command_prints_component_and_end_to_end_differences(tiny_folder: Callable[[str], Path],
                                                                    capsys: Any) -> None:
    assert main(["parity", str(tiny_folder("tiny-sdxl-inpaint")), "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["components"]) == {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"}
    assert all(d < 1e-3 for outputs in report["components"].values() for d in outputs.values())
    assert list(report["end_to_end"]) == ["inpaint"]
    assert report["end_to_end"]["inpaint"]["latents"] < 1e-4 and report["end_to_end"]["inpaint"]["image"] < 1 / 255


def test_run_quiet_after_the_subcommand_prints_no_progress(tiny_folder: Callable[[str], Path], tmp_path: Path,
                                                           capsys: Any) -> None:
    out = tmp_path / "quiet.png"
    assert main(["run", str(tiny_folder("tiny-sd15")), "--prompt", "x", "--steps", "2", "--seed", "3", "--out",
                 str(out), "-q"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and out.exists()
    assert _parameters(out)["num_inference_steps"] == 2

"""GenerationArgs is the one place of the generation arguments: Pipeline.__call__ and `sdexport run` agree with it."""

from __future__ import annotations

import argparse
import inspect
from dataclasses import MISSING, field, fields, make_dataclass
from typing import Any

import pytest

from sdexport import cli
from sdexport.runtime import args as args_module
from sdexport.runtime.args import DEFAULTS, Arg, GenerationArgs, arg_info, cli_fields, defaults
from sdexport.runtime.images import OUTPUT_TYPES
from sdexport.runtime.noise import RNGS
from sdexport.runtime.pipeline import Pipeline
from sdexport.runtime.schedulers import scheduler_names


def _run_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def _run_actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in _run_parser()._actions}


def test_call_signature_has_the_dataclass_names_and_defaults() -> None:
    parameters = list(inspect.signature(Pipeline.__call__).parameters.values())[1:]  # without self
    assert [p.name for p in parameters] == [f.name for f in fields(GenerationArgs)]
    for parameter, f in zip(parameters, fields(GenerationArgs), strict=True):
        expected = inspect.Parameter.empty if f.default is MISSING else f.default
        assert parameter.default == expected, parameter.name
    assert DEFAULTS["num_inference_steps"] == 50  # diffusers' default, the library's and the CLI's


def test_every_argument_documents_itself() -> None:
    for f in fields(GenerationArgs):
        assert isinstance(f.metadata.get("arg"), Arg), f.name
        assert len(arg_info(f.name).help) > 10, f.name


def test_run_flags_have_the_library_defaults_and_choices() -> None:
    actions = _run_actions()
    assert set(cli_fields()) <= set(actions)
    assert not {"callback", "output_type"} & set(actions)  # Python objects / decided by --out
    for name in cli_fields():
        action = actions[name]
        assert action.help.startswith(arg_info(name).help), name
        if name in DEFAULTS:
            assert action.default == DEFAULTS[name] and not action.required, name
        else:
            assert action.required, name
    assert actions["rng"].choices == RNGS
    assert actions["long_prompts"].choices == args_module.LONG_PROMPTS
    assert tuple(actions["scheduler"].choices) == scheduler_names()
    assert arg_info("output_type").choices == OUTPUT_TYPES


def test_run_flags_parse_to_the_argument_names() -> None:
    parsed = cli.parser().parse_args([
        "run", "folder", "--prompt", "a", "--prompt", "b", "--num-inference-steps", "7", "--num-images", "2",
        "--original-size", "1024x768", "--crops-coords-top-left", "3,4", "--scheduler-config",
        '{"use_karras_sigmas": true}', "--rng", "torch", "--guidance-scale", "4.5",
    ])
    assert parsed.prompt == ["a", "b"] and parsed.num_inference_steps == 7 and parsed.num_images_per_prompt == 2
    assert parsed.original_size == (1024, 768) and parsed.crops_coords_top_left == (3, 4)
    assert parsed.scheduler_config == {"use_karras_sigmas": True} and parsed.rng == "torch"
    assert parsed.guidance_scale == 4.5 and parsed.eta == DEFAULTS["eta"]
    assert cli.parser().parse_args(["run", "f", "--prompt", "x", "--steps", "3"]).num_inference_steps == 3


@pytest.mark.parametrize("argv", [
    ["--rng", "jax"], ["--long-prompts", "wrap"], ["--scheduler", "warp_drive"], ["--original-size", "12"],
    ["--scheduler-config", "[1]"], ["--steps", "many"], ["--image", "/no/such/picture.png"],
])
def test_run_refuses_bad_flag_values_as_usage_errors(argv: list[str], capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "folder", "--prompt", "x", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_a_field_added_to_the_dataclass_appears_in_run_help(monkeypatch: pytest.MonkeyPatch) -> None:
    extended = make_dataclass("Extended", [("sharpness", float, field(default=1.5, metadata={
        "arg": Arg(help="edge sharpening of the decoded images")}))], bases=(GenerationArgs,), frozen=True)
    monkeypatch.setattr(args_module, "GenerationArgs", extended)
    assert defaults()["sharpness"] == 1.5
    text = " ".join(_run_parser().format_help().split())
    assert "--sharpness FLOAT edge sharpening of the decoded images (default: 1.5)" in text
    assert cli.parser().parse_args(["run", "f", "--prompt", "x", "--sharpness", "2"]).sharpness == 2.0

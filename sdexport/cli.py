"""Command line: argument parsing -> config -> one library call per command."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdexport import __version__
from sdexport.cli_quantize import add_quantize_parser, cmd_quantize
from sdexport.engines import Backend, Option, backends, get_backend
from sdexport.errors import SdexportError, UsageError
from sdexport.serve.cli import add_serve_parser, run_serve
from sdexport.specs import PRESETS
from sdexport.synth.cli import add_synth_parser, cmd_synth

log = logging.getLogger("sdexport")

EXIT_CODES = {0: "success", 1: "error: an invalid request, an unusable folder or model, a failed build or check "
              "(doctor: FOLDER cannot run here)", 2: "usage error: an unknown flag or a value that is not allowed",
              130: "interrupted (Ctrl-C); run the same command again to resume a build or a synth run"}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default when it has one worth showing; description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (default is None or default is False or default is argparse.SUPPRESS or default == [])
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _logging_flags() -> argparse.ArgumentParser:
    """-v / -q, accepted before and after the subcommand (``sdexport -v run ...`` or ``sdexport run -v ...``)."""
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="errors only, no progress output")
    return flags


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser: the shared formatter and the -v / -q flags."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs["parents"] = [*kwargs.get("parents", ()), _logging_flags()]
        super().__init__(**kwargs)


def _range(text: str) -> tuple[int, int, int]:
    """MIN:OPT:MAX or a single value (a static size)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:OPT:MAX or one integer") from exc
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:OPT:MAX or one integer")
    return parts[0], parts[1], parts[2]


def _component_precision(text: str) -> tuple[str, str]:
    name, sep, precision = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected COMPONENT=fp16 or COMPONENT=fp32")
    return name, precision


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="export, validate and compile a pipeline into a folder")
    p.add_argument("--model", default="demo",
                   help=f"a preset ({', '.join(PRESETS)}), a hub id or a local diffusers folder")
    p.add_argument("--out", type=Path, help="output folder (default: build/<model>)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA to fuse into the UNet and text encoders; repeatable")
    p.add_argument("--ip-adapter", type=Path, metavar="PATH",
                   help="an IP-Adapter (.safetensors with an image_encoder folder beside it): image prompts")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH_OR_HUB_ID[:SCALE]",
                   help="a ControlNet exported as its own graph, with its default conditioning scale (repeatable: "
                   "multi-ControlNet)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="precision of every component")
    p.add_argument("--component-precision", action="append", type=_component_precision, default=[],
                   metavar="COMPONENT=PRECISION", help="override one component's precision (e.g. vae_decoder=fp16)")
    p.add_argument("--batch", type=_range, help="images per call MIN:OPT:MAX")
    p.add_argument("--height", type=_range, help="pixel height MIN:OPT:MAX")
    p.add_argument("--width", type=_range, help="pixel width MIN:OPT:MAX")
    p.add_argument("--prompt-chunks", type=int, help="longest prompt in chunks of 77 tokens")
    p.add_argument("--random-weights", action="store_true",
                   help="instantiate a family preset's full-size architecture with random weights (no download)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin/.ckpt) weights you trust")
    p.add_argument("--memory-budget", metavar="SIZE", help="memory the trace and validation may use, e.g. 2GiB "
                   "(default: what /proc/meminfo says is available); a build over it is refused before any work")
    _add_backend_choice(p)
    for backend in backends().values():
        if backend.build_options:
            _add_backend_options(p.add_argument_group(f"{backend.label} (with --backend {backend.name})"), backend)


def _add_backend_choice(p: argparse.ArgumentParser) -> None:
    """``--backend``, its choices and help from the backend registry."""
    found = backends()
    p.add_argument("--backend", choices=list(found), default="onnxruntime",
                   help="; ".join(f"{name}: {b.help}" for name, b in found.items()))


def _option_dest(backend: Backend, option: Option, stage: str = "build") -> str:
    return f"backend:{backend.name}:{option.name}" if stage == "build" else f"load:{backend.name}:{option.name}"


def _load_flag(backend: Backend, option: Option) -> str:
    """``sdexport run``'s spelling of a load option: prefixed by the backend (``--openvino-precision``)."""
    return f"--{backend.name}-{option.name.replace('_', '-')}"


def _run_load_options(backend: Backend) -> list[Option]:
    """The load options ``sdexport run`` has flags for: those with ``cli``, except threads (``--threads``)."""
    return [o for o in backend.load_options if o.cli and o.name != "threads"]


def _add_backend_options(group: argparse._ArgumentGroup, backend: Backend, stage: str = "build") -> None:
    """One flag per build (or, for run, load) option the backend declares (type, default, choices, help)."""
    options = backend.build_options if stage == "build" else _run_load_options(backend)
    for option in options:
        if not option.cli:
            continue
        kwargs: dict[str, Any] = {"dest": _option_dest(backend, option, stage), "help": option.help}
        if option.kind == "switch":
            kwargs.update(action=argparse.BooleanOptionalAction if option.default else "store_true",
                          default=bool(option.default))
        else:
            metavar = option.metavar or (None if option.choices else option.name.upper())
            kwargs.update(type=option.type, choices=option.choices, metavar=metavar, default=option.default)
            if option.default not in (None, [], ()):
                kwargs["help"] += " (default: %(default)s)"
            if option.kind == "repeat":
                kwargs.update(action="append", default=list(option.default or []))
            elif option.kind == "many":
                kwargs["nargs"] = "+"
        group.add_argument(option.cli_flag if stage == "build" else _load_flag(backend, option), **kwargs)


def _backend_values(args: argparse.Namespace, backend: Backend) -> dict[str, Any]:
    """The build option values of ``backend`` from parsed arguments (options without a flag keep their default)."""
    return {o.name: getattr(args, _option_dest(backend, o)) for o in backend.build_options if o.cli}


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``sdexport run``'s engine options for the chosen backend: --threads and its --BACKEND-OPTION flags."""
    backend = backends()[args.backend]
    values = {o.name: getattr(args, _option_dest(backend, o, "load")) for o in _run_load_options(backend)}
    if args.threads:
        values["threads"] = args.threads
    return {name: value for name, value in values.items() if value is not None}


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="verify a compiled folder against its manifest and describe it")
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    p.add_argument("--json", action="store_true", help="print the manifest instead of the summary")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate images with a compiled folder (no torch, no diffusers)",
                       description="Generate images with a compiled folder. The generation flags are the arguments "
                       "of Pipeline.__call__ (diffusers' names), with the library's defaults.")
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    _add_generation_flags(p.add_argument_group("generation (the arguments of Pipeline.__call__)"))
    p.add_argument("--out", type=Path, default=Path("out.png"),
                   help="PNG, JPEG or WebP by the suffix (several images: out-0.png, out-1.png, ...), or .npy to save "
                   "the latents (with a .npy.json naming their latent space)")
    _add_backend_choice(p)
    p.add_argument("--threads", type=int, help="intra-op threads of the backend (ONNX Runtime, OpenVINO)")
    for backend in backends().values():
        if _run_load_options(backend):
            _add_backend_options(p.add_argument_group(f"{backend.label} (with --backend {backend.name})"), backend,
                                 "load")
    p.add_argument("--no-verify", action="store_true", help="check file sizes only, not sha256 (faster start)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _cli_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """A parser whose ValueError message argparse shows as it is (a usage error naming the flag)."""
    if parse in (int, float, str):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    convert.__name__ = parse.__name__
    return convert


_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT"}


def _add_generation_flags(group: argparse._ArgumentGroup) -> None:
    """One flag per command-line field of GenerationArgs: type, default, choices and help from its metadata."""
    from sdexport.runtime.args import arg_info, cli_fields, cli_parse, defaults

    default = defaults()

    for name in cli_fields():
        info = arg_info(name)
        parse = cli_parse(name)
        metavar = info.metavar or (None if info.choices else _METAVARS.get(parse))
        options: dict[str, Any] = {"dest": name, "help": info.help, "metavar": metavar, "type": _cli_type(parse),
                                   "choices": info.choices}
        if info.choices is not None and info.metavar is not None:
            options["help"] += "; one of: %(choices)s"
        if info.repeat:
            options["action"] = "append"
            options["help"] += " (repeatable)"
        if name in default:
            options["default"] = default[name]
        else:
            options["required"] = True
        group.add_argument(*(info.flags or (f"--{name.replace('_', '-')}",)), **options)


def _messages(args: argparse.Namespace) -> Callable[[str], None]:
    """Progress messages to stderr, or nowhere with -q."""
    if args.quiet:
        return lambda msg: None
    return lambda msg: print(msg, file=sys.stderr, flush=True)


def _progress_bar(enabled: bool) -> object:
    from sdexport.cli_progress import StepBar

    return StepBar() if enabled else None


def _cmd_run(args: argparse.Namespace) -> int:
    from sdexport.runtime.args import GenerationArgs, cli_fields
    from sdexport.runtime.images import LATENT_SUFFIX, check_output_path, save_image
    from sdexport.runtime.latent_files import save_latents
    from sdexport.runtime.pipeline import Pipeline

    latent_out = check_output_path(args.out).suffix.lower() == LATENT_SUFFIX
    request = GenerationArgs(**{name: getattr(args, name) for name in cli_fields()},
                             output_type="latent" if latent_out else "pil",
                             callback=_progress_bar(not (args.no_progress or args.quiet)))
    pipe = Pipeline.load(args.folder, backend=args.backend, verify=not args.no_verify,
                         engine_options=_engine_options(args))
    result = pipe.generate(request)
    if latent_out:
        save_latents(args.out, result.images, result.latent_space, pipe.family)
        print(f"latents {list(result.images.shape)} -> {args.out}")
    else:
        many = len(result.images) > 1
        for index, (picture, seed) in enumerate(zip(result.images, result.seeds, strict=True)):
            path = args.out.with_name(f"{args.out.stem}-{index}{args.out.suffix}") if many else args.out
            save_image(picture, path, {**{k: v for k, v in result.parameters.items() if k != "seeds"}, "seed": seed})
            print(f"{path} (seed {seed})")
    t = result.timings
    if not args.quiet:
        print(f"text {t.text_encoder:.2f} s, {len(t.unet)} UNet steps {sum(t.unet):.2f} s, "
              f"VAE {t.vae_encoder + t.vae_decoder:.2f} s, total {t.total:.2f} s", file=sys.stderr)
    return 0


def _add_parity(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parity", help="re-run the folder's source model in diffusers and print the differences")
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps of the end-to-end runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the end-to-end runs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _cmd_parity(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from sdexport.export.parity import run_parity

    report = run_parity(args.folder, steps=args.steps, seed=args.seed,
                        progress=_messages(args))
    print(json.dumps(asdict(report), indent=1) if args.json else report.table())
    return 0


def parser() -> argparse.ArgumentParser:
    """The sdexport argument parser."""
    codes = (textwrap.fill(f"{code:<4} {meaning}", 78, initial_indent="  ", subsequent_indent=" " * 7)
             for code, meaning in EXIT_CODES.items())
    epilog = "exit codes:\n" + "\n".join(codes)
    ap = argparse.ArgumentParser(prog="sdexport", description="Stable Diffusion deployment compiler",
                                 epilog=epilog, formatter_class=_Formatter, parents=[_logging_flags()])
    ap.add_argument("--version", action="version", version=f"sdexport {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                            title="commands (sdexport COMMAND --help for each)")
    _add_build(sub)
    _add_info(sub)
    _add_run(sub)
    _add_parity(sub)
    _add_doctor(sub)
    add_quantize_parser(sub)
    add_synth_parser(sub)
    add_serve_parser(sub, _add_backend_choice)
    return ap


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="GPU, driver, CUDA, TensorRT / ONNX Runtime, and whether FOLDER can run here")
    p.add_argument("folder", type=Path, nargs="?", help="a compiled folder to check (default: the machine only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--device", type=int, default=0, help="CUDA device to probe")


def _cmd_doctor(args: argparse.Namespace) -> int:
    from sdexport.engines.doctor import run_doctor

    code, text = run_doctor(args.folder, args.json, args.device)
    print(text)
    return code


def _cmd_build(args: argparse.Namespace) -> int:
    from sdexport.export.build import BuildConfig, build
    from sdexport.export.controlnet import ControlNetSpec
    from sdexport.export.lora import LoraSpec

    # Given ranges over the defaults (the preset's, or the model config's); a 0 is kept, and refused by the plan.
    ranges = {k: getattr(args, k) for k in ("batch", "height", "width", "prompt_chunks")}
    out = args.out or Path("build") / Path(args.model.rstrip("/")).name
    config = BuildConfig(
        model=args.model, out=out, loras=[LoraSpec.parse(t) for t in args.lora], precision=args.precision,
        component_precision=dict(args.component_precision), ranges=ranges,
        random_weights=args.random_weights, allow_pickle=args.allow_pickle, backend=args.backend,
        backend_options=_backend_values(args, get_backend(args.backend)), ip_adapter=args.ip_adapter,
        memory_budget=args.memory_budget, controlnets=[ControlNetSpec.parse(t) for t in args.controlnet],
    )
    if args.quiet:
        build(config, progress=_messages(args))
        return 0
    from sdexport.cli_progress import BuildProgress

    progress = BuildProgress()
    try:
        build(config, progress=progress)
    finally:
        progress.close()
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from sdexport.engines.artifacts import describe, load_manifest

    manifest = load_manifest(args.folder, verify=True)
    print(json.dumps(manifest, indent=1) if args.json else describe(args.folder, manifest))
    return 0


COMMANDS = {
    "build": _cmd_build, "info": _cmd_info, "run": _cmd_run, "parity": _cmd_parity, "doctor": _cmd_doctor,
    "quantize": cmd_quantize, "synth": cmd_synth,
    "serve": run_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sdexport` console script; returns the exit code."""
    ap = parser()
    args = ap.parse_args(argv)
    args.verbose, args.quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if args.verbose and args.quiet:
        ap.error("-v/--verbose and -q/--quiet exclude each other")
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"sdexport: error: {exc}", file=sys.stderr)
        return 2
    except (SdexportError, ValueError) as exc:
        print(f"sdexport: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdexport: interrupted; run the same command again to resume", file=sys.stderr)
        return 130

"""TensorRT engine builds: options, builder decisions, one child process per engine, manifest records."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdexport.engines.artifacts import check_inside, file_record, sha256_file
from sdexport.engines.tensorrt.compat import Environment, GpuInfo, probe_environment, verified_plan
from sdexport.engines.tensorrt.profiles import Bucket, check_profile, component_profiles
from sdexport.errors import ArtifactError, CompatibilityError, SdexportError
from sdexport.progress import Step
from sdexport.specs import ModelSpec, ShapeRanges

log = logging.getLogger(__name__)

PLAN_NAME = "engine.plan"
HARDWARE_LEVELS = {"none": "NONE", "same-cc": "SAME_COMPUTE_CAPABILITY", "ampere+": "AMPERE_PLUS"}
OPTIMIZATION_LEVELS = range(0, 6)


class EngineBuildError(SdexportError):
    """TensorRT could not build an engine, or its builder process died."""


@dataclass(frozen=True)
class TrtOptions:
    """What `sdexport build --backend tensorrt` asks of the TensorRT builder."""

    shapes: str = "static"
    buckets: tuple[Bucket, ...] | None = None
    workspace_gib: float | None = None
    optimization_level: int = 3
    refittable: bool = False
    strip_weights: bool = False
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compatibility: str = "none"
    timing_cache: Path | None = None
    components: tuple[str, ...] | None = None
    device: int = 0
    timeout_s: float | None = None


def options_from(values: Mapping[str, Any]) -> TrtOptions:
    """TrtOptions from the tensorrt backend's build option values (``--bucket`` WxH strings are parsed here)."""
    given = dict(values)
    buckets = tuple(b if isinstance(b, Bucket) else Bucket.parse(b) for b in given.pop("buckets", None) or ())
    components = tuple(given.pop("components", None) or ())
    return TrtOptions(**given, buckets=buckets or None, components=components or None)


@dataclass(frozen=True)
class BuildDecisions:
    """Every builder setting, as TensorRT enum member names: decided here, applied by ``layer.build_plan``."""

    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    workspace_bytes: int | None
    optimization_level: int
    hardware_compatibility: str
    host_code_allowed: bool
    stripped: bool
    refittable: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form (part of the engine record and of its cache key)."""
        return asdict(self)


def decide(options: TrtOptions, gpu: GpuInfo | None) -> BuildDecisions:
    """Turn options into builder settings; raise ValueError for combinations TensorRT would reject or misrun."""
    if options.optimization_level not in OPTIMIZATION_LEVELS:
        raise ValueError(f"builder optimization level {options.optimization_level}: choose 0..5 (3 is TensorRT's "
                         "default; 5 searches longest for the fastest kernels)")
    if options.hardware_compatibility not in HARDWARE_LEVELS:
        raise ValueError(f"hardware compatibility {options.hardware_compatibility!r}: choose one of "
                         f"{', '.join(HARDWARE_LEVELS)}")
    level = HARDWARE_LEVELS[options.hardware_compatibility]
    if level == "AMPERE_PLUS" and gpu is not None and int(gpu.compute_capability.split(".")[0]) < 8:
        raise ValueError(f"--hardware-compatibility ampere+ needs an Ampere or newer GPU to build on; this is "
                         f"{gpu.name} ({gpu.sm})")
    if options.exclude_lean_runtime and not options.version_compatible:
        raise ValueError("--exclude-lean-runtime only applies to --version-compatible engines")
    if options.version_compatible and (options.refittable or options.strip_weights):
        raise ValueError("version-compatible engines run on TensorRT's lean runtime, which cannot refit: drop "
                         "--version-compatible, or drop --refittable / --strip-weights")
    if options.workspace_gib is not None and options.workspace_gib <= 0:
        raise ValueError(f"workspace {options.workspace_gib} GiB must be > 0 (or unset for TensorRT's default)")
    flags: list[str] = []
    if options.refittable:
        flags.append("REFIT")  # any weight may change at refit (LoRA hot swap)
    if options.strip_weights:
        flags.append("STRIP_PLAN")  # the plan omits weights; they are refit from the ONNX graph at load
    if options.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if options.exclude_lean_runtime:
        flags.append("EXCLUDE_LEAN_RUNTIME")
    workspace = int(options.workspace_gib * 2**30) if options.workspace_gib is not None else None
    return BuildDecisions(
        network_flags=("STRONGLY_TYPED",),  # precision comes from the ONNX graph; required on 10.x, implied on 11.x
        builder_flags=tuple(flags),
        workspace_bytes=workspace,
        optimization_level=options.optimization_level,
        hardware_compatibility=level,
        host_code_allowed=options.version_compatible and not options.exclude_lean_runtime,
        stripped=options.strip_weights,
        refittable=options.refittable,
    )


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def timing_cache_path(options: TrtOptions, gpu: GpuInfo, trt_version: str) -> Path:
    """Where the timing cache of this GPU model and TensorRT version lives (kept across builds and folders)."""
    if options.timing_cache is not None:
        return Path(options.timing_cache)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdexport" / "tensorrt"
    return root / f"{_safe(trt_version)}-{gpu.sm}-{_safe(gpu.name)}.timing-cache"


@dataclass
class BuildJob:
    """Everything the builder process needs, as plain data (it is pickled into a spawned process)."""

    component: str
    onnx_path: str
    plan_path: str
    profiles: list[dict[str, Any]]
    decisions: dict[str, Any]
    timing_cache: str | None
    device: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _child_main(target: Callable[[Any], dict[str, Any]], arg: Any, conn: Any) -> None:
    try:
        result = ("ok", target(arg))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        result = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    conn.send(result)
    conn.close()


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not finish in time and was stopped"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {exitcode} without a result"


def run_isolated(target: Callable[[Any], dict[str, Any]], arg: Any, label: str,
                 timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``target(arg)`` in a spawned child process; a crash, OOM kill or timeout there raises here instead."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, arg, child), name=f"sdexport-{label}", daemon=True)
    proc.start()
    child.close()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    result = None
    try:
        while result is None:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            if parent.poll(wait):
                result = parent.recv()
            elif not proc.is_alive() or (deadline is not None and time.monotonic() >= deadline):
                break
    except EOFError:
        result = None
    finally:
        proc.join(None if result is not None else 5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        timed_out = deadline is not None and time.monotonic() >= deadline
        raise EngineBuildError(f"{label}: the builder process {_death(None if timed_out else proc.exitcode)}; "
                               "free GPU memory, lower --workspace-gib or --optimization-level, and retry")
    if result[0] == "error":
        log.debug("%s builder traceback:\n%s", label, result[2])
        raise EngineBuildError(f"{label}: {result[1]}")
    return result[1]


def graph_digest(files: Mapping[str, Mapping[str, Any]], graph: str, plan: str) -> str:
    """sha256 over the graph and every other file of its component folder (external data, weight map)."""
    prefix = str(Path(graph).parent) + "/"
    members = sorted((p, r["sha256"]) for p, r in files.items() if (p == graph or p.startswith(prefix)) and p != plan)
    if not any(p == graph for p, _ in members):
        raise ArtifactError(f"{graph} is not in the manifest's files; write the graphs before building engines")
    return hashlib.sha256(json.dumps(members).encode()).hexdigest()


def engine_key(onnx_sha256: str, profiles: list[dict[str, Any]], decisions: BuildDecisions, trt_version: str,
               gpu: GpuInfo) -> str:
    """Hash of everything a plan depends on; an engine whose record has this key is reused, not rebuilt."""
    data = {"onnx": onnx_sha256, "profiles": profiles, "decisions": decisions.to_dict(), "trt": trt_version,
            "gpu": [gpu.name, gpu.compute_capability]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _reusable(folder: Path, record: Mapping[str, Any] | None, key: str) -> bool:
    if not record or record.get("key") != key:
        return False
    try:
        verified_plan(folder, record)
    except ArtifactError as exc:
        log.info("rebuilding: %s", exc)
        return False
    return True


def _build_target() -> Callable[[Any], dict[str, Any]]:
    from sdexport.engines.tensorrt.layer import build_plan

    return build_plan


def preflight(options: TrtOptions, env: Environment | None = None) -> tuple[Environment, GpuInfo]:
    """Refuse at once (before any export work) when this machine cannot build TensorRT engines."""
    env = env or probe_environment()
    gpu = env.gpu(options.device)
    if gpu is None:
        raise CompatibilityError(f"building TensorRT engines needs an NVIDIA GPU; none found at CUDA device "
                                 f"{options.device} ({env.gpu_error}). Run `sdexport doctor` to see what is missing")
    if env.tensorrt_version is None:
        raise CompatibilityError(env.tensorrt_error or "TensorRT is not installed")
    decide(options, gpu)
    return env, gpu


def build_engines(folder: Path, manifest: Mapping[str, Any], options: TrtOptions,
                  progress: Callable[[str], None] | None = None, env: Environment | None = None,
                  target: Callable[[BuildJob], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Build (or reuse) one TensorRT engine per component of a compiled folder whose graphs are written.

    Returns ``{"engines": {component: record}, "files": {relative plan path: {size, sha256}}}``: the manifest's
    ``engines`` section and the file records to add to its ``files``. Each engine is built in its own spawned
    process, so a builder crash or out-of-memory kill raises EngineBuildError here and GPU memory is returned.
    ``target`` replaces the builder function (``layer.build_plan``; tests pass one that uses a fake TensorRT).
    """
    say = progress or (lambda msg: log.info("%s", msg))
    folder = Path(folder)
    env, gpu = preflight(options, env)
    decisions = decide(options, gpu)
    spec = ModelSpec.from_dict(manifest["model"])
    ranges = ShapeRanges.from_dict(manifest["shape_ranges"])
    wanted = options.components or tuple(manifest["components"])
    unknown = [c for c in wanted if c not in manifest["components"]]
    if unknown:
        raise ValueError(f"no component {unknown} in {folder}; it has {list(manifest['components'])}")
    cache = timing_cache_path(options, gpu, env.tensorrt_version)
    previous = manifest.get("engines", {})
    engines: dict[str, Any] = {}
    files: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(wanted):
        comp = manifest["components"][name]
        component = spec.components[name]
        profiles = component_profiles(component, ranges, spec.vae_scale_factor, options.shapes, options.buckets)
        for profile in profiles:
            check_profile(profile, component)
        profile_dicts = [p.to_dict() for p in profiles]
        plan_rel = str(Path(comp["graph"]).parent / PLAN_NAME)
        onnx_sha = graph_digest(manifest["files"], comp["graph"], plan_rel)
        key = engine_key(onnx_sha, profile_dicts, decisions, env.tensorrt_version, gpu)
        if _reusable(folder, previous.get(name), key):
            say(Step(f"{name}: TensorRT engine up to date", "tensorrt", index + 1, len(wanted)))
            engines[name] = dict(previous[name])
        else:
            if comp.get("precision") == "fp32":
                log.warning("%s: the graph is fp32, so its engine runs in fp32/TF32; build with --precision fp16 "
                            "for fp16 engines", name)
            say(Step(f"{name}: building TensorRT engine ({', '.join(p.label for p in profiles)})", "tensorrt", index,
                     len(wanted)))
            job = BuildJob(name, str(check_inside(folder, comp["graph"])), str(check_inside(folder, plan_rel)),
                           profile_dicts, decisions.to_dict(), str(cache), options.device)
            t0 = time.perf_counter()
            info = run_isolated(target or _build_target(), job, f"{name} engine", options.timeout_s)
            seconds = time.perf_counter() - t0
            say(Step(f"{name}: engine built in {seconds:.0f} s", "tensorrt", index + 1, len(wanted)))
            engines[name] = engine_record(plan_rel, folder, info, key, profile_dicts, decisions, gpu, onnx_sha,
                                          seconds)
        files[plan_rel] = {"size": engines[name]["size"], "sha256": engines[name]["sha256"]}
    return {"engines": engines, "files": files}


def engine_record(plan_rel: str, folder: Path, info: Mapping[str, Any], key: str, profiles: list[dict[str, Any]],
                  decisions: BuildDecisions, gpu: GpuInfo, onnx_sha256: str, seconds: float) -> dict[str, Any]:
    """The manifest entry of one engine: what it was built from, with, for, and how to check it before loading."""
    record = file_record(folder, folder / plan_rel)
    cache = info.get("timing_cache")
    return {
        "plan": plan_rel,
        "size": record["size"],
        "sha256": record["sha256"],
        "key": key,
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": info["tensorrt_version"],
        "gpu": {"name": gpu.name, "compute_capability": gpu.compute_capability},
        "profiles": profiles,
        "io": info["io"],
        "builder_flags": list(decisions.builder_flags),
        "hardware_compatibility": decisions.hardware_compatibility,
        "version_compatible": "VERSION_COMPATIBLE" in decisions.builder_flags,
        "host_code_allowed": decisions.host_code_allowed,
        "refittable": decisions.refittable,
        "stripped": decisions.stripped,
        "optimization_level": decisions.optimization_level,
        "workspace_bytes": decisions.workspace_bytes,
        "timing_cache": {"path": cache, "sha256": sha256_file(Path(cache))} if cache and Path(cache).is_file()
        else None,
        "build_seconds": round(seconds, 1),
    }

"""TensorRT optimisation profiles and static shape buckets, derived from the specs' shape ranges (pure Python)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdexport.errors import CompatibilityError
from sdexport.specs import ComponentSpec, ShapeRanges

SHAPE_MODES = ("static", "dynamic", "both")
# Width:height ratios of the default buckets: square plus the common landscape / portrait pairs. At SDXL's
# 1024x1024 area they give 1152x896, 896x1152, 1344x768 and 768x1344, four of SDXL's training buckets.
DEFAULT_ASPECTS: tuple[tuple[int, int], ...] = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16))
SPATIAL_SYMBOLS = frozenset({"image_height", "image_width", "latent_height", "latent_width"})
DYNAMIC = "dynamic"
STATIC = "static"


@dataclass(frozen=True, order=True)
class Bucket:
    """A static pixel size, written WIDTHxHEIGHT."""

    width: int
    height: int

    @property
    def label(self) -> str:
        """``WIDTHxHEIGHT``, the form used on the command line and in the manifest."""
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        """Parse ``WIDTHxHEIGHT`` (e.g. ``1152x896``)."""
        parts = text.lower().split("x")
        try:
            width, height = (int(p) for p in parts)
        except ValueError as exc:
            raise ValueError(f"bucket {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1024x1024") from exc
        return cls(width, height)


@dataclass(frozen=True)
class ProfileSpec:
    """One optimisation profile: input name -> {"min","opt","max"} shape, and what it was made for."""

    kind: str
    label: str
    shapes: dict[str, dict[str, list[int]]]

    def fits(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """True when every given input shape lies inside this profile."""
        for name, shape in shapes.items():
            rng = self.shapes.get(name)
            if rng is None or len(shape) != len(rng["min"]):
                return False
            if any(not (lo <= s <= hi) for s, lo, hi in zip(shape, rng["min"], rng["max"], strict=True)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {"kind": self.kind, "label": self.label, "shapes": self.shapes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProfileSpec:
        """Inverse of ``to_dict``."""
        return cls(data["kind"], data["label"], {k: dict(v) for k, v in data["shapes"].items()})


def bucket_grid(ranges: ShapeRanges, vae_scale_factor: int) -> int:
    """Pixel multiple buckets snap to: 64 for real models (latents divisible by 8), finer for tiny ones."""
    opt_side = min(ranges.height[1], ranges.width[1])
    return max(vae_scale_factor, min(64, opt_side // 8 // vae_scale_factor * vae_scale_factor))


def _snap(value: float, grid: int) -> int:
    return max(grid, round(value / grid) * grid)


def default_buckets(ranges: ShapeRanges, vae_scale_factor: int,
                    aspects: Sequence[tuple[int, int]] = DEFAULT_ASPECTS) -> list[Bucket]:
    """The opt size plus the same pixel area at the common aspect ratios, kept when inside the ranges."""
    grid = bucket_grid(ranges, vae_scale_factor)
    area = ranges.height[1] * ranges.width[1]
    out: list[Bucket] = []
    for w_ratio, h_ratio in aspects:
        if w_ratio == h_ratio:
            bucket = Bucket(ranges.width[1], ranges.height[1])
        else:
            bucket = Bucket(_snap(math.sqrt(area * w_ratio / h_ratio), grid),
                            _snap(math.sqrt(area * h_ratio / w_ratio), grid))
        if bucket not in out and bucket_problem(bucket, ranges, vae_scale_factor) is None:
            out.append(bucket)
    return out


def bucket_problem(bucket: Bucket, ranges: ShapeRanges, vae_scale_factor: int) -> str | None:
    """Why a bucket cannot be built for these ranges, or None when it can."""
    if bucket.width % vae_scale_factor or bucket.height % vae_scale_factor:
        return f"bucket {bucket.label}: both sides must be multiples of {vae_scale_factor} pixels"
    if not (ranges.width[0] <= bucket.width <= ranges.width[2]):
        return f"bucket {bucket.label}: width outside the folder's width range {list(ranges.width)}"
    if not (ranges.height[0] <= bucket.height <= ranges.height[2]):
        return f"bucket {bucket.label}: height outside the folder's height range {list(ranges.height)}"
    return None


def is_spatial(component: ComponentSpec) -> bool:
    """True when the component's input shapes depend on the image size (UNet, VAE), not only on the batch."""
    return bool(SPATIAL_SYMBOLS & set(component.symbols()))


def component_profiles(component: ComponentSpec, ranges: ShapeRanges, vae_scale_factor: int,
                       mode: str = "static", buckets: Sequence[Bucket] | None = None) -> list[ProfileSpec]:
    """The optimisation profiles of one engine, in selection order (static buckets before the dynamic one).

    ``static``: one profile per bucket, spatial dims fixed, batch and prompt length over the folder's range.
    ``dynamic``: one profile over the folder's whole range. ``both``: the buckets, then the dynamic profile.
    Components whose inputs do not depend on the image size get the one dynamic profile in every mode.
    """
    if mode not in SHAPE_MODES:
        raise ValueError(f"shape mode {mode!r}: choose one of {', '.join(SHAPE_MODES)}")
    dynamic = ProfileSpec(DYNAMIC, DYNAMIC, ranges.profile(component, vae_scale_factor))
    if not is_spatial(component) or mode == DYNAMIC:
        return [dynamic]
    chosen = list(buckets) if buckets is not None else default_buckets(ranges, vae_scale_factor)
    problems = [p for p in (bucket_problem(b, ranges, vae_scale_factor) for b in chosen) if p]
    if problems:
        raise ValueError("; ".join(problems) + ": pick buckets inside the folder's ranges or use --shapes dynamic")
    if not chosen:
        raise ValueError("no static bucket fits the folder's shape ranges; pass --bucket WIDTHxHEIGHT or use "
                         "--shapes dynamic")
    profiles = []
    for bucket in chosen:
        fixed = replace(ranges, height=(bucket.height,) * 3, width=(bucket.width,) * 3)
        profiles.append(ProfileSpec(STATIC, bucket.label, fixed.profile(component, vae_scale_factor)))
    return profiles + [dynamic] if mode == "both" else profiles


def check_profile(profile: ProfileSpec, component: ComponentSpec) -> None:
    """Raise ValueError unless the profile satisfies what TensorRT enforces for the component's inputs."""
    names = [t.name for t in component.inputs]
    if sorted(profile.shapes) != sorted(names):
        raise ValueError(f"{component.name} profile {profile.label}: inputs {sorted(profile.shapes)}, "
                         f"the component has {sorted(names)}")
    for tensor in component.inputs:
        rng = profile.shapes[tensor.name]
        lo, opt, hi = rng["min"], rng["opt"], rng["max"]
        if not (len(lo) == len(opt) == len(hi) == len(tensor.dims)):
            raise ValueError(f"{component.name}.{tensor.name} profile {profile.label}: rank mismatch {rng}")
        for axis, dim in enumerate(tensor.dims):
            if not (1 <= lo[axis] <= opt[axis] <= hi[axis]):
                raise ValueError(f"{component.name}.{tensor.name} axis {axis}: min/opt/max "
                                 f"{lo[axis]}/{opt[axis]}/{hi[axis]} must satisfy 1 <= min <= opt <= max")
            if isinstance(dim, int) and not (lo[axis] == opt[axis] == hi[axis] == dim):
                raise ValueError(f"{component.name}.{tensor.name} axis {axis} is fixed at {dim} in the graph, "
                                 f"the profile says {lo[axis]}..{hi[axis]}")


def select_profile(component: str, profiles: Sequence[ProfileSpec], shapes: Mapping[str, Sequence[int]]) -> int:
    """Index of the profile to run ``shapes`` with: the first static bucket that fits, else a dynamic one."""
    fitting = [i for i, p in enumerate(profiles) if p.fits(shapes)]
    for index in fitting:
        if profiles[index].kind == STATIC:
            return index
    if fitting:
        return fitting[0]
    wanted = ", ".join(f"{k}={list(v)}" for k, v in shapes.items())
    built = ", ".join(p.label for p in profiles)
    raise CompatibilityError(
        f"{component}: no engine profile accepts {wanted}; the engine was built for {built}. Use one of those "
        "sizes, or rebuild with `sdexport build ... --backend tensorrt --bucket WIDTHxHEIGHT` (a static size) or "
        "`--shapes both` (adds a dynamic profile over the folder's whole range)"
    )


def ort_gpu_providers(profile: Mapping[str, Mapping[str, Sequence[int]]], cache_dir: Path, device: int = 0,
                      tensorrt: bool = True, optimization_level: int = 3, workspace_bytes: int | None = None,
                      cuda_graphs: bool = False) -> list[Any]:
    """ONNX Runtime providers for one component on an NVIDIA GPU: TensorRT EP (explicit profile over the folder's
    range, engine and timing caches under ``cache_dir``), then CUDA EP, then CPU for anything left.

    Precision comes from the graph (build with --precision fp16), so ``trt_fp16_enable`` is not set. Check what a
    session really got with ``OrtEngine.dropped_providers``: onnxruntime-gpu falls back to CPU silently.
    """
    providers: list[Any] = []
    if tensorrt:
        options: dict[str, Any] = {
            "device_id": device,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache_dir),
            "trt_builder_optimization_level": optimization_level,
        }
        for key in ("min", "opt", "max"):
            options[f"trt_profile_{key}_shapes"] = ",".join(
                f"{name}:{'x'.join(str(d) for d in rng[key])}" for name, rng in profile.items())
        if workspace_bytes is not None:
            options["trt_max_workspace_size"] = workspace_bytes
        if cuda_graphs:
            options["trt_cuda_graph_enable"] = True
        providers.append(("TensorrtExecutionProvider", options))
    providers.append(("CUDAExecutionProvider", {"device_id": device}))
    providers.append("CPUExecutionProvider")
    return providers

"""Peak memory of a build, estimated from the specs before any weights load; refused when over the budget.

The estimate per component and shape: a fixed base (Python, torch, ONNX, ONNX Runtime), the fp32 weights times the
copies each phase holds (torch module + exporter proto when tracing, torch module or ONNX Runtime session when
validating), and the largest activations the exporter and ONNX Runtime materialise: attention score matrices
(batch x heads x tokens x keys, fp32, at each UNet level with attention and the VAE's mid block) and the widest
convolution output. The factors are calibrated on measured builds (docs in the module constants).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sdexport.errors import SdexportError
from sdexport.specs import ShapeRanges

log = logging.getLogger(__name__)

BASE_BYTES = 600 * 2**20
"""Resident size of the build process before any model: interpreter, torch, diffusers, onnx, ONNX Runtime
(tiny builds peak at 590-670 MiB)."""
WEIGHT_COPIES = {"trace": 1.3, "validate": 1.7}
"""fp32 weight copies alive at the peak. Trace: the torch module plus the exporter's buffers (SD 1.5 UNet at 256 px:
3.28 GiB of weights, 3.77 GiB loaded, 4.77 GiB after the trace). Validate: ONNX Runtime's session plus the graph
being optimised and saved (the SD 1.5 build's 6.2 GB peak)."""
ACTIVATION_COPIES = 3.0
"""Score matrix, its softmax and one more buffer of the same size (exporter / ONNX Runtime arena) at the peak
(tiny 2x-VAE UNet traced at 97x99 latents: 1.48 GiB measured, 1.58 estimated)."""
FLOAT = 4
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


class MemoryBudgetError(SdexportError):
    """A build would need more memory than the budget; the message names the component, shape and the fix."""


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of one component in one phase (trace / validate) at one shape."""

    component: str
    phase: str
    """"trace" or "validate" (WEIGHT_COPIES)."""
    shape: dict[str, int]
    """The component's symbol values (batch, latent or image sides, sequence)."""
    weights: int
    activations: int

    @property
    def total(self) -> int:
        """Bytes: base + weight copies + activation copies."""
        return int(BASE_BYTES + WEIGHT_COPIES[self.phase] * self.weights + ACTIVATION_COPIES * self.activations)


def parse_size(value: int | str) -> int:
    """Bytes from an int or a size like ``2GiB``, ``512MB``, ``1.5g``; ValueError naming the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"memory budget {value!r} is not a size: pass bytes or a number with one of "
                             "B, KB, KiB, MB, MiB, GB, GiB, TB, TiB (e.g. 2GiB)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory budget {value!r} must be more than 0 bytes")
    return size


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (what can be used without swapping), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _heads(unet: Mapping[str, Any], level: int) -> int:
    """Attention heads at one UNet level (diffusers reads attention_head_dim as the head count when unset)."""
    value = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    return int(value[level] if isinstance(value, list | tuple) else value)


def _unet_activations(unet: Mapping[str, Any], env: Mapping[str, int]) -> int:
    """The largest attention scores + convolution output at any UNet level, in bytes."""
    batch, h, w, keys = env["batch"], env["latent_height"], env["latent_width"], env.get("sequence", 77)
    blocks = list(unet["down_block_types"])
    channels = list(unet["block_out_channels"])
    peak = 0
    for level, block in enumerate(blocks):
        tokens = math.ceil(h / 2**level) * math.ceil(w / 2**level)
        attention = "CrossAttn" in block or level == len(blocks) - 1  # the mid block attends at the last level
        scores = batch * _heads(unet, level) * tokens * max(tokens, keys) if attention else 0
        peak = max(peak, (scores + batch * channels[level] * tokens) * FLOAT)
    return peak


def _vae_activations(vae: Mapping[str, Any], env: Mapping[str, int]) -> int:
    """The VAE mid block's one-head attention scores + the widest full-size convolution output, in bytes."""
    batch = env["batch"]
    tokens = env["latent_height"] * env["latent_width"]
    pixels = env["image_height"] * env["image_width"]
    return (batch * tokens * tokens + batch * int(vae["block_out_channels"][0]) * pixels) * FLOAT


def _text_activations(config: Mapping[str, Any], env: Mapping[str, int]) -> int:
    seq = env.get("sequence", 77)
    return env["batch"] * (int(config["num_attention_heads"]) * seq * seq + int(config["hidden_size"]) * seq) * FLOAT


def estimated(configs: Mapping[str, Any], component: str) -> bool:
    """Whether ``component`` has an estimate: the UNet, ControlNets, the VAE and the text encoders (an IP-Adapter's
    image encoder, a few hundred MiB at 224 px, has none)."""
    return component in ("unet", "vae_encoder", "vae_decoder") or component.startswith("controlnet") or (
        component.startswith("text_encoder") and component in configs)


def activations(configs: Mapping[str, Any], component: str, env: Mapping[str, int]) -> int:
    """Bytes of the largest activations of ``component`` at symbol values ``env``."""
    if component == "unet":
        return _unet_activations(configs["unet"], env)
    if component.startswith("controlnet"):  # the UNet's down and mid blocks: its config when known, else the UNet's
        return _unet_activations(configs.get(component, configs["unet"]), env)
    if component.startswith("vae"):
        return _vae_activations(configs["vae"], env)
    return _text_activations(configs[component], env)


def weight_bytes(configs: Mapping[str, Any], component: str) -> int:
    """fp32 bytes of a component's weights, counted on torch's meta device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        module = _module(configs, component)
    return FLOAT * sum(p.numel() for p in module.parameters())


def _module(configs: Mapping[str, Any], component: str) -> Any:
    import diffusers
    import transformers

    if component == "unet":
        return diffusers.UNet2DConditionModel.from_config(configs["unet"])
    if component.startswith("controlnet"):
        if component in configs:
            return diffusers.ControlNetModel.from_config(configs[component])
        return diffusers.UNet2DConditionModel.from_config(configs["unet"])  # an upper bound
    if component.startswith("vae"):
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
        return vae.encoder if component == "vae_encoder" else vae.decoder
    cfg = {k: v for k, v in configs[component].items() if k != "architectures"}
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))


def estimates(configs: Mapping[str, Any], spec: Any, components: list[str], ranges: ShapeRanges,
              weights_of: Mapping[str, int] | None = None) -> list[Estimate]:
    """The trace and validation estimates of every component in ``components`` (``weights_of``: known sizes)."""
    from sdexport.export.onnx import trace_env, validation_envs

    out = []
    for name in (n for n in components if estimated(configs, n)):
        component = spec.components[name]
        weights = weights_of[name] if weights_of and name in weights_of else weight_bytes(configs, name)
        envs = [("trace", trace_env(spec, component, ranges))]
        envs += [("validate", env) for env in validation_envs(spec, component, ranges)]
        for phase, env in envs:
            shape = {k: v for k, v in env.items() if k in component.symbols()}
            out.append(Estimate(name, phase, shape, weights, activations(configs, name, env)))
    return out


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def _smaller(ranges: ShapeRanges, factor: int) -> ShapeRanges | None:
    """The ranges with min and opt sizes halved (max kept) and batch max 1, or None when nothing is smaller."""
    def half(r: tuple[int, int, int]) -> tuple[int, int, int]:
        lo = max(factor, r[0] // 2 // factor * factor)
        return lo, max(lo, r[1] // 2 // factor * factor), min(r[2], 8 * lo)

    smaller = replace(ranges, height=half(ranges.height), width=half(ranges.width), batch=(1, 1, 1))
    return None if smaller == ranges else smaller


def _fix(configs: Mapping[str, Any], spec: Any, components: list[str], ranges: ShapeRanges, budget: int,
         weights_of: Mapping[str, int]) -> str:
    """A range that fits the budget, as flags, or advice when none of the tried ones does."""
    candidate = ranges
    for _ in range(8):
        candidate = _smaller(candidate, spec.vae_scale_factor)
        if candidate is None:
            break
        if max(e.total for e in estimates(configs, spec, components, candidate, weights_of)) <= budget:
            fmt = ":".join
            return (f"--height {fmt(map(str, candidate.height))} --width {fmt(map(str, candidate.width))} "
                    f"--batch 1 fits")
    return "no smaller size range fits: free memory or build on a larger machine"


def check_budget(configs: Mapping[str, Any], spec: Any, components: list[str], ranges: ShapeRanges,
                 budget: int | str | None = None) -> list[Estimate]:
    """Raise MemoryBudgetError if any trace / validation estimate exceeds ``budget`` (default: available memory)."""
    if not components:
        return []
    limit = available_memory() if budget is None else parse_size(budget)
    found = estimates(configs, spec, components, ranges)
    if not found:
        return []
    worst = max(found, key=lambda e: e.total)
    log.info("estimated build peak %s (%s %s at %s); budget %s", _gib(worst.total), worst.component, worst.phase,
             worst.shape, _gib(limit))
    if worst.total > limit:
        what = "the memory budget (--memory-budget)" if budget is not None else "the available memory (MemAvailable)"
        raise MemoryBudgetError(
            f"{worst.component}: the {worst.phase} at shape {worst.shape} needs about {_gib(worst.total)} "
            f"({_gib(worst.weights)} of fp32 weights, {_gib(worst.activations)} of attention and activations), "
            f"over {what} of {_gib(limit)}. Shape ranges: height {list(ranges.height)}, width "
            f"{list(ranges.width)}, batch {list(ranges.batch)}; smaller --height/--width minimums and --batch "
            f"fix it ({_fix(configs, spec, components, ranges, limit, {e.component: e.weights for e in found})})")
    return found

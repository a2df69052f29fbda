"""torch.onnx.export per ComponentSpec: dummy inputs and dynamic axes come from the spec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sdexport.specs import ComponentSpec, ModelSpec, ShapeRanges
from sdexport.specs.model import TOKENS_PER_CHUNK

log = logging.getLogger(__name__)

OPSET = 17
BOS, EOS = 49406, 49407


def _odd_in(lo: int, hi: int, start: int) -> int:
    """The first odd value >= start inside [lo, hi] (or lo when none)."""
    for value in range(max(lo, start), hi + 1):
        if value % 2:
            return value
    return lo


def trace_env(spec: ModelSpec, component: ComponentSpec, ranges: ShapeRanges) -> dict[str, int]:
    """Symbol values to trace at: batch 2 and odd latent sides.

    Tracing at odd latent sides makes diffusers' UNet pass explicit upsample sizes, which the exporter records as
    shape arithmetic, so the graph stays correct at every size rather than only multiples of 2**up-blocks.
    """
    sym = ranges.symbol_ranges(component, spec.vae_scale_factor)
    env = {"batch": min(2, sym["batch"][2]) if "batch" in sym else 1, "sequence": TOKENS_PER_CHUNK}
    f = spec.vae_scale_factor
    lh = _odd_in(ranges.height[0] // f, ranges.height[2] // f, ranges.height[0] // f + 1)
    lw = _odd_in(ranges.width[0] // f, ranges.width[2] // f, ranges.width[0] // f + 3)
    env.update(latent_height=lh, latent_width=lw, image_height=lh * f, image_width=lw * f)
    return env


def validation_envs(spec: ModelSpec, component: ComponentSpec, ranges: ShapeRanges) -> list[dict[str, int]]:
    """Two shapes other than the traced one: the smallest size at batch 1, and odd, non-square sides at batch 3."""
    sym = ranges.symbol_ranges(component, spec.vae_scale_factor)
    f = spec.vae_scale_factor
    lh0, lw0 = ranges.height[0] // f, ranges.width[0] // f
    first = {"batch": 1, "latent_height": lh0, "latent_width": lw0, "sequence": TOKENS_PER_CHUNK}
    lh = _odd_in(lh0, ranges.height[2] // f, lh0 + 5)
    lw = _odd_in(lw0, ranges.width[2] // f, lw0 + 1)
    seq_hi = sym.get("sequence", (TOKENS_PER_CHUNK,) * 3)[2]
    second = {"batch": min(3, sym["batch"][2]), "latent_height": lh, "latent_width": lw,
              "sequence": min(2 * TOKENS_PER_CHUNK, seq_hi)}
    for env in (first, second):
        env.update(image_height=env["latent_height"] * f, image_width=env["latent_width"] * f)
    return [first, second]


def dummy_inputs(component: ComponentSpec, env: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs in the value ranges the component sees in a real pipeline."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for tensor in component.inputs:
        shape = tensor.shape(env)
        if tensor.name == "input_ids":
            ids = rng.integers(0, BOS, size=shape)
            ids[:, 0] = BOS
            ends = rng.integers(2, shape[1], size=shape[0])
            for row, end in enumerate(ends):
                ids[row, end:] = EOS
            feeds[tensor.name] = ids.astype(np.int64)
        elif tensor.name == "timestep":
            feeds[tensor.name] = rng.uniform(0, 1000, size=shape).astype(np.float32)
        elif tensor.name == "time_ids":
            feeds[tensor.name] = rng.uniform(0, 1024, size=shape).astype(np.float32)
        elif tensor.name == "image":
            feeds[tensor.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
        elif tensor.name in ("controlnet_cond", "conditioning_scale"):  # a [0, 1] control image, scales
            feeds[tensor.name] = rng.uniform(0, 1, size=shape).astype(np.float32)
        else:
            feeds[tensor.name] = rng.standard_normal(size=shape).astype(np.float32)
    return feeds


def torch_outputs(module: nn.Module, component: ComponentSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the torch wrapper on numpy feeds; fp32 reference outputs."""
    args = tuple(torch.from_numpy(feeds[t.name]) for t in component.inputs)
    with torch.inference_mode():
        outs = module(*args)
    return [o.float().numpy() for o in outs]


def export_component(module: nn.Module, component: ComponentSpec, env: dict[str, int], path: Path) -> None:
    """Export ``module`` to ``path`` (weights may land in loose external files next to it for large graphs)."""
    feeds = dummy_inputs(component, env, seed=0)
    args = tuple(torch.from_numpy(feeds[t.name]) for t in component.inputs)
    dynamic_axes = {t.name: t.dynamic_axes() for t in (*component.inputs, *component.outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s at %s", component.name, env)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[t.name for t in component.inputs],
            output_names=[t.name for t in component.outputs],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=False,  # keep every parameter under its own name (refit, LoRA swap)
            keep_initializers_as_inputs=True,  # no value-based de-duplication: one initializer per parameter
            dynamo=False,
        )

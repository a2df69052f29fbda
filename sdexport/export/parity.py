"""`sdexport parity`: re-run a folder's source model in diffusers; per-component and end-to-end differences."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.errors import SourceError
from sdexport.specs import ModelSpec, ShapeRanges
from sdexport.specs.controlnet import controlnet_components
from sdexport.specs.ip_adapter import has_ip_adapter

CONTROLNET_TASK = "controlnet"
"""The end-to-end task of a ControlNet folder: text-to-image with the control image (diffusers' ControlNet pipeline)."""

log = logging.getLogger(__name__)

def _alias_text_model(module: Any) -> None:
    """transformers 5 flattens CLIPTextModel (no ``.text_model``); diffusers' SD clip_skip path still reads
    ``text_encoder.text_model.final_layer_norm``. Point the old name at the module itself (not as a submodule)."""
    if module is not None and not hasattr(module, "text_model") and hasattr(module, "final_layer_norm"):
        object.__setattr__(module, "text_model", module)


def diffusers_pipeline(source_pipe: Any, spec: ModelSpec, task: str, scheduler: str | None = None,
                       scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """The diffusers pipeline for ``task`` over the source's modules, configured like the folder's model_index."""
    import diffusers

    from sdexport.export.load import assemble

    name = spec.family_record.pipelines.get(task)
    if name is None:
        raise ValueError(f"no diffusers pipeline for task {task!r} of family {spec.family!r}; it has "
                         f"{list(spec.family_record.pipelines)}")
    pipe = assemble(name, dict(source_pipe.components), spec.pipeline_config)
    pipe.set_progress_bar_config(disable=True)
    for attr in ("text_encoder", "text_encoder_2"):
        _alias_text_model(getattr(pipe, attr, None))
    if scheduler is not None or scheduler_config:
        sched_cls = getattr(diffusers, scheduler) if scheduler else type(pipe.scheduler)
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config, **dict(scheduler_config or {}))
    return pipe


def torch_generators(seeds: list[int]) -> list[Any]:
    """One CPU torch.Generator per image: what the runtime's ``rng="torch"`` reproduces."""
    import torch

    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def load_oracle(manifest: Mapping[str, Any]) -> Any:
    """The folder's source model as a loaded ``Source`` (LoRAs fused again), from local files only."""
    from sdexport.export.controlnet import attach_recorded
    from sdexport.export.load import inspect_source, load_source
    from sdexport.export.lora import LoraSpec, fuse_loras

    source = manifest["source"]
    if source["kind"] == "memory":
        raise SourceError("this folder was built from an in-memory pipeline, which cannot be reloaded from disk; "
                          "compare it from Python (sdexport.export.parity.end_to_end_parity with that pipeline)")
    model = source.get("path") or source["id"]
    try:
        info = inspect_source(model, random_weights=source["kind"] == "random")
        loaded = load_source(info)
    except SourceError as exc:
        raise SourceError(f"the source model {model!r} of this folder is not available locally: {exc}") from exc
    if info.fingerprint != source.get("hash"):
        raise SourceError(f"the source model {model!r} changed since the build (fingerprint differs); rebuild first")
    loras = [LoraSpec(Path(r["path"]), r["weight"]) for r in manifest.get("loras", [])]
    if loras:
        fuse_loras(loaded.pipe, loras)
    if "ip_adapter" in source:
        from sdexport.export.ip_adapter import load_into

        load_into(loaded.pipe, source["ip_adapter"]["path"])
    attach_recorded(loaded.pipe, manifest)
    return loaded


@dataclass
class ParityReport:
    """Max |runtime - diffusers| per component output and per end-to-end task."""

    components: dict[str, dict[str, float]] = field(default_factory=dict)
    end_to_end: dict[str, dict[str, float]] = field(default_factory=dict)

    def table(self) -> str:
        """A plain-text table of the report."""
        lines = [f"{'component':<16}{'output':<16}{'max |diff|':>12}"]
        for name, outputs in self.components.items():
            lines += [f"{name:<16}{out:<16}{diff:>12.2e}" for out, diff in outputs.items()]
        lines.append("")
        lines.append(f"{'end to end':<16}{'latents':>12}{'image (0..1)':>16}{'image (1/255)':>15}")
        for task, diffs in self.end_to_end.items():
            lines.append(f"{task:<16}{diffs['latents']:>12.2e}{diffs['image']:>16.2e}{diffs['image'] * 255:>15.3f}")
        return "\n".join(lines)


def component_parity(folder: Path, manifest: Mapping[str, Any], source: Any, seed: int = 0) -> dict[str, dict]:
    """Each component's engine vs its torch module on seeded inputs at the folder's optimal shapes."""
    from sdexport.engines.ort import OrtEngine
    from sdexport.export.onnx import dummy_inputs, torch_outputs
    from sdexport.export.wrappers import wrap

    spec = ModelSpec.from_dict(manifest["model"])
    ranges = ShapeRanges.from_dict(manifest["shape_ranges"])
    out: dict[str, dict[str, float]] = {}
    for name, component in spec.components.items():
        env = {s: r[1] for s, r in ranges.symbol_ranges(component, spec.vae_scale_factor).items()}
        feeds = dummy_inputs(component, env, seed)
        refs = torch_outputs(wrap(source.pipe, spec, component), component, feeds)
        engine = OrtEngine(name, folder / manifest["components"][name]["graph"], component.inputs, component.outputs)
        got = engine.run(feeds)
        out[name] = {t.name: float(np.abs(got[t.name] - ref).max()) for t, ref in zip(component.outputs, refs,
                                                                                      strict=True)}
    return out


def _task_inputs(task: str, height: int, width: int) -> dict[str, Any]:
    """A synthetic picture (and mask) for the image tasks."""
    from PIL import Image

    if task == "txt2img":
        return {}
    y, x = np.mgrid[0:height, 0:width]
    picture = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    inputs: dict[str, Any] = {"image": Image.fromarray(picture.astype(np.uint8))}
    if task == "inpaint":
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
        inputs["mask_image"] = Image.fromarray(mask)
    return inputs


def end_to_end_parity(pipe: Any, source: Any, task: str, steps: int = 4, seed: int = 0,
                      size: tuple[int, int] | None = None) -> dict[str, float]:
    """One generation by the runtime and by diffusers with the same seeds: max |diff| of latents and images."""
    height, width = size or (pipe.ranges.height[1], pipe.ranges.width[1])
    common: dict[str, Any] = {"prompt": "a lighthouse at dawn", "num_inference_steps": steps, **_task_inputs(
        task, height, width)}
    if task == CONTROLNET_TASK:  # image= is the control image; the folder's default scales on both sides
        from sdexport.export.controlnet import recorded_pipeline

        oracle = recorded_pipeline(source.pipe, pipe.spec)
        scales = list(pipe.controls.default_scales)
        single = len(scales) == 1  # diffusers takes a float and an image for one ControlNet, lists for several
        common.update(image=common["image"] if single else [common["image"]] * len(scales),
                      controlnet_conditioning_scale=scales[0] if single else scales)
    else:
        oracle = diffusers_pipeline(source.pipe, pipe.spec, task)
    if task != "img2img":
        common.update(height=height, width=width)
    if has_ip_adapter(pipe.spec):  # diffusers' UNet then needs image embeds: give both sides an image prompt
        common["ip_adapter_image"] = _task_inputs("img2img", height, width)["image"]
    results: dict[str, np.ndarray] = {}
    for output in ("latent", "np"):
        ref = oracle(**common, generator=torch_generators([seed]), output_type=output).images
        ours = pipe(**common, seed=seed, rng="torch", output_type="np_float" if output == "np" else output).images
        ref = ref.numpy() if hasattr(ref, "numpy") else np.asarray(ref)
        results[output] = np.abs(ref - ours).max()
    return {"latents": float(results["latent"]), "image": float(results["np"])}


def folder_tasks(spec: ModelSpec) -> list[str]:
    """The tasks a folder runs: inpainting only for 9-channel UNets, image tasks only with a VAE encoder."""
    if spec.inpaint:
        return ["inpaint"]
    if controlnet_components(spec):
        return [CONTROLNET_TASK]
    image_tasks = "vae_encoder" in spec.components
    return [t for t in spec.family_record.tasks if t == "txt2img" or image_tasks]


def run_parity(folder: str | Path, steps: int = 4, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> ParityReport:
    """Compare a compiled folder with its source model in diffusers, component by component and end to end."""
    from sdexport.runtime.pipeline import Pipeline

    say = progress or (lambda msg: log.info("%s", msg))
    pipe = Pipeline.load(folder)
    say(f"loading the source model {pipe.manifest['source']['id']} ...")
    source = load_oracle(pipe.manifest)
    report = ParityReport(component_parity(Path(folder), pipe.manifest, source, seed))
    for task in folder_tasks(pipe.spec):
        say(f"end to end: {task}")
        report.end_to_end[task] = end_to_end_parity(pipe, source, task, steps, seed)
    return report

"""The Pipeline: load a compiled folder, then check inputs, encode, pick timesteps, start, denoise and decode."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.arrays import HOST, Arrays
from sdexport.engines.artifacts import check_inside
from sdexport.engines.base import Engine
from sdexport.runtime.args import DEFAULTS, GenerationArgs
from sdexport.runtime.backends import (
    ComponentFiles,
    EngineRunner,
    component_files,
    open_engine,
    open_engines,
    read_scheduler_config,
    verify_folder,
)
from sdexport.runtime.conditioning import conditioner_for
from sdexport.runtime.control import ControlInputs, ControlLoop, Controls
from sdexport.runtime.denoise import Cancelled, Guidance, denoise
from sdexport.runtime.images import postprocess
from sdexport.runtime.ip_adapter import IMAGE_ENCODER, ImagePrompt, condition_on_image, image_prompt
from sdexport.runtime.latents import LatentSource, Start, start_img2img, start_inpaint, start_txt2img
from sdexport.runtime.noise import NoiseStreams
from sdexport.runtime.request import Request, build_request, latent_space
from sdexport.runtime.result import (
    GenerationCancelled,
    GenerationResult,
    NonFiniteError,
    RequestError,
    StepCallback,
    Timings,
)
from sdexport.runtime.schedulers import Plan, Scheduler, SchedulerConfigError, load_scheduler
from sdexport.runtime.tokenizer import ClipTokenizer
from sdexport.specs import ModelSpec, ShapeRanges

log = logging.getLogger(__name__)


class Pipeline:
    """A compiled folder ready to generate. Thread-safe: every call keeps its own scheduler state and noise.

    ``pipe(prompt, ...)`` takes diffusers' argument names (see ``__call__``); ``pipe.engines`` holds one Engine per
    component, replaceable with ``replace_engine`` (another backend, or re-weighted engines after a LoRA swap).
    """

    def __init__(self, folder: Path, manifest: Mapping[str, Any], engines: dict[str, Engine],
                 scheduler: str | None = None, scheduler_config: Mapping[str, Any] | None = None,
                 backend: str = "onnxruntime") -> None:
        self.folder = Path(folder)
        self.manifest = manifest
        self.spec = ModelSpec.from_dict(manifest["model"])
        self.ranges = ShapeRanges.from_dict(manifest["shape_ranges"])
        self.backend = backend
        self.components: dict[str, ComponentFiles] = {
            name: component_files(self.folder, manifest, spec) for name, spec in self.spec.components.items()
        }
        missing = sorted(set(self.components) - set(engines))
        if missing:
            raise ValueError(f"no engine for component(s) {missing} of {self.folder}")
        self.engines = dict(engines)
        self.tokenizers = {name: ClipTokenizer(check_inside(self.folder, name))
                           for name in manifest.get("tokenizers", [])}
        self.conditioner = conditioner_for(self.spec, self.tokenizers)
        self.controls = Controls(manifest, self.spec)
        self.scheduler_base_config = read_scheduler_config(self.folder, manifest)
        self._schedulers: dict[str, Scheduler] = {}
        self._lock = threading.Lock()
        self._swapper: Any = None
        self.engine_options: dict[str, Any] = {}
        self.scheduler = self._scheduler(scheduler, scheduler_config)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], backend: str = "onnxruntime", scheduler: str | None = None,
             scheduler_config: Mapping[str, Any] | None = None, verify: bool = True,
             engine_options: Mapping[str, Any] | None = None) -> Pipeline:
        """Verify the folder's manifest and file hashes, open one engine per component, read tokenizers and scheduler.

        ``backend``: a registered backend (``sdexport.engines.backends()``: "onnxruntime", "tensorrt", ...);
        ``engine_options``: that backend's load options, each declared with its type, default and help in
        ``Backend.load_options`` (onnxruntime: ``threads``, ``providers``; tensorrt: ``device``, ``worker``,
        ``cuda_graphs``, ``device_loop``; see docs/gpu.md). ``scheduler``: a diffusers class name or
        alias (default: the folder's);
        ``scheduler_config``: config keys overriding the folder's ``scheduler_config.json``.
        """
        root = Path(folder)
        t0 = time.perf_counter()
        manifest = verify_folder(root, verify=verify)
        spec = ModelSpec.from_dict(manifest["model"])
        engines = open_engines(root, manifest, spec, backend, dict(engine_options or {}))
        pipe = cls(root, manifest, engines, scheduler, scheduler_config, backend)
        pipe.engine_options = dict(engine_options or {})
        log.info("loaded %s (%s, %s) in %.2f s", root, spec.family, backend, time.perf_counter() - t0)
        return pipe

    @property
    def family(self) -> str:
        """The family name stored in the manifest (``sdexport.specs.families``: "sd", "sd2", "sdxl", ...)."""
        return self.spec.family

    @property
    def unet_channels(self) -> int:
        """The UNet's input channels: the latent channels, or 2 x latent + 1 for an inpainting UNet."""
        return int(self.spec.components["unet"].inputs[0].dims[1])

    def replace_engine(self, name: str, engine: Engine) -> None:
        """Swap one component's engine (same tensor names and dtypes); requests already running keep the old one."""
        if name not in self.components:
            raise ValueError(f"{name!r} is not a component of {self.folder}; it has {sorted(self.components)}")
        spec = self.spec.components[name]
        if [(t.name, t.dtype) for t in engine.inputs] != [(t.name, t.dtype) for t in spec.inputs]:
            raise ValueError(f"the new {name} engine's inputs {[t.name for t in engine.inputs]} differ from the "
                             f"folder's {[t.name for t in spec.inputs]}")
        self.engines = {**self.engines, name: engine}

    def set_loras(self, loras: Sequence[tuple[str | os.PathLike[str], float]]) -> dict[str, Any]:
        """Swap LoRAs without a rebuild: ``[(path, weight), ...]`` fused onto the base weights; ``[]`` restores them.

        Weights are always recomputed from the folder's base weights, so A -> B -> A gives A exactly. ONNX Runtime
        sessions are reopened with the fused weights; TensorRT engines (built ``--refittable``) are refitted,
        including weights only the previous LoRAs touched. Call between requests. Returns what changed and the time.
        """
        from sdexport.engines.lora import LoraSwapper
        from sdexport.engines.lora_checks import lora_pairs

        t0 = time.perf_counter()
        with self._lock:
            if self._swapper is None:
                self._swapper = LoraSwapper(self.folder, self.manifest)
            swapper = self._swapper
            update = swapper.update(lora_pairs(loras))
            for name in update.changed:
                engine = self.engines[name]
                component = getattr(engine, "component", None)
                if component is not None and hasattr(component, "refit"):
                    component.refit(update.refit[name], lambda init, c=name: swapper.current(c, init))
                else:
                    options = {**self.engine_options, "initializer_overrides": update.overrides[name] or None}
                    self.replace_engine(name, open_engine(self.components[name], self.backend, options))
        seconds = time.perf_counter() - t0
        log.info("LoRAs %s applied to %s in %.2f s", [str(p) for p, _ in loras], update.changed, seconds)
        return {"changed": update.changed, "seconds": seconds}

    def get_scheduler(self, name: str | None = None, overrides: Mapping[str, Any] | None = None) -> Scheduler:
        """The scheduler called ``name`` (default: the pipeline's) configured from the folder's config + overrides.

        Schedulers are immutable, so one instance per (name, overrides) serves every request.
        """
        if name is None and not overrides:
            return self.scheduler
        return self._scheduler(name, overrides)

    def _scheduler(self, name: str | None, overrides: Mapping[str, Any] | None) -> Scheduler:
        key = json.dumps([name, dict(overrides or {})], sort_keys=True, default=str)
        with self._lock:
            if key not in self._schedulers:
                self._schedulers[key] = load_scheduler(self.scheduler_base_config, name, dict(overrides or {}))
            return self._schedulers[key]

    @property
    def arrays(self) -> Arrays:
        """Where the denoising loop's arrays live: the UNet engine's device arrays if it has any, else the host."""
        return getattr(self.engines["unet"], "array_device", None) or HOST

    def _release(self, name: str) -> None:
        """Let an engine free the working memory it keeps between runs (those that can: ``release_memory``)."""
        release = getattr(self.engines[name], "release_memory", None)
        if release is not None:
            release()

    def _runner(self, name: str, arrays: Arrays = HOST) -> EngineRunner:
        engine = self.engines[name]
        return EngineRunner(engine, self.components[name].run_batch(engine), arrays)

    def __call__(
        self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
        prompt_2: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        image: Any = None, mask_image: Any = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int = DEFAULTS["num_inference_steps"], guidance_scale: float | None = None,
        guidance_rescale: float = DEFAULTS["guidance_rescale"], strength: float | None = None,
        denoising_start: float | None = None, denoising_end: float | None = None,
        num_images_per_prompt: int = DEFAULTS["num_images_per_prompt"], seed: int | list[int] | None = None,
        latents: np.ndarray | None = None, eta: float = DEFAULTS["eta"], clip_skip: int | None = None,
        output_type: str = DEFAULTS["output_type"],
        scheduler: str | None = None, scheduler_config: Mapping[str, Any] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = DEFAULTS["crops_coords_top_left"],
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = DEFAULTS["aesthetic_score"],
        negative_aesthetic_score: float = DEFAULTS["negative_aesthetic_score"],
        long_prompts: str = DEFAULTS["long_prompts"], rng: str = DEFAULTS["rng"],
        ip_adapter_image: Any = None, ip_adapter_scale: float = DEFAULTS["ip_adapter_scale"],
        controlnet_conditioning_scale: float | list[float] | None = None,
        control_guidance_start: float | list[float] | None = None,
        control_guidance_end: float | list[float] | None = None, guess_mode: bool = DEFAULTS["guess_mode"],
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Generate images; arguments keep diffusers' names and meanings (each is described in ``GenerationArgs``).

        Task: no ``image`` -> text-to-image; ``image`` -> image-to-image (``strength``, or ``denoising_start`` to
        continue a base's latents passed as ``image``); ``image`` + ``mask_image`` -> inpainting (white repaints).
        Defaults follow the matching diffusers pipeline (num_inference_steps 50; guidance_scale 7.5 for SD, 5.0 for
        SDXL; strength 0.8 / 0.3 for img2img, 1.0 / 0.9999 for inpainting). ``seed``: an int gives image i the seed
        ``seed + i`` (a batch equals its images made one by one); a list gives one per image. ``rng="torch"`` draws
        noise like diffusers' CPU ``torch.Generator`` (needs torch), so the same seeds give diffusers' images.
        ``long_prompts="chunk"`` encodes prompts over 75 tokens in chunks (up to the folder's prompt_chunks)
        instead of truncating. ``output_type``: "pil", "np" (uint8 [N, H, W, 3]), "np_float" ([0, 1] float32) or
        "latent". ``ip_adapter_image`` / ``ip_adapter_scale`` (folders built with an IP-Adapter): an image prompt
        and its strength, as diffusers' ``ip_adapter_image`` and ``set_ip_adapter_scale``.
        ``callback(step_index, num_steps, timestep, latents)`` returning False raises GenerationCancelled (its
        ``partial`` result holds the latents so far). Every argument is checked before any engine runs: an invalid
        one raises RequestError naming it and what is allowed.
        """
        return self.generate(GenerationArgs(
            prompt=prompt, negative_prompt=negative_prompt, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            image=image, mask_image=mask_image, height=height, width=width, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, strength=strength,
            denoising_start=denoising_start, denoising_end=denoising_end, num_images_per_prompt=num_images_per_prompt,
            seed=seed, latents=latents, eta=eta, clip_skip=clip_skip, output_type=output_type, scheduler=scheduler,
            scheduler_config=scheduler_config, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            long_prompts=long_prompts, rng=rng, ip_adapter_image=ip_adapter_image,
            ip_adapter_scale=ip_adapter_scale, controlnet_conditioning_scale=controlnet_conditioning_scale,
            control_guidance_start=control_guidance_start, control_guidance_end=control_guidance_end,
            guess_mode=guess_mode, callback=callback,
        ))

    def validate(self, args: GenerationArgs) -> tuple[Request, Scheduler, Plan]:
        """Check every argument against this folder without running an engine; raise RequestError naming it."""
        return self._checked(args)[:3]

    def _checked(self, args: GenerationArgs) -> tuple[Request, Scheduler, Plan, ControlInputs | None,
                                                      ImagePrompt | None]:
        """``validate``, plus the ControlNet inputs of a ControlNet folder (``image`` is the control image there)
        and the IP-Adapter image prompt of an IP-Adapter folder."""
        args, pictures = self.controls.split(args)
        request = build_request(self.spec, self.ranges, args, self.conditioner.chunks_needed)
        prompt_image = image_prompt(self.spec, self.manifest, args)
        control = None if pictures is None else self.controls.inputs(
            args, pictures, request.prompts.count, request.per_prompt, request.height, request.width)
        try:
            sched = self.get_scheduler(args.scheduler, args.scheduler_config)
            plan = sched.plan(request.num_inference_steps, strength=request.strength,
                              denoising_start=request.denoising_start, denoising_end=request.denoising_end,
                              eta=request.eta)
        except SchedulerConfigError as exc:
            raise RequestError(f"scheduler={args.scheduler!r}, scheduler_config={args.scheduler_config!r}: "
                               f"{exc}") from exc
        return request, sched, plan, control, prompt_image

    def generate(self, args: GenerationArgs) -> GenerationResult:
        """Generate from a ``GenerationArgs``: validate everything, then encode, start, denoise and decode."""
        t_start = time.perf_counter()
        request, sched, plan, control, prompt_image = self._checked(args)
        timings = Timings()
        streams = NoiseStreams(request.seeds, request.rng)
        t0 = time.perf_counter()
        runners = {name: self._runner(name) for name in self.conditioner.encoders}
        cond = self.conditioner.conditioning(request.prompts, request.cfg, runners, request.sizes, request.height,
                                             request.width, request.per_prompt)
        if prompt_image is not None:
            encoder = self._runner(IMAGE_ENCODER) if prompt_image.pixels is not None else None
            cond = condition_on_image(cond, prompt_image, self.spec, encoder)
        timings.text_encoder = time.perf_counter() - t0
        t0 = time.perf_counter()
        start = self._start(request, plan, streams)
        timings.vae_encoder = time.perf_counter() - t0 if request.task != "txt2img" else 0.0
        parameters = {**self._parameters(request, sched), **(control.parameters() if control else {})}
        guidance = Guidance(request.guidance_scale, request.guidance_rescale)
        arrays = self.arrays
        with arrays.scope():
            try:
                loop = self._control_loop(control, request.cfg, len(plan), arrays)
                latents = denoise(plan, start, cond, guidance, self._runner("unet", arrays), streams, timings,
                                  args.callback, arrays, loop)
                self._release("unet")
            except Cancelled as stop:
                timings.total = time.perf_counter() - t_start
                partial = GenerationResult(arrays.get(stop.latents), request.seeds, timings, "latent", parameters,
                                           latent_space(self.spec))
                raise GenerationCancelled(stop.step, len(plan), partial) from None
            if request.output_type == "latent":
                images = arrays.get(latents)
            else:
                t0 = time.perf_counter()
                scaled = latents / float(np.float32(self.spec.scaling_factor))
                decoded = arrays.get(self._runner("vae_decoder", arrays)({"latent": scaled})["image"])
                self._release("vae_decoder")
                if not np.isfinite(decoded).all():
                    raise NonFiniteError("vae_decoder")
                images = postprocess(decoded, request.output_type)
                timings.vae_decoder = time.perf_counter() - t0
        timings.total = time.perf_counter() - t_start
        return GenerationResult(images, request.seeds, timings, request.output_type, parameters,
                                latent_space(self.spec))

    def _control_loop(self, control: ControlInputs | None, cfg: bool, steps: int, arrays: Arrays
                      ) -> ControlLoop | None:
        """The ControlNet calls of one request (None on a folder without ControlNets)."""
        if control is None:
            return None
        runners = [self._runner(name, arrays) for name in self.controls.components]
        return ControlLoop(self.spec, control, runners, steps, cfg, arrays)

    def _start(self, request: Request, plan: Plan, streams: NoiseStreams) -> Start:
        source = LatentSource(self.spec, request, streams, self._runner("vae_encoder"))
        if request.task == "txt2img":
            return start_txt2img(source, plan)
        if request.task == "img2img":
            return start_img2img(source, plan)
        return start_inpaint(source, plan)

    def _parameters(self, request: Request, sched: Scheduler) -> dict[str, Any]:
        """The generation parameters, JSON-friendly (stored in PNG metadata by the CLI)."""
        prompts = request.prompts
        out: dict[str, Any] = {
            "model": self.manifest.get("source", {}).get("id"), "family": self.family, "task": request.task,
            "prompt": list(prompts.texts[0]), "negative_prompt": list(prompts.negatives[0]) if prompts.negatives
            else None, "num_inference_steps": request.num_inference_steps, "guidance_scale": request.guidance_scale,
            "guidance_rescale": request.guidance_rescale, "height": request.height, "width": request.width,
            "seeds": request.seeds, "rng": request.rng, "scheduler": sched.class_name,
            "clip_skip": prompts.clip_skip or None, "num_images_per_prompt": request.per_prompt,
        }
        for key in ("strength", "denoising_start", "denoising_end"):
            if getattr(request, key) is not None:
                out[key] = getattr(request, key)
        return out

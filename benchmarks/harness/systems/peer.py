"""A diffusers-style pipeline (diffusers itself, or optimum's subclass) as a benchmarked system."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from harness.cases import Case
from harness.timing import RunTiming, StageClock, TimedProxy

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class PeerRunner:
    """Times a diffusers-style pipeline's stages by standing proxies in for its text encoders, UNet and VAE."""

    def __init__(self, pipe: Any, backend: str, precision: str = "fp32", latent_dtype: Any = None) -> None:
        self.pipe = pipe
        self.latent_dtype = latent_dtype  # a torch dtype the shared float32 latents are cast to (None: as they are)
        self.backend = backend
        self.precision = precision
        self.clock = StageClock()
        # object.__setattr__: DiffusionPipeline.__setattr__ would try to register the proxies in its config.
        for name in TEXT_ENCODERS:
            if getattr(pipe, name, None) is not None:
                object.__setattr__(pipe, name, TimedProxy(getattr(pipe, name), self.clock.text_encoder))
        object.__setattr__(pipe, "unet", TimedProxy(pipe.unet, self.clock.unet))
        object.__setattr__(pipe, "vae", TimedProxy(pipe.vae, self.clock.vae_decoder, method="decode"))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

    def run(self, case: Case, latents: np.ndarray) -> tuple[RunTiming, np.ndarray]:
        """One generation with the shared latents (as a torch tensor); images as float32 NHWC in [0, 1]."""
        import torch

        start = torch.from_numpy(latents.copy())
        start = start if self.latent_dtype is None else start.to(self.latent_dtype)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.pipe(case.prompt, height=case.height, width=case.width, num_inference_steps=case.steps,
                            guidance_scale=case.guidance_scale, num_images_per_prompt=case.batch,
                            latents=start, output_type="np")
            total = time.perf_counter() - t0
        return self.clock.take(total), np.asarray(out.images, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        """Backend, precision and the scheduler class the pipeline runs."""
        return {"backend": self.backend, "precision": self.precision,
                "scheduler": type(self.pipe.scheduler).__name__}

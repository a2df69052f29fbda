"""Our runtime as a benchmarked system: sdexport's Pipeline on a compiled folder (numpy + ONNX Runtime or OpenVINO)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harness.cases import Case
from harness.timing import RunTiming


class OursRunner:
    """``Pipeline.load(folder)`` with default settings; runs report the runtime's own per-stage timings."""

    def __init__(self, folder: str | Path, options: Mapping[str, Any] | None = None,
                 backend: str = "onnxruntime") -> None:
        from sdexport.runtime.pipeline import Pipeline

        self.pipe = Pipeline.load(folder, backend=backend, engine_options=dict(options or {}))

    def run(self, case: Case, latents: np.ndarray) -> tuple[RunTiming, np.ndarray]:
        """One generation with the shared latents; images as float32 NHWC in [0, 1]."""
        t0 = time.perf_counter()
        out = self.pipe(case.prompt, height=case.height, width=case.width, num_inference_steps=case.steps,
                        guidance_scale=case.guidance_scale, num_images_per_prompt=case.batch, latents=latents,
                        output_type="np_float")
        total = time.perf_counter() - t0
        t = out.timings
        return RunTiming(total, t.text_encoder, list(t.unet), t.vae_decoder, list(t.steps)), np.asarray(out.images)

    def info(self) -> dict[str, Any]:
        """Backend, UNet precision and scheduler of the loaded folder."""
        unet = self.pipe.manifest["components"]["unet"]
        precision = getattr(self.pipe.engines["unet"], "precision", None) or unet.get("precision", "fp32")
        return {"backend": self.pipe.backend, "precision": precision,
                "scheduler": self.pipe.scheduler.class_name, "family": self.pipe.family}

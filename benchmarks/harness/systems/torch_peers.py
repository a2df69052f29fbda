"""diffusers in PyTorch on the CPU: eager in fp32 or bf16, or with ``torch.compile`` on the UNet (imports torch when
loaded)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from harness.systems.peer import PeerRunner

log = logging.getLogger(__name__)


def load_diffusers(folder: str | Path, compile_unet: bool = False, bf16: bool = False) -> PeerRunner:
    """``DiffusionPipeline.from_pretrained(folder)`` on the CPU with one torch thread per core, in float32 (or in
    bfloat16 with ``bf16``: every weight and activation, what a torch user picks on a CPU with AMX or avx512_bf16).

    With ``compile_unet`` the UNet is wrapped in ``torch.compile`` (inductor, default mode): compilation happens
    during the first generation of each new shape, so it shows in that case's first-run time, not its median.
    """
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if bf16 else torch.float32
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    pipe.to("cpu")
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    backend = "torch-inductor" if compile_unet else "torch-eager"
    log.info("loaded diffusers %s from %s (%s, %s)", type(pipe).__name__, folder, backend, dtype)
    return PeerRunner(pipe, backend, "bf16" if bf16 else "fp32", latent_dtype=dtype)

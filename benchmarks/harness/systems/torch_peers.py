"""diffusers in PyTorch on the CPU, eager or with ``torch.compile`` on the UNet (imports torch when loaded)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from harness.systems.peer import PeerRunner

log = logging.getLogger(__name__)


def load_diffusers(folder: str | Path, compile_unet: bool = False) -> PeerRunner:
    """``DiffusionPipeline.from_pretrained(folder)`` in float32 on the CPU with one torch thread per core.

    With ``compile_unet`` the UNet is wrapped in ``torch.compile`` (inductor, default mode): compilation happens
    during the first generation of each new shape, so it shows in that case's first-run time, not its median.
    """
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.to("cpu")
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
    backend = "torch-inductor" if compile_unet else "torch-eager"
    log.info("loaded diffusers %s from %s (%s)", type(pipe).__name__, folder, backend)
    return PeerRunner(pipe, backend)

"""optimum-intel's OpenVINO diffusion pipeline as a benchmarked system; runs inside its own virtual environment.

``python -m harness.systems.optimum_intel export DIFFUSERS_FOLDER OUT`` converts a diffusers folder to OpenVINO IR.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from harness.systems.peer import PeerRunner

log = logging.getLogger(__name__)

OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""fp32 like every other system (OpenVINO would pick bf16 by itself on a CPU with avx512_bf16)."""


def load_optimum_intel(folder: str | Path) -> PeerRunner:
    """``OVDiffusionPipeline.from_pretrained(folder, ov_config=f32)`` on the CPU, otherwise optimum-intel's defaults."""
    from optimum.intel import OVDiffusionPipeline

    pipe = OVDiffusionPipeline.from_pretrained(str(folder), ov_config=dict(OV_CONFIG), device="CPU")
    log.info("loaded optimum-intel %s from %s", type(pipe).__name__, folder)
    return PeerRunner(pipe, "openvino (optimum-intel)")


def export(source: str | Path, out: str | Path) -> None:
    """Convert a diffusers folder to optimum-intel's OpenVINO layout with fp32 weights (no 8-bit compression)."""
    from optimum.intel import OVDiffusionPipeline

    pipe = OVDiffusionPipeline.from_pretrained(str(source), export=True, compile=False, load_in_8bit=False)
    pipe.save_pretrained(str(out))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m harness.systems.optimum_intel export DIFFUSERS_FOLDER OUT")
    logging.basicConfig(level=logging.WARNING)
    export(sys.argv[2], sys.argv[3])

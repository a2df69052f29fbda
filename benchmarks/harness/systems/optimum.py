"""optimum's ONNX Runtime diffusion pipeline as a benchmarked system; runs inside its own virtual environment.

``python -m harness.systems.optimum export DIFFUSERS_FOLDER OUT`` exports a diffusers folder with optimum.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from harness.systems.peer import PeerRunner

log = logging.getLogger(__name__)


def load_optimum(folder: str | Path) -> PeerRunner:
    """``ORTDiffusionPipeline.from_pretrained(folder)`` with optimum's defaults (CPU execution provider)."""
    from optimum.onnxruntime import ORTDiffusionPipeline

    pipe = ORTDiffusionPipeline.from_pretrained(str(folder))
    log.info("loaded optimum %s from %s", type(pipe).__name__, folder)
    return PeerRunner(pipe, "onnxruntime (optimum)")


def export(source: str | Path, out: str | Path) -> None:
    """Export a diffusers folder to optimum's ONNX layout, as ``optimum-cli export onnx --task text-to-image``.

    optimum's own validation pass is skipped: the benchmark compares every system's images with diffusers eager.
    """
    from optimum.exporters.onnx import main_export

    main_export(str(source), output=str(out), task="text-to-image", device="cpu", do_validation=False)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m harness.systems.optimum export DIFFUSERS_FOLDER OUT")
    logging.basicConfig(level=logging.WARNING)
    export(sys.argv[2], sys.argv[3])

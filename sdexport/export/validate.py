"""ONNX Runtime vs torch, per output, at the component's tolerance; raises with the max difference."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.ort import OrtEngine
from sdexport.errors import ValidationError
from sdexport.specs import ComponentSpec
from sdexport.specs.model import Tolerance

log = logging.getLogger(__name__)


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    """Max abs difference and the worst ratio to the allowed |diff| <= atol + rtol*|ref| (<= 1 passes)."""
    if got.shape != ref.shape:
        raise ValidationError(f"output {name!r}: ONNX shape {list(got.shape)} != torch shape {list(ref.shape)}")
    if not np.isfinite(got).all():
        raise ValidationError(f"output {name!r}: ONNX Runtime produced NaN or Inf")
    diff = np.abs(got.astype(np.float64) - ref)
    allowed = tol.atol + tol.rtol * np.abs(ref)
    return {"max_abs_diff": float(diff.max()), "worst_ratio": float((diff / allowed).max())}


def validate_graph(
    component: ComponentSpec,
    graph: Path,
    cases: list[tuple[dict[str, int], dict[str, np.ndarray], list[np.ndarray]]],
    precision: str,
) -> dict[str, Any]:
    """Run the graph on every (env, feeds, torch outputs) case; raise ValidationError beyond tolerance."""
    tol = component.tolerance(precision)
    engine = OrtEngine(component.name, graph, component.inputs, component.outputs, fused=False)
    shapes = []
    for env, feeds, refs in cases:
        outs = engine.run(feeds)
        result = {t.name: compare(t.name, outs[t.name], ref, tol) for t, ref in zip(component.outputs, refs,
                                                                                   strict=True)}
        shapes.append({"shape": {k: env[k] for k in component.symbols()}, "outputs": result})
        for out_name, r in result.items():
            if r["worst_ratio"] > 1.0:
                raise ValidationError(
                    f"{component.name} ({precision}) output {out_name!r} at {shapes[-1]['shape']} differs from "
                    f"torch by up to {r['max_abs_diff']:.3g}, beyond atol={tol.atol} rtol={tol.rtol}"
                )
    log.info("%s (%s) validated at %d shapes", component.name, precision, len(shapes))
    return {"passed": True, "precision": precision, "tolerance": {"atol": tol.atol, "rtol": tol.rtol},
            "shapes": shapes}

"""Checks of LoRA arguments shared by the build (``--lora PATH:WEIGHT``) and run-time swaps (``set_loras``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdexport.errors import UsageError


def check_lora_weight(weight: Any, path: str | os.PathLike[str]) -> float:
    """``weight`` as a float; UsageError naming the LoRA unless it is a finite real number."""
    ok = isinstance(weight, int | float) and not isinstance(weight, bool)
    if not ok or not math.isfinite(weight):
        raise UsageError(f"LoRA {str(path)!r}: weight {weight!r} is not allowed; pass a finite number "
                         "(e.g. style.safetensors:0.8, or 1.0 when omitted)")
    return float(weight)


def lora_pairs(loras: Any) -> list[tuple[Path, float]]:
    """``[(path, weight), ...]`` checked: a list of pairs, each weight finite; UsageError naming the entry."""
    if isinstance(loras, str | bytes | os.PathLike) or not isinstance(loras, Sequence):
        raise UsageError(f"loras={loras!r}: pass a list of (path, weight) pairs, or [] for none")
    out = []
    for index, entry in enumerate(loras):
        if not isinstance(entry, Sequence) or isinstance(entry, str | bytes) or len(entry) != 2:
            raise UsageError(f"loras[{index}]={entry!r}: pass a (path, weight) pair")
        path, weight = entry
        if not isinstance(path, str | os.PathLike):
            raise UsageError(f"loras[{index}]: path {path!r} is not a file path")
        out.append((Path(path), check_lora_weight(weight, path)))
    return out

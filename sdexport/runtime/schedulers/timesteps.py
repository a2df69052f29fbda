"""Inference timestep spacings (linspace / leading / trailing) with each diffusers family's arithmetic."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .config import check_choice

SPACINGS = ("linspace", "leading", "trailing")

Kind = Literal["int", "float", "skip_last"]


def spaced_timesteps(
    class_name: str,
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int,
    kind: Kind,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Descending inference timesteps.

    ``kind`` selects the diffusers family: ``"int"`` (DDPM, DDIM, PNDM: int64), ``"float"`` (Euler, Euler
    ancestral, Heun, LMS: float32, linspace not rounded) or ``"skip_last"`` (DPM-Solver, UniPC: N+1 points
    with the last dropped, int64; ``last_timestep`` is DPM-Solver's ``lambda_min_clipped`` cut, default the
    full range).
    """
    check_choice(class_name, "timestep_spacing", spacing, SPACINGS)
    t_max, n = num_train_timesteps, num_inference_steps
    if kind == "float":
        if spacing == "linspace":
            return np.linspace(0, t_max - 1, n, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ts = (np.arange(0, n) * (t_max // n)).round()[::-1].copy().astype(np.float32)
            return ts + np.float32(steps_offset)
        return np.arange(t_max, 0, -t_max / n).round().astype(np.float32) - np.float32(1)
    if kind == "int":
        if spacing == "linspace":
            return np.linspace(0, t_max - 1, n).round()[::-1].copy().astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (t_max // n)).round()[::-1].copy().astype(np.int64) + steps_offset
        return np.round(np.arange(t_max, 0, -t_max / n)).astype(np.int64) - 1
    last = t_max if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    return np.arange(last, 0, -t_max / n).round().copy().astype(np.int64) - 1

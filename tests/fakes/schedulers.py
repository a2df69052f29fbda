"""Shared data of the scheduler tests: one short name per algorithm, the shipped configs, the latent shape."""

from __future__ import annotations

from sdexport.specs import PRESETS

ALIASES = [
    "ddpm",
    "ddim",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "unipc",
    "lms",
    "lcm",
]
"""One registry name per scheduler algorithm (variants such as ``_karras`` are tested where they matter)."""

SD15 = dict(PRESETS["sd15"].configs()["scheduler"])
"""The scheduler_config.json shipped with the SD 1.5 preset."""
SDXL = dict(PRESETS["sdxl"].configs()["scheduler"])
"""The scheduler_config.json shipped with the SDXL preset."""

SHAPE = (1, 4, 8, 8)
"""The latent shape every scheduler test steps."""

"""Tolerances of the end-to-end parity tests (runtime vs diffusers, same weights and noise)."""

from __future__ import annotations

LATENT_ATOL = 1e-4  # issue 4: final latents within 1e-4 absolute
IMAGE_ATOL = 1 / 255  # issue 4: decoded images (floats in [0, 1]) within one 8-bit level

"""Tolerances of the end-to-end parity tests (runtime vs diffusers, same weights and noise)."""

from __future__ import annotations

from sdexport.specs import ShapeRanges

LATENT_ATOL = 1e-4  # issue 4: final latents within 1e-4 absolute
IMAGE_ATOL = 1 / 255  # issue 4: decoded images (floats in [0, 1]) within one 8-bit level
SMALL_RANGES = ShapeRanges(batch=(1, 1, 2), height=(32, 64, 96), width=(32, 64, 96))
"""Shape ranges of the adapter / in-memory test folders: every test size fits, tracing and validation stay cheap."""

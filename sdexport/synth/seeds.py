"""Per-image seeds: derived from (run seed, row id, image index), so a re-run or a resumed run draws the same noise."""

from __future__ import annotations

import hashlib

from sdexport.runtime.noise import MAX_SEED


def derive_seed(run_seed: int, row_id: str, index: int) -> int:
    """A seed in 0..2**63-1 from sha256 of the run seed, the row id and the image index (stable across machines)."""
    digest = hashlib.sha256(f"sdexport-synth/{int(run_seed)}/{row_id}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def image_seed(run_seed: int, row_id: str, row_seed: int | None, index: int) -> int:
    """The seed of image ``index`` of a row: the row's own ``seed`` + index when it has one, else derived."""
    return row_seed + index if row_seed is not None else derive_seed(run_seed, row_id, index)

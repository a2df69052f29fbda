"""Latents saved to .npy with a sidecar naming their latent space, so another folder can refuse them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.artifacts import atomic_write_bytes, atomic_write_json

SIDECAR_SUFFIX = ".json"
"""``latents.npy`` is described by ``latents.npy.json``: family, channels, scaling factor, VAE scale factor."""
FORMAT = "sdexport-latents"


class TaggedLatents(np.ndarray):
    """Latents read from a .npy file with a sidecar: a float array that remembers its latent space and family."""

    latent_space: tuple[float, int, int] | None
    family: str | None
    source: str

    def __array_finalize__(self, obj: Any) -> None:
        self.latent_space = getattr(obj, "latent_space", None)
        self.family = getattr(obj, "family", None)
        self.source = getattr(obj, "source", "")


def sidecar(path: Path) -> Path:
    """The sidecar file of a saved latents file."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_latents(path: Path, latents: np.ndarray, latent_space: tuple[float, int, int], family: str) -> None:
    """Write ``latents`` to ``path`` (.npy) and their latent space to the sidecar next to it."""
    scaling, factor, channels = latent_space
    atomic_write_json(sidecar(path), {"format": FORMAT, "family": family, "scaling_factor": scaling,
                                      "vae_scale_factor": factor, "latent_channels": channels,
                                      "shape": list(latents.shape)})
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(latents))
    atomic_write_bytes(path, buffer.getvalue())


def _read_tag(path: Path) -> tuple[tuple[float, int, int], str] | None:
    """(latent space, family) from the sidecar of ``path``, None when there is none."""
    side = sidecar(path)
    if not side.is_file():
        return None
    try:
        tag = json.loads(side.read_text())
        if tag.get("format") != FORMAT:
            raise ValueError(f"its format is {tag.get('format')!r}, not {FORMAT!r}")
        space = (float(tag["scaling_factor"]), int(tag["vae_scale_factor"]), int(tag["latent_channels"]))
        return space, str(tag["family"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"cannot read the latent-space sidecar {str(side)!r}: {exc}") from exc


def read_latents(path: Path) -> np.ndarray:
    """A .npy array; latents saved by ``save_latents`` come back as TaggedLatents carrying their latent space."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"cannot read {str(path)!r} as a .npy array: {exc}") from exc
    tag = _read_tag(path)
    if tag is None:
        return array
    tagged = array.view(TaggedLatents)
    tagged.latent_space, tagged.family, tagged.source = tag[0], tag[1], str(path)
    return tagged

"""Tiny ControlNets for the tests (random residual convs, so the control image matters) and a parity runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def make_controlnet(unet: Any, folder: Path, seed: int) -> Path:
    """``ControlNetModel.from_unet`` with its zero-initialised convs randomised, saved as a diffusers folder."""
    import diffusers

    net = diffusers.ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    embedding = net.controlnet_cond_embedding
    with torch.no_grad():
        for conv in (embedding.conv_in, *embedding.blocks):  # He-initialised: the image survives to conv_out
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
        for module in (net.controlnet_down_blocks, net.controlnet_mid_block, embedding.conv_out):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    net.save_pretrained(folder)
    return folder


def control_picture(seed: int, height: int = 64, width: int = 64) -> Image.Image:
    """A seeded RGB control picture: random colours in 8x8 cells (what a ControlNet sees after downsampling)."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, ((height + 7) // 8, (width + 7) // 8, 3))
    picture = np.repeat(np.repeat(cells, 8, axis=0), 8, axis=1)[:height, :width]
    return Image.fromarray(picture.astype(np.uint8))


def parity(pipe: Any, oracle: Any, seeds: list[int], ours: dict[str, Any], theirs: dict[str, Any]
           ) -> tuple[float, float]:
    """(max |latent diff|, max |image diff| in [0, 1]) of one generation by the runtime (``ours`` arguments) and by
    diffusers (``theirs``), with the same seeds."""
    from sdexport.export.parity import torch_generators

    captured: list[np.ndarray] = []

    def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        captured.append(tensors["latents"].numpy().copy())
        return tensors

    ref = oracle(**theirs, generator=torch_generators(seeds), output_type="np", callback_on_step_end=keep)
    ours_latents: list[np.ndarray] = []
    result = pipe(**ours, seed=seeds, rng="torch", output_type="np_float",
                callback=lambda i, n, t, lat: ours_latents.append(lat.copy()))
    assert ours_latents[-1].shape == captured[-1].shape
    return float(np.abs(ours_latents[-1] - captured[-1]).max()), float(np.abs(result.images - ref.images).max())

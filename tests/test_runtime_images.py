"""Image / mask pre- and post-processing equals diffusers' VaeImageProcessor; PNG metadata round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from sdexport.runtime.images import (
    as_latents,
    default_size,
    latent_mask,
    postprocess,
    preprocess_image,
    preprocess_mask,
    save_png,
)


@pytest.mark.parametrize("size", [(72, 56), (80, 64)])
def test_image_preprocessing_equals_diffusers(picture: Image.Image, size: tuple[int, int]) -> None:
    ref = VaeImageProcessor(vae_scale_factor=8).preprocess(picture, height=size[0], width=size[1]).numpy()
    ours = preprocess_image(picture, *size)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, *size)
    np.testing.assert_array_equal(ours, ref)  # exact: same Lanczos resize, same arithmetic


def test_uint8_array_input_equals_pil(picture: Image.Image) -> None:
    np.testing.assert_array_equal(preprocess_image(np.asarray(picture), 72, 56), preprocess_image(picture, 72, 56))


def test_float_array_of_another_size_is_refused(picture: Image.Image) -> None:
    array = np.asarray(picture).astype(np.float32) / 255
    with pytest.raises(ValueError, match="resize it"):
        preprocess_image(array, 72, 56)
    np.testing.assert_allclose(preprocess_image(array, 80, 64), preprocess_image(picture, 80, 64), atol=1e-6)


def test_mask_preprocessing_equals_diffusers(mask: Image.Image) -> None:
    processor = VaeImageProcessor(vae_scale_factor=8, do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    rgb_mask = mask.convert("RGB").resize((61, 77))  # another size and mode: resized first, then grayscale
    for source in (mask, rgb_mask):
        ref = processor.preprocess(source, height=72, width=56).numpy()
        np.testing.assert_array_equal(preprocess_mask(source, 72, 56), ref)


def test_latent_mask_is_torch_nearest_interpolation(mask: Image.Image) -> None:
    pixels = preprocess_mask(mask, 72, 56)
    ref = torch.nn.functional.interpolate(torch.from_numpy(pixels), size=(9, 7)).numpy()
    np.testing.assert_array_equal(latent_mask(pixels, 8), ref)


def test_postprocessing_equals_diffusers() -> None:
    decoded = np.random.default_rng(0).normal(0, 0.8, (2, 3, 16, 24)).astype(np.float32)
    processor = VaeImageProcessor(vae_scale_factor=8)
    ref_float = processor.postprocess(torch.from_numpy(decoded), output_type="np")
    np.testing.assert_array_equal(postprocess(decoded, "np_float"), ref_float)
    ref_pil = processor.postprocess(torch.from_numpy(decoded), output_type="pil")
    ours_pil = postprocess(decoded, "pil")
    uint8 = postprocess(decoded, "np")
    assert uint8.dtype == np.uint8 and uint8.shape == (2, 16, 24, 3)
    for ours, ref, array in zip(ours_pil, ref_pil, uint8, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
        np.testing.assert_array_equal(array, np.asarray(ref))


def test_default_size_rounds_down_like_diffusers(picture: Image.Image) -> None:
    assert default_size(picture.resize((61, 77)), 8) == VaeImageProcessor(vae_scale_factor=8).get_default_height_width(
        picture.resize((61, 77)))


def test_latents_are_told_apart_from_pictures(picture: Image.Image) -> None:
    assert as_latents(picture, 4) is None
    assert as_latents(np.asarray(picture), 4) is None
    assert as_latents(np.zeros((4, 9, 7), np.float32), 4).shape == (1, 4, 9, 7)
    with pytest.raises(ValueError, match="4 channels"):
        as_latents(np.zeros((1, 3, 9, 7), np.float32), 4)


def test_png_stores_generation_parameters(tmp_path: Path, picture: Image.Image) -> None:
    params = {"prompt": ["a cat"], "seed": 7, "guidance_scale": 5.0}
    path = save_png(picture, tmp_path / "sub" / "out.png", params)
    with Image.open(path) as saved:
        assert json.loads(saved.text["parameters"]) == params
        np.testing.assert_array_equal(np.asarray(saved), np.asarray(picture))

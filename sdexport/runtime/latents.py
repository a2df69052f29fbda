"""The starting latents of each task (txt2img, img2img, inpainting), drawing noise in diffusers' order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdexport.runtime.backends import Runner
from sdexport.runtime.images import latent_mask
from sdexport.runtime.noise import NoiseStreams
from sdexport.runtime.request import Request
from sdexport.runtime.result import NonFiniteError
from sdexport.runtime.schedulers import Plan
from sdexport.specs import ModelSpec


@dataclass(frozen=True)
class Start:
    """Where denoising starts: initial latents, plus what inpainting needs on every step."""

    latents: np.ndarray
    noise: np.ndarray | None = None
    """The initial noise (4-channel inpainting re-noises the original with it after every step)."""
    image_latents: np.ndarray | None = None
    mask: np.ndarray | None = None
    """Latent-resolution mask [N, 1, h, w], 1 where the image is repainted."""
    masked_latents: np.ndarray | None = None
    """Latents of the masked picture [N, latent channels, h, w] (the inpainting UNet's extra input)."""


class LatentSource:
    """Encodes pictures with the VAE encoder and samples latents from the moments, per image stream."""

    def __init__(self, spec: ModelSpec, request: Request, streams: NoiseStreams, vae_encoder: Runner) -> None:
        self.spec = spec
        self.request = request
        self.streams = streams
        self.vae_encoder = vae_encoder
        self.shape = request.latent_shape(spec.latent_channels, spec.vae_scale_factor)

    def per_image(self, per_prompt_rows: np.ndarray) -> np.ndarray:
        """Rows given once or once per prompt -> one row per image (p0, p0, p1, p1)."""
        count, n = self.request.prompts.count, self.request.num_images
        if per_prompt_rows.shape[0] == n:
            return per_prompt_rows
        if per_prompt_rows.shape[0] == 1:
            return np.repeat(per_prompt_rows, n, axis=0)
        return np.repeat(per_prompt_rows, n // count, axis=0)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """VAE-encode distinct rows once, sample one latent per image from its own stream, times scaling_factor."""
        unique, inverse = np.unique(pixels.reshape(pixels.shape[0], -1), axis=0, return_inverse=True)
        moments = self.vae_encoder({"image": np.ascontiguousarray(unique.reshape(-1, *pixels.shape[1:]))})["moments"]
        if not np.isfinite(moments).all():
            raise NonFiniteError("vae_encoder")
        moments = self.per_image(moments[inverse.reshape(-1)])
        mean, logvar = np.split(moments, 2, axis=1)
        std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
        return (mean + std * self.streams.draw(self.shape)) * np.float32(self.spec.scaling_factor)

    def skip_encode(self) -> None:
        """Consume the draws of a VAE sampling whose result diffusers computes but does not use."""
        self.streams.draw(self.shape)


def start_txt2img(source: LatentSource, plan: Plan) -> Start:
    """Pure noise (or the given latents) times the scheduler's initial sigma."""
    noise = source.request.latents if source.request.latents is not None else source.streams.draw(source.shape)
    return Start(noise * np.float32(plan.init_noise_sigma))


def _base_latents(source: LatentSource) -> np.ndarray:
    req = source.request
    if req.image_latents is not None:
        return source.per_image(req.image_latents)
    return source.encode(req.images)


def start_img2img(source: LatentSource, plan: Plan) -> Start:
    """Image latents noised to the first kept step; after ``denoising_start`` (a refiner) they are used as they are."""
    base = _base_latents(source)
    if source.request.denoising_start is not None:
        return Start(base)
    return Start(plan.add_noise(base, source.streams.draw(source.shape), 0))


def start_inpaint(source: LatentSource, plan: Plan) -> Start:
    """Inpainting as StableDiffusion[XL]InpaintPipeline: image latents, noise, mask and masked-image latents."""
    req = source.request
    strength_max = req.strength == 1.0
    blend = not source.spec.inpaint  # a text-to-image UNet blends; an inpainting UNet takes mask + masked latents
    pixels = req.images
    base = None
    if req.image_latents is not None or blend or (req.latents is None and not strength_max):
        base = _base_latents(source)
    if req.denoising_start is not None:
        noise, latents = source.streams.draw(source.shape), base
    elif req.latents is not None:
        noise = req.latents
        latents = noise * np.float32(plan.init_noise_sigma)
    else:
        noise = source.streams.draw(source.shape)
        latents = noise * np.float32(plan.init_noise_sigma) if strength_max else plan.add_noise(base, noise, 0)
    masks = req.masks
    mask = source.per_image(latent_mask(masks, source.spec.vae_scale_factor))
    masked = None
    if pixels is not None:
        # diffusers encodes the masked picture (drawing VAE noise) for every UNet; only the 9-channel one uses it.
        if blend:
            source.skip_encode()
        else:
            masked = source.encode(pixels * (masks < 0.5))
    return Start(latents, noise, base if blend else None, mask, masked)

"""Dynamic batching as data: which requests can share an engine batch, one merged call, and each one's share."""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sdexport.runtime.args import GenerationArgs
from sdexport.runtime.request import Request
from sdexport.runtime.result import GenerationResult, StepCallback


def batch_key(args: GenerationArgs, request: Request) -> Hashable | None:
    """What must be equal for two requests to run as one batch; None: this request always runs alone.

    Text-to-image requests with the same size, steps, schedule, guidance and noise settings share a batch: each
    image keeps its own seed and prompt, so it gets the pixels it would get alone. Requests with pictures or
    initial latents run alone (their inputs are per request).
    """
    if request.task != "txt2img" or request.latents is not None:
        return None
    prompts = request.prompts
    return (request.height, request.width, request.num_inference_steps, request.guidance_scale,
            request.guidance_rescale, request.denoising_end, request.eta, request.rng, request.output_type,
            request.sizes, prompts.clip_skip, prompts.chunks, prompts.negatives is None, args.scheduler,
            json.dumps(dict(args.scheduler_config or {}), sort_keys=True, default=str))


@dataclass(frozen=True)
class Share:
    """One request's part of a batch: its validated request and where its images sit in the merged output."""

    args: GenerationArgs
    request: Request

    @property
    def images(self) -> int:
        """Images this request makes."""
        return self.request.num_images


def _per_image(texts: tuple[str, ...], per_prompt: int) -> list[str]:
    return [text for text in texts for _ in range(per_prompt)]


def _column(shares: Sequence[Share], pick: Any) -> list[str] | None:
    """Every share's texts from ``pick(prompts)`` (a tuple per prompt, or None), one per image, concatenated."""
    columns = [pick(s.request.prompts) for s in shares]
    if any(c is None for c in columns):
        return None
    return [text for share, texts in zip(shares, columns, strict=True)
            for text in _per_image(texts, share.request.per_prompt)]


def merged_args(shares: Sequence[Share], callback: StepCallback | None) -> GenerationArgs:
    """One Pipeline call for every share: prompts, negatives and seeds one per image, the rest from the first."""
    if len(shares) == 1:
        return replace(shares[0].args, callback=callback)
    encoders = len(shares[0].request.prompts.texts)
    second = encoders > 1
    return replace(
        shares[0].args, callback=callback, num_images_per_prompt=1,
        prompt=_column(shares, lambda p: p.texts[0]),
        prompt_2=_column(shares, lambda p: p.texts[1]) if second else None,
        negative_prompt=_column(shares, lambda p: p.negatives[0] if p.negatives else None),
        negative_prompt_2=_column(shares, lambda p: p.negatives[1] if p.negatives else None) if second else None,
        seed=[seed for s in shares for seed in s.request.seeds],
    )


def split_result(result: GenerationResult, shares: Sequence[Share]) -> list[GenerationResult]:
    """Each share's images, seeds and parameters (as its own call would report them) from the merged result."""
    if len(shares) == 1:
        return [result]
    out, start = [], 0
    for share in shares:
        stop = start + share.images
        prompts = share.request.prompts
        parameters = {**result.parameters, "prompt": list(prompts.texts[0]), "seeds": list(share.request.seeds),
                      "negative_prompt": list(prompts.negatives[0]) if prompts.negatives else None,
                      "num_images_per_prompt": share.request.per_prompt}
        out.append(replace(result, images=result.images[start:stop], seeds=result.seeds[start:stop],
                           parameters=parameters))
        start = stop
    return out

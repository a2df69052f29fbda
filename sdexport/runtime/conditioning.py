"""Per-family prompt -> UNet conditioning: SD (one CLIP), SDXL (two CLIPs, pooled embeds, time ids), refiner."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from sdexport.runtime.backends import Runner
from sdexport.runtime.tokenizer import ClipTokenizer
from sdexport.specs import ModelSpec

log = logging.getLogger(__name__)

Size = tuple[int, int]


@dataclass(frozen=True)
class Prompts:
    """Prompt texts per text encoder of the family (``texts[e][p]``), negatives likewise or None when not given."""

    texts: tuple[tuple[str, ...], ...]
    negatives: tuple[tuple[str, ...], ...] | None
    clip_skip: int = 0
    chunks: int | None = None
    """None: truncate to 77 tokens (diffusers); an int: chunked mode, every prompt encoded in this many chunks (what
    the longest needs, checked against the folder's prompt_chunks when the request is validated)."""

    @property
    def count(self) -> int:
        """Number of prompts."""
        return len(self.texts[0])


@dataclass(frozen=True)
class SizeConditions:
    """SDXL micro-conditioning (diffusers' argument names); None means "the generated size" / "same as positive"."""

    original_size: Size | None = None
    crops_coords_top_left: Size = (0, 0)
    target_size: Size | None = None
    negative_original_size: Size | None = None
    negative_crops_coords_top_left: Size | None = None
    negative_target_size: Size | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


@dataclass(frozen=True)
class Parts:
    """One side of the conditioning: hidden states [rows, 77 * chunks, D], pooled embeds and time ids per row."""

    hidden: np.ndarray
    pooled: np.ndarray | None = None
    time_ids: np.ndarray | None = None

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Parts:
        """Apply ``fn`` to every present array."""
        return Parts(fn(self.hidden), *(None if x is None else fn(x) for x in (self.pooled, self.time_ids)))


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning: positive rows, and negative rows when classifier-free guidance is on."""

    positive: Parts
    negative: Parts | None

    @property
    def cfg(self) -> bool:
        """Whether guidance runs (negative rows exist)."""
        return self.negative is not None

    def repeat(self, per_prompt: int) -> Conditioning:
        """Each prompt's rows repeated ``per_prompt`` times in place (p0, p0, p1, p1), as diffusers orders them."""
        def rep(x: np.ndarray) -> np.ndarray:
            return np.repeat(x, per_prompt, axis=0)
        return Conditioning(self.positive.map(rep), None if self.negative is None else self.negative.map(rep))

    def feeds(self) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs by name: negatives then positives under guidance."""
        sides = [self.negative, self.positive] if self.negative is not None else [self.positive]
        out = {"encoder_hidden_states": np.concatenate([s.hidden for s in sides])}
        if self.positive.pooled is not None:
            out["text_embeds"] = np.concatenate([s.pooled for s in sides])
        if self.positive.time_ids is not None:
            out["time_ids"] = np.concatenate([s.time_ids for s in sides])
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


class SdConditioner:
    """CLIP encoders concatenated on features; SD 1.x: one encoder with the final layer norm, no added conditions.

    Quirks kept from diffusers: the negative prompt is encoded without ``clip_skip``; with guidance,
    ``force_zeros_for_empty_prompt`` in the model config and no negative prompt, the negative embeddings are zeros.
    """

    def __init__(self, spec: ModelSpec, tokenizers: Mapping[str, ClipTokenizer]) -> None:
        self.spec = spec
        self.family = spec.family_record
        self.encoders: tuple[str, ...] = self.family.encoder_names
        self.tokenizers = {e.name: tokenizers[e.tokenizer] for e in self.family.text_encoders}
        self.force_zeros = bool(spec.pipeline_config.get("force_zeros_for_empty_prompt", False))

    def chunks_needed(self, prompts: Prompts) -> int:
        """Chunks of 75 tokens the longest prompt (any encoder, negatives included) needs."""
        texts = [t for group in (prompts.texts + (prompts.negatives or ())) for t in group]
        return max((self.tokenizers[e].chunks_needed(t) for e in self.encoders for t in texts), default=1)

    def encode(self, prompts: Prompts, cfg: bool, runners: Mapping[str, Runner]) -> Conditioning:
        """Text conditioning per prompt (not yet repeated per image); one call per text encoder."""
        zeros = cfg and prompts.negatives is None and self.force_zeros
        with_negatives = cfg and not zeros
        chunks = prompts.chunks
        hidden_parts, pooled = [], None
        dropped: list[str] = []
        for index, encoder in enumerate(self.encoders):
            texts = list(prompts.texts[index])
            if with_negatives:
                texts = list(prompts.negatives[index] if prompts.negatives else ("",) * prompts.count) + texts
            tokens = self.tokenizers[encoder](texts, chunks)
            dropped += tokens.dropped
            out = runners[encoder]({"input_ids": tokens.ids})
            hidden_parts.append(self._select(out["hidden_states"], prompts.clip_skip, with_negatives, tokens.chunks))
            if encoder == self.family.pooled_from:
                pooled = out["text_embeds"][:: tokens.chunks]
        if dropped:
            log.warning("The following part of your input was truncated because CLIP can only handle sequences up "
                        "to 77 tokens: %s", list(dict.fromkeys(dropped)))
        hidden = np.concatenate(hidden_parts, axis=-1)
        count = prompts.count
        positive = Parts(hidden[-count:], None if pooled is None else pooled[-count:])
        if not cfg:
            return Conditioning(positive, None)
        if zeros:
            return Conditioning(positive, positive.map(np.zeros_like))
        return Conditioning(positive, Parts(hidden[:count], None if pooled is None else pooled[:count]))

    @staticmethod
    def _select(states: np.ndarray, clip_skip: int, has_negatives: bool, chunks: int) -> np.ndarray:
        """[rows * chunks, skips, 77, D] -> [rows, chunks * 77, D]; negatives take entry 0, positives ``clip_skip``."""
        rows = states.shape[0] // chunks
        picks = np.full(rows, clip_skip)
        if has_negatives:
            picks[: rows // 2] = 0
        picked = states[np.arange(states.shape[0]), np.repeat(picks, chunks)]
        return picked.reshape(rows, chunks * states.shape[2], states.shape[3])

    def time_ids(self, sizes: SizeConditions, height: int, width: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(positive, negative) added time ids, or None for a family without them."""
        return None

    def conditioning(self, prompts: Prompts, cfg: bool, runners: Mapping[str, Runner], sizes: SizeConditions,
                     height: int, width: int, per_prompt: int) -> Conditioning:
        """Encode, add time ids and repeat per image: the UNet's conditioning for the whole request."""
        cond = self.encode(prompts, cfg, runners)
        ids = self.time_ids(sizes, height, width)
        if ids is not None:
            pos, neg = (np.tile(v[None], (prompts.count, 1)) for v in ids)
            cond = Conditioning(replace(cond.positive, time_ids=pos),
                                None if cond.negative is None else replace(cond.negative, time_ids=neg))
        return cond.repeat(per_prompt)


class SdxlConditioner(SdConditioner):
    """SDXL base / inpaint (two encoders) and refiner (text_encoder_2 only): pooled text_embeds and time ids.

    Time ids are original_size + crops_coords_top_left + target_size, or original_size + crops_coords_top_left +
    aesthetic_score when the model requires aesthetic scores (the refiner). Negative values default to the positive
    ones (so the negative crops default to ``crops_coords_top_left``).
    """

    def __init__(self, spec: ModelSpec, tokenizers: Mapping[str, ClipTokenizer]) -> None:
        super().__init__(spec, tokenizers)
        default = self.family.time_ids == "aesthetic"
        self.aesthetic = bool(spec.pipeline_config.get("requires_aesthetics_score", default))
        expected = 5 if self.aesthetic else 6
        if spec.time_ids_dim != expected:
            raise ValueError(
                f"the UNet takes {spec.time_ids_dim} time ids but requires_aesthetics_score={self.aesthetic} makes "
                f"{expected}; the folder's model config is inconsistent: rebuild it from a matching model_index.json"
            )

    def time_ids(self, sizes: SizeConditions, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        original = sizes.original_size or (height, width)
        target = sizes.target_size or (height, width)
        neg_original = sizes.negative_original_size or original
        neg_target = sizes.negative_target_size or target
        crops = sizes.crops_coords_top_left
        neg_crops = sizes.negative_crops_coords_top_left or crops
        if self.aesthetic:
            pos: Sequence[float] = (*original, *crops, sizes.aesthetic_score)
            neg: Sequence[float] = (*neg_original, *neg_crops, sizes.negative_aesthetic_score)
        else:
            pos, neg = (*original, *crops, *target), (*neg_original, *neg_crops, *neg_target)
        return np.asarray(pos, dtype=np.float32), np.asarray(neg, dtype=np.float32)


CONDITIONERS: dict[str, type[SdConditioner]] = {
    "clip": SdConditioner,
    "clip_time_ids": SdxlConditioner,
}
"""Conditioner kind (``Family.conditioner``) -> class."""


def conditioner_for(spec: ModelSpec, tokenizers: Mapping[str, ClipTokenizer]) -> SdConditioner:
    """The conditioner of the folder's family."""
    kind = spec.family_record.conditioner
    if kind not in CONDITIONERS:
        raise ValueError(f"family {spec.family!r} names conditioner {kind!r}; known kinds: {', '.join(CONDITIONERS)}")
    return CONDITIONERS[kind](spec, tokenizers)

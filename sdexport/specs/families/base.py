"""The family record: everything that differs between model families, as one frozen dataclass per family."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sdexport.specs.ranges import ShapeRanges

TASKS = ("txt2img", "img2img", "inpaint")
TIME_IDS = ("none", "size", "aesthetic")
VAE_COMPONENTS = ("vae_encoder", "vae_decoder")
"""The VAE's components: image -> latent moments, latent -> image."""
"""UNet added time ids: none (SD), original + crop + target size (SDXL), original + crop + aesthetic (refiner)."""
CLIP_PAD = "<|endoftext|>"
"""The pad token of OpenAI CLIP tokenizers (SD 1.x, SDXL's first encoder); OpenCLIP ones pad with "!"."""
_CLIP_DEFAULT_ACT = "quick_gelu"  # transformers' CLIPTextConfig default hidden_act (OpenAI CLIP)


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and how it is read.

    ``clip_layer_offset``: the hidden state fed to the UNet with no clip_skip is ``hidden_states[-offset]``
    (clip_skip k reads ``-(offset + k)``); ``final_norm``: whether it goes through the final layer norm;
    ``pooled``: whether its projected pooled output becomes the UNet's ``text_embeds``; ``pad_token``: what its
    tokenizer pads with.
    """

    name: str
    clip_layer_offset: int
    final_norm: bool
    pooled: bool = False
    pad_token: str = CLIP_PAD

    @property
    def tokenizer(self) -> str:
        """The tokenizer folder of this encoder (text_encoder_2 -> tokenizer_2)."""
        return self.name.replace("text_encoder", "tokenizer")


@dataclass(frozen=True)
class Detection:
    """How a family is recognised from a pipeline's own configs (never from its name).

    ``addition_embed_type``: the UNet config's value; ``has_text_encoder``: whether ``text_encoder`` must be present
    (True), absent (False) or either (None); ``text_encoder_act``: the ``hidden_act`` ``text_encoder`` must have
    ("gelu" for OpenCLIP, "quick_gelu" for OpenAI CLIP), or None for any.
    """

    addition_embed_type: str | None
    has_text_encoder: bool | None = None
    text_encoder_act: str | None = None

    def matches(self, unet_config: Mapping[str, Any], text_configs: Mapping[str, Mapping[str, Any]]) -> bool:
        """Whether the configs are of this family."""
        if unet_config.get("addition_embed_type") != self.addition_embed_type:
            return False
        if self.has_text_encoder is not None and ("text_encoder" in text_configs) != self.has_text_encoder:
            return False
        act = text_configs.get("text_encoder", {}).get("hidden_act", _CLIP_DEFAULT_ACT)
        return self.text_encoder_act is None or act == self.text_encoder_act


@dataclass(frozen=True)
class CallDefaults:
    """diffusers' defaults of one pipeline call: guidance_scale and (for the image tasks) strength."""

    guidance_scale: float
    strength: float | None = None


@dataclass(frozen=True)
class Family:
    """One model family as data; ``name`` is the string stored in manifests.

    ``pipelines`` maps each supported task to the diffusers pipeline class that defines it (the parity oracle); the
    first entry is the class the source model is assembled in (LoRA loading). ``fp32_components``: components kept
    in fp32 when a build asks for reduced precision. ``latent_channels`` / ``scaling_factor``: used when the VAE
    config does not say; the VAE scale factor is always 2 ** (VAE blocks - 1). ``conditioner``: the runtime
    conditioner kind (``sdexport.runtime.conditioning.CONDITIONERS``).
    """

    name: str
    description: str
    text_encoders: tuple[TextEncoder, ...]
    detection: Detection
    pipelines: Mapping[str, str]
    call_defaults: Mapping[str, CallDefaults]
    default_ranges: ShapeRanges
    conditioner: str = "clip"
    time_ids: str = "none"
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    fp32_components: frozenset[str] = field(default_factory=frozenset)
    task_hint: str = ""
    """Said when a request asks for a task the family does not run."""

    def __post_init__(self) -> None:
        bad = [t for t in (*self.pipelines, *self.call_defaults) if t not in TASKS]
        if bad or not self.pipelines or set(self.pipelines) != set(self.call_defaults):
            raise ValueError(f"family {self.name!r}: pipelines {list(self.pipelines)} and call_defaults "
                             f"{list(self.call_defaults)} must name the same tasks among {TASKS}")
        if self.time_ids not in TIME_IDS:
            raise ValueError(f"family {self.name!r}: time_ids={self.time_ids!r} is not one of {TIME_IDS}")
        pooled = [e.name for e in self.text_encoders if e.pooled]
        if len(pooled) > 1 or (self.time_ids != "none") != bool(pooled):
            raise ValueError(f"family {self.name!r}: time ids need exactly one pooled text encoder, none without "
                             f"them; pooled: {pooled}, time_ids={self.time_ids!r}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """The tasks this family runs, in TASKS order."""
        return tuple(t for t in TASKS if t in self.pipelines)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """Text encoder component names in the order their hidden states are concatenated."""
        return tuple(e.name for e in self.text_encoders)

    @property
    def pooled_from(self) -> str | None:
        """The encoder whose projected pooled output becomes ``text_embeds``, or None."""
        return next((e.name for e in self.text_encoders if e.pooled), None)

    @property
    def added_conditions(self) -> bool:
        """Whether the UNet takes ``text_embeds`` and ``time_ids`` besides the text hidden states."""
        return self.time_ids != "none"

    @property
    def source_pipeline(self) -> str:
        """The diffusers pipeline class the source model is assembled in (LoRA loading)."""
        return next(iter(self.pipelines.values()))

    def encoder(self, name: str) -> TextEncoder:
        """The text encoder record called ``name``."""
        for enc in self.text_encoders:
            if enc.name == name:
                return enc
        raise ValueError(f"family {self.name!r} has no text encoder {name!r}; it has {list(self.encoder_names)}")

    def task_error(self, task: str) -> str | None:
        """Why this family does not run ``task`` (naming the tasks it runs), or None when it does."""
        if task in self.pipelines:
            return None
        hint = f"; {self.task_hint}" if self.task_hint else ""
        return f"this {self.name} folder does not run {task} (it runs {', '.join(self.tasks)}){hint}"

"""Tensor / component / model specs: each component declares its inputs and outputs once, with symbolic dims.

Symbolic dims and what they mean (all derived from one ``ShapeRanges``):

- ``batch``: the batch the component sees. Text encoders and the UNet see the classifier-free-guidance batch
  (negative + positive, so up to 2x the images per call); the VAE sees the images.
- ``latent_height`` / ``latent_width``: pixel size // vae_scale_factor.
- ``image_height`` / ``image_width``: pixel size.
- ``sequence``: the text length the UNet cross-attends to, 77 per prompt chunk.

Export dummy inputs, ONNX dynamic axes, engine min/opt/max profiles and runtime shape checks all come from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sdexport.specs.families import Family, detect_family, family
from sdexport.specs.families.base import VAE_COMPONENTS
from sdexport.specs.ranges import TOKENS_PER_CHUNK

COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder", "unet")


DERIVED = "/"
"""``symbol/k`` is the size of ``symbol`` after log2(k) stride-2 convolutions: ceil(symbol / k) (UNet levels)."""


def base_symbol(dim: str) -> str:
    """The symbol a dim is derived from (itself when it is not derived)."""
    return dim.split(DERIVED, 1)[0]


def dim_value(dim: int | str, env: dict[str, int]) -> int:
    """The value of a fixed, symbolic or derived dim under ``env``."""
    if isinstance(dim, int):
        return dim
    if DERIVED not in dim:
        return env[dim]
    base, factor = dim.split(DERIVED, 1)
    return -(-env[base] // int(factor))


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and dims (ints are fixed, strings are symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def shape(self, env: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given symbol values (derived dims like ``latent_height/4`` computed from theirs)."""
        return tuple(dim_value(d, env) for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbol, in the form torch.onnx.export expects."""
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        """Inverse of ``to_dict``."""
        return cls(data["name"], data["dtype"], tuple(data["dims"]))


@dataclass(frozen=True)
class Tolerance:
    """Allowed |onnx - torch| <= atol + rtol * |torch|, per precision."""

    atol: float
    rtol: float


@dataclass(frozen=True)
class ComponentSpec:
    """One exported network: its tensors, whether it runs at the CFG batch, its tolerances and fp16 policy."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    cfg_batched: bool
    tolerance_fp32: Tolerance
    tolerance_fp16: Tolerance
    fp16_by_default: bool = True

    def tolerance(self, precision: str) -> Tolerance:
        """The validation tolerance for a precision ("fp32" or "fp16")."""
        return self.tolerance_fp16 if precision == "fp16" else self.tolerance_fp32

    def symbols(self) -> list[str]:
        """Every symbolic dim used by this component's inputs, in first-seen order."""
        seen: list[str] = []
        for tensor in self.inputs:
            for dim in tensor.dims:
                if isinstance(dim, str) and base_symbol(dim) not in seen:
                    seen.append(base_symbol(dim))
        return seen

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {
            "name": self.name,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "cfg_batched": self.cfg_batched,
            "tolerance_fp32": asdict(self.tolerance_fp32),
            "tolerance_fp16": asdict(self.tolerance_fp16),
            "fp16_by_default": self.fp16_by_default,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentSpec:
        """Inverse of ``to_dict``."""
        return cls(
            name=data["name"],
            inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
            cfg_batched=data["cfg_batched"],
            tolerance_fp32=Tolerance(**data["tolerance_fp32"]),
            tolerance_fp16=Tolerance(**data["tolerance_fp16"]),
            fp16_by_default=data["fp16_by_default"],
        )


_TEXT_TOL = (Tolerance(1e-4, 1e-4), Tolerance(2e-2, 2e-2))
_UNET_TOL = (Tolerance(1e-4, 1e-3), Tolerance(3e-2, 3e-2))
_VAE_TOL = (Tolerance(5e-4, 1e-3), Tolerance(3e-2, 3e-2))


@dataclass(frozen=True)
class ModelSpec:
    """A whole pipeline: family, components and the numbers the runtime needs, all serialisable."""

    family: str
    inpaint: bool
    components: dict[str, ComponentSpec]
    vae_scale_factor: int
    scaling_factor: float
    clip_skip_max: int
    time_ids_dim: int
    pipeline_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        family(self.family)  # an unknown family fails here, with the known ones listed

    @property
    def family_record(self) -> Family:
        """The registered record of this spec's family."""
        return family(self.family)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Text encoder component names in the order the family concatenates them."""
        return self.family_record.encoder_names

    @property
    def latent_channels(self) -> int:
        """Channels of the latent space (the VAE decoder's input), whatever the UNet's input channels."""
        return int(self.components["vae_decoder"].inputs[0].dims[1])

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {
            "family": self.family,
            "inpaint": self.inpaint,
            "components": {n: c.to_dict() for n, c in self.components.items()},
            "vae_scale_factor": self.vae_scale_factor,
            "scaling_factor": self.scaling_factor,
            "clip_skip_max": self.clip_skip_max,
            "time_ids_dim": self.time_ids_dim,
            "pipeline_config": self.pipeline_config,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Inverse of ``to_dict``."""
        return cls(
            family=data["family"],
            inpaint=data["inpaint"],
            components={n: ComponentSpec.from_dict(c) for n, c in data["components"].items()},
            vae_scale_factor=data["vae_scale_factor"],
            scaling_factor=data["scaling_factor"],
            clip_skip_max=data["clip_skip_max"],
            time_ids_dim=data["time_ids_dim"],
            pipeline_config=data.get("pipeline_config", {}),
        )


def _text_encoder_spec(name: str, hidden: int, skip_options: int, pooled_dim: int | None,
                       fp16: bool) -> ComponentSpec:
    outputs = [TensorSpec("hidden_states", "float32", ("batch", skip_options, TOKENS_PER_CHUNK, hidden))]
    if pooled_dim is not None:
        outputs.append(TensorSpec("text_embeds", "float32", ("batch", pooled_dim)))
    return ComponentSpec(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", ("batch", TOKENS_PER_CHUNK)),),
        outputs=tuple(outputs),
        cfg_batched=True,
        tolerance_fp32=_TEXT_TOL[0],
        tolerance_fp16=_TEXT_TOL[1],
        fp16_by_default=fp16,
    )


def _text_components(info: Family, text_configs: dict[str, dict[str, Any]]) -> tuple[dict[str, ComponentSpec], int]:
    """The family's text encoder specs and clip_skip_max."""
    missing = [n for n in info.encoder_names if n not in text_configs]
    if missing:
        raise ValueError(f"a {info.name} pipeline needs {missing}; found text encoders {sorted(text_configs)}")
    # clip_skip k selects hidden state -(offset + k); keep every k that exists, at most 4 (users pick 1 or 2).
    clip_skip_max = max(0, min(4, *(int(text_configs[e.name]["num_hidden_layers"]) + 1 - e.clip_layer_offset
                                    for e in info.text_encoders)))
    components: dict[str, ComponentSpec] = {}
    for enc in info.text_encoders:
        cfg = text_configs[enc.name]
        pooled = int(cfg.get("projection_dim", cfg["hidden_size"])) if enc.pooled else None
        components[enc.name] = _text_encoder_spec(enc.name, int(cfg["hidden_size"]), clip_skip_max + 1, pooled,
                                                  fp16=enc.name not in info.fp32_components)
    return components, clip_skip_max


def _vae_components(info: Family, latent: int) -> dict[str, ComponentSpec]:
    """VAE encoder (image -> moments) and decoder (latent -> image) specs."""
    image = ("batch", 3, "image_height", "image_width")
    latents = ("batch", latent, "latent_height", "latent_width")
    moments = ("batch", 2 * latent, "latent_height", "latent_width")
    return {
        name: ComponentSpec(
            name=name,
            inputs=(TensorSpec(inp, "float32", in_dims),),
            outputs=(TensorSpec(out, "float32", out_dims),),
            cfg_batched=False,
            tolerance_fp32=_VAE_TOL[0],
            tolerance_fp16=_VAE_TOL[1],
            fp16_by_default=name not in info.fp32_components,
        )
        for name, (inp, in_dims, out, out_dims) in zip(
            VAE_COMPONENTS, (("image", image, "moments", moments), ("latent", latents, "image", image)), strict=True)
    }


def _unet_component(info: Family, unet_config: dict[str, Any], latent: int,
                    components: dict[str, ComponentSpec]) -> tuple[ComponentSpec, int]:
    """The UNet spec (sample, timestep, text states and the family's added conditions) and its time ids width."""
    in_ch = int(unet_config["in_channels"])
    if in_ch not in (latent, 2 * latent + 1):
        raise ValueError(f"UNet in_channels={in_ch}: supported are {latent} (text/image-to-image) "
                         f"and {2 * latent + 1} (inpainting)")
    cross = int(unet_config["cross_attention_dim"])
    unet_inputs = [
        TensorSpec("sample", "float32", ("batch", in_ch, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", cross)),
    ]
    time_ids_dim = 0
    if info.added_conditions:
        pooled_dim = components[info.pooled_from].outputs[1].dims[1]
        time_ids_dim = (int(unet_config["projection_class_embeddings_input_dim"]) - int(pooled_dim)) // int(
            unet_config["addition_time_embed_dim"]
        )
        unet_inputs += [
            TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),
            TensorSpec("time_ids", "float32", ("batch", time_ids_dim)),
        ]
    out_ch = int(unet_config.get("out_channels", latent))
    unet = ComponentSpec(
        name="unet",
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("out_sample", "float32", ("batch", out_ch, "latent_height", "latent_width")),),
        cfg_batched=True,
        tolerance_fp32=_UNET_TOL[0],
        tolerance_fp16=_UNET_TOL[1],
        fp16_by_default="unet" not in info.fp32_components,
    )
    return unet, time_ids_dim


def model_spec(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_configs: dict[str, dict[str, Any]],
    pipeline_config: dict[str, Any] | None = None,
) -> ModelSpec:
    """Build the ModelSpec of a pipeline from its own configs (UNet, VAE, each text encoder, model_index)."""
    info = family(detect_family(unet_config, text_configs))
    components, clip_skip_max = _text_components(info, text_configs)
    latent = int(vae_config.get("latent_channels", info.latent_channels))
    components.update(_vae_components(info, latent))
    components["unet"], time_ids_dim = _unet_component(info, unet_config, latent, components)
    return ModelSpec(
        family=info.name,
        inpaint=int(unet_config["in_channels"]) == 2 * latent + 1,
        components={n: components[n] for n in COMPONENT_ORDER if n in components},
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        scaling_factor=float(vae_config.get("scaling_factor", info.scaling_factor)),
        clip_skip_max=clip_skip_max,
        time_ids_dim=time_ids_dim,
        pipeline_config=dict(pipeline_config or {}),
    )

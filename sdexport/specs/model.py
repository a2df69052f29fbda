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

COMPONENT_ORDER = ("text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder", "unet")
TOKENS_PER_CHUNK = 77

Range = tuple[int, int, int]


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and dims (ints are fixed, strings are symbolic)."""

    name: str
    dtype: str
    dims: tuple[int | str, ...]

    def shape(self, env: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given symbol values."""
        return tuple(d if isinstance(d, int) else env[d] for d in self.dims)

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
                if isinstance(dim, str) and dim not in seen:
                    seen.append(dim)
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


def _check_range(label: str, value: Range, multiple: int = 1) -> None:
    lo, opt, hi = value
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"{label} range {value} must satisfy 1 <= min <= opt <= max")
    bad = [v for v in value if v % multiple]
    if bad:
        raise ValueError(f"{label} range {value}: {bad} not a multiple of {multiple}")


@dataclass(frozen=True)
class ShapeRanges:
    """What a compiled folder accepts: images per call, pixel height / width, prompt chunks of 77 tokens."""

    batch: Range = (1, 1, 4)
    height: Range = (256, 512, 1024)
    width: Range = (256, 512, 1024)
    prompt_chunks: int = 3

    def validate(self, pixel_multiple: int) -> None:
        """Raise ValueError naming the first range that is empty or off the pixel grid."""
        _check_range("batch", self.batch)
        _check_range("height", self.height, pixel_multiple)
        _check_range("width", self.width, pixel_multiple)
        if self.prompt_chunks < 1:
            raise ValueError(f"prompt_chunks={self.prompt_chunks} must be >= 1")

    def symbol_ranges(self, component: ComponentSpec, vae_scale_factor: int) -> dict[str, Range]:
        """min/opt/max of every symbolic dim of ``component``."""
        b_lo, b_opt, b_hi = self.batch
        if component.cfg_batched:
            # Guidance off runs batch B; guidance on runs 2B in one call. Text encoders also take every chunk.
            chunks = self.prompt_chunks if component.name.startswith("text_encoder") else 1
            batch = (b_lo, 2 * b_opt, 2 * b_hi * chunks)
        else:
            batch = self.batch
        f = vae_scale_factor
        values: dict[str, Range] = {
            "batch": batch,
            "image_height": self.height,
            "image_width": self.width,
            "latent_height": (self.height[0] // f, self.height[1] // f, self.height[2] // f),
            "latent_width": (self.width[0] // f, self.width[1] // f, self.width[2] // f),
            "sequence": (TOKENS_PER_CHUNK, TOKENS_PER_CHUNK, TOKENS_PER_CHUNK * self.prompt_chunks),
        }
        return {s: values[s] for s in component.symbols()}

    def profile(self, component: ComponentSpec, vae_scale_factor: int) -> dict[str, dict[str, list[int]]]:
        """Input name -> {"min","opt","max"} shapes: the engine optimisation profile and the runtime check."""
        ranges = self.symbol_ranges(component, vae_scale_factor)
        out: dict[str, dict[str, list[int]]] = {}
        for tensor in component.inputs:
            out[tensor.name] = {
                key: list(tensor.shape({s: r[i] for s, r in ranges.items()}))
                for i, key in enumerate(("min", "opt", "max"))
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form used in the manifest."""
        return {
            "batch": list(self.batch),
            "height": list(self.height),
            "width": list(self.width),
            "prompt_chunks": self.prompt_chunks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShapeRanges:
        """Inverse of ``to_dict``."""
        return cls(
            batch=tuple(data["batch"]),
            height=tuple(data["height"]),
            width=tuple(data["width"]),
            prompt_chunks=int(data["prompt_chunks"]),
        )


# Family differences as data. ``clip_layer_offset``: the hidden state the family feeds the UNet with no clip_skip
# (-1: last, SD; -2: penultimate, SDXL); ``final_norm``: whether that hidden state goes through the final layer
# norm (SD yes, SDXL no); ``pooled_from``: which encoder's projected pooled output becomes ``text_embeds``.
FAMILIES: dict[str, dict[str, Any]] = {
    "sd": {"text_encoders": ("text_encoder",), "clip_layer_offset": 1, "final_norm": True, "pooled_from": None},
    "sdxl": {
        "text_encoders": ("text_encoder", "text_encoder_2"),
        "clip_layer_offset": 2,
        "final_norm": False,
        "pooled_from": "text_encoder_2",
    },
    "sdxl-refiner": {
        "text_encoders": ("text_encoder_2",),
        "clip_layer_offset": 2,
        "final_norm": False,
        "pooled_from": "text_encoder_2",
    },
}

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

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """Text encoder component names in the order the family concatenates them."""
        return FAMILIES[self.family]["text_encoders"]

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


def detect_family(unet_config: dict[str, Any], has_text_encoder: bool) -> str:
    """Family from the UNet config and the folder structure, never from a name."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl" if has_text_encoder else "sdxl-refiner"
    if unet_config.get("addition_embed_type") is not None:
        raise ValueError(
            f"unsupported UNet addition_embed_type={unet_config['addition_embed_type']!r}; "
            "supported: None (SD 1.x / 2.x) or 'text_time' (SDXL)"
        )
    return "sd"


def _text_encoder_spec(name: str, hidden: int, skip_options: int, pooled_dim: int | None) -> ComponentSpec:
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
    )


def model_spec(
    unet_config: dict[str, Any],
    vae_config: dict[str, Any],
    text_configs: dict[str, dict[str, Any]],
    pipeline_config: dict[str, Any] | None = None,
) -> ModelSpec:
    """Build the ModelSpec of a pipeline from its own configs (UNet, VAE, each text encoder, model_index)."""
    family = detect_family(unet_config, "text_encoder" in text_configs)
    info = FAMILIES[family]
    missing = [n for n in info["text_encoders"] if n not in text_configs]
    if missing:
        raise ValueError(f"a {family} pipeline needs {missing}; found text encoders {sorted(text_configs)}")
    offset = info["clip_layer_offset"]
    layers = min(int(text_configs[n]["num_hidden_layers"]) for n in info["text_encoders"])
    # clip_skip k selects hidden state -(offset + k); keep every k that exists, at most 4 (users pick 1 or 2).
    clip_skip_max = max(0, min(4, layers + 1 - offset))
    components: dict[str, ComponentSpec] = {}
    for name in info["text_encoders"]:
        cfg = text_configs[name]
        pooled = int(cfg.get("projection_dim", cfg["hidden_size"])) if info["pooled_from"] == name else None
        components[name] = _text_encoder_spec(name, int(cfg["hidden_size"]), clip_skip_max + 1, pooled)

    latent = int(vae_config.get("latent_channels", 4))
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    components["vae_encoder"] = ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        outputs=(TensorSpec("moments", "float32", ("batch", 2 * latent, "latent_height", "latent_width")),),
        cfg_batched=False,
        tolerance_fp32=_VAE_TOL[0],
        tolerance_fp16=_VAE_TOL[1],
        fp16_by_default=family == "sd",
    )
    components["vae_decoder"] = ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", latent, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        cfg_batched=False,
        tolerance_fp32=_VAE_TOL[0],
        tolerance_fp16=_VAE_TOL[1],
        fp16_by_default=family == "sd",  # the SDXL VAE overflows in fp16
    )

    in_ch = int(unet_config["in_channels"])
    if in_ch not in (4, 9) or (in_ch == 9) != (latent * 2 + 1 == in_ch):
        raise ValueError(f"UNet in_channels={in_ch}: supported are {latent} (text/image-to-image) "
                         f"and {2 * latent + 1} (inpainting)")
    cross = int(unet_config["cross_attention_dim"])
    unet_inputs = [
        TensorSpec("sample", "float32", ("batch", in_ch, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", cross)),
    ]
    time_ids_dim = 0
    if info["pooled_from"] is not None:
        pooled_dim = components[info["pooled_from"]].outputs[1].dims[1]
        time_ids_dim = (int(unet_config["projection_class_embeddings_input_dim"]) - int(pooled_dim)) // int(
            unet_config["addition_time_embed_dim"]
        )
        unet_inputs += [
            TensorSpec("text_embeds", "float32", ("batch", pooled_dim)),
            TensorSpec("time_ids", "float32", ("batch", time_ids_dim)),
        ]
    components["unet"] = ComponentSpec(
        name="unet",
        inputs=tuple(unet_inputs),
        outputs=(TensorSpec("out_sample", "float32", ("batch", int(unet_config.get("out_channels", 4)),
                                                      "latent_height", "latent_width")),),
        cfg_batched=True,
        tolerance_fp32=_UNET_TOL[0],
        tolerance_fp16=_UNET_TOL[1],
    )
    return ModelSpec(
        family=family,
        inpaint=in_ch == 2 * latent + 1,
        components={n: components[n] for n in COMPONENT_ORDER if n in components},
        vae_scale_factor=vae_scale,
        scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
        clip_skip_max=clip_skip_max,
        time_ids_dim=time_ids_dim,
        pipeline_config=dict(pipeline_config or {}),
    )

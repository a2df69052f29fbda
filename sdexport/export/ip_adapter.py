"""IP-Adapter export: read an adapter laid out like diffusers' ``load_ip_adapter`` folder, load it into the source,
and wrap the CLIP vision encoder and the adapter-carrying UNet for tracing.

Layout: ``PATH`` is the adapter's weights (``ip-adapter_sd15.safetensors``) or the folder holding exactly one
``*.safetensors``; the CLIP vision encoder is the ``image_encoder`` folder next to the weights. The UNet keeps
diffusers' ``IPAdapterAttnProcessor2_0`` in every cross-attention layer; its scale becomes the graph input
``ip_adapter_scale`` (one value per row).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdexport.errors import SourceError
from sdexport.export.load import SourceInfo, _check_weights
from sdexport.specs import ComponentSpec
from sdexport.specs.ip_adapter import IMAGE_EMBEDS, SCALE, IpAdapterShape, with_ip_adapter

log = logging.getLogger(__name__)

ENCODER_FOLDER = "image_encoder"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COMPONENTS = ("unet", "image_encoder")


@dataclass(frozen=True)
class IpAdapterFiles:
    """Where an IP-Adapter's weights and image encoder are."""

    folder: Path
    weight_name: str

    @property
    def weights(self) -> Path:
        """The adapter's state dict (image_proj.* and ip_adapter.* keys)."""
        return self.folder / self.weight_name

    @property
    def encoder(self) -> Path:
        """The CLIP vision encoder folder."""
        return self.folder / ENCODER_FOLDER


def locate(path: str | Path, allow_pickle: bool = False) -> IpAdapterFiles:
    """The adapter files of ``--ip-adapter PATH``; SourceError naming what is missing."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if len(found) != 1:
            raise SourceError(f"--ip-adapter {path}: expected exactly one *.safetensors adapter file in the folder, "
                              f"found {found or 'none'}; pass the file itself")
        path = path / found[0]
    if not path.is_file():
        raise SourceError(f"--ip-adapter {path} does not exist")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise SourceError(f"--ip-adapter {path} is not a .safetensors file; pickle files can run code when loaded. "
                          "Convert it with safetensors or pass --allow-pickle if you trust it")
    files = IpAdapterFiles(path.parent, path.name)
    if not (files.encoder / "config.json").is_file():
        raise SourceError(f"--ip-adapter {path}: no image encoder at {files.encoder} (diffusers' load_ip_adapter "
                          "layout: an image_encoder folder with config.json next to the weights)")
    _check_weights(files.folder, ENCODER_FOLDER, allow_pickle)
    return files


def _state_dict_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    if weights.suffix != ".safetensors":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        flat = {f"{g}.{k}": v for g, d in state.items() for k, v in d.items()} if "image_proj" in state else state
        return {k: tuple(v.shape) for k, v in flat.items()}
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict


def adapter_shape(files: IpAdapterFiles) -> IpAdapterShape:
    """Image size, embedding width, tokens and cross-attention width of a plain (ImageProjection) IP-Adapter."""
    shapes = _state_dict_shapes(files.weights)
    proj = shapes.get("image_proj.proj.weight")
    if proj is None:
        kinds = sorted({k.split(".")[1] for k in shapes if k.startswith("image_proj.")})
        raise SourceError(f"--ip-adapter {files.weights}: only the plain IP-Adapter (image_proj.proj, 4 image "
                          f"tokens) is supported; this one has image_proj {kinds or 'missing'} (Plus / FaceID / "
                          "full-projection adapters are not)")
    config = json.loads((files.encoder / "config.json").read_text())
    vision = config.get("vision_config", config)
    embed_dim = int(config.get("projection_dim", vision.get("projection_dim", 0)))
    if proj[1] != embed_dim:
        raise SourceError(f"--ip-adapter {files.weights} projects {proj[1]}-wide image embeds but the image "
                          f"encoder at {files.encoder} makes {embed_dim}: they do not belong together")
    tokens = 4  # diffusers' ImageProjection for image_proj.proj (IP-Adapter's 4 image tokens)
    return IpAdapterShape(int(vision.get("image_size", 224)), embed_dim, tokens, proj[0] // tokens)


def _digest(files: IpAdapterFiles) -> str:
    digest = hashlib.sha256()
    for path in [files.weights, *sorted(p for p in files.encoder.rglob("*") if p.is_file())]:
        digest.update(str(path.relative_to(files.folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def attach(info: SourceInfo, path: str | Path, allow_pickle: bool = False) -> SourceInfo:
    """``info`` with the adapter's components in its spec and the adapter's record (path, hash) in its adapters."""
    files = locate(path, allow_pickle)
    try:
        spec = with_ip_adapter(info.spec, adapter_shape(files))
    except ValueError as exc:
        raise SourceError(f"--ip-adapter {files.weights}: {exc}") from exc
    record = {"path": str(files.weights), "sha256": _digest(files), "components": list(COMPONENTS)}
    return replace(info, spec=spec, adapters={**info.adapters, "ip_adapter": record})


def load_into(pipe: Any, path: str | Path) -> None:
    """Load the adapter into the source pipeline as diffusers does (image encoder, processors, projection)."""
    files = locate(path, allow_pickle=True)  # checked at plan time
    try:
        pipe.load_ip_adapter(str(files.folder), subfolder="", weight_name=files.weight_name,
                             image_encoder_folder=ENCODER_FOLDER)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for an adapter that does not fit
        raise SourceError(f"--ip-adapter {files.weights} does not fit this model: {exc}") from exc
    pipe.image_encoder = pipe.image_encoder.float().eval()
    log.info("IP-Adapter %s loaded", files.weights)


class ImageEncoderWrapper(nn.Module):
    """CLIPVisionModelWithProjection: pixel_values -> image_embeds; ``record`` holds its CLIP preprocessing."""

    def __init__(self, encoder: nn.Module, image_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.record = {"preprocess": {"size": image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                                      "resample": "bicubic"}}

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor]:
        """pixel_values [batch, 3, S, S] -> (image_embeds [batch, D],)."""
        return (self.encoder(pixel_values).image_embeds,)


class RowScale:
    """The adapter scale as a graph input: ``scale * states`` multiplies row b by scale[b].

    It never equals 0 in Python, so diffusers' ``if scale == 0: skip`` stays a Python decision (no tensor to bool)
    and the attention branch is always in the graph; scale 0 then adds exactly zero.
    """

    def __init__(self, scale: torch.Tensor) -> None:
        self.scale = scale.reshape(-1, 1, 1)

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __mul__(self, other: torch.Tensor) -> torch.Tensor:
        return self.scale * other

    __rmul__ = __mul__


class IpAdapterUNetWrapper(nn.Module):
    """The UNet with named inputs; image_embeds feed diffusers' image projection, the scale every IP processor."""

    def __init__(self, unet: nn.Module, component: ComponentSpec) -> None:
        super().__init__()
        self.unet = unet
        self.names = [t.name for t in component.inputs]
        self.ip_processors = [p for p in unet.attn_processors.values() if hasattr(p, "to_k_ip")]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor]:
        """The component's inputs in spec order -> (out_sample,); each IP processor's scale is the row scale."""
        feeds = dict(zip(self.names, inputs, strict=True))
        added: dict[str, Any] = {"image_embeds": [feeds[IMAGE_EMBEDS][:, None]]}
        if "text_embeds" in feeds:
            added.update(text_embeds=feeds["text_embeds"], time_ids=feeds["time_ids"])
        saved = [p.scale for p in self.ip_processors]
        for processor in self.ip_processors:
            processor.scale = [RowScale(feeds[SCALE])]
        try:
            out = self.unet(feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"],
                            added_cond_kwargs=added, return_dict=False)[0]
        finally:
            for processor, scale in zip(self.ip_processors, saved, strict=True):
                processor.scale = scale
        return (out,)


def wrap_ip_adapter(module: nn.Module, component: ComponentSpec) -> nn.Module | None:
    """The export wrapper of an IP-Adapter component (image encoder, UNet with image embeds), or None."""
    names = [t.name for t in component.inputs]
    if component.name == "image_encoder":
        return ImageEncoderWrapper(module, int(component.inputs[0].dims[2])).eval()
    if component.name == "unet" and IMAGE_EMBEDS in names:
        if not getattr(module, "encoder_hid_proj", None):
            raise SourceError("the UNet has no IP-Adapter loaded (encoder_hid_proj is empty)")
        return IpAdapterUNetWrapper(module, component).eval()
    return None


def write_random_ip_adapter(folder: Path, unet: nn.Module, vision_config: dict[str, Any], seed: int = 0) -> Path:
    """A random plain IP-Adapter for ``unet`` in diffusers' layout (tests, benchmarks); returns the weights path.

    ``vision_config``: a CLIPVisionConfig (hidden_size, image_size, patch_size, projection_dim, ...). Keys follow
    diffusers' safetensors format: ``image_proj.proj/norm`` and ``ip_adapter.{1,3,5..}.to_k_ip/to_v_ip``, one pair
    per cross-attention layer in ``unet.attn_processors`` order.
    """
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision_config)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(folder / ENCODER_FOLDER), safe_serialization=True)
    cross, embed, tokens = int(unet.config.cross_attention_dim), int(vision_config["projection_dim"]), 4
    state = {"image_proj.proj.weight": torch.randn(cross * tokens, embed) * embed ** -0.5,
             "image_proj.proj.bias": torch.randn(cross * tokens) * 0.1,
             "image_proj.norm.weight": 1 + 0.1 * torch.randn(cross), "image_proj.norm.bias": 0.1 * torch.randn(cross)}
    index = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k.weight
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{index}.{key}.weight"] = torch.randn(to_k.shape) * to_k.shape[1] ** -0.5
        index += 2
    weights = folder / "ip-adapter.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    return weights

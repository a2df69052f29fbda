"""Load one or more LoRAs with weights, fuse them into the UNet and text encoders, record what was fused."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdexport.engines.artifacts import sha256_file
from sdexport.engines.lora_checks import check_lora_weight
from sdexport.errors import SourceError

log = logging.getLogger(__name__)

LORA_TARGETS = ("unet", "text_encoder", "text_encoder_2")


def split_weight(text: str, default: float) -> tuple[str, float]:
    """``NAME[:NUMBER]`` -> (name, number or ``default``); a tail that is not a number stays part of the name."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return text, default


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file and the weight it is fused with."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """Parse ``PATH[:WEIGHT]`` (the weight defaults to 1.0)."""
        path, weight = split_weight(text, 1.0)
        check_lora_weight(weight, path)
        return cls(Path(path).expanduser(), weight)

    def check(self, allow_pickle: bool) -> None:
        """Refuse a missing file, a weight that is not a finite number, or a pickle file without the opt-in."""
        check_lora_weight(self.weight, self.path)
        if not self.path.is_file():
            raise SourceError(f"LoRA file {self.path} does not exist")
        if self.path.suffix != ".safetensors" and not allow_pickle:
            raise SourceError(
                f"LoRA {self.path} is not a .safetensors file; pickle files can run code when loaded. Convert it "
                "with safetensors.torch.save_file(torch.load(path), 'lora.safetensors') or pass --allow-pickle"
            )

    def record(self) -> dict[str, Any]:
        """Manifest entry: name, path, weight, sha256."""
        return {"name": self.path.name, "path": str(self.path.resolve()), "weight": self.weight,
                "sha256": sha256_file(self.path)}


def fuse_loras(pipe: Any, loras: list[LoraSpec], allow_pickle: bool = False) -> list[dict[str, Any]]:
    """Fuse every LoRA (with its weight) into the pipeline's modules; return manifest records with targets."""
    if not loras:
        return []
    names: list[str] = []
    records = []
    for index, lora in enumerate(loras):
        lora.check(allow_pickle)
        adapter = f"sdexport_{index}"
        before = _adapters(pipe)
        try:
            pipe.load_lora_weights(str(lora.path.parent), weight_name=lora.path.name, adapter_name=adapter,
                                   use_safetensors=lora.path.suffix == ".safetensors")
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a LoRA that does not fit
            raise SourceError(f"LoRA {lora.path} does not fit this model: {exc}") from exc
        touched = [c for c, adapters in _adapters(pipe).items() if adapter in adapters and adapter not in
                   before.get(c, [])]
        if not touched:
            raise SourceError(
                f"LoRA {lora.path} matched no layer of this model's UNet or text encoders; is it for another family?"
            )
        names.append(adapter)
        records.append(dict(lora.record(), components=sorted(touched)))
        log.info("LoRA %s (weight %s) -> %s", lora.path.name, lora.weight, ", ".join(sorted(touched)))
    pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
    targets = sorted({c for r in records for c in r["components"]})
    pipe.fuse_lora(components=targets, lora_scale=1.0)
    pipe.unload_lora_weights()
    return records


def _adapters(pipe: Any) -> dict[str, list[str]]:
    try:
        return {k: list(v) for k, v in pipe.get_list_adapters().items() if k in LORA_TARGETS}
    except (AttributeError, ValueError):
        return {}

"""LoRA hot swap without torch: read LoRA files, map them onto graph initializers, fuse from the base weights.

Accepted formats are the ones diffusers' ``load_lora_weights`` accepts for SD / SDXL: diffusers / PEFT
(``unet.<module>.lora_A.weight`` / ``lora_B.weight``, older ``lora.down`` / ``lora.up``, ``.alpha`` keys or the
``lora_adapter_metadata`` header) and kohya (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` with
``lora_down`` / ``lora_up`` / ``alpha``; SDXL kohya files in the original ``input_blocks`` naming included).
Fusion follows PEFT: ``W = W_base + sum_i weight_i * alpha_i / rank_i * (up_i @ down_i)``, accumulated in fp32 in
file order, cast to the initializer's dtype. The base is the graph as built (including LoRAs fused at build time).
"""

from __future__ import annotations

import collections
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sdexport.engines.artifacts import check_inside
from sdexport.engines.onnx_weights import patched_model, read_initializers
from sdexport.errors import SourceError

log = logging.getLogger(__name__)

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KEY_KINDS = (  # (regex on the key's tail, kind)
    (re.compile(r"\.lora_A(\.[\w-]+)?\.weight$"), "down"), (re.compile(r"\.lora_B(\.[\w-]+)?\.weight$"), "up"),
    (re.compile(r"\.(lora|lora_linear_layer)\.down\.weight$"), "down"),
    (re.compile(r"\.(lora|lora_linear_layer)\.up\.weight$"), "up"),
    (re.compile(r"\.lora_down\.weight$"), "down"), (re.compile(r"\.lora_up\.weight$"), "up"),
    (re.compile(r"\.alpha$"), "alpha"),
)
_UNSUPPORTED = ("dora_scale", "lora_magnitude_vector", "hada_", "lokr_", "lora_mid", ".diff", "lora_B.bias")
# Old diffusers attention-processor names -> module names (UNet, then CLIP).
_PROCESSOR_NAMES = {"unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
                    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj",
                             "to_out_lora": "out_proj"}}
# SGM (original SDXL) resnet layer names -> diffusers.
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_TOP = {"time_embed_0": "time_embedding.linear_1", "time_embed_2": "time_embedding.linear_2",
            "label_emb_0_0": "add_embedding.linear_1", "label_emb_0_2": "add_embedding.linear_2",
            "out_2": "conv_out", "input_blocks_0_0": "conv_in"}


@dataclass(frozen=True)
class WeightMap:
    """A component's parameter -> initializer map (written by the exporter next to the graph)."""

    component: str
    params: dict[str, str]
    shapes: dict[str, list[int]]

    @classmethod
    def load(cls, path: Path, component: str) -> WeightMap:
        data = json.loads(Path(path).read_text())
        return cls(component, dict(data["params"]), {k: list(v) for k, v in data.get("shapes", {}).items()})

    @cached_property
    def modules(self) -> frozenset[str]:
        """Every module that owns a ``.weight`` parameter."""
        return frozenset(p[: -len(".weight")] for p in self.params if p.endswith(".weight"))

    @cached_property
    def flat(self) -> dict[str, str | None]:
        """kohya's underscore spelling of each module -> the module (None where two modules collide)."""
        out: dict[str, str | None] = {}
        for module in self.modules:
            key = module.replace(".", "_")
            out[key] = None if key in out else module
        return out

    def module(self, name: str) -> str | None:
        """The module called ``name`` here, trying CLIP's optional ``text_model.`` level both ways."""
        for candidate in (name, f"text_model.{name}", name.removeprefix("text_model.")):
            if candidate in self.modules:
                return candidate
        return None

    def flat_module(self, flat: str) -> str | None:
        """The module whose underscore spelling is ``flat`` (kohya), with or without ``text_model_``."""
        for candidate in (flat, f"text_model_{flat}", flat.removeprefix("text_model_")):
            if self.flat.get(candidate):
                return self.flat[candidate]
        return None

    @cached_property
    def layers_per_block(self) -> int:
        found = [int(m.group(1)) for p in self.modules if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))]
        return max(found, default=0) + 1


def sgm_to_diffusers(flat: str, wmap: WeightMap) -> str | None:
    """Translate a kohya SDXL key in SGM naming (``input_blocks_4_1_...``) to a diffusers UNet module."""
    for sgm, module in _SGM_TOP.items():
        if flat == sgm:
            return module if module in wmap.modules else None
    middle = re.match(r"middle_block_(\d+)_(.+)$", flat)
    m = re.match(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)$", flat)
    per = wmap.layers_per_block + 1
    if middle is not None:
        prefix = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}.get(
            int(middle.group(1)))
        rest = middle.group(2)
    elif m is None:
        return None
    elif m.group(1) == "input_blocks":
        index, inner, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        block, layer = (index - 1) // per, (index - 1) % per
        if rest == "op" or layer == per - 1:
            prefix, rest = f"down_blocks.{block}.downsamplers.0", "conv"
        else:
            prefix = f"down_blocks.{block}.{('resnets', 'attentions')[inner]}.{layer}"
    else:
        index, inner, rest = int(m.group(2)), int(m.group(3)), m.group(4)
        block, layer = index // per, index % per
        attn = f"up_blocks.{block}.attentions.{layer}"
        if inner == 0:
            prefix = f"up_blocks.{block}.resnets.{layer}"
        elif inner == 1 and any(p.startswith(attn + ".") for p in wmap.modules):
            prefix = attn
        else:
            prefix = f"up_blocks.{block}.upsamplers.0"
    if prefix is None:
        return None
    rest = _SGM_RESNET.get(rest, rest)
    return wmap.flat_module(f"{prefix}_{rest}".replace(".", "_"))


@dataclass
class _Pair:
    down: np.ndarray | None = None
    up: np.ndarray | None = None
    alpha: float | None = None
    keys: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoraTerm:
    """One low-rank update of one parameter: ``scale * up @ down``."""

    param: str
    down: np.ndarray
    up: np.ndarray
    scale: float

    def delta(self, weight: float = 1.0) -> np.ndarray:
        """``weight * scale * up @ down`` in fp32, shaped like the parameter (linear or conv), as PEFT computes it."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], -1)
        down = self.down.astype(np.float32).reshape(self.down.shape[0], -1)
        product = (up @ down).reshape(self.up.shape[0], *self.down.shape[1:])
        return product * np.float32(weight * self.scale)


def read_lora(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and header metadata of a LoRA .safetensors file, without torch."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise SourceError(f"LoRA {path}: only .safetensors files can be swapped in at run time (pickle files can "
                          "run code); convert it with safetensors.torch.save_file")
    if not path.is_file():
        raise SourceError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 - not a dict
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ValueError
        raise SourceError(f"LoRA file {path} is not a readable .safetensors file ({exc}); it is truncated, "
                          "corrupt or another format") from exc


def _split_key(key: str, components: Sequence[str]) -> tuple[str, str, str] | None:
    """(component, module spelling, kind) of one LoRA key; kohya modules keep their underscore spelling."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, tail = key[len(prefix):].partition(".")
            kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(tail)
            return (component, "kohya:" + name, kind) if kind else None
    key = key.removeprefix("base_model.model.")
    found = next(((m, kind) for pattern, kind in _KEY_KINDS if (m := pattern.search(key))), None)
    if found is None:
        return None
    module, kind = key[: found[0].start()], found[1]
    component = next((c for c in sorted(components, key=len, reverse=True) if module.startswith(c + ".")), None)
    if component is None:
        if any(module.startswith(c + ".") for c in LORA_COMPONENTS):
            return None  # a component this folder does not have (e.g. text_encoder for the refiner)
        component = "unet"  # unprefixed diffusers / PEFT UNet files
    else:
        module = module[len(component) + 1:]
    module = module.replace(".processor.", ".")
    names = _PROCESSOR_NAMES["unet" if component == "unet" else "text"]
    for old, new in names.items():
        module = re.sub(rf"(^|\.){old}$", rf"\g<1>{new}", module)
    return component, module, kind


def _resolve(component: str, spelling: str, wmap: WeightMap) -> str | None:
    if spelling.startswith("kohya:"):
        flat = spelling[len("kohya:"):]
        return wmap.flat_module(flat) or (sgm_to_diffusers(flat, wmap) if component == "unet" else None)
    return wmap.module(spelling)


def _scales(pairs: Mapping[str, _Pair], metadata: Mapping[str, Any] | None) -> dict[str, float]:
    """alpha / rank per module, as diffusers + PEFT would configure it."""
    if metadata:
        alpha_pattern = metadata.get("alpha_pattern") or {}
        out = {}
        for module, pair in pairs.items():
            rank = pair.down.shape[0]
            key = next((p for p in alpha_pattern if re.match(rf"(.*\.)?({p})$", module)), None)
            alpha = float(alpha_pattern[key] if key else metadata.get("lora_alpha", rank))
            out[module] = alpha / (rank ** 0.5 if metadata.get("use_rslora") else rank)
        return out
    alphas = [p.alpha for p in pairs.values() if p.alpha is not None]
    default = collections.Counter(alphas).most_common(1)[0][0] if alphas else None
    return {m: (p.alpha if p.alpha is not None else default if default is not None else p.down.shape[0])
            / p.down.shape[0] for m, p in pairs.items()}


def _adapter_metadata(metadata: Mapping[str, str], component: str) -> dict[str, Any] | None:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    data = json.loads(raw)
    prefix = component + "."
    own = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    return own or None


def lora_terms(path: Path, maps: Mapping[str, WeightMap]) -> dict[str, list[LoraTerm]]:
    """Parse one LoRA file into per-component terms against the folder's weight maps."""
    tensors, metadata = read_lora(path)
    bad = sorted({u for k in tensors for u in _UNSUPPORTED if u in k})
    if bad:
        raise SourceError(f"LoRA {path} uses {', '.join(bad)} (DoRA / LyCORIS / LoRA bias), which run-time swapping "
                          "does not support; fuse it at build time instead: sdexport build --lora PATH")
    pairs: dict[str, dict[str, _Pair]] = {c: {} for c in maps}
    unmatched: list[str] = []
    for key, value in tensors.items():
        split = _split_key(key, list(maps))
        if split is None:
            unmatched.append(key)
            continue
        component, spelling, kind = split
        module = _resolve(component, spelling, maps[component]) if component in maps else None
        if module is None:
            unmatched.append(key)
            continue
        pair = pairs[component].setdefault(module, _Pair())
        pair.keys.append(key)
        if kind == "alpha":
            pair.alpha = float(np.asarray(value).reshape(-1)[0])
        else:
            setattr(pair, kind, value)
    if unmatched:
        log.warning("LoRA %s: %d keys match no weight of this folder's graphs and are ignored (e.g. %s); layers "
                    "a graph does not use, like SDXL's last CLIP layer, are not exported", path.name,
                    len(unmatched), ", ".join(unmatched[:3]))
    out: dict[str, list[LoraTerm]] = {}
    for component, found in pairs.items():
        incomplete = [p.keys[0] for p in found.values() if p.down is None or p.up is None]
        if incomplete:
            raise SourceError(f"LoRA {path}: {incomplete[:3]} have no matching down/up pair; the file is damaged")
        scales = _scales(found, _adapter_metadata(metadata, component))
        terms = []
        for module, pair in sorted(found.items()):
            term = LoraTerm(module + ".weight", pair.down, pair.up, scales[module])
            expected = maps[component].shapes.get(term.param)
            shape = [pair.up.shape[0], *pair.down.shape[1:]]
            if expected is not None and [int(d) for d in expected] != shape:
                raise SourceError(f"LoRA {path}: {pair.keys[0]} makes a {shape} update for {component}.{term.param}, "
                                  f"which is {expected}: the LoRA is for another model")
            terms.append(term)
        if terms:
            out[component] = terms
    if not out:
        raise SourceError(f"LoRA {path} matched no layer of this model's UNet or text encoders; is it for another "
                          "model family?")
    return out


def fuse(base: np.ndarray, deltas: Sequence[tuple[float, LoraTerm]]) -> np.ndarray:
    """``base + sum weight * term.delta()`` accumulated in fp32, in order, cast back to ``base.dtype``."""
    fused = base.astype(np.float32, copy=True)
    for weight, term in deltas:
        fused += term.delta(weight)
    return fused.astype(base.dtype)


@dataclass
class LoraUpdate:
    """What a swap changes: full initializer overrides (ONNX Runtime) and the weights to refit (TensorRT)."""

    overrides: dict[str, dict[str, np.ndarray]]
    refit: dict[str, dict[str, np.ndarray]]

    @property
    def changed(self) -> list[str]:
        """Components whose weights differ from before the swap (rebuild / refit these only)."""
        return [c for c, weights in self.refit.items() if weights]


class LoraSwapper:
    """Per-folder LoRA state: base weights read once from the graphs, the LoRAs applied now, swaps between."""

    def __init__(self, folder: Path, manifest: Mapping[str, Any]) -> None:
        self.folder = Path(folder)
        self.graphs: dict[str, Path] = {}
        self.maps: dict[str, WeightMap] = {}
        for name in LORA_COMPONENTS:
            comp = manifest.get("components", {}).get(name)
            if comp and comp.get("weight_map"):
                self.maps[name] = WeightMap.load(check_inside(self.folder, comp["weight_map"]), name)
                self.graphs[name] = check_inside(self.folder, comp["graph"])
        self._base: dict[str, dict[str, np.ndarray]] = {c: {} for c in self.maps}
        self.applied: dict[str, dict[str, np.ndarray]] = {c: {} for c in self.maps}
        self.loras: list[tuple[Path, float]] = []

    def base(self, component: str, initializers: Sequence[str]) -> dict[str, np.ndarray]:
        """Base values of initializers (read from the graph on first use, then kept)."""
        cache = self._base[component]
        missing = [n for n in initializers if n not in cache]
        if missing:
            cache.update(read_initializers(self.graphs[component], missing))
        return {n: cache[n] for n in initializers}

    def current(self, component: str, initializer: str) -> np.ndarray:
        """The value an initializer has now (with the applied LoRAs); TensorRT's refitter may ask for any."""
        if initializer in self.applied[component]:
            return self.applied[component][initializer]
        return self.base(component, [initializer])[initializer]

    def compute(self, loras: Sequence[tuple[str | Path, float]]) -> dict[str, dict[str, np.ndarray]]:
        """Fused initializer values for ``loras`` applied to the base (pure: the applied state is unchanged)."""
        if not self.maps:
            raise SourceError(f"{self.folder} has no weight maps, so LoRAs cannot be swapped; rebuild it")
        per_param: dict[str, dict[str, list[tuple[float, LoraTerm]]]] = {c: {} for c in self.maps}
        for path, weight in loras:
            for component, terms in lora_terms(Path(path), self.maps).items():
                for term in terms:
                    per_param[component].setdefault(term.param, []).append((float(weight), term))
        out: dict[str, dict[str, np.ndarray]] = {}
        for component, params in per_param.items():
            names = {p: self.maps[component].params[p] for p in params}
            base = self.base(component, list(names.values()))
            out[component] = {names[p]: fuse(base[names[p]], deltas) for p, deltas in params.items()}
        return out

    def update(self, loras: Sequence[tuple[str | Path, float]]) -> LoraUpdate:
        """Switch to ``loras`` (``[]`` restores the base): new overrides, plus every weight to refit.

        The refit set covers the initializers the new LoRAs touch AND those only the previous ones touched (set
        back to base), so A -> B -> A restores A exactly, whatever A and B touch.
        """
        new = self.compute(loras)
        refit = {}
        for component in self.maps:
            stale = [n for n in self.applied[component] if n not in new[component]]
            refit[component] = {**self.base(component, stale), **new[component]}
        self.applied = new
        self.loras = [(Path(p), float(w)) for p, w in loras]
        return LoraUpdate(overrides={c: dict(v) for c, v in new.items()}, refit=refit)


def ort_session(graph: Path, overrides: Mapping[str, np.ndarray], options: Any = None,
                providers: Sequence[Any] | None = None) -> Any:
    """An ONNX Runtime session of ``graph`` with initializers replaced by ``overrides`` (the LoRA-fused weights).

    The overrides are written into the model before ONNX Runtime optimises it (see ``patched_model``), so they
    hold at every graph optimisation level, for every execution provider.
    """
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    model, external = patched_model(graph, overrides)
    arrays = [np.ascontiguousarray(v) for v in external.values()]
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if external:
        options.add_external_initializers(list(external), values)
    if model is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(graph).parent))
    session = ort.InferenceSession(model if model is not None else str(graph), sess_options=options,
                                   providers=list(providers or ["CPUExecutionProvider"]))
    session.sdexport_external_weights = (arrays, values)  # ONNX Runtime uses this memory: keep it alive
    return session

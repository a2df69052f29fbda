"""Attention processors at export time: which class each layer has, custom ones traced as they are, and a build
failure naming the layer when a processor's Python control flow depends on tensor values.

A diffusers ``Attention`` module delegates its math to ``module.processor``; the exporter never swaps a processor.
The standard processors (``STANDARD``) have their ``scaled_dot_product_attention`` call traced in the equivalent
constant-scale form (``export.attention``); any other processor is traced exactly as written. A processor that turns a
tensor into a Python bool or number while tracing (``if hidden_states.mean() > 0:``, ``.item()``) gets one branch
baked into the graph: the tracer reports each such conversion as a ``TracerWarning`` located in the processor's
code, which is what this module checks (torch's own shape checks warn too, from torch's files, and are not counted).
A second-shape validation would miss a branch that both validation inputs happen to take.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.jit import TracerWarning

import sdexport
from sdexport.errors import SourceError

log = logging.getLogger(__name__)

STANDARD = frozenset({
    "diffusers.models.attention_processor.AttnProcessor",
    "diffusers.models.attention_processor.AttnProcessor2_0",
    "diffusers.models.attention_processor.IPAdapterAttnProcessor",
    "diffusers.models.attention_processor.IPAdapterAttnProcessor2_0",
})
"""Processors whose ``scaled_dot_product_attention`` may be traced in the constant-scale form."""

_AS_IS = threading.local()
# torch's own shape checks and sdexport's constant-scale attention (the head size as a constant) convert sizes.
_TRUSTED = tuple(str(Path(m.__file__).resolve().parent) for m in (torch, sdexport))


class UntraceableProcessorError(SourceError):
    """An attention processor has Python control flow on tensor values, so no single graph can follow it."""


def class_path(obj: Any) -> str:
    """``module.QualName`` of ``obj``'s class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def attention_layers(wrapper: nn.Module) -> dict[str, nn.Module]:
    """Every module of an export wrapper that delegates to an attention processor, by its name inside the wrapped
    model (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``, as in ``unet.attn_processors``)."""
    return {name.partition(".")[2] or name: module for name, module in wrapper.named_modules()
            if hasattr(module, "processor") and callable(getattr(module, "set_processor", None))}


def processor_record(wrapper: nn.Module, used: Collection[str] | None = None) -> dict[str, dict[str, str]]:
    """Layer name -> {"class": the processor's class, "export": "constant-scale" or "as-is"}, for the layers in
    ``used`` (default: all)."""
    out = {}
    for name, module in attention_layers(wrapper).items():
        if used is not None and name not in used:
            continue
        path = class_path(module.processor)
        out[name] = {"class": path, "export": "constant-scale" if path in STANDARD else "as-is"}
    return out


def traced_as_is() -> bool:
    """True while a custom (non-standard) processor runs inside ``trace_guard``: its math is traced unchanged."""
    return getattr(_AS_IS, "depth", 0) > 0


class _LayerWatch:
    """Forward hooks on one attention layer: record TracerWarnings raised while it runs, mark custom processors."""

    def __init__(self, name: str, module: nn.Module, found: list[str], ran: list[str]) -> None:
        self.name = name
        self.module = module
        self.found = found
        self.ran = ran
        self.custom = class_path(module.processor) not in STANDARD
        self.caught: contextlib.ExitStack | None = None
        self.log: list[warnings.WarningMessage] = []

    def before(self, *_: Any) -> None:
        """Forward pre-hook: start recording TracerWarnings (and mark a custom processor as running)."""
        if self.name not in self.ran:
            self.ran.append(self.name)
        self.caught = contextlib.ExitStack()
        self.log = self.caught.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always", TracerWarning)
        if self.custom:
            _AS_IS.depth = getattr(_AS_IS, "depth", 0) + 1

    def after(self, *_: Any) -> None:
        """Forward hook: stop recording; note the layer when its processor's code converted a tensor to Python."""
        self.close()
        messages = [str(w.message) for w in self.log if issubclass(w.category, TracerWarning)
                    and not str(Path(w.filename).resolve()).startswith(_TRUSTED)]
        if messages:
            self.found.append(f"{self.name} ({class_path(self.module.processor)}): {messages[0].split('.')[0]}")

    def close(self) -> None:
        """Restore the warning filters (idempotent; also after a failed forward)."""
        if self.caught is not None:
            self.caught.close()
            self.caught = None
            if self.custom:
                _AS_IS.depth -= 1


@contextlib.contextmanager
def trace_guard(model: nn.Module, component: str) -> Iterator[list[str]]:
    """While tracing ``model``: custom processors run as written; yields the names of the attention layers that ran
    (filled while tracing). On exit, raise UntraceableProcessorError naming every layer whose processor converted
    a tensor to a Python value (data-dependent control flow)."""
    found: list[str] = []
    ran: list[str] = []
    watches = [_LayerWatch(name, module, found, ran) for name, module in attention_layers(model).items()]
    handles = []
    for watch in watches:
        handles.append(watch.module.register_forward_pre_hook(watch.before))
        handles.append(watch.module.register_forward_hook(watch.after))
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()
        for watch in reversed(watches):
            watch.close()
    if found:
        raise UntraceableProcessorError(
            f"{component}: attention processor(s) cannot be exported as one graph, their Python control flow "
            f"depends on tensor values: {'; '.join(found)}. Write the branch with tensor ops (torch.where) or use "
            "a processor without value-dependent `if`/`.item()`")

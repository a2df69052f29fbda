"""The explicit map from model parameter names to graph initializer names, recorded at export time.

The exporter keeps one initializer per parameter under the parameter's own name (no value-based
de-duplication, no constant folding of weights), so the map is exact by construction; this module checks it and
writes it down for LoRA refits.
"""

from __future__ import annotations

from typing import Any

import onnx
from torch import nn

from sdexport.errors import ValidationError


def weight_map(wrapper: nn.Module, module_attr: str, graph: onnx.ModelProto) -> dict[str, Any]:
    """{"module", "prefix", "params": {param: initializer}, "shapes": {param: shape}} for the graph's weights.

    ``module_attr`` is the wrapper attribute holding the exported model ("unet", "vae", "model"); parameter names
    are relative to that model, as in its state_dict and in LoRA files.
    """
    shapes = {init.name: list(init.dims) for init in graph.graph.initializer}
    prefix = module_attr + "."
    params: dict[str, str] = {}
    param_shapes: dict[str, list[int]] = {}
    for name, param in wrapper.named_parameters():
        if name not in shapes:
            continue  # unused by this graph (e.g. the VAE decoder's encoder half): removed by the exporter
        if shapes[name] != list(param.shape):
            raise ValidationError(
                f"initializer {name!r} has shape {shapes[name]} but the parameter has {list(param.shape)}"
            )
        params[name.removeprefix(prefix)] = name
        param_shapes[name.removeprefix(prefix)] = list(param.shape)
    return {"module": module_attr, "prefix": prefix, "params": params, "shapes": param_shapes}

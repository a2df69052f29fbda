"""The exporter: the only subpackage that imports torch, diffusers, transformers, peft and onnx."""

"""Engines: turn ONNX graphs into something that runs (ONNX Runtime, TensorRT); no diffusers."""

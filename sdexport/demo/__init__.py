"""The trained demo model: its synthetic shapes data, its training script and the evaluator that scores its images."""

from pathlib import Path

# The shipped diffusers folder (fp16 safetensors) that `sdexport build --model` compiles.
MODEL_DIR = Path(__file__).parent / "model"

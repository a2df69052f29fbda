"""The trained demo model: its synthetic shapes data, its training script and the evaluator that scores its images."""

from pathlib import Path

# The shipped diffusers folder (fp16 safetensors) that `sdexport build --model` compiles.
MODEL_DIR = Path(__file__).parent / "model"
# The guidance scale the model is made for (1-2; docs/demo.md says why higher scales push colours off the palette).
GUIDANCE = 2.0

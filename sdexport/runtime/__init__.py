"""The lean runtime: numpy, tokenizers, Pillow and engines only; no torch, no diffusers."""

#!/usr/bin/env bash
# Set up this checkout for building and testing: the CPU torch build, sdexport with its exporter and test extras,
# and open-clip-torch's CLIP BPE vocabulary (used offline by the tiny and demo presets).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m pip install -q torch==2.13.0          # the CPU build; an unpinned torch pulls a multi-GB CUDA build
"$PYTHON" -m pip install -q -e ".[export,dev]"     # sdexport + diffusers, transformers, peft, onnx, pytest, ruff
"$PYTHON" -m pip install -q --no-deps open-clip-torch   # only for its bpe_simple_vocab_16e6.txt.gz

"""The real CLIP BPE tokenizer files, built offline from the vocabulary that ships inside open-clip-torch."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from sdexport.errors import SourceError

VOCAB_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_MERGES_KEPT = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def open_clip_vocab_path() -> Path:
    """Where open-clip-torch keeps the CLIP BPE merges, located without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "tiny and --random-weights models need the CLIP vocabulary from open-clip-torch: "
            "run `pip install --no-deps open-clip-torch`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_NAME
    if not path.is_file():
        raise SourceError(f"{path} is missing: reinstall open-clip-torch")
    return path


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt and the tokenizer configs of the real CLIP tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(open_clip_vocab_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _MERGES_KEPT + 1]
    merges = [tuple(line.split()) for line in lines]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder

"""CLIP tokenization from the vocab.json / merges.txt stored in a compiled folder, with the `tokenizers` library."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdexport.errors import ArtifactError

log = logging.getLogger(__name__)

MAX_LENGTH = 77
"""Tokens per CLIP sequence, bos and eos included."""
PER_CHUNK = MAX_LENGTH - 2
"""Prompt tokens per sequence (between bos and eos)."""
# CLIP's pre-tokenization: special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_DEFAULT_SPECIALS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


@dataclass(frozen=True)
class Tokenized:
    """Token ids of a batch of prompts: ``ids`` int64 [prompts * chunks, 77] and what truncation dropped."""

    ids: np.ndarray
    chunks: int
    dropped: tuple[str, ...]


def _special_tokens(folder: Path) -> dict[str, str]:
    specials = dict(_DEFAULT_SPECIALS)
    path = folder / "special_tokens_map.json"
    if path.is_file():
        for key, value in json.loads(path.read_text()).items():
            if key in specials:
                specials[key] = value["content"] if isinstance(value, dict) else str(value)
    return specials


class ClipTokenizer:
    """Byte-level BPE with "</w>" word ends, NFC + whitespace cleanup + lowercase, CLIP's split, bos/eos, padding.

    Produces the same ids as ``transformers.CLIPTokenizer`` loaded from the same folder (the special tokens in
    ``special_tokens_map.json``, including a "!" pad token, are matched as whole tokens before normalisation).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (self.folder / name).is_file():
                raise ArtifactError(f"{self.folder / name} is missing: the folder's tokenizer is incomplete; rebuild")
        vocab = json.loads((self.folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (self.folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        specials = _special_tokens(self.folder)
        bpe = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                  fuse_unk=False, unk_token=specials["unk_token"])
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        unique = dict.fromkeys(specials.values())
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in unique])
        self._tok = tok
        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token_id = tok.token_to_id(specials[key])
            if token_id is None:
                raise ArtifactError(f"{self.folder}: {key} {specials[key]!r} is not in vocab.json; rebuild the folder")
            ids[key] = token_id
        self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]

    def token_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids without bos / eos, untruncated."""
        return self._tok.encode(prompt, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (word ends become spaces), as CLIPTokenizer.decode."""
        return self._tok.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()

    def _row(self, content: list[int]) -> list[int]:
        row = [self.bos_id, *content, self.eos_id]
        return row + [self.pad_id] * (MAX_LENGTH - len(row))

    def chunks_needed(self, prompt: str) -> int:
        """How many chunks of 75 tokens ``prompt`` fills (at least 1)."""
        return max(1, -(-len(self.token_ids(prompt)) // PER_CHUNK))

    def __call__(self, prompts: list[str], chunks: int | None = None) -> Tokenized:
        """Token ids: one 77-token row per prompt, or ``chunks`` rows per prompt.

        With ``chunks=None`` a prompt longer than 75 tokens is truncated (``dropped`` says what went, as diffusers
        warns). With ``chunks=k`` every prompt is split into k chunks of 75 tokens, each wrapped in bos / eos and
        padded (chunks past the prompt's end are empty); a prompt needing more than k chunks is an error.
        """
        contents = [self.token_ids(p) for p in prompts]
        if chunks is None:
            dropped = tuple(self.decode(c[PER_CHUNK:]) for c in contents if len(c) > PER_CHUNK)
            rows = [self._row(c[:PER_CHUNK]) for c in contents]
            return Tokenized(np.asarray(rows, dtype=np.int64).reshape(len(prompts), MAX_LENGTH), 1, dropped)
        longest = max((len(c) for c in contents), default=0)
        if longest > chunks * PER_CHUNK:
            raise ValueError(
                f"a prompt has {longest} tokens; at most {chunks} chunk(s) of {PER_CHUNK} ({chunks * PER_CHUNK} "
                f"tokens) fit: shorten it, or rebuild the folder with a larger --prompt-chunks"
            )
        rows = [self._row(c[k * PER_CHUNK:(k + 1) * PER_CHUNK]) for c in contents for k in range(chunks)]
        return Tokenized(np.asarray(rows, dtype=np.int64).reshape(len(prompts) * chunks, MAX_LENGTH), chunks, ())

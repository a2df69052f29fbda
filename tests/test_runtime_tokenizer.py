"""The runtime's CLIP tokenizer (tokenizers library, folder files) equals transformers' CLIPTokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from transformers import CLIPTokenizer

from sdexport.runtime.tokenizer import MAX_LENGTH, PER_CHUNK, ClipTokenizer

PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO of a CaT, HDR!!",
    "hello!  world!!  (masterpiece:1.2), [best quality]",
    "  leading and trailing\twhitespace\nnew line  ",
    "it's what we're doing, they'll've gone; I'd say",
    "café naïve résumé — «quotes» “curly” ‘single’",
    "日本語のプロンプト 中文提示 한국어",
    "emoji 🙂🚀 and symbols ©®™ ∑∞≈",
    "ﬁ ligature, Ａ fullwidth, Å combining",
    "numbers 1234567 3.14159 1e-5 $99 50% #1",
    "<|startoftext|> special <|endoftext|> tokens",
    "x" * 300,
    " ".join(f"word{i}" for i in range(120)),
]


@pytest.fixture(scope="module", params=["tokenizer", "tokenizer_2"])
def pair(request: pytest.FixtureRequest, tiny_folder: Callable[[str], Path]) -> tuple[ClipTokenizer, CLIPTokenizer]:
    # tokenizer_2 pads with "!" like the released SDXL checkpoints.
    folder = tiny_folder("tiny-sdxl") / request.param
    return ClipTokenizer(folder), CLIPTokenizer.from_pretrained(str(folder))


def test_ids_equal_transformers(pair: tuple[ClipTokenizer, CLIPTokenizer]) -> None:
    ours, ref = pair
    expected = ref(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    got = ours(PROMPTS)
    assert got.ids.dtype == np.int64 and got.ids.shape == (len(PROMPTS), MAX_LENGTH)
    for prompt, want, have in zip(PROMPTS, expected, got.ids.tolist(), strict=True):
        assert have == want, prompt


def test_truncation_reports_what_diffusers_warns_about(pair: tuple[ClipTokenizer, CLIPTokenizer]) -> None:
    ours, ref = pair
    prompt = PROMPTS[-1]
    untruncated = ref(prompt, padding="longest").input_ids
    # diffusers: tokenizer.batch_decode(untruncated_ids[:, model_max_length - 1 : -1])
    expected = ref.batch_decode([untruncated[MAX_LENGTH - 1:-1]])[0]
    result = ours([prompt, "short"])
    assert result.dropped == (expected,)
    assert ours(["short"]).dropped == ()


def test_chunks_cover_the_whole_prompt(pair: tuple[ClipTokenizer, CLIPTokenizer]) -> None:
    ours, ref = pair
    prompt = PROMPTS[-1]
    content = ref(prompt, add_special_tokens=False).input_ids
    chunks = ours.chunks_needed(prompt)
    assert chunks == -(-len(content) // PER_CHUNK)
    rows = ours([prompt, "a cat"], chunks).ids.reshape(2, chunks, MAX_LENGTH)
    assert (rows[:, :, 0] == ours.bos_id).all()
    first = rows[0]
    pieces = [list(row[1:1 + PER_CHUNK]) for row in first]
    flat = [t for piece in pieces for t in piece]
    assert flat[: len(content)] == content
    # Every chunk closes with eos, then padding; "a cat" gets an empty second chunk (bos, eos, padding).
    assert rows[1, 1, 1] == ours.eos_id and (rows[1, 1, 2:] == ours.pad_id).all()
    with pytest.raises(ValueError, match="chunk"):
        ours([prompt], chunks - 1)

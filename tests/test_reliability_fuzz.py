"""Mutated copies of a compiled folder: refused, or accepted with the untouched folder's image; never a crash.

A seeded sample runs in CI; the full 300 mutations are opt-in (``-m slow``).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from pathlib import Path

import pytest

from fakes.folder_fuzz import BAD, MUTATIONS, fuzz

PRESET = "tiny-sd15"


def _check(outcomes: list, count: int) -> None:
    bad = [o for o in outcomes if o.result in BAD]
    assert not bad, "\n".join(f"{o.seed} {o.result}: {o.mutation} :: {o.detail}" for o in bad)
    results = collections.Counter(o.result for o in outcomes)
    assert len(outcomes) == count and results["refused"] >= count // 2, results  # most mutations matter


def test_a_sample_of_mutated_folders_is_refused_or_unchanged(tiny_folder: Callable[[str], Path],
                                                             tmp_path: Path) -> None:
    outcomes = fuzz(tiny_folder(PRESET), tmp_path / "work", range(30))
    _check(outcomes, 30)
    assert {o.mutation.split()[0] for o in outcomes} >= {"flip", "truncate", "delete", "manifest"}


@pytest.mark.slow
def test_300_mutated_folders(tiny_folder: Callable[[str], Path], tmp_path: Path) -> None:
    outcomes = fuzz(tiny_folder(PRESET), tmp_path / "work", range(300))
    _check(outcomes, 300)
    assert len({o.mutation.split()[0] for o in outcomes}) >= len(MUTATIONS) - 2

"""Per-image noise streams: the torch mode draws what diffusers draws; a batch equals its images one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from sdexport.runtime.noise import MAX_SEED, NoiseStreams, check_seeds


def test_torch_mode_equals_diffusers_randn_tensor_with_generator_lists() -> None:
    seeds = [3, 99, 2**40]
    streams = NoiseStreams(seeds, "torch")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for shape in [(4, 9, 7), (4, 9, 7), (3, 2, 2)]:  # consecutive draws keep advancing each stream
        ref = randn_tensor((len(seeds), *shape), generator=generators, dtype=torch.float32).numpy()
        np.testing.assert_array_equal(streams.draw(shape), ref)


@pytest.mark.parametrize("rng", ["numpy", "torch"])
def test_a_batch_equals_its_images_drawn_alone(rng: str) -> None:
    together = NoiseStreams([5, 6, 7], rng)
    alone = [NoiseStreams([s], rng) for s in (5, 6, 7)]
    for _ in range(3):
        batch = together.draw((4, 8, 8))
        assert batch.dtype == np.float32 and batch.shape == (3, 4, 8, 8)
        for index, stream in enumerate(alone):
            np.testing.assert_array_equal(batch[index:index + 1], stream.draw((4, 8, 8)))


def test_streams_are_independent_and_seeded() -> None:
    a, b = NoiseStreams([1, 2]).draw((16,)), NoiseStreams([1, 2]).draw((16,))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], a[1])
    assert abs(float(NoiseStreams([1]).draw((100_000,)).std()) - 1.0) < 0.02


def test_seed_rules() -> None:
    assert check_seeds(10, 3) == [10, 11, 12]
    assert check_seeds([4, 4, 9], 3) == [4, 4, 9]
    fresh = check_seeds(None, 2)
    assert fresh[1] == fresh[0] + 1 and 0 <= fresh[0] <= MAX_SEED
    with pytest.raises(ValueError, match="one per image"):
        check_seeds([1, 2], 3)
    with pytest.raises(ValueError, match="out of range"):
        check_seeds(-1, 1)
    with pytest.raises(ValueError, match="must be an int"):
        check_seeds("7", 1)
    with pytest.raises(ValueError, match="rng='jax'"):
        NoiseStreams([1], "jax")

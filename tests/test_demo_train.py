"""The demo's training script: min-SNR weights, and a few updates that are deterministic given the seed."""

from __future__ import annotations

from pathlib import Path

import torch

from sdexport.demo import train


def test_min_snr_weights_keep_noisy_timesteps_and_damp_clean_ones() -> None:
    alphas_cumprod = torch.tensor([0.999, 0.9, 0.5, 0.01])  # SNR 999, 9, 1, ~0.0101
    weights = train._snr_weights(alphas_cumprod, gamma=5.0)(torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(weights, torch.tensor([5.0 / 999.0, 5.0 / 9.0, 1.0, 1.0]),
                               rtol=1e-4, atol=0)  # float32: SNR near 1000 is inexact
    plain = train._snr_weights(alphas_cumprod, gamma=0.0)(torch.tensor([0, 3]))
    assert plain.tolist() == [1.0, 1.0]


def _train(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    code = train.main(["--out", str(out), "--logging-dir", str(out.parent / f"{out.name}-logs"), "--images", "64",
                       "--batch-size", "8", "--vae-batch-size", "8", "--vae-steps", "2", "--unet-steps", "3"])
    assert code == 0
    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_a_short_run_saves_a_pipeline_and_repeats_bit_for_bit(tmp_path: Path) -> None:
    first, second = _train(tmp_path / "a"), _train(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "a" / "model_index.json").is_file() and (tmp_path / "a" / "tokenizer" / "vocab.json").is_file()

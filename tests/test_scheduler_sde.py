"""DPM++ SDE's noise: the joint distribution of its Brownian increments, ours and diffusers' (torchsde), and
end-to-end parity with diffusers given the same increments.

The per-step outputs given the same noise are checked in test_schedulers_more.py (``dpmpp_sde`` in its sweep),
with diffusers' Brownian sampler replaced by fakes/brownian.py.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
import pytest

from fakes.brownian import brownian_sampler
from fakes.parity import IMAGE_ATOL, LATENT_ATOL
from sdexport.runtime.schedulers import load_scheduler

SAMPLES = 200_000
# Sample statistics of SAMPLES independent values: 6 standard errors (a false failure about once in 5e8).
MEAN_ATOL = 6 / math.sqrt(SAMPLES)
VAR_ATOL = 6 * math.sqrt(2 / SAMPLES)
COV_ATOL = 6 / math.sqrt(SAMPLES)  # the standard error of a sample covariance of unit normals is <= 1/sqrt(n)


def nested_levels(plan: Any, i: int) -> tuple[float, float, float]:
    """``(s, m, n)`` of the step whose first evaluation is entry ``i``: from, midpoint and target sigma."""
    s = plan.entries[i].noise_coefs[1]
    n = plan.entries[i + 1].noise_coefs[1]
    m = math.sqrt(plan.entries[i + 1].input_scale ** 2 - 1)
    return s, m, n


def our_increments(steps: int, seed: int) -> tuple[Any, list[np.ndarray]]:
    """The normalised noise of every noisy evaluation of a DPM++ SDE run, recovered from the steps' outputs.

    Each step starts from 0 and the model output makes x0 = 0 (epsilon: ``sample / sigma``), so
    ``prev = z * sigma_up`` at both of its evaluations.
    """
    plan = load_scheduler({}, "dpmpp_sde_karras").plan(steps)
    rng = np.random.default_rng(seed)
    run, x, zs = plan.start(), np.zeros(SAMPLES, np.float32), []
    for i in range(len(plan)):
        if not plan.needs_noise[i]:
            break
        if i % 2 == 0:
            x = np.zeros(SAMPLES, np.float32)
        level = plan.entries[i].coefs.level.sigma
        xi = rng.standard_normal(SAMPLES).astype(np.float32)
        prev = run.step((x / np.float32(level)).astype(np.float32), i, x, noise=xi).prev_sample
        zs.append(prev.astype(np.float64) / plan.entries[i].coefs.noise_scale)
        x = prev
    return plan, zs


def check_joint(plan: Any, zs: list[np.ndarray]) -> None:
    """Each z is N(0, 1); a step's two are correlated sqrt((s - m) / (s - n)); different steps are independent."""
    for k, z in enumerate(zs):
        assert abs(z.mean()) < MEAN_ATOL, f"draw {k}: mean {z.mean():.4f}"
        assert abs(z.var() - 1) < VAR_ATOL, f"draw {k}: variance {z.var():.4f}"
    for k in range(0, len(zs), 2):
        s, m, n = nested_levels(plan, k)
        expected = math.sqrt((s - m) / (s - n))
        cov = float(np.mean(zs[k] * zs[k + 1]))
        assert abs(cov - expected) < COV_ATOL, f"step {k // 2}: cov {cov:.4f}, expected {expected:.4f}"
        if k + 2 < len(zs):
            for a, b in ((k, k + 2), (k + 1, k + 2), (k + 1, k + 3)):
                cross = float(np.mean(zs[a] * zs[b]))
                assert abs(cross) < COV_ATOL, f"draws {a} and {b} of different steps: cov {cross:.4f}"


@pytest.mark.parametrize("steps", [2, 5])
def test_our_increments_have_the_brownian_joint_distribution(steps):
    plan, zs = our_increments(steps, seed=steps)
    assert len(zs) == 2 * (steps - 1)
    check_joint(plan, zs)


# torchsde warns when a query endpoint rounds past its float32 ends (diffusers' own calls do the same)
@pytest.mark.filterwarnings("ignore:Should have t")
def test_diffusers_brownian_tree_has_the_documented_distribution():
    """The distribution we reproduce is the one torchsde's tree gives diffusers (per element, 200k elements)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    plan = load_scheduler({}, "dpmpp_sde_karras").plan(3)
    sig = [plan.entries[i].noise_coefs[1] for i in range(len(plan))]
    sampler = BrownianTreeNoiseSampler(torch.zeros(SAMPLES), min(s for s in sig if s > 0), max(sig), seed=3)
    zs = []
    for k in range(0, len(plan) - 1, 2):
        s, m, n = nested_levels(plan, k)
        zs += [sampler(torch.tensor(s), torch.tensor(m)).double().numpy(),
               sampler(torch.tensor(s), torch.tensor(n)).double().numpy()]
    check_joint(plan, zs)


def test_txt2img_matches_diffusers_given_the_same_increments(parity_run: Any, monkeypatch: Any) -> None:
    """diffusers' Brownian sampler is fed the generator draws our pipeline takes after the initial latents."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torchsde")
    gen = torch.Generator().manual_seed(11)
    latents_drawn: list[bool] = []

    def draw(shape: tuple) -> Any:
        if not latents_drawn:  # the pipeline drew the initial latents from this generator first
            torch.randn(shape, generator=gen, dtype=torch.float32)
            latents_drawn.append(True)
        return torch.randn(shape, generator=gen, dtype=torch.float32).numpy()

    module = sys.modules[diffusers.DPMSolverSDEScheduler.__module__]
    monkeypatch.setattr(module, "BrownianTreeNoiseSampler", brownian_sampler(draw))
    run = parity_run("tiny-sd15", "txt2img", seeds=[11], prompt="a red circle", num_inference_steps=5,
                     scheduler="DPMSolverSDEScheduler", scheduler_config={"use_karras_sigmas": True})
    assert latents_drawn, "diffusers never asked its Brownian sampler for noise"
    assert run.latent_diff <= LATENT_ATOL, f"final latents differ by {run.latent_diff:.3g}"
    assert run.image_diff <= IMAGE_ATOL, f"images differ by {run.image_diff * 255:.3g}/255"

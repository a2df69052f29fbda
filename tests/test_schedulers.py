"""Step-by-step parity of sdexport's runtime schedulers with diffusers (the oracle), on numpy and torch.

Both sides run the same closed denoising loop (the harness, tolerances and noise fields are in
fakes/scheduler_runs.py): the same deterministic pseudo-model (a fixed function of the model input and the
timestep) and the same injected noise draws (diffusers' ``randn_tensor`` is patched to hand out the draws our
loop passes as ``noise=``). Every per-step output is compared.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from fakes.scheduler_runs import (  # noqa: E402
    BASES,
    STEPS,
    ZSNR,
    compare,
    our_run,
    reference_run,
    to_numpy,
    tol_for,
)
from fakes.schedulers import ALIASES, SD15, SDXL  # noqa: E402
from sdexport.runtime.schedulers import SchedulerConfigError, load_scheduler  # noqa: E402
from sdexport.runtime.schedulers.registry import resolve_name  # noqa: E402


def _case(alias: str, base: str, eta: float = 0.0, **overrides: Any) -> Any:
    tag = ",".join(f"{k}={v}" for k, v in overrides.items())
    return pytest.param(
        alias, base, overrides, eta, id=f"{alias}-{base}{'-eta' if eta else ''}-{tag}".rstrip("-")
    )


def _sweep() -> list:
    common = [(base, {}) for base in BASES]
    per = {
        "ddpm": [
            ("sd15", {"prediction_type": "sample"}),
            ("sd15", {"variance_type": "fixed_small_log"}),
            ("sd15", {"variance_type": "fixed_large", "clip_sample": True}),
            ("sd15", {"thresholding": True, "sample_max_value": 1.5}),
            ("sd15", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}),
            ("sd15", {"beta_schedule": "sigmoid"}),
        ],
        "ddim": [
            ("sd15", {"prediction_type": "sample"}),
            ("sd15", {"set_alpha_to_one": True, "clip_sample": True}),
            ("sd15", {"timestep_spacing": "linspace", "thresholding": True}),
        ],
        "pndm": [
            ("sd15", {"skip_prk_steps": False}),
            ("sd15", {"set_alpha_to_one": True}),
            ("sd15", {"timestep_spacing": "linspace", "beta_schedule": "linear"}),
        ],
        "euler": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("sdxl", {"use_exponential_sigmas": True}),
            ("sdxl", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
            ("sdxl", {"interpolation_type": "log_linear"}),
            ("sdxl", {"final_sigmas_type": "sigma_min"}),
            ("zsnr", {"timestep_type": "continuous"}),
            ("sdxl", {"prediction_type": "sample"}),
        ],
        "euler_a": [("sdxl", {"timestep_spacing": "linspace"})],
        "heun": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("bounds", {"use_karras_sigmas": True}),
            ("sdxl", {"use_exponential_sigmas": True}),
            ("sd15", {"prediction_type": "sample", "clip_sample": True}),
            ("sd15", {"beta_schedule": "exp"}),
        ],
        "dpmpp_2m": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("bounds", {"use_karras_sigmas": True}),
            ("sd15", {"solver_order": 3}),
            ("sd15", {"solver_order": 1}),
            ("sd15", {"solver_type": "heun", "lower_order_final": False}),
            ("sd15", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
            ("sd15", {"use_lu_lambdas": True}),
            ("sd15", {"lambda_min_clipped": -5.1}),
            ("sd15", {"thresholding": True, "sample_max_value": 2.0, "prediction_type": "sample"}),
            ("sd15", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}),
            ("sdxl", {"use_exponential_sigmas": True}),
        ],
        "dpmpp_2m_sde": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("sd15", {"solver_type": "heun"}),
            ("sd15", {"solver_order": 3}),
        ],
        "dpm_2m": [("sd15", {"solver_order": 3}), ("sd15", {"solver_type": "heun", "thresholding": True})],
        "dpm_2m_sde": [("sd15", {"solver_type": "heun"})],
        "unipc": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("sd15", {"solver_type": "bh1"}),
            ("sd15", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
            ("sd15", {"solver_order": 3}),
            ("sd15", {"predict_x0": False}),
            ("sd15", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
            ("sd15", {"disable_corrector": [0, 2]}),
            ("sd15", {"final_sigmas_type": "sigma_min"}),
            ("sd15", {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}),
            ("sd15", {"use_exponential_sigmas": True}),
            ("sd15", {"thresholding": True}),
        ],
        "lms": [
            ("sdxl", {"use_karras_sigmas": True}),
            ("sdxl", {"use_exponential_sigmas": True}),
            ("sd15", {"prediction_type": "sample"}),
        ],
        "lcm": [("sd15", {"original_inference_steps": 50}), ("sd15", {"thresholding": True})],
    }
    cases = []
    for alias, extra in per.items():
        for base, overrides in common + extra:
            if alias == "euler_a" and base == "sd15":
                cases.append(_case(alias, "sd15", prediction_type="v_prediction"))
            cases.append(_case(alias, base, **overrides))
    cases += [_case("ddim", "sd15", eta=0.5), _case("ddim", "zsnr", eta=0.5), _case("ddim", "sdxl", eta=1.0)]
    return cases


def _float_timesteps(overrides: dict) -> bool:
    keys = ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas")
    return any(overrides.get(k) for k in keys) or overrides.get("timestep_type") == "continuous"


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(("alias", "base", "overrides", "eta"), _sweep())
def test_matches_diffusers_step_by_step(alias, base, overrides, eta, n, monkeypatch):
    config = BASES[base]
    try:
        ref = reference_run(alias, config, overrides, n, monkeypatch, eta=eta)
    except (ValueError, NotImplementedError) as exc:  # diffusers refuses this combination: so must we
        with pytest.raises(ValueError):
            our_run(alias, config, overrides, n, eta=eta)
        pytest.skip(f"diffusers refuses it too: {exc}")
    if not all(np.isfinite(to_numpy(x)).all() for x in ref["prev"]):
        # diffusers returns NaN / inf with this configuration (an infinite coefficient at the last step): we
        # refuse it when planning, with a message saying which keys to change
        with pytest.raises(SchedulerConfigError, match="non-finite"):
            our_run(alias, config, overrides, n, eta=eta)
        return
    # At zero SNR a 1-ulp table difference (see fakes.scheduler_runs.TOL_ZSNR) moves a whole trajectory; there
    # each step starts from diffusers' own input, so every step's arithmetic is compared on its own.
    inputs = [ref["start"], *ref["prev"][:-1]] if config.get("rescale_betas_zero_snr") else None
    ours = our_run(alias, config, overrides, n, eta=eta, inputs=inputs)
    compare(ours, ref, _float_timesteps(overrides), tol_for(config), zsnr=inputs is not None)


TORCH_CASES = [
    ("pndm", SD15, {}),
    ("euler", SDXL, {}),
    ("euler_a", ZSNR, {}),
    ("heun", SDXL, {"use_karras_sigmas": True}),
    ("dpmpp_2m_sde", SDXL, {"use_karras_sigmas": True}),
    ("unipc", SD15, {"solver_order": 3}),
    ("lms", SD15, {}),
    ("lcm", SD15, {}),
    ("ddpm", SD15, {"thresholding": True}),
    ("ddim", ZSNR, {}),
]


@pytest.mark.parametrize(("alias", "config", "overrides"), TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_same_code_runs_on_torch_tensors(alias, config, overrides, monkeypatch):
    ref = reference_run(alias, config, overrides, 20, monkeypatch, strength=0.7, renoise=True)
    ours = our_run(alias, config, overrides, 20, xp="torch", strength=0.7, renoise=True)
    compare(ours, ref, _float_timesteps(overrides), tol_for(config))
    on_numpy = our_run(alias, config, overrides, 20, strength=0.7)
    for a, b in zip(ours["prev"], on_numpy["prev"], strict=True):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-6, atol=1e-6)  # same arithmetic on both array types


WINDOWS = [
    {"strength": 0.3},
    {"strength": 0.75},
    {"strength": 1.0},
    {"denoising_end": 0.8},
    {"denoising_start": 0.8},
    {"denoising_start": 0.65},
    {"denoising_end": 0.55},
    {"denoising_start": 0.3, "denoising_end": 0.7},
]


@pytest.mark.parametrize("n", [7, 25])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: ",".join(f"{k}={v}" for k, v in w.items()))
@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_truncated_schedules_match_the_pipelines(base, alias, window, n, monkeypatch):
    """img2img strength, SDXL base (denoising_end) / refiner (denoising_start), inpainting re-noise."""
    config = BASES[base]
    ref = reference_run(alias, config, {}, n, monkeypatch, renoise=True, **window)
    ours = our_run(alias, config, {}, n, renoise=True, **window)
    compare(ours, ref, False)


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("split", [0.8, 0.7, 0.5])
def test_base_to_refiner_hand_off(alias, split, monkeypatch):
    """The SDXL ensemble of experts: base with denoising_end, refiner continues from its latents."""
    n = 30
    base_ref = reference_run(alias, SDXL, {}, n, monkeypatch, denoising_end=split)
    base_ours = our_run(alias, SDXL, {}, n, denoising_end=split)
    compare(base_ours, base_ref, False)
    full = load_scheduler(SDXL, alias).plan(n)
    refiner = load_scheduler(SDXL, alias).plan(n, denoising_start=split)
    ref_sched = getattr(diffusers, full.scheduler.class_name).from_config(SDXL, **resolve_name(alias).preset)
    ref_sched.set_timesteps(n)
    ts, steps = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref_sched), n, 0.3, "cpu", denoising_start=split
    )
    np.testing.assert_array_equal(refiner.timesteps, ts.numpy())
    assert refiner.num_inference_steps == steps
    assert refiner.begin_index == len(full.timesteps) - steps
    # base and refiner together cover the whole schedule (second-order: the refiner re-runs the base's last
    # entry)
    assert len(base_ours["plan"]) + len(refiner) == len(full) + (full.order == 2)


def test_sdxl_denoising_end_source_is_unchanged():
    source = inspect.getsource(StableDiffusionXLPipeline.__call__)
    assert (
        "num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))"
        in source
    )
    assert "timesteps = timesteps[:num_inference_steps]" in source
    assert "- (self.denoising_end * self.scheduler.config.num_train_timesteps)" in source

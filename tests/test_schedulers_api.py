"""The scheduler API: registry, config reading (diffusers' from_config), errors and per-request state."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
from pathlib import Path

import numpy as np
import pytest

import sdexport.runtime.schedulers as schedulers
from fakes.schedulers import ALIASES, SD15, SHAPE
from sdexport.runtime.schedulers import (
    SCHEDULER_CLASSES,
    SchedulerConfigError,
    get_scheduler_class,
    load_scheduler,
    scheduler_names,
)


def _run(plan, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32) * plan.init_noise_sigma
    run, out = plan.start(), []
    for i, t in enumerate(plan.timesteps):
        m = np.tanh(plan.scale_model_input(x, i)) * np.float32(math.cos(float(t) / 300))
        noise = rng.standard_normal(SHAPE).astype(np.float32) if plan.needs_noise[i] else None
        x = run.step(m, i, x, noise=noise).prev_sample
        out.append(x)
    return out


# --- config reading
# ---------------------------------------------------------------------------------------------


def test_config_keys_and_defaults_are_diffusers_init_arguments():
    diffusers = pytest.importorskip("diffusers")
    for cls in SCHEDULER_CLASSES:
        params = inspect.signature(getattr(diffusers, cls.class_name).__init__).parameters
        expected = {k: p.default for k, p in params.items() if k != "self"}
        assert dict(cls.defaults) == expected, cls.class_name


@pytest.mark.parametrize(
    "config",
    [
        SD15,
        {
            **SD15,
            "_class_name": "EulerDiscreteScheduler",
            "timestep_spacing": "leading",
            "prediction_type": "v_prediction",
        },
        {
            **SD15,
            "_use_default_values": ["steps_offset", "beta_start"],
            "thresholding": True,
            "solver_order": 3,
        },
        {"_class_name": "NotADiffusersClass", "beta_schedule": "linear", "use_karras_sigmas": True, "eta": 3},
    ],
    ids=["sd15", "from-euler", "use-default-values", "foreign-keys"],
)
@pytest.mark.parametrize("cls", SCHEDULER_CLASSES, ids=lambda c: c.class_name)
def test_reads_configs_like_diffusers_from_config(cls, config):
    diffusers = pytest.importorskip("diffusers")
    ref = getattr(diffusers, cls.class_name).from_config(config)
    ours = load_scheduler(config, cls.class_name)
    for key in cls.defaults:
        assert ours.config[key] == ref.config[key], key


def test_alias_presets_and_overrides_apply_over_the_config():
    sched = load_scheduler(SD15, "dpmpp_2m_sde_karras", overrides={"solver_order": 3})
    assert type(sched).__name__ == "DPMSolverMultistepScheduler"
    assert sched.config["algorithm_type"] == "sde-dpmsolver++"
    assert sched.config["use_karras_sigmas"] is True
    assert sched.config["solver_order"] == 3
    assert sched.config["beta_schedule"] == "scaled_linear"  # from the config
    assert load_scheduler(SD15).class_name == "PNDMScheduler"  # the config's own class


def test_registry_names():
    names = scheduler_names()
    for alias in ALIASES + ["euler_karras", "dpmpp_2m_karras", "dpm_2m", "dpmpp_3m", "euler_ancestral"]:
        assert alias in names
    for cls in SCHEDULER_CLASSES:
        assert get_scheduler_class(cls.class_name) is cls
        assert get_scheduler_class(cls.class_name.upper()) is cls
    assert get_scheduler_class("euler_a").class_name == "EulerAncestralDiscreteScheduler"
    assert get_scheduler_class("dpmpp_2m_sde").class_name == "DPMSolverMultistepScheduler"
    with pytest.raises(ValueError, match="unknown scheduler 'NoSuchScheduler'.*euler_a"):
        get_scheduler_class("NoSuchScheduler")
    with pytest.raises(ValueError, match="no _class_name"):
        load_scheduler({"beta_schedule": "linear"})


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("ddpm", {"variance_type": "learned_range"}, "variance_type"),
        ("ddpm", {"beta_schedule": "cosine"}, "beta_schedule"),
        ("ddim", {"timestep_spacing": "uniform"}, "timestep_spacing"),
        ("pndm", {"prediction_type": "sample"}, "prediction_type"),
        ("euler", {"use_beta_sigmas": True, "use_karras_sigmas": True}, "use_beta_sigmas"),
        ("euler", {"interpolation_type": "cubic"}, "interpolation_type"),
        ("euler", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ("euler_a", {"prediction_type": "sample"}, "prediction_type"),
        ("heun", {"use_karras_sigmas": True, "use_exponential_sigmas": True}, "use_karras_sigmas"),
        ("dpmpp_2m", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("dpmpp_2m", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("dpmpp_2m", {"algorithm_type": "dpmsolver", "final_sigmas_type": "zero"}, "final_sigmas_type"),
        ("dpm_2m_sde", {"solver_order": 3}, "solver_order"),
        ("dpmpp_2m", {"solver_order": 4}, "solver_order"),
        ("unipc", {"solver_p": "ddim"}, "solver_p"),
        ("unipc", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("lms", {"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ("euler", {"not_a_key": 1}, "not_a_key"),
    ],
)
def test_unsupported_config_values_raise_naming_the_key(name, overrides, key):
    with pytest.raises(SchedulerConfigError, match=key):
        load_scheduler(SD15, name, overrides).plan(10)


def test_irrelevant_keys_are_accepted():
    # keys other schedulers use (SDXL's Euler config read by DDIM, PNDM's skip_prk_steps read by Euler, ...)
    sdxl_like = {
        **SD15,
        "interpolation_type": "log_linear",
        "use_karras_sigmas": True,
        "sample_max_value": 5.0,
    }
    for name in ALIASES:
        assert len(load_scheduler(sdxl_like, name).plan(4)) >= 4


# --- request validation
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, None])
def test_step_count_out_of_range(name, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        load_scheduler(SD15, name).plan(steps)


@pytest.mark.parametrize("strength", [0, 0.0, -0.1, 1.5, float("nan"), "0.5"])
def test_strength_out_of_range(strength):
    with pytest.raises(ValueError, match=r"strength=.*allowed: 0 < strength <= 1"):
        load_scheduler(SD15, "euler").plan(20, strength=strength)


def test_strength_leaving_no_step():
    with pytest.raises(ValueError, match="no denoising step left"):
        load_scheduler(SD15, "euler").plan(10, strength=0.05)
    assert len(load_scheduler(SD15, "euler").plan(10, strength=0.1)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"denoising_start": 0.0},
        {"denoising_start": 1.0},
        {"denoising_end": 1.2},
        {"denoising_end": 0},
        {"denoising_start": 0.7, "denoising_end": 0.7},
    ],
)
def test_denoising_fractions_out_of_range(kwargs):
    with pytest.raises(ValueError, match="denoising_"):
        load_scheduler(SD15, "euler").plan(20, **kwargs)


def test_eta_only_for_ddim():
    with pytest.raises(ValueError, match="only DDIMScheduler"):
        load_scheduler(SD15, "euler").plan(20, eta=0.3)
    with pytest.raises(ValueError, match="0 <= eta <= 1"):
        load_scheduler(SD15, "ddim").plan(20, eta=1.5)
    assert all(load_scheduler(SD15, "ddim").plan(20, eta=0.3).needs_noise)
    assert not any(load_scheduler(SD15, "ddim").plan(20).needs_noise)


def test_lcm_steps_bounded_by_original_inference_steps():
    with pytest.raises(ValueError, match="original_inference_steps"):
        load_scheduler(SD15, "lcm").plan(51)


def test_stepper_misuse():
    plan = load_scheduler(SD15, "euler_a").plan(5)
    x = np.zeros(SHAPE, np.float32)
    run = plan.start()
    with pytest.raises(ValueError, match="needs noise"):
        run.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step 0, got 1"):
        run.step(x, 1, x, noise=x)
    with pytest.raises(IndexError, match="out of range"):
        plan.scale_model_input(x, 5)
    deterministic = load_scheduler(SD15, "euler").plan(5).start()
    with pytest.raises(ValueError, match="takes no noise"):
        deterministic.step(x, 0, x, noise=x)


@pytest.mark.parametrize("name", [*ALIASES, "dpmpp_2m_karras", "unipc_karras", "heun_karras", "dpm_2m"])
@pytest.mark.parametrize(
    "config",
    [
        SD15,
        {
            **SD15,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
    ],
    ids=["sd15", "zsnr"],
)
def test_one_step_is_finite_and_float32(name, config):
    (x,) = _run(load_scheduler(config, name).plan(1))[-1:]
    assert x.dtype == np.float32 and np.isfinite(x).all()


def test_ddim_eta_one_at_zero_terminal_snr_stays_finite():
    # The direction coefficient is sqrt(1 - a_prev - std^2), exactly 0 here; in float32 the difference can round
    # below zero (diffusers then returns NaN on some CPUs, depending on torch's rounding): ours clamps it to 0.
    config = {
        **SD15,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
    }
    assert all(np.isfinite(x).all() for x in _run(load_scheduler(config, "ddim").plan(10, eta=1.0)))


# --- per-request state
# ----------------------------------------------------------------------------------------------


def test_plans_are_immutable_and_tables_read_only():
    sched = load_scheduler(SD15, "dpmpp_2m")
    plan = sched.plan(10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_inference_steps = 3
    with pytest.raises(ValueError):
        plan.timesteps[0] = 1
    with pytest.raises(ValueError):
        sched.alphas_cumprod[0] = 1
    with pytest.raises(TypeError):
        sched.config["solver_order"] = 3


@pytest.mark.parametrize("name", ["unipc", "pndm", "heun", "lms", "dpmpp_2m_sde"])
def test_interleaved_runs_of_one_plan_do_not_share_history(name):
    plan = load_scheduler(SD15, name).plan(12)
    alone = [_run(plan, seed) for seed in (1, 2)]
    runs = [plan.start(), plan.start()]
    rngs = [np.random.default_rng(seed) for seed in (1, 2)]
    xs = [r.standard_normal(SHAPE).astype(np.float32) * plan.init_noise_sigma for r in rngs]
    for i, t in enumerate(plan.timesteps):
        for k in (0, 1):  # one step of each request in turn
            m = np.tanh(plan.scale_model_input(xs[k], i)) * np.float32(math.cos(float(t) / 300))
            noise = rngs[k].standard_normal(SHAPE).astype(np.float32) if plan.needs_noise[i] else None
            xs[k] = runs[k].step(m, i, xs[k], noise=noise).prev_sample
    for k in (0, 1):
        np.testing.assert_array_equal(xs[k], alone[k][-1])


def test_heun_plan_lists_every_model_evaluation():
    plan = load_scheduler(SD15, "heun").plan(10)
    assert len(plan) == 19 and plan.num_inference_steps == 10 and plan.order == 2
    assert list(plan.timesteps[1::2]) == list(plan.timesteps[2::2])  # pairs share a timestep


def test_package_imports_neither_torch_nor_diffusers():
    forbidden = {"torch", "diffusers", "transformers", "scipy"}
    for path in Path(schedulers.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not {n.split(".")[0] for n in names} & forbidden, f"{path.name} imports {names}"

"""Step-by-step parity with diffusers of the beta sigma spacing and the schedulers added after the first set.

Same harness (fakes/scheduler_runs.py) and standard as ``test_schedulers.py``: the same pseudo-model and
injected noise on both sides, timesteps and every per-step output within 1e-5 x max|diffusers| (plus 4 float32
ulps of the step's input).
"""

from __future__ import annotations

import sys
from functools import partialmethod
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
scipy_stats = pytest.importorskip("scipy.stats")

from fakes import scheduler_runs  # noqa: E402
from fakes.scheduler_runs import (  # noqa: E402
    BASES,
    STEPS,
    compare,
    our_run,
    reference_run,
    to_numpy,
    tol_for,
)
from sdexport.runtime.schedulers import SchedulerConfigError, load_scheduler  # noqa: E402
from sdexport.runtime.schedulers.beta_dist import beta_cdf, beta_ppf  # noqa: E402
from sdexport.runtime.schedulers.registry import resolve_name  # noqa: E402

DERIVED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# schedulers whose timesteps are always computed from sigmas (interpolated in log-sigma), e.g. the midpoints of
# KDPM2 and DPM++ SDE (EDM: 0.25 log sigma)
DERIVED_ALIASES = {"dpm2", "dpm2_a", "dpmpp_sde", "edm_euler", "edm_dpmpp_2m", "edm_dpmpp_2m_sde"}
STEPWISE = {"edm_euler"}
# KDPM2 ancestral's sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels catastrophically in float32 when
# sigma_next << sigma (few steps): torch's float32 sqrt on this CPU is not correctly rounded for ~19% of the
# training sigmas, and a 1-ulp sigma there moves sigma_down by up to ~2%, hence the midpoint timestep near t = 0
# by up to ~0.02 (of 1000).
TIMESTEP_ATOL = {"dpm2_a": 0.05}
# At 2 steps that sigma_down is ~2e-3 x sigma_next, and the midpoint sigma (the x0 level of the corrector) moves
# with it: those runs get TOL_CANCEL (the other step counts keep TOL).
TOL_CANCEL = 1e-4
CANCEL_STEPS = {"dpm2_a": 2}


@pytest.mark.parametrize(("a", "b"), [(0.6, 0.6), (0.5, 2.0), (3.0, 0.7), (1.0, 1.0), (7.5, 7.5)])
@pytest.mark.parametrize("n", [1, 2, 7, 50, 1000])
def test_beta_ppf_matches_scipy(a, b, n):
    q = 1 - np.linspace(0, 1, n)
    ours, ref = beta_ppf(q, a, b), scipy_stats.beta.ppf(q, a, b)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-300)  # float64: a few ulps of the quantile
    np.testing.assert_allclose(beta_cdf(ours, a, b), q, rtol=1e-12, atol=1e-14)


def test_beta_ppf_refuses_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        beta_ppf(np.array([0.5]), 0.0, 0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        beta_ppf(np.array([1.5]), 0.6, 0.6)


# Configurations whose trajectories amplify float32 rounding ~100x (diffusers' own run, restarted from initial
# noise 1 ulp away, moves by ~7e-6 relative at 50 steps): they are allowed 4x diffusers' own sensitivity, measured.
SENSITIVE = [("dpmpp_2s_sde", {"solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"})]


def own_sensitivity(alias: str, config: dict, overrides: dict, n: int, monkeypatch: Any, ref: dict) -> float:
    """Max relative change of diffusers' per-step samples when its initial noise moves by one float32 ulp."""
    nudged = np.nextafter(scheduler_runs.INIT_NOISE, np.float32(np.inf))
    with monkeypatch.context() as m:
        m.setattr(scheduler_runs, "INIT_NOISE", nudged)
        other = reference_run(alias, config, overrides, n, m)
    return max(float(np.abs(to_numpy(a) - to_numpy(b)).max() / np.abs(to_numpy(b)).max())
               for a, b in zip(other["prev"], ref["prev"], strict=True))


# DEIS order 3's log-rho weights cancel ~1e4-fold in float32: torch's float32 sqrt on this CPU is 1 ulp off for
# ~19% of the training sigmas, which moves diffusers' own weights by ~1e-4. There diffusers is run on our sigma
# table, checked first to be within 1 ulp of its own, so its arithmetic is compared on equal inputs.
# SA-Solver's order-3/4 Lagrange weights cancel the same way, and enough for torch's float32 exp / log (not
# correctly rounded on this CPU, 0-d tensors included) to move them by up to 0.4%: there diffusers' scheduler
# module also gets correctly rounded exp / log / sqrt (float64, then rounded to float32, as ours), so equal
# algorithms give equal results. The default orders (2, 2) are compared against diffusers as it is.
EXACT_MATH = {"sa_solver"}
OUR_TABLE = [
    ("deis", {"solver_order": 3}),
    ("deis", {"solver_order": 3, "lower_order_final": False}),
    ("sa_solver", {"predictor_order": 3, "corrector_order": 4}),
    ("sa_solver", {"predictor_order": 3, "corrector_order": 3, "lower_order_final": False}),
]


def use_our_sigmas(alias: str, config: dict, overrides: dict, n: int, monkeypatch: Any) -> None:
    """Make diffusers' ``set_timesteps`` keep our float32 sigmas (after checking they are within 1 ulp)."""
    cls = getattr(diffusers, resolve_name(alias).cls.class_name)
    ours = load_scheduler(config, alias, overrides)._schedule(n).sigmas
    original = cls.set_timesteps

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        theirs = self.sigmas.numpy()
        assert np.abs(theirs.view(np.int32).astype(np.int64) - ours.view(np.int32)).max() <= 1
        self.sigmas = torch.from_numpy(ours.copy())

    monkeypatch.setattr(cls, "set_timesteps", patched)
    if alias in EXACT_MATH:
        monkeypatch.setattr(sys.modules[cls.__module__], "torch", _RoundedTorch())
        monkeypatch.setattr(cls, "_sigma_to_alpha_sigma_t", _rounded_alpha_sigma)


def _rounded_alpha_sigma(self: Any, sigma: Any) -> tuple:
    """diffusers' ``_sigma_to_alpha_sigma_t`` with a correctly rounded square root."""
    alpha_t = 1 / torch.sqrt((sigma**2 + 1).double()).float()
    return alpha_t, sigma * alpha_t


class _RoundedTorch:
    """``torch`` with exp / log / sqrt of float32 tensors computed in float64 and rounded once."""

    def __getattr__(self, name: str) -> Any:
        fn = getattr(torch, name)
        if name not in ("exp", "log", "sqrt"):
            return fn
        return lambda x, *a, **k: fn(x.double(), *a, **k).to(x.dtype) if x.dtype == torch.float32 else fn(x, *a, **k)


def check_parity(alias: str, base: str, overrides: dict, n: int, monkeypatch: Any, **req: Any) -> None:
    """Our run vs diffusers', as ``test_schedulers.test_matches_diffusers_step_by_step`` does."""
    config = BASES[base]
    if alias == "tcd":  # drive it as the pipelines do: eta passed explicitly, 0 when not given
        monkeypatch.setattr(diffusers.TCDScheduler, "step", partialmethod(diffusers.TCDScheduler.step, eta=0.0))
    if (alias, overrides) in OUR_TABLE:
        use_our_sigmas(alias, config, overrides, n, monkeypatch)
    try:
        ref = reference_run(alias, config, overrides, n, monkeypatch, **req)
    except (ValueError, NotImplementedError) as exc:  # diffusers refuses this combination: so must we
        with pytest.raises(ValueError):
            our_run(alias, config, overrides, n, **req)
        pytest.skip(f"diffusers refuses it too: {exc}")
    if not all(np.isfinite(to_numpy(x)).all() for x in ref["prev"]):
        with pytest.raises(SchedulerConfigError, match="non-finite"):
            our_run(alias, config, overrides, n, **req)
        return
    # zero SNR (see fakes.scheduler_runs.TOL_ZSNR) and EDM Euler (a first step from sigma_max ~ 80 whose result is
    # ~100x smaller: its 4-ulp input allowance is inherited by the next step) start each step from diffusers' input
    alone = config.get("rescale_betas_zero_snr") or alias in STEPWISE
    inputs = [ref["start"], *ref["prev"][:-1]] if alone else None
    ours = our_run(alias, config, overrides, n, inputs=inputs, **req)
    derived = any(overrides.get(k) for k in DERIVED) or alias in DERIVED_ALIASES
    if alias in TIMESTEP_ATOL:
        np.testing.assert_allclose(ours["plan"].timesteps, ref["timesteps"], rtol=1e-5, atol=TIMESTEP_ATOL[alias])
        ref = {**ref, "timesteps": ours["plan"].timesteps.copy()}
    tol = TOL_CANCEL if n <= CANCEL_STEPS.get(alias, 0) else tol_for(config)
    if (alias, overrides) in SENSITIVE:
        tol = max(tol, 4 * own_sensitivity(alias, config, overrides, n, monkeypatch, ref))
    compare(ours, ref, derived, tol, zsnr=bool(config.get("rescale_betas_zero_snr")))


BETA_CASES = [
    ("euler", "sdxl", {}),
    ("euler", "bounds", {}),
    ("euler", "zsnr", {}),
    ("heun", "sdxl", {}),
    ("lms", "sd15", {}),
    ("dpmpp_2m", "sdxl", {}),
    ("dpmpp_2m", "bounds", {}),
    ("dpmpp_2m_sde", "sd15", {}),
    ("unipc", "sd15", {}),
    ("unipc", "sd15", {"final_sigmas_type": "sigma_min"}),
]


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(("alias", "base", "overrides"), BETA_CASES, ids=lambda v: str(v))
def test_beta_sigmas_match_diffusers(alias, base, overrides, n, monkeypatch):
    check_parity(alias, base, {**overrides, "use_beta_sigmas": True}, n, monkeypatch)


def _sweep(per: dict[str, list[tuple[str, dict]]], bases: tuple[str, ...] = tuple(BASES)) -> list:
    cases = []
    for alias, extra in per.items():
        for base, overrides in [(b, {}) for b in bases] + extra:
            for eta in ETAS.get(alias, (0.0,)):
                tag = ",".join(f"{k}={v}" for k, v in overrides.items()) + (f"-eta={eta}" if eta else "")
                cases.append(pytest.param(alias, base, overrides, eta, id=f"{alias}-{base}-{tag}".rstrip("-")))
    return cases


SWEEP = {
    "dpm2": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("bounds", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"timestep_spacing": "leading", "steps_offset": 1}),
        ("sd15", {"prediction_type": "sample"}),
    ],
    "dpm2_a": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("sd15", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ],
    "dpmpp_sde": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("bounds", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("bounds", {"use_exponential_sigmas": True}),
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"timestep_spacing": "leading", "steps_offset": 1}),
        ("sd15", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        ("sd15", {"beta_schedule": "squaredcos_cap_v2"}),
        ("sd15", {"noise_sampler_seed": 7}),
    ],
    "dpmpp_2s": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("bounds", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("sd15", {"solver_type": "heun"}),
        ("sd15", {"lower_order_final": True}),
        ("sd15", {"final_sigmas_type": "sigma_min"}),
        ("sd15", {"final_sigmas_type": "sigma_min", "solver_type": "heun"}),
        ("sd15", {"solver_order": 1}),
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"thresholding": True, "sample_max_value": 2.0, "prediction_type": "sample"}),
        ("sd15", {"lambda_min_clipped": -5.1}),
        ("sd15", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
        ("sd15", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"}),
        ("sd15", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "prediction_type": "sample"}),
        ("sd15", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}),
    ],
    "dpmpp_3s": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("sd15", {"solver_type": "heun"}),
        ("sd15", {"final_sigmas_type": "sigma_min"}),
        ("sd15", {"final_sigmas_type": "sigma_min", "solver_type": "heun", "lower_order_final": True}),
        ("sd15", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
        ("sd15", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun"}),
    ],
    "dpmpp_2s_sde": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("sd15", {"solver_type": "heun"}),
        ("sd15", {"solver_order": 3}),
        ("sd15", {"solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ],
    "deis": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("bounds", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("sd15", {"solver_order": 3}),
        ("sd15", {"solver_order": 3, "lower_order_final": False}),
        ("sd15", {"solver_order": 1}),
        ("sd15", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        ("sd15", {"thresholding": True, "sample_max_value": 2.0, "prediction_type": "sample"}),
        ("sd15", {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"}),
    ],
    "edm_euler": [
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"sigma_schedule": "exponential"}),
        ("sd15", {"final_sigmas_type": "sigma_min", "sigma_data": 1.0, "sigma_max": 120.0, "rho": 5.0}),
    ],
    "edm_dpmpp_2m": [
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"sigma_schedule": "exponential"}),
        ("sd15", {"solver_type": "heun", "lower_order_final": False}),
        ("sd15", {"final_sigmas_type": "sigma_min", "sigma_data": 1.0, "sigma_max": 120.0}),
        ("sd15", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
        ("sd15", {"solver_order": 3}),
        ("sd15", {"solver_order": 1}),
        ("sd15", {"thresholding": True, "sample_max_value": 2.0}),
    ],
    "edm_dpmpp_2m_sde": [("sd15", {"solver_type": "heun"}), ("sd15", {"prediction_type": "v_prediction"})],
    "tcd": [
        ("sd15", {"prediction_type": "v_prediction"}),
        ("sd15", {"prediction_type": "sample"}),
        ("sd15", {"original_inference_steps": 100, "timestep_spacing": "trailing"}),
        ("zsnr", {"set_alpha_to_one": False}),
    ],
    "sa_solver": [
        ("sdxl", {"use_karras_sigmas": True}),
        ("sdxl", {"use_exponential_sigmas": True}),
        ("sdxl", {"use_beta_sigmas": True}),
        ("sd15", {"predictor_order": 3, "corrector_order": 4}),
        ("sd15", {"predictor_order": 1, "corrector_order": 1}),
        ("sd15", {"predictor_order": 3, "corrector_order": 3, "lower_order_final": False}),
        ("sd15", {"algorithm_type": "noise_prediction"}),
        ("sd15", {"algorithm_type": "noise_prediction", "predictor_order": 3, "corrector_order": 3}),
        ("sd15", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
        ("sd15", {"thresholding": True, "sample_max_value": 2.0, "prediction_type": "sample"}),
        ("sd15", {"lambda_min_clipped": -5.1}),
    ],
}
# TCD's gamma (diffusers' step(eta=...), default 0.3 there; the pipelines pass their eta, default 0)
ETAS = {"tcd": (0.0, 0.3, 1.0)}


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(("alias", "base", "overrides", "eta"), _sweep(SWEEP))
def test_matches_diffusers_step_by_step(alias, base, overrides, eta, n, monkeypatch):
    check_parity(alias, base, overrides, n, monkeypatch, eta=eta)


WINDOWS = [{"strength": 0.3}, {"strength": 1.0}, {"denoising_end": 0.8}, {"denoising_start": 0.65},
           {"denoising_start": 0.3, "denoising_end": 0.7}]


EDM = ("edm_euler", "edm_dpmpp_2m", "edm_dpmpp_2m_sde")
# EDM timesteps are 0.25 log sigma, not training timesteps: the SDXL denoising_start / denoising_end cut-offs
# (fractions of num_train_timesteps) leave diffusers nothing or everything there, so EDM runs strength windows.
TRUNCATED = [(a, w) for a in SWEEP for w in WINDOWS if a not in EDM or "strength" in w]


@pytest.mark.parametrize("n", [7, 25])
@pytest.mark.parametrize(("alias", "window"), TRUNCATED,
                         ids=[f"{a}-" + ",".join(f"{k}={v}" for k, v in w.items()) for a, w in TRUNCATED])
def test_truncated_schedules_match_the_pipelines(alias, window, n, monkeypatch):
    """img2img strength, SDXL base / refiner windows and the inpainting re-noise, as in the pipelines."""
    check_parity(alias, "sdxl", {}, n, monkeypatch, renoise=True, eta=ETAS.get(alias, (0.0,))[-1], **window)


@pytest.mark.parametrize("alias", EDM)
def test_edm_refuses_training_timestep_windows(alias):
    with pytest.raises(SchedulerConfigError, match="no denoising step left"):
        load_scheduler(BASES["sdxl"], alias).plan(25, denoising_end=0.8)


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("dpm2", {"prediction_type": "sample"}, "prediction_type"),
        ("dpm2_a", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("dpm2", {"use_beta_sigmas": True, "use_exponential_sigmas": True}, "use_beta_sigmas"),
        ("dpmpp_2s", {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
        ("dpmpp_2s", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("dpmpp_2s", {"use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ("dpmpp_2s", {"solver_order": 4}, "solver_order"),
        ("dpmpp_2s", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
         "thresholding"),
        ("dpmpp_2s", {"algorithm_type": "dpmsolver"}, "final_sigmas_type"),
        ("dpmpp_2s", {"timestep_spacing": "trailing"}, "timestep_spacing"),
        ("deis", {"algorithm_type": "unipc"}, "algorithm_type"),
        ("deis", {"solver_type": "bh3"}, "solver_type"),
        ("deis", {"use_flow_sigmas": True}, "use_flow_sigmas"),
        ("edm_euler", {"prediction_type": "sample"}, "prediction_type"),
        ("edm_euler", {"sigma_schedule": "linear"}, "sigma_schedule"),
        ("edm_dpmpp_2m_sde", {"solver_order": 3}, "solver_order"),
        ("edm_dpmpp_2m", {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
        ("edm_dpmpp_2m", {"algorithm_type": "dpmsolver"}, "algorithm_type"),
        ("tcd", {"beta_schedule": "sigmoid"}, "beta_schedule"),
        ("sa_solver", {"tau_func": "lambda t: 1"}, "tau_func"),
        ("sa_solver", {"predictor_order": 5}, "predictor_order"),
        ("sa_solver", {"algorithm_type": "dpmsolver++"}, "algorithm_type"),
        ("sa_solver", {"algorithm_type": "noise_prediction", "thresholding": True}, "thresholding"),
        ("sa_solver", {"use_flow_sigmas": True}, "use_flow_sigmas"),
    ],
)
def test_unsupported_config_values_raise_naming_the_key(name, overrides, key):
    with pytest.raises(SchedulerConfigError, match=key):
        load_scheduler(BASES["sd15"], name, overrides).plan(10)


def test_registry_names_and_defaults():
    import inspect

    import diffusers

    from sdexport.runtime.schedulers import get_scheduler_class, scheduler_names

    names = scheduler_names()
    for alias in [*SWEEP, "dpm2_karras", "dpmpp_2s_karras"]:
        assert alias in names
        cls = get_scheduler_class(alias)
        params = inspect.signature(getattr(diffusers, cls.class_name).__init__).parameters
        assert dict(cls.defaults) == {k: p.default for k, p in params.items() if k != "self"}
    assert get_scheduler_class("KDPM2AncestralDiscreteScheduler").class_name == "KDPM2AncestralDiscreteScheduler"

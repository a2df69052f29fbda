"""Step-by-step parity of sdexport's runtime schedulers with diffusers (the oracle), on numpy and torch.

Both sides run the same closed denoising loop: the same deterministic pseudo-model (a fixed function of the
model input and the timestep) and the same injected noise draws (diffusers' ``randn_tensor`` is patched to
hand out the draws our loop passes as ``noise=``). Every per-step output is compared.
"""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from fakes.schedulers import ALIASES, SD15, SDXL, SHAPE  # noqa: E402
from sdexport.runtime.schedulers import SchedulerConfigError, load_scheduler  # noqa: E402
from sdexport.runtime.schedulers.registry import resolve_name  # noqa: E402

ZSNR = {
    **SD15,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": True,
}
# sigma_min / sigma_max are not DPM-Solver or Heun __init__ keys, yet diffusers honours them for Karras sigmas
BOUNDS = {**SD15, "sigma_min": 0.05, "sigma_max": 12.0}
BASES = {"sd15": SD15, "sdxl": SDXL, "zsnr": ZSNR, "bounds": BOUNDS}

# fp32 parity: max|ours - diffusers| <= 1e-5 * max|diffusers| for every per-step output. Our float32 tables
# and per-step coefficients are computed with diffusers' float32 operations in its order.
TOL = 1e-5
# Zero-terminal-SNR rescaling subtracts nearly equal square roots near t = 999; torch's float32 sqrt (MKL VML)
# is not correctly rounded in rare near-ties (which ties depends on the CPU: on an AMD EPYC torch rounds
# sqrt(2**24 - 1) up to sigma_max = 4096, ours is the correctly rounded 4095.99976), and the rescale amplifies
# such 1-ulp differences ~100x there.
TOL_ZSNR = 5e-5
# A 1-ulp difference in a coefficient that multiplies the step's input sample shows up as ~1 ulp of that input,
# which at zero SNR (input ~ 4096 x noise) can exceed the relative bound on a small output: every comparison also
# allows 4 float32 ulps of the largest input it was computed from.
ULPS = 4 * float(np.finfo(np.float32).eps)
# The first zero-SNR step leaves the terminal timestep (alpha = 2**-12, sigma = 4096): whatever the scheduler's
# parametrisation, its terms there are ~4096 x the unit-variance sample, so it is allowed 4 ulps at that scale.
SIGMA_TERMINAL = float(np.sqrt((1 - 2.0**-24) / 2.0**-24))
STEPS = (1, 2, 5, 20, 50)

_RNG = np.random.default_rng(20240601)
FIELD = _RNG.standard_normal(SHAPE).astype(np.float32)
NOISES = [_RNG.standard_normal(SHAPE).astype(np.float32) for _ in range(128)]
INIT_NOISE = _RNG.standard_normal(SHAPE).astype(np.float32)
IMAGE = (0.8 * _RNG.standard_normal(SHAPE)).astype(np.float32)


def model(x: np.ndarray, t: Any) -> np.ndarray:
    """A deterministic stand-in for the UNet: a smooth function of its input and the timestep."""
    return (0.8 * np.tanh(x) + FIELD * np.float32(0.3 * np.cos(float(t) / 250.0))).astype(np.float32)


def to_numpy(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def assert_close(ours: Any, ref: Any, what: str, tol: float = TOL, operand: Any = None) -> None:
    """max|ours - ref| <= tol x max|ref| + ULPS x max|operand| (``operand``: the input the step started from)."""
    ours, ref = to_numpy(ours), to_numpy(ref)
    assert np.isfinite(ref).all(), f"{what}: the diffusers reference is not finite"
    assert np.isfinite(ours).all(), f"{what}: not finite"
    scale = max(float(np.abs(ref).max()), 1e-3)
    floor = 0.0 if operand is None else ULPS * float(np.abs(to_numpy(operand)).max())
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    assert err <= tol * scale + floor, (f"{what}: max abs error {err:.3g} > {tol} x max|diffusers| ({scale:.3g}) "
                                        f"+ {floor:.3g}")


class NoiseQueue:
    """Replaces diffusers' ``randn_tensor`` in a scheduler module: hands out NOISES in order."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any):
        assert tuple(shape) == SHAPE
        noise = torch.from_numpy(NOISES[self.count].copy()).to(dtype or torch.float32)
        self.count += 1
        return noise


def sdxl_denoising_end(scheduler: Any, timesteps: Any, denoising_end: float) -> tuple[Any, int]:
    # The inline code of StableDiffusionXLPipeline.__call__ ("8.1 Apply denoising_end");
    # test_sdxl_denoising_end_source_is_unchanged checks the installed diffusers still has it.
    discrete_timestep_cutoff = int(
        round(scheduler.config.num_train_timesteps - (denoising_end * scheduler.config.num_train_timesteps))
    )
    num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
    return timesteps[:num_inference_steps], num_inference_steps


def reference_run(alias: str, config: dict, overrides: dict, n: int, monkeypatch: Any, **req: Any) -> dict:
    """diffusers' scheduler driven like its pipelines drive it."""
    entry = resolve_name(alias)
    sched = getattr(diffusers, entry.cls.class_name).from_config(config, **{**entry.preset, **overrides})
    sched.set_timesteps(n)
    timesteps, steps = sched.timesteps, n
    holder = SimpleNamespace(scheduler=sched)
    if req.get("denoising_start") is not None:
        timesteps, steps = StableDiffusionXLImg2ImgPipeline.get_timesteps(
            holder, n, 0.3, "cpu", denoising_start=req["denoising_start"]
        )
    elif req.get("strength") is not None:
        timesteps, steps = StableDiffusionImg2ImgPipeline.get_timesteps(holder, n, req["strength"], "cpu")
    begin = len(sched.timesteps) - len(timesteps)
    if getattr(sched, "begin_index", None) is not None:
        assert sched.begin_index == begin
    if req.get("denoising_end") is not None:
        timesteps, steps = sdxl_denoising_end(sched, timesteps, req["denoising_end"])
    image, init = torch.from_numpy(IMAGE.copy()), torch.from_numpy(INIT_NOISE.copy())
    if req.get("denoising_start") is not None:
        x = image
    elif req.get("strength") is not None:
        x = sched.add_noise(image, init, timesteps[:1])
    else:
        x = init * sched.init_noise_sigma
        # Our plans start at entry 0, like a pipeline calling set_begin_index(0). diffusers' text-to-image
        # pipelines look the first timestep up instead, which only differs when it is duplicated (diffusers
        # then starts at the duplicate, e.g. squaredcos_cap_v2 + Karras, and runs off the schedule).
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
    queue = NoiseQueue()
    monkeypatch.setattr(sys.modules[type(sched).__module__], "randn_tensor", queue, raising=False)
    kwargs = {"eta": req["eta"]} if req.get("eta") else {}
    out: dict = {
        "timesteps": timesteps.numpy(),
        "steps": steps,
        "begin": begin,
        "start": x,
        "prev": [],
        "x0": [],
    }
    out["draws"] = []
    out["init_noise_sigma"] = float(sched.init_noise_sigma)
    for i, t in enumerate(timesteps):
        drawn = queue.count
        m = model(sched.scale_model_input(x, t).numpy(), t)
        result = sched.step(torch.from_numpy(m), t, x, **kwargs)
        x = result.prev_sample
        out["prev"].append(x)
        out["x0"].append(getattr(result, "pred_original_sample", getattr(result, "denoised", None)))
        out["draws"].append(queue.count - drawn)
        if req.get("renoise") and i < len(timesteps) - 1:  # the 4-channel inpainting re-noise
            out.setdefault("renoised", []).append(
                sched.add_noise(image, init, torch.tensor([timesteps[i + 1]]))
            )
    return out


def our_run(alias: str, config: dict, overrides: dict, n: int, xp: str = "numpy", inputs: list | None = None,
            **req: Any) -> dict:
    """Our plan and stepper driven like the pipeline drives them; with ``inputs`` (diffusers' per-step input
    samples), step i starts from ``inputs[i]`` instead of our previous output, so each step is compared alone."""
    plan = load_scheduler(config, alias, overrides).plan(
        n,
        strength=req.get("strength"),
        denoising_start=req.get("denoising_start"),
        denoising_end=req.get("denoising_end"),
        eta=req.get("eta", 0.0),
    )
    conv = (lambda a: torch.from_numpy(a.copy())) if xp == "torch" else (lambda a: a.copy())
    image, init = conv(IMAGE), conv(INIT_NOISE)
    if req.get("denoising_start") is not None:
        x = image
    elif req.get("strength") is not None:
        x = plan.add_noise(image, init, 0)
    else:
        x = init * plan.init_noise_sigma
    out: dict = {"plan": plan, "start": x, "prev": [], "x0": [], "draws": []}
    run, used = plan.start(), 0
    for i, t in enumerate(plan.timesteps):
        if inputs is not None:
            x = conv(to_numpy(inputs[i]))
        m = conv(model(to_numpy(plan.scale_model_input(x, i)), t))
        noise = None
        if plan.needs_noise[i]:
            noise, used = conv(NOISES[used]), used + 1
        result = run.step(m, i, x, noise=noise)
        x = result.prev_sample
        assert type(x) is type(image) and x.dtype == image.dtype, "step changed the array type or dtype"
        out["prev"].append(x)
        out["x0"].append(result.pred_original_sample)
        out["draws"].append(int(noise is not None))
        if req.get("renoise") and i < len(plan) - 1:
            out.setdefault("renoised", []).append(plan.add_noise(image, init, i + 1))
    return out


def compare(ours: dict, ref: dict, derived_timesteps: bool, tol: float = TOL, zsnr: bool = False) -> None:
    plan = ours["plan"]
    if derived_timesteps:
        # timesteps computed from sigmas (Karras / exponential / log-SNR spacings: interpolated in log-sigma,
        # in training-timestep units; continuous: 0.25 log sigma) inherit the tables' last-bit differences
        np.testing.assert_allclose(plan.timesteps, ref["timesteps"], rtol=1e-5, atol=2e-3)
    else:
        np.testing.assert_array_equal(plan.timesteps, ref["timesteps"])
    assert plan.timesteps.dtype == ref["timesteps"].dtype
    assert plan.num_inference_steps == ref["steps"]
    assert plan.begin_index == ref["begin"]
    assert plan.init_noise_sigma == pytest.approx(ref["init_noise_sigma"], rel=1e-6)
    assert ours["draws"] == ref["draws"], "noise draws differ from diffusers' randn_tensor calls"
    assert_close(ours["start"], ref["start"], "initial latents", tol)
    inputs = [ref["start"], *ref["prev"][:-1]]
    if zsnr and plan.begin_index == 0:
        inputs[0] = to_numpy(ref["start"]) / ref["init_noise_sigma"] * SIGMA_TERMINAL
    for i, (a, b) in enumerate(zip(ours["prev"], ref["prev"], strict=True)):
        assert_close(a, b, f"prev_sample of step {i}", tol, operand=inputs[i])
    for i, (a, b) in enumerate(zip(ours["x0"], ref["x0"], strict=True)):
        if a is not None and b is not None:
            assert_close(a, b, f"pred_original_sample of step {i}", tol)
    for i, (a, b) in enumerate(zip(ours.get("renoised", []), ref.get("renoised", []), strict=True)):
        assert_close(a, b, f"add_noise after step {i}", tol)


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


def _tol(config: dict) -> float:
    return TOL_ZSNR if config.get("rescale_betas_zero_snr") else TOL


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
    # At zero SNR a 1-ulp table difference (see TOL_ZSNR) moves a whole trajectory; there each step starts from
    # diffusers' own input, so every step's arithmetic is compared on its own.
    inputs = [ref["start"], *ref["prev"][:-1]] if config.get("rescale_betas_zero_snr") else None
    ours = our_run(alias, config, overrides, n, eta=eta, inputs=inputs)
    compare(ours, ref, _float_timesteps(overrides), _tol(config), zsnr=inputs is not None)


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
    compare(ours, ref, _float_timesteps(overrides), _tol(config))
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

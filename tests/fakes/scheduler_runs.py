"""The step-by-step scheduler harness: diffusers' and our runs of one schedule on a pseudo-model, and their comparison.

Both sides run the same closed denoising loop: the same deterministic pseudo-model (a fixed function of the
model input and the timestep) and the same injected noise draws (diffusers' ``randn_tensor`` is patched to
hand out the draws our loop passes as ``noise=``; DPM++ SDE's Brownian sampler builds its path from them, see
fakes/brownian.py). Shared by tests/test_schedulers.py and
tests/test_schedulers_more.py; test modules importing it skip first when torch or diffusers is missing.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

from fakes.brownian import brownian_sampler
from fakes.schedulers import SD15, SDXL, SHAPE
from sdexport.runtime.schedulers import load_scheduler
from sdexport.runtime.schedulers.registry import resolve_name

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
    """A torch tensor or array-like as a numpy array."""
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
    """The timesteps and step count StableDiffusionXLPipeline keeps for ``denoising_end``."""
    # The inline code of StableDiffusionXLPipeline.__call__ ("8.1 Apply denoising_end");
    # test_schedulers.test_sdxl_denoising_end_source_is_unchanged checks the installed diffusers still has it.
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
    module = sys.modules[type(sched).__module__]
    monkeypatch.setattr(module, "randn_tensor", queue, raising=False)
    if hasattr(module, "BrownianTreeNoiseSampler"):  # DPM++ SDE: its Brownian increments from the same draws
        monkeypatch.setattr(module, "BrownianTreeNoiseSampler", brownian_sampler(queue))
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
    """Assert our run (``our_run``) matches diffusers' (``reference_run``): timesteps, draws, every step."""
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


def tol_for(config: dict) -> float:
    """The relative tolerance of runs on ``config``: TOL_ZSNR at zero terminal SNR, TOL otherwise."""
    return TOL_ZSNR if config.get("rescale_betas_zero_snr") else TOL

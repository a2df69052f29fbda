"""Diffusion schedulers matching diffusers step for step, on numpy arrays or device tensors (no torch import).

Building a scheduler
--------------------
``load_scheduler(config, name=None, overrides=None) -> Scheduler`` reads a ``scheduler_config.json`` dict as
``diffusers.<Class>.from_config(config, **overrides)`` does: keys the class does not have are ignored, as in
diffusers; a value that would change the result but is not implemented raises ``SchedulerConfigError`` (a
``ValueError`` naming the key and the allowed values). ``name`` (default: the config's ``_class_name``) is
a diffusers class name (``"EulerDiscreteScheduler"``) or an alias (and ``<alias>_karras`` where Karras
sigmas exist):

- ``ddpm``, ``ddim``, ``pndm``, ``euler``, ``euler_a``, ``heun``, ``lms``, ``lcm``, ``unipc``;
- ``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmpp_3m``, ``dpm_2m``, ``dpm_2m_sde`` (DPM-Solver multistep);
- ``dpm2``, ``dpm2_a`` (KDPM2); ``dpmpp_2s``, ``dpmpp_3s``, ``dpmpp_2s_sde`` (DPM-Solver singlestep);
- ``deis``; ``edm_euler``, ``edm_dpmpp_2m``, ``edm_dpmpp_2m_sde``, ``edm_dpmpp_3m`` (EDM models);
- ``dpmpp_sde`` (DPM++ SDE: Brownian-increment noise, see ``dpm_sde``); ``tcd``, ``sa_solver``.

An alias may imply config values (the SDE algorithm of ``dpmpp_2m_sde``), applied over the config;
``overrides`` come last. ``scheduler_names()`` lists the names; ``get_scheduler_class(name)`` returns the
class (``Class.from_config(config, **overrides)`` too).

A ``Scheduler`` is immutable (read-only tables): one per loaded pipeline, shared by all its requests.

Per request: ``Plan`` and ``Stepper``
-------------------------------------
``scheduler.plan(num_inference_steps, *, strength=None, denoising_start=None, denoising_end=None, eta=0.0)``
returns an immutable ``Plan`` (safe to share and cache); ``i`` below is a position in ``plan.timesteps``:

- ``plan.timesteps``: one timestep per model evaluation, in diffusers' dtype. Heun, KDPM2 and DPM++ SDE list 2N - 1.
- ``plan.num_inference_steps`` (as diffusers reports it), ``plan.init_noise_sigma``, ``plan.begin_index``,
  ``plan.order`` (2 for Heun).
- ``plan.needs_noise[i]``: step ``i`` consumes one standard-normal array shaped like the sample, exactly where
  diffusers draws one (DDPM, DDIM with eta > 0, Euler ancestral, SDE DPM-Solver, LCM).
- ``plan.scale_model_input(sample, i)``: the model input of step ``i``.
- ``plan.add_noise(original, noise, i=0)``: diffusers' ``add_noise(original, noise, timesteps[i])``. img2img
  starts from ``i = 0``; inpainting with a 4-channel UNet re-noises the original image latents after step
  ``i`` at ``i + 1`` (``i + 1 < len(plan)``) with the initial noise and blends them in with the mask.
- ``plan.start() -> Stepper``: a run's mutable history (multistep methods). ``stepper.step(model_output, i,
  sample, noise=None) -> StepOutput(prev_sample, pred_original_sample)``; steps go in order;
  ``pred_original_sample`` is ``None`` where the method has no x0 (PNDM, noise-prediction DPM-Solver / UniPC).

``strength`` (``0 < s <= 1``) keeps the tail like ``StableDiffusion[XL]Img2ImgPipeline.get_timesteps``.
``denoising_end`` keeps the head (SDXL base, ``StableDiffusionXLPipeline``); ``denoising_start`` keeps the
tail (SDXL refiner, ``StableDiffusionXLImg2ImgPipeline``: strength ignored, the base's latents used without
added noise). Both are fractions of the training timesteps in ``(0, 1)``, with diffusers' odd-length rule for
second-order schedulers (a Heun refiner then re-runs the base's last evaluation, as in diffusers).

Example: one loop serves every scheduler, Heun (2 evaluations per step) and stochastic ones included::

    sched = load_scheduler(json.load(open("scheduler_config.json")), "dpmpp_2m_sde_karras")
    plan = sched.plan(30)                                          # text-to-image
    latents = rng.standard_normal(shape, dtype=np.float32) * plan.init_noise_sigma
    run = plan.start()
    for i, t in enumerate(plan.timesteps):                         # Heun: 2N - 1 entries, one UNet call each
        x_in = plan.scale_model_input(latents, i)
        eps = guided_unet(x_in, t)                                 # CFG batching is the pipeline's business
        noise = rng.standard_normal(shape, dtype=np.float32) if plan.needs_noise[i] else None
        latents = run.step(eps, i, latents, noise=noise).prev_sample

    plan = sched.plan(30, strength=0.6)                            # img2img: then the same loop
    latents = plan.add_noise(image_latents, rng.standard_normal(shape, dtype=np.float32), 0)

    base = base_sched.plan(40, denoising_end=0.8)                  # SDXL base: loop from pure noise
    refiner = refiner_sched.plan(40, denoising_start=0.8)          # refiner: loop from the base's latents

Numerics: tables are float32 and per-step coefficients are computed once per plan in float32 with diffusers'
operation order, then kept as Python floats; a step is a few array multiply-adds, so the same code runs on
numpy arrays (float32 stays float32) and on torch or other device tensors without host synchronisation.
"""

from .base import Entry, Plan, Scheduler, StepOutput, Stepper
from .config import SchedulerConfigError
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISMultistepScheduler
from .dpm_sde import DPMSolverSDEScheduler
from .dpm_singlestep import DPMSolverSinglestepScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .edm_dpm_solver import EDMDPMSolverMultistepScheduler
from .edm_euler import EDMEulerScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .kdpm2 import KDPM2DiscreteScheduler
from .kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .registry import SCHEDULER_CLASSES, get_scheduler_class, load_scheduler, scheduler_names
from .sa_solver import SASolverScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "SCHEDULER_CLASSES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "Entry",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "Plan",
    "SASolverScheduler",
    "Scheduler",
    "SchedulerConfigError",
    "StepOutput",
    "Stepper",
    "TCDScheduler",
    "UniPCMultistepScheduler",
    "get_scheduler_class",
    "load_scheduler",
    "scheduler_names",
]

"""The scheduler protocol: an immutable ``Plan`` per request and a ``Stepper`` holding one run's history."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, NamedTuple

import numpy as np

from .config import SchedulerConfigError, check_fraction, check_steps, resolve_config
from .ops import Array

logger = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """The result of one ``Stepper.step``: the next sample, and the predicted x0 when the algorithm has it."""

    prev_sample: Array
    pred_original_sample: Array | None


@dataclass(frozen=True)
class Entry:
    """Everything precomputed for one model evaluation of a plan (Python floats only)."""

    index: int
    """Position in the full, untruncated schedule (diffusers' ``step_index``)."""
    timestep: float | int
    input_scale: float | None
    """``scale_model_input`` divides the sample by this; ``None`` means the sample is passed unchanged."""
    noise_coefs: tuple[float, float]
    """``(a, b)``: ``add_noise`` returns ``a * original + b * noise`` at this entry's noise level."""
    needs_noise: bool
    """Whether ``step`` consumes a standard-normal draw here (exactly when diffusers draws one)."""
    coefs: Any = None
    """Algorithm-specific coefficients."""


@dataclass(frozen=True)
class Schedule:
    """A scheduler's full schedule for N steps, before any img2img / base-refiner truncation."""

    timesteps: np.ndarray
    num_inference_steps: int
    sigmas: np.ndarray | None = None
    init_noise_sigma: float = 1.0


@dataclass(frozen=True, eq=False)
class Plan:
    """The immutable, per-request schedule: timesteps and per-step coefficients. Safe to share across threads.

    Index ``i`` everywhere means the position in ``timesteps`` (0 = the first model evaluation of this
    request).
    """

    scheduler: Scheduler
    timesteps: np.ndarray
    """Timesteps to feed the model, one per model evaluation, in diffusers' dtype (int64 or float32)."""
    entries: tuple[Entry, ...]
    num_inference_steps: int
    """The step count diffusers reports for this request (Heun: pairs of evaluations count once)."""
    init_noise_sigma: float
    """Multiply a pure-noise initial latent by this (text-to-image, or inpainting at strength 1)."""
    begin_index: int
    """Where ``timesteps[0]`` sits in the full schedule (what diffusers passes to ``set_begin_index``)."""

    def __len__(self) -> int:
        return len(self.entries)

    @cached_property
    def needs_noise(self) -> tuple[bool, ...]:
        """Per step: whether ``step`` needs ``noise`` (a standard-normal array shaped like the sample)."""
        return tuple(e.needs_noise for e in self.entries)

    @property
    def order(self) -> int:
        """Model evaluations per solver step (2 for Heun), as diffusers' ``scheduler.order``."""
        return self.scheduler.order

    def _entry(self, i: int) -> Entry:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self.entries):
            raise IndexError(f"step index {i!r} is out of range; this plan has {len(self.entries)} steps")
        return self.entries[int(i)]

    def scale_model_input(self, sample: Array, i: int) -> Array:
        """The model input for step ``i`` (before classifier-free-guidance batching or concatenation)."""
        scale = self._entry(i).input_scale
        return sample if scale is None else sample / scale

    def add_noise(self, original: Array, noise: Array, i: int = 0) -> Array:
        """Noise ``original`` to step ``i``'s level, equal to diffusers' ``add_noise(..., timesteps[i])``.

        img2img / inpainting at strength < 1 start from ``add_noise(image_latents, noise, 0)``. Inpainting
        with a 4-channel UNet re-noises the original after step ``i`` with
        ``add_noise(image_latents, noise, i + 1)`` (for ``i + 1 < len(plan)``), reusing the initial noise,
        exactly as the diffusers inpaint pipelines do.
        """
        a, b = self._entry(i).noise_coefs
        return a * original + b * noise

    def start(self) -> Stepper:
        """A fresh stepper for one denoising run of this plan."""
        return Stepper(self)


class Stepper:
    """One run of a plan: holds the multistep history. Not thread-safe; make one per request."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._next = 0
        self._state = plan.scheduler._new_state()

    @property
    def timesteps(self) -> np.ndarray:
        return self.plan.timesteps

    def scale_model_input(self, sample: Array, i: int) -> Array:
        return self.plan.scale_model_input(sample, i)

    def step(self, model_output: Array, i: int, sample: Array, noise: Array | None = None) -> StepOutput:
        """Advance from step ``i`` (steps must be taken in order 0, 1, 2, ...).

        ``model_output`` is the (guided) model prediction at ``plan.timesteps[i]`` for ``sample``; ``noise``
        is required exactly when ``plan.needs_noise[i]`` (a standard-normal array shaped like ``sample``).
        """
        entry = self.plan._entry(i)
        if i != self._next:
            raise ValueError(f"steps must be taken in order: expected step {self._next}, got {i}")
        if entry.needs_noise and noise is None:
            raise ValueError(
                f"step {i} of {self.plan.scheduler.class_name} needs noise: pass noise=<standard normal "
                f"array shaped like the sample> (see plan.needs_noise)"
            )
        if not entry.needs_noise and noise is not None:
            raise ValueError(
                f"step {i} of {self.plan.scheduler.class_name} takes no noise; drawing it would "
                f"desynchronise the random stream from diffusers (see plan.needs_noise)"
            )
        self._next += 1
        prev, x0 = self.plan.scheduler._step(entry, self._state, model_output, sample, noise)
        return StepOutput(prev, x0)


class Scheduler(ABC):
    """A diffusion scheduler configured from a diffusers ``scheduler_config.json`` dict.

    Immutable after construction (its tables are read-only); ``plan()`` builds per-request state.
    """

    class_name: ClassVar[str]
    """The diffusers class this reproduces."""
    defaults: ClassVar[Mapping[str, Any]]
    """The diffusers class's ``__init__`` arguments and defaults: the config keys this class reads."""
    order: ClassVar[int] = 1
    uses_eta: ClassVar[bool] = False
    state_type: ClassVar[Callable[[], Any] | None] = None
    """Builds the mutable per-run history of multi-step methods (``None``: one-step methods keep none)."""

    def __init__(self, config: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        self.config, self.hidden_config = resolve_config(self.class_name, self.defaults, config, overrides)
        self.num_train_timesteps = int(self.config["num_train_timesteps"])
        self._setup()

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
        """Like diffusers' ``cls.from_config(config, **overrides)``."""
        return cls(config, **overrides)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if v != self.defaults[k]}
        return f"{type(self).__name__}({changed})"

    def plan(
        self,
        num_inference_steps: int,
        *,
        strength: float | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        eta: float = 0.0,
    ) -> Plan:
        """The per-request schedule for ``num_inference_steps``.

        ``strength`` (img2img, ``0 < strength <= 1``) keeps the last ``int(N * strength)`` steps, as
        ``StableDiffusion[XL]Img2ImgPipeline.get_timesteps``. ``denoising_start`` / ``denoising_end``
        (``0 < v < 1``, fractions of the training timesteps) select the refiner's tail / the base's head as
        the SDXL pipelines do, including the odd-length adjustment for second-order schedulers; ``strength``
        is ignored when ``denoising_start`` is given (as in diffusers). ``eta`` is DDIM's stochasticity (the
        other schedulers accept 0 only).
        """
        n = check_steps(self.class_name, num_inference_steps, self.num_train_timesteps)
        eta = self._check_eta(eta)
        schedule = self._schedule(n)
        begin, end, steps = self._window(schedule, strength, denoising_start, denoising_end)
        entries = tuple(self._entries(schedule, begin, end, eta))
        timesteps = schedule.timesteps[begin:end].copy()
        timesteps.flags.writeable = False
        return Plan(self, timesteps, entries, steps, float(schedule.init_noise_sigma), begin)

    def _check_eta(self, eta: float) -> float:
        if self.uses_eta:
            if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
                raise SchedulerConfigError(
                    f"{self.class_name}: eta={eta!r} is out of range; allowed: 0 <= eta <= 1"
                )
            return float(eta)
        if eta:
            raise SchedulerConfigError(
                f"{self.class_name} has no eta (only DDIMScheduler does); got eta={eta!r}, pass 0"
            )
        return 0.0

    def _window(
        self,
        schedule: Schedule,
        strength: float | None,
        denoising_start: float | None,
        denoising_end: float | None,
    ) -> tuple[int, int, int]:
        ts, n, t_max = schedule.timesteps, schedule.num_inference_steps, self.num_train_timesteps
        begin, end, steps = 0, len(ts), n
        if denoising_start is not None:
            start = check_fraction("denoising_start", denoising_start)
            if strength is not None:
                logger.debug("strength=%s is ignored because denoising_start is given", strength)
            cutoff = int(round(t_max - start * t_max))
            steps = int((ts < cutoff).sum())
            if self.order == 2 and steps % 2 == 0:
                steps += 1
            begin = len(ts) - steps
        elif strength is not None:
            strength = check_fraction("strength", strength, closed_right=True)
            init_timestep = min(int(n * strength), n)
            t_start = max(n - init_timestep, 0)
            begin, steps = t_start * self.order, n - t_start
        if denoising_end is not None:
            stop = check_fraction("denoising_end", denoising_end)
            if denoising_start is not None and denoising_start >= stop:
                raise SchedulerConfigError(
                    f"denoising_start={denoising_start} must be smaller than denoising_end={stop}"
                )
            cutoff = int(round(t_max - stop * t_max))
            steps = int((ts[begin:] >= cutoff).sum())
            end = begin + steps
        if end - begin <= 0 or begin >= len(ts):
            raise SchedulerConfigError(
                f"{self.class_name}: no denoising step left for num_inference_steps={n}, "
                f"strength={strength}, denoising_start={denoising_start}, denoising_end={denoising_end}; "
                f"raise the step count or strength (need int(num_inference_steps * strength) >= 1) or widen "
                f"the denoising range"
            )
        return begin, end, steps

    def _setup(self) -> None:  # noqa: B027 - optional hook
        """Validate the config and build the training tables (called once from ``__init__``)."""

    @abstractmethod
    def _schedule(self, num_inference_steps: int) -> Schedule:
        """The full schedule for N steps (diffusers' ``set_timesteps``)."""

    @abstractmethod
    def _entries(self, schedule: Schedule, begin: int, end: int, eta: float) -> Sequence[Entry]:
        """Precomputed entries for full-schedule positions ``begin .. end - 1`` of a run from ``begin``."""

    def _new_state(self) -> Any:
        """Mutable per-run history (``None`` for one-step methods)."""
        return self.state_type() if self.state_type is not None else None

    @abstractmethod
    def _step(
        self, entry: Entry, state: Any, model_output: Array, sample: Array, noise: Array | None
    ) -> tuple:
        """Return ``(prev_sample, pred_original_sample_or_None)``."""

"""Scheduler lookup by diffusers class name or short alias, and construction from a config dict."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Scheduler
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
from .sa_solver import SASolverScheduler
from .tcd import TCDScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULER_CLASSES: tuple[type[Scheduler], ...] = (
    DDPMScheduler,
    DDIMScheduler,
    PNDMScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    LMSDiscreteScheduler,
    LCMScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    DPMSolverSinglestepScheduler,
    DEISMultistepScheduler,
    EDMEulerScheduler,
    EDMDPMSolverMultistepScheduler,
    TCDScheduler,
    SASolverScheduler,
    DPMSolverSDEScheduler,
)


@dataclass(frozen=True)
class Alias:
    """A scheduler name: the class plus config overrides it implies (e.g. ``dpmpp_2m_sde``)."""

    cls: type[Scheduler]
    preset: Mapping[str, Any] = field(default_factory=dict)


def _aliases() -> dict[str, Alias]:
    dpm = DPMSolverMultistepScheduler
    base = {
        "ddpm": Alias(DDPMScheduler),
        "ddim": Alias(DDIMScheduler),
        "pndm": Alias(PNDMScheduler),
        "euler": Alias(EulerDiscreteScheduler),
        "euler_a": Alias(EulerAncestralDiscreteScheduler),
        "euler_ancestral": Alias(EulerAncestralDiscreteScheduler),
        "heun": Alias(HeunDiscreteScheduler),
        "dpmpp_2m": Alias(dpm, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_sde": Alias(dpm, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        "dpmpp_3m": Alias(dpm, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
        "dpm_2m": Alias(
            dpm, {"algorithm_type": "dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}
        ),
        "dpm_2m_sde": Alias(
            dpm, {"algorithm_type": "sde-dpmsolver", "solver_order": 2, "final_sigmas_type": "sigma_min"}
        ),
        "unipc": Alias(UniPCMultistepScheduler),
        "lms": Alias(LMSDiscreteScheduler),
        "lcm": Alias(LCMScheduler),
        "dpm2": Alias(KDPM2DiscreteScheduler),
        "dpm2_a": Alias(KDPM2AncestralDiscreteScheduler),
        "dpmpp_2s": Alias(DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_3s": Alias(DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
        "deis": Alias(DEISMultistepScheduler),
        "edm_euler": Alias(EDMEulerScheduler),
        "edm_dpmpp_2m": Alias(EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "edm_dpmpp_2m_sde": Alias(
            EDMDPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
        ),
        "edm_dpmpp_3m": Alias(EDMDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
        "tcd": Alias(TCDScheduler),
        "sa_solver": Alias(SASolverScheduler),
        "dpmpp_sde": Alias(DPMSolverSDEScheduler),
        "dpmpp_2s_sde": Alias(
            DPMSolverSinglestepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
        ),
    }
    karras = {
        f"{name}_karras": Alias(alias.cls, {**alias.preset, "use_karras_sigmas": True})
        for name, alias in base.items()
        if "use_karras_sigmas" in alias.cls.defaults
    }
    classes = {cls.class_name.lower(): Alias(cls) for cls in SCHEDULER_CLASSES}
    return {**classes, **base, **karras}


_ALIASES = _aliases()


def scheduler_names() -> tuple[str, ...]:
    """Every accepted name: the diffusers class names, then the short aliases."""
    classes = tuple(cls.class_name for cls in SCHEDULER_CLASSES)
    return classes + tuple(n for n in _ALIASES if n not in {c.lower() for c in classes})


def resolve_name(name: str) -> Alias:
    """The class and preset of a diffusers class name or alias (case-insensitive)."""
    alias = _ALIASES.get(str(name).lower())
    if alias is None:
        raise SchedulerConfigError(f"unknown scheduler {name!r}; choose one of {list(scheduler_names())}")
    return alias


def get_scheduler_class(name: str) -> type[Scheduler]:
    """The scheduler class for a diffusers class name (``EulerDiscreteScheduler``) or alias (``euler``)."""
    return resolve_name(name).cls


def load_scheduler(
    config: Mapping[str, Any],
    name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Scheduler:
    """Build a scheduler from a ``scheduler_config.json`` dict, like diffusers' ``Other.from_config(config)``.

    ``name`` selects another scheduler than the config's ``_class_name`` (its alias preset, e.g. the SDE
    algorithm of ``dpmpp_2m_sde``, is applied over the config); ``overrides`` are applied last.
    """
    if name is None:
        name = config.get("_class_name")
        if not name:
            raise SchedulerConfigError(
                f"the scheduler config has no _class_name; pass name=, one of {list(scheduler_names())}"
            )
    alias = resolve_name(name)
    return alias.cls(config, **{**alias.preset, **(overrides or {})})

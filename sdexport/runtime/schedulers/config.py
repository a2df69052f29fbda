"""Reading a ``scheduler_config.json`` dict as diffusers' ``from_config`` does, with strict checks."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from sdexport.errors import SdexportError

logger = logging.getLogger(__name__)


class SchedulerConfigError(SdexportError, ValueError):
    """A scheduler config key, value or request parameter cannot be used; the message names it."""


def resolve_config(
    class_name: str,
    defaults: Mapping[str, Any],
    config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None,
) -> tuple[MappingProxyType, MappingProxyType]:
    """Merge ``config`` and ``overrides`` over ``defaults`` like ``diffusers.ConfigMixin.from_config``.

    Returns ``(init, hidden)``: ``init`` has exactly the keys of ``defaults`` (the diffusers class's
    ``__init__`` arguments); ``hidden`` has the other, non-underscore keys of ``config``. diffusers ignores
    hidden keys except ``sigma_min`` / ``sigma_max``, which some schedulers read from ``self.config`` when
    present. Keys listed in the config's ``_use_default_values`` fall back to this class's defaults, as in
    diffusers. An override naming a key the class does not have is an error (diffusers would drop it).
    """
    config = dict(config or {})
    use_default = set(config.pop("_use_default_values", None) or ())
    config = {k: v for k, v in config.items() if k not in use_default and not k.startswith("_")}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SchedulerConfigError(
            f"{class_name} has no config key(s) {unknown}; valid keys: {sorted(defaults)}"
        )
    init = {k: overrides.get(k, config.get(k, v)) for k, v in defaults.items()}
    for key, value in init.items():
        check_value(class_name, key, value, defaults[key])
    hidden = {k: v for k, v in config.items() if k not in defaults}
    if hidden:
        logger.debug("%s ignores config keys %s (as diffusers does)", class_name, sorted(hidden))
    return MappingProxyType(init), MappingProxyType(hidden)


POSITIVE_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "solver_order"})
"""Config keys that must be > 0 (a zero is a division or an empty table later)."""


def check_value(class_name: str, key: str, value: Any, default: Any) -> None:
    """Raise naming ``key`` when ``value`` is not of the type of its default (a finite number, an int, a bool).

    None is left to the scheduler (some keys take it); strings and lists are checked where they are used.
    """
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        # NaN never; infinity only where the default is infinite (lambda_min_clipped = -inf: no clipping)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        ok = ok and (math.isfinite(value) or not math.isfinite(default))
        what = "a finite number"
    else:
        return
    if ok and key in POSITIVE_KEYS and value <= 0:
        ok, what = False, f"{what} > 0"
    if not ok:
        raise SchedulerConfigError(f"{class_name}: config key {key!r}={value!r} is not allowed; it must be {what}")


def check_choice(class_name: str, key: str, value: Any, allowed: Iterable[Any], why: str = "") -> None:
    """Raise naming ``key`` unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        hint = f" ({why})" if why else ""
        raise SchedulerConfigError(
            f"{class_name}: config key {key!r}={value!r} is not supported{hint}; allowed: {list(allowed)}"
        )


def check_steps(class_name: str, num_inference_steps: Any, num_train_timesteps: int) -> int:
    """Validate a step count: an int in ``[1, num_train_timesteps]``."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise SchedulerConfigError(
            f"{class_name}: num_inference_steps must be an int, got {num_inference_steps!r}"
        )
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise SchedulerConfigError(
            f"{class_name}: num_inference_steps={num_inference_steps} is out of range; allowed: "
            f"1 <= num_inference_steps <= num_train_timesteps ({num_train_timesteps})"
        )
    return num_inference_steps


def check_fraction(name: str, value: Any, *, closed_right: bool = False) -> float:
    """Validate ``strength`` (``0 < v <= 1``) or ``denoising_start`` / ``denoising_end`` (``0 < v < 1``)."""
    interval = "0 < {} <= 1" if closed_right else "0 < {} < 1"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and value > 0 and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise SchedulerConfigError(f"{name}={value!r} is out of range; allowed: {interval.format(name)}")
    return float(value)

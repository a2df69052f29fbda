"""The backend registry: one ``Backend`` record per engine backend, read by the runtime, the build, the CLI and doctor.

A backend is declared once, in its own module (``engines/ort.py``, ``engines/openvino.py``,
``engines/tensorrt/__init__.py``), with ``register_backend(Backend(...))``. Its hooks are callables or
``"module:attribute"`` paths imported on first use, so reading the registry (CLI choices, ``--help``, doctor) never
imports a GPU library.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILTIN_MODULES = ("sdexport.engines.ort", "sdexport.engines.openvino", "sdexport.engines.tensorrt")
"""Modules that declare the built-in backends (imported when the registry is first read)."""
OPTION_KINDS = ("value", "switch", "repeat", "many")

Hook = Callable[..., Any] | str
"""A callable, or the ``"module:attribute"`` path of one (imported on first use)."""


@dataclass(frozen=True)
class Option:
    """One backend option: its key in the options mapping, type, default and help (the CLI derives its flag).

    ``kind``: "value" (one ``type`` value), "switch" (a boolean flag), "repeat" (the flag may be repeated: a list),
    "many" (one flag, several values). ``cli=False`` keeps an option library-only (e.g. a providers list).
    """

    name: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    kind: str = "value"
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | None = None
    cli: bool = True

    def __post_init__(self) -> None:
        if self.kind not in OPTION_KINDS:
            raise ValueError(f"option {self.name!r}: kind {self.kind!r} is not one of {OPTION_KINDS}")

    @property
    def cli_flag(self) -> str:
        """The command-line spelling: ``flag``, or ``--`` + the name with dashes."""
        return self.flag or "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class BackendStatus:
    """What a backend's probe found on this machine: can it run here, which version, and why not."""

    available: bool
    detail: str
    version: str | None = None


@dataclass(frozen=True)
class Backend:
    """A registered backend: how to open a component, whether it compiles after export, options, probe, extra.

    ``open(component, options) -> Engine`` opens one component of a compiled folder (``ComponentFiles``).
    ``compile(folder, manifest, options, progress) -> dict`` runs after the graphs are written and validated; the
    keys it returns are added to the manifest (``files`` merged into the manifest's files). ``make_options(values)``
    turns the build option values (``build_options``) into what ``preflight`` and ``compile`` take; ``preflight``
    refuses, before any export work, a machine that cannot compile. ``probe(device) -> BackendStatus`` is what
    ``sdexport doctor`` reports. ``extra`` names the optional dependency group (``pip install 'sdexport[gpu]'``).
    """

    name: str
    help: str
    open: Hook
    title: str = ""
    load_options: tuple[Option, ...] = ()
    build_options: tuple[Option, ...] = ()
    make_options: Hook | None = None
    preflight: Hook | None = None
    compile: Hook | None = None
    probe: Hook | None = None
    extra: str | None = None
    packages: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """The display name (``title``, or the name)."""
        return self.title or self.name

    @property
    def compiles(self) -> bool:
        """True when the build runs this backend's compile hook after the export."""
        return self.compile is not None

    @property
    def install_hint(self) -> str:
        """How to install the optional dependencies (empty when it needs none beyond sdexport's own)."""
        return f"pip install 'sdexport[{self.extra}]'" if self.extra else ""

    def open_component(self, component: Any, options: Mapping[str, Any]) -> Any:
        """Check ``options`` against the declared load options, then open ``component`` with the backend."""
        allowed = [o.name for o in self.load_options]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"backend {self.name!r} has no option(s) {unknown}; allowed: {allowed}")
        return resolve(self.open)(component, options)

    def build_config(self, values: Any) -> Any:
        """The options object ``compile`` takes, from an options object or a mapping of option values."""
        if values is not None and not isinstance(values, Mapping):
            return values
        given = dict(values or {})
        names = {o.name for o in self.build_options}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ValueError(f"backend {self.name!r} has no build option(s) {unknown}; allowed: {sorted(names)}")
        merged = {o.name: given.get(o.name, o.default) for o in self.build_options}
        return resolve(self.make_options)(merged) if self.make_options is not None else merged

    def check_machine(self, options: Any) -> None:
        """Run the preflight hook: raise at once when this machine cannot compile with ``options``."""
        if self.preflight is not None:
            resolve(self.preflight)(options)

    def compile_folder(self, folder: Path, manifest: Mapping[str, Any], options: Any,
                       progress: Callable[[str], None]) -> dict[str, Any]:
        """Run the compile hook on a folder whose graphs are written; the manifest keys it adds ({} if none)."""
        if self.compile is None:
            return {}
        return dict(resolve(self.compile)(folder, manifest, options, progress))

    def status(self, device: int = 0) -> BackendStatus:
        """Whether this backend can run here (its probe; a backend without one is assumed available)."""
        if self.probe is None:
            return BackendStatus(True, "no probe declared")
        try:
            return resolve(self.probe)(device)
        except Exception as exc:  # noqa: BLE001 - a broken probe is a finding of doctor, not a crash
            return BackendStatus(False, f"probe failed: {type(exc).__name__}: {exc}")


_REGISTRY: dict[str, Backend] = {}
_builtins_loaded = False


def resolve(hook: Hook) -> Callable[..., Any]:
    """The callable behind a hook: itself, or the attribute named by ``"module:attribute"``."""
    if not isinstance(hook, str):
        return hook
    module, sep, attribute = hook.partition(":")
    if not sep:
        raise ValueError(f"hook {hook!r} must be a callable or 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend: ``Pipeline.load(folder, backend=name)``, the CLI and doctor then offer it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes a Backend record, not {type(backend).__name__}")
    _REGISTRY[backend.name] = backend
    log.debug("registered backend %s", backend.name)
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (a no-op for unknown names)."""
    _REGISTRY.pop(name, None)


def backends() -> dict[str, Backend]:
    """Every registered backend by name, in registration order (the built-ins first)."""
    _load_builtins()
    return dict(_REGISTRY)


def backend_names() -> list[str]:
    """The registered backend names (CLI choices)."""
    return list(backends())


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or ValueError naming the choices."""
    found = backends().get(name)
    if found is None:
        raise ValueError(f"backend {name!r} is not available; choose one of {sorted(backends())}")
    return found

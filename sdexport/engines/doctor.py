"""`sdexport doctor [FOLDER]`: this machine's GPU, driver, CUDA, every registered backend, and FOLDER's verdict.

Returns data plus a text report; never constructs a TensorRT object (every probe runs in a child process).
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from sdexport.engines import BackendStatus, backends
from sdexport.engines.tensorrt import compat
from sdexport.errors import SdexportError

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@dataclass
class FolderCheck:
    """Whether one compiled folder can run here, per backend."""

    folder: str
    backend: str | None = None
    error: str | None = None
    engines: dict[str, list[str]] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and not any(self.engines.values())


@dataclass
class DoctorReport:
    """Everything `sdexport doctor` found."""

    python: str
    platform: str
    packages: dict[str, str]
    environment: compat.Environment
    ort_providers: list[str]
    ort_error: str | None
    folder: FolderCheck | None = None
    backends: dict[str, BackendStatus] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True unless a given folder cannot run here."""
        return self.folder is None or self.folder.ok

    def to_dict(self) -> dict[str, Any]:
        """JSON form (`sdexport doctor --json`)."""
        folder = None
        if self.folder is not None:
            folder = {"folder": self.folder.folder, "backend": self.folder.backend, "error": self.folder.error,
                      "engines": self.folder.engines, "warnings": self.folder.warnings, "ok": self.folder.ok}
        return {"python": self.python, "platform": self.platform, "packages": self.packages,
                "environment": self.environment.to_dict(), "onnxruntime_providers": self.ort_providers,
                "onnxruntime_error": self.ort_error, "folder": folder, "ok": self.ok,
                "backends": {name: asdict(status) for name, status in self.backends.items()}}


def packages() -> tuple[str, ...]:
    """The distributions doctor reports: numpy, every registered backend's packages, onnx."""
    names = ["numpy", *(p for b in backends().values() for p in b.packages), "onnx"]
    return tuple(dict.fromkeys(names))


def _packages() -> dict[str, str]:
    out = {}
    for name in packages():
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _ort_providers() -> tuple[list[str], str | None]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return [], f"cannot import onnxruntime: {exc}"
    return list(ort.get_available_providers()), None


def check_folder(folder: Path, env: compat.Environment, device: int = 0) -> FolderCheck:
    """Read FOLDER's manifest (sizes checked, hashes not) and judge each TensorRT engine against ``env``."""
    from sdexport.engines.artifacts import load_manifest

    check = FolderCheck(str(folder))
    try:
        manifest = load_manifest(folder, verify=False)
    except SdexportError as exc:
        check.error = str(exc)
        return check
    check.backend = manifest.get("backend")
    for name, record in (manifest.get("engines") or {}).items():
        check.engines[name] = compat.engine_problems(record, env, device)
        check.warnings[name] = compat.engine_warnings(record, env, device)
    return check


def diagnose(folder: Path | None = None, device: int = 0,
             env: compat.Environment | None = None) -> DoctorReport:
    """Probe this machine (every GPU / TensorRT probe runs in a child process) and check ``folder`` if given."""
    env = env or compat.probe_environment()
    providers, ort_error = _ort_providers()
    report = DoctorReport(sys.version.split()[0], platform.platform(), _packages(), env, providers, ort_error,
                          backends={name: b.status(device) for name, b in backends().items()})
    if folder is not None:
        report.folder = check_folder(Path(folder), env, device)
    return report


def _gpu_lines(env: compat.Environment) -> list[str]:
    if not env.gpus:
        return [f"GPU:          none ({env.gpu_error})"]
    lines = [f"GPU {g.index}:        {g.name}, {g.sm}, {g.memory_mib} MiB" for g in env.gpus]
    lines.append(f"driver:       {env.driver_version or '?'} (CUDA {env.cuda_version or '?'})")
    return lines


def format_report(report: DoctorReport) -> str:
    """The human-readable report."""
    env = report.environment
    lines = [f"python:       {report.python} on {report.platform}", *_gpu_lines(env), *env.notes]
    lines.append(f"TensorRT:     {env.tensorrt_version or 'not available: ' + str(env.tensorrt_error)}")
    lines.append(f"onnxruntime:  {report.packages.get('onnxruntime-gpu') or report.packages.get('onnxruntime')}"
                 f" providers {', '.join(report.ort_providers) or report.ort_error}")
    if any(p in report.ort_providers for p in GPU_PROVIDERS) and not env.gpus:
        lines.append("              (GPU providers are compiled in, but without a GPU sessions fall back to CPU)")
    if "onnxruntime" in report.packages and "onnxruntime-gpu" in report.packages:
        lines.append("warning:      onnxruntime and onnxruntime-gpu are both installed and overwrite each other's "
                     "files; uninstall both, then install only onnxruntime-gpu")
    lines += _backend_lines(report.backends)
    if report.folder is not None:
        lines += _folder_lines(report.folder)
    return "\n".join(lines)


def _backend_lines(statuses: dict[str, BackendStatus]) -> list[str]:
    """One line per registered backend: can it run here, and how to install what it lacks."""
    lines = ["backends:" if statuses else "backends:     none registered"]
    registered = backends()
    for name, status in statuses.items():
        hint = registered[name].install_hint if name in registered and not status.available else ""
        verdict = "runs here" if status.available else "not available"
        lines.append(f"  {name:16s}{verdict}: {status.detail}" + (f" ({hint})" if hint else ""))
    return lines


def _folder_lines(check: FolderCheck) -> list[str]:
    lines = [f"folder:       {check.folder} (backend {check.backend or '?'})"]
    if check.error:
        return lines + [f"  cannot read it: {check.error}"]
    if not check.engines:
        return lines + ["  no TensorRT engines: it runs with ONNX Runtime (CPU, or the CUDA / TensorRT providers)"]
    for name, problems in check.engines.items():
        status = "OK" if not problems else "cannot run here: " + "; ".join(problems)
        lines.append(f"  {name:16s}{status}")
        lines += [f"  {'':16s}note: {w}" for w in check.warnings.get(name, [])]
    if not check.ok:
        lines.append(f"  rebuild the engines here: sdexport build --model <source> --out {check.folder} "
                     "--backend tensorrt")
    return lines


def run_doctor(folder: Path | None = None, as_json: bool = False, device: int = 0,
               env: compat.Environment | None = None) -> tuple[int, str]:
    """What `sdexport doctor` prints and its exit code (1 when FOLDER's engines cannot run here)."""
    import json

    report = diagnose(folder, device, env)
    text = json.dumps(report.to_dict(), indent=1) if as_json else format_report(report)
    return (0 if report.ok else 1), text

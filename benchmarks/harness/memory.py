"""Peak resident memory of this process (Linux /proc), resettable so one process can measure several cases."""

from __future__ import annotations

import logging
import resource
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def current_rss_mib() -> float | None:
    """Resident set size now, in MiB (None off Linux)."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else None


def rss_parts_mib() -> dict[str, float]:
    """Resident memory now by kind, in MiB: total (VmRSS), anonymous (RssAnon), file-backed (RssFile); {} off Linux."""
    kib = {name: _status_kib(field) for name, field in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}
    return {name: v / 1024 for name, v in kib.items() if v is not None}


def peak_rss_mib() -> float:
    """Peak resident set size since start or the last ``reset_peak``, in MiB."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0: ``5`` into /proc/self/clear_refs); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        log.debug("cannot reset the peak RSS: %s", exc)
        return False
    return True

"""The server's settings (one frozen dataclass; the ``sdexport serve`` flags derive from it) and the API key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY_ENV = "SDEXPORT_API_KEY"
"""The environment variable holding the bearer token when no key file is given."""


def _opt(default: Any, help: str, flag: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class ServeConfig:
    """How the server schedules, limits and protects requests; each field with ``flag`` is a command-line flag."""

    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = _opt(8000, "port to bind")
    max_queue: int = _opt(64, "requests waiting for a worker; one more is answered 429 with Retry-After")
    max_batch: int = _opt(4, "images per engine batch (capped by the folder's batch range); 1 turns dynamic "
                          "batching off")
    batch_window_ms: float = _opt(10.0, "how long the oldest waiting request waits for compatible ones to join "
                                  "its batch")
    workers: int = _opt(1, "worker threads running the pipeline, one batch each")
    timeout_s: float = _opt(300.0, "default and largest per-request deadline (queue + generation), seconds")
    max_body_bytes: int = _opt(16 * 1024 * 1024, "largest request body (413 above)")
    max_image_pixels: int = _opt(4096 * 4096, "largest uploaded picture, width x height (422 above)")
    max_n: int | None = _opt(None, "largest number of images per request (default: the folder's batch maximum)")
    drain_s: float = _opt(30.0, "on SIGTERM: how long requests in flight get to finish before they are cancelled")
    warmup_steps: int = _opt(2, "denoising steps of the warm-up generation before /readyz turns true (0: none)")
    api_key: str | None = field(default=None, repr=False, metadata={"flag": False})
    cors_origins: tuple[str, ...] = field(default=(), metadata={"flag": False})
    """Origins allowed by CORS (empty: CORS off)."""

    def __post_init__(self) -> None:
        """Check the limits; raise ValueError naming the field and what is allowed."""
        for name in ("max_queue", "max_batch", "workers", "max_body_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: pass an integer >= 1")
        for name in ("batch_window_ms", "drain_s", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: pass a number >= 0")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s!r} is not allowed: pass a number of seconds > 0")
        if self.max_n is not None and self.max_n < 1:
            raise ValueError(f"max_n={self.max_n!r} is not allowed: pass an integer >= 1, or leave it unset")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r} is not allowed: pass 0..65535")


def read_api_key(path: str | os.PathLike[str] | None = None, env: str = API_KEY_ENV) -> str | None:
    """The bearer token from ``path`` (stripped), else from the ``env`` variable, else None (auth off)."""
    if path is not None:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the API key file {str(path)!r}: {exc.strerror}") from exc
        if not key:
            raise ValueError(f"the API key file {str(path)!r} is empty: write the token on its first line")
        return key
    return os.environ.get(env) or None

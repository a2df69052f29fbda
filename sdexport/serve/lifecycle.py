"""Running the app on uvicorn: SIGTERM stops accepting, drains in-flight requests within drain_s, exits 0."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from sdexport.serve.config import ServeConfig

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also marks the service as draining (readyz false, new work 503) on a signal."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.sdexport_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Begin the drain, then let uvicorn stop accepting and wait for the requests in flight."""
        service = getattr(self.sdexport_app.state, "service", None)
        if service is not None and not service.draining:
            log.info("signal %s: draining (up to %.0f s for requests in flight)", sig,
                     self.config.timeout_graceful_shutdown or 0)
            service.begin_drain()
        super().handle_exit(sig, frame)


def _drained(sig: int, _frame: FrameType | None) -> None:
    """uvicorn re-raises the signal it shut down on; after a drain that is a normal exit."""
    log.info("stopped after signal %s", sig)


def run_server(app: Any, config: ServeConfig) -> int:
    """Serve ``app`` on ``config.host:config.port`` until SIGTERM / SIGINT; returns the exit code (0 after a drain)."""
    server = DrainingServer(uvicorn.Config(app, host=config.host, port=config.port, access_log=False,
                                           log_config=None, timeout_graceful_shutdown=config.drain_s,
                                           lifespan="on"), app)
    previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1

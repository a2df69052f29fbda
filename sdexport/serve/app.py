"""The FastAPI app factory: routes, error handlers, the gate, and a lifespan that loads and warms the Pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from sdexport import __version__
from sdexport.serve import native_routes, openai_routes
from sdexport.serve.config import ServeConfig
from sdexport.serve.errors import ApiError, api_error_handler, error_response, validation_handler
from sdexport.serve.middleware import Gate
from sdexport.serve.service import Service

log = logging.getLogger(__name__)


def _load(source: Any, backend: str, engine_options: Mapping[str, Any] | None) -> Any:
    """A Pipeline from a folder path, or the given Pipeline itself."""
    if isinstance(source, str | os.PathLike):
        from sdexport.runtime.pipeline import Pipeline

        return Pipeline.load(Path(source), backend=backend, engine_options=dict(engine_options or {}))
    return source


async def _bring_up(app: FastAPI, source: Any, config: ServeConfig, backend: str,
                    engine_options: Mapping[str, Any] | None) -> None:
    """Load (in a thread), build the service, warm up; readyz turns true at the end. Failures are logged."""
    try:
        pipe = await asyncio.to_thread(_load, source, backend, engine_options)
        service = Service(pipe, config)
        app.state.service = service
        await service.start()
        log.info("ready: %s", getattr(pipe, "folder", pipe))
    except Exception as exc:  # reported by /readyz; the process stays up for the operator to see why
        app.state.failure = f"{type(exc).__name__}: {exc}"
        log.exception("the service failed to start")


def _lifespan(source: Any, config: ServeConfig, backend: str, engine_options: Mapping[str, Any] | None) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service, app.state.failure = None, None
        starting = asyncio.ensure_future(_bring_up(app, source, config, backend, engine_options))
        app.state.starting = starting
        try:
            yield
        finally:
            starting.cancel()
            if app.state.service is not None:
                await app.state.service.stop()

    return lifespan


def _ops(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        """200 while the process is alive."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Engines loaded and warmed up, requests accepted")
    async def readyz(request: Request) -> JSONResponse:
        """200 once the engines are loaded and warm and requests are accepted; 503 (with the reason) before/after."""
        service, failure = request.app.state.service, request.app.state.failure
        if service is not None and service.ready:
            return JSONResponse({"ready": True, "queue_depth": service.batcher.depth})
        state = failure or ("draining" if service is not None and service.draining else "warming up")
        return JSONResponse({"ready": False, "state": state}, status_code=503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        """Prometheus text exposition of the server's metrics."""
        service = request.app.state.service
        body = service.metrics.render() if service is not None else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error", exc_info=exc)
    return error_response(500, f"internal error: {type(exc).__name__}")


def create_app(source: str | os.PathLike[str] | Any, config: ServeConfig | None = None, *,
               backend: str = "onnxruntime", engine_options: Mapping[str, Any] | None = None) -> FastAPI:
    """The service's FastAPI app over a compiled folder (loaded at start-up) or an already loaded Pipeline.

    Run it with uvicorn (``run_server``) or under Ray Serve (``sdexport.serve.ray_serve``). The Pipeline is
    loaded and warmed up in the background: /healthz answers at once, /readyz once requests are accepted.
    """
    config = config or ServeConfig()
    app = FastAPI(title="sdexport serve", version=__version__, lifespan=_lifespan(source, config, backend,
                                                                                 engine_options),
                  description="Stable Diffusion from a compiled sdexport folder: OpenAI-style images API, native "
                  "generation with every Pipeline argument, dynamic batching, Prometheus metrics.")
    app.state.service, app.state.failure = None, None
    app.include_router(openai_routes.router)
    app.include_router(native_routes.router)
    _ops(app)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(Exception, _unexpected)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"])

    def observe(endpoint: str, status: int, seconds: float) -> None:
        service = app.state.service
        if service is not None:
            service.metrics.observe_request(endpoint, status, seconds)

    app.add_middleware(Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes, observe=observe)
    return app

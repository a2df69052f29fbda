"""The ``sdexport serve`` subcommand: flags from ServeConfig, then one call to run the app (uvicorn or Ray Serve)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import typing
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from sdexport.errors import SdexportError, UsageError
from sdexport.serve.config import API_KEY_ENV, ServeConfig


def _scalar(hint: Any) -> Callable[[str], Any]:
    members = typing.get_args(hint) or (hint,)
    return next(kind for kind in (int, float, str) if kind in members)


def add_serve_parser(sub: argparse._SubParsersAction, add_backend: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``sdexport serve``; ``add_backend`` adds the shared --backend flag."""
    p = sub.add_parser("serve", help="serve a compiled folder over HTTP (OpenAI-style API, batching, metrics)",
                       description="Serve a compiled folder: POST /v1/images/generations, /v1/images/edits, "
                       "/v1/generate; GET /healthz, /readyz, /metrics, /docs. See docs/serve.md.")
    p.add_argument("folder", type=Path, help="a compiled folder (sdexport build)")
    hints = typing.get_type_hints(ServeConfig)
    for f in fields(ServeConfig):
        if f.metadata.get("flag"):
            p.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=_scalar(hints[f.name]),
                           default=f.default, help=f.metadata["help"])
    p.add_argument("--api-key-file", type=Path, help=f"file holding the bearer token (default: ${API_KEY_ENV}; "
                   "neither: no auth)")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this origin (repeatable; default: "
                   "CORS off)")
    add_backend(p)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ray = p.add_argument_group("Ray Serve (pip install 'sdexport[ray]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment instead of plain uvicorn")
    ray.add_argument("--ray-address", help="Ray cluster to join (default: start a local one)")
    ray.add_argument("--num-replicas", type=int, default=1, help="replicas when not autoscaling")
    ray.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    ray.add_argument("--num-gpus", type=float, default=1.0, help="GPUs per replica (0 for CPU replicas)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (keep some free for Ray itself)")


def config_from(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of parsed ``sdexport serve`` arguments (the key read from its file or the environment)."""
    from sdexport.serve.config import read_api_key

    values = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.metadata.get("flag")}
    try:
        return ServeConfig(**values, api_key=read_api_key(args.api_key_file), cors_origins=tuple(args.cors_origin))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _access_log(quiet: bool) -> None:
    """The access log's JSON lines go to stderr as they are (one object per request), unless -q."""
    logger = logging.getLogger("sdexport.serve.access")
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


def _require(*modules: str, extra: str) -> None:
    """Raise SdexportError naming the extra to install when one of ``modules`` is missing."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SdexportError(f"sdexport serve needs {', '.join(missing)}: pip install 'sdexport[{extra}]'")


def run_serve(args: argparse.Namespace) -> int:
    """Run ``sdexport serve``: uvicorn on host:port, or a Ray Serve deployment with --ray."""
    config = config_from(args)
    _access_log(getattr(args, "quiet", False))
    options = {"threads": args.threads} if args.threads else {}
    _require("fastapi", "uvicorn", "prometheus_client", "multipart", extra="serve")
    if args.ray:
        from sdexport.serve.ray_serve import ReplicaPlan, run_on_ray

        _require("ray", extra="ray")
        plan = ReplicaPlan(num_replicas=args.num_replicas, min_replicas=args.min_replicas,
                           max_replicas=args.max_replicas, num_gpus=args.num_gpus, num_cpus=args.num_cpus)
        return run_on_ray(args.folder, config, plan, backend=args.backend, engine_options=options,
                          address=args.ray_address)
    from sdexport.serve.app import create_app
    from sdexport.serve.lifecycle import run_server

    return run_server(create_app(args.folder, config, backend=args.backend, engine_options=options), config)

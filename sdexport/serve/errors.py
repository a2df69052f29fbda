"""HTTP errors in OpenAI's error shape, and the mapping of validation and library errors onto them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
                500: "server_error", 503: "service_unavailable", 504: "timeout"}


class ApiError(Exception):
    """An answer other than 200: status, a message naming the value and what is allowed, the parameter."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, dict(headers or {})


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"error": {"message": message, "type": STATUS_TYPES.get(status, "error"), "param": param,
                      "code": str(status)}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error answer."""
    return JSONResponse(error_body(status, message, param), status_code=status, headers=dict(headers or {}))


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    """ApiError -> its answer."""
    if not isinstance(exc, ApiError):
        raise exc
    return error_response(exc.status, exc.message, exc.param, exc.headers)


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or "body"


def describe_errors(errors: Sequence[Mapping[str, Any]], allowed: Sequence[str] = ()) -> tuple[str, str | None]:
    """Pydantic errors -> (one message naming every field at fault, the first field)."""
    messages, first = [], None
    for error in errors:
        field = _where(error.get("loc", ()))
        first = first or field
        if error.get("type") == "extra_forbidden":
            known = f"; known fields: {', '.join(allowed)}" if allowed else ""
            messages.append(f"{field}: unknown field{known}")
        else:
            messages.append(f"{field}={error.get('input')!r}: {error.get('msg')}")
    return "; ".join(messages), first


async def validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation errors -> 400 for a body that is not JSON, else 422 naming the fields."""
    if not isinstance(exc, RequestValidationError):
        raise exc
    errors = list(exc.errors())
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        detail = bad_json[0].get("ctx", {}).get("error", "")
        return error_response(400, f"the body is not valid JSON: {detail}".rstrip(": "), "body")
    message, field = describe_errors(errors)
    return error_response(422, message, field)


def parse_json(body: bytes) -> Any:
    """The request body as JSON; ApiError 400 when it is not."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", "body") from exc

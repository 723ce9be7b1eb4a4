"""HTTP routes. Each module exposes `routes`; handlers raise ApiError, never build error JSON."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from receiver.context import Context
from receiver.errors import InvalidRequest, PayloadTooLarge, body_cut_off
from receiver.nesting import MAX_DEPTH, too_deep
from receiver.types import JSON


def context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def draining(request: Request) -> asyncio.Event:
    """Set once the server starts to shut down: long-polls answer and streams end (receiver.server).
    An app served without the lifespan that creates it gets an event that is never set."""
    event: asyncio.Event | None = getattr(request.app.state, "draining", None)
    return event or asyncio.Event()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is larger than {limit} bytes.", details={"limit": limit})
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"The body is larger than {limit} bytes.", details={"limit": limit})
            chunks.append(chunk)
    except ClientDisconnect:
        timed_out = body_cut_off(request)  # the body deadline's 408, counted and logged as a refusal
        if timed_out is None:
            raise
        raise timed_out from None
    return b"".join(chunks)


async def read_json_object(request: Request, limit: int = 1 << 20) -> JSON:
    body = await read_body(request, limit)
    try:
        value: Any = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if too_deep(value, source=body):
        raise InvalidRequest(f"The request body nests more than {MAX_DEPTH} levels.", details={"limit": MAX_DEPTH})
    return value


Problems = list[dict[str, str]]


async def read_fields(request: Request, allowed: frozenset[str]) -> tuple[JSON, Problems]:
    """The JSON body, and one problem for each field in it beyond `allowed` (more may be added)."""
    body = await read_json_object(request)
    expected = ", ".join(sorted(allowed))
    problems = [
        {"field": name, "message": f"is not a field; expected: {expected}"} for name in sorted(set(body) - allowed)
    ]
    return body, problems


def query_int(request: Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise InvalidRequest(f"'{name}' must be an integer.", details={"field": name}) from exc
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}.", details={"field": name})
    return value


def query_float(request: Request, name: str, default: float, *, low: float, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise InvalidRequest(f"'{name}' must be a number.", details={"field": name}) from exc
    if not low <= value <= high:  # also refuses nan
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}.", details={"field": name})
    return value

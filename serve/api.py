"""What the local service and the Ray Serve deployment share over HTTP: errors as status codes, the body size
limit, and the response for a result.

Every error answers ``{"error": {"type": ..., "message": ...}}``; a runtime error's message is the runtime's own.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdrt.runtime.errors import InputError, InternalError, SdrtError
from sdrt.serve import schema

log = logging.getLogger(__name__)

Count = Callable[[str], None]  # counts a request's outcome: ok, bad_request, overloaded, timeout, error, cancelled


class ServiceError(Exception):
    """A refusal by the service itself: status, error type, outcome (the metric's label), Retry-After."""

    def __init__(self, status: int, kind: str, message: str, outcome: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.outcome, self.retry_after = status, kind, outcome, retry_after


def error_response(status: int, kind: str, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, count: Count | None = None) -> None:
    """Map errors to responses (and count them): the runtime's by kind, the body's to 422, the service's own
    refusals to theirs. None of them stops the process."""

    def counted(outcome: str) -> None:
        if count is not None:
            count(outcome)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        counted(e.outcome)
        return error_response(e.status, e.kind, str(e), e.retry_after)

    @app.exception_handler(schema.SchemaError)
    async def schema_error(request: Request, e: schema.SchemaError) -> JSONResponse:
        counted("bad_request")
        return error_response(422, "invalid_request", str(e))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        counted("bad_request")
        return error_response(422, "invalid_request", describe_validation(e.errors()))

    @app.exception_handler(SdrtError)
    async def runtime_error(request: Request, e: SdrtError) -> JSONResponse:
        if isinstance(e, InputError):  # BudgetError included: the caller asked for too much
            counted("bad_request")
            return error_response(400, type(e).__name__, str(e))
        counted("error")  # NumericalError, a backend's failure sdrt names, or an InternalError (logged with its id)
        if not isinstance(e, InternalError):
            log.error("request failed: %s: %s", type(e).__name__, e)
        return error_response(500, "internal_error" if isinstance(e, InternalError) else type(e).__name__, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def framework_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, another method, a body it cannot parse) in sdrt's shape."""
        counted("bad_request")
        kind, message = FRAMEWORK_ERRORS.get(e.status_code, ("invalid_request", str(e.detail)))
        if e.status_code == 404:
            message = f"{request.url.path}: expected one of {', '.join(ROUTES)}, got no such path"
        elif e.status_code == 405:
            message = f"{request.method} {request.url.path}: expected {e.headers.get('Allow', 'another method')}"
        headers = {k: v for k, v in (e.headers or {}).items() if k.lower() in ("allow", "retry-after")}
        response = error_response(e.status_code, kind, message)
        response.headers.update(headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
        """Anything else: logged with an id, answered 500 without the library's text."""
        counted("error")
        error = InternalError("the request")
        log.error("request %s: %s %s failed unexpectedly", error.request_id, request.method, request.url.path,
                  exc_info=e)  # fmt: skip
        return error_response(500, "internal_error", str(error))


ROUTES = ("POST /v1/images/generations", "GET /healthz", "GET /readyz", "GET /metrics")
FRAMEWORK_ERRORS = {
    400: (
        "invalid_request",
        "body: expected a JSON object in UTF-8, got a body the JSON reader refuses (invalid UTF-8, "
        "nesting deeper than it reads, or an integer of more than 4,300 digits)",
    ),
    404: ("not_found", ""),
    405: ("method_not_allowed", ""),
}


def describe_validation(errors) -> str:
    """One message for pydantic's errors about the body: unknown fields, a missing prompt, bad JSON."""
    unknown = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        return (
            f"body: expected fields among {', '.join(schema.FIELDS)}, got unknown {', '.join(map(repr, unknown))} "
            "(remove them; GET /docs describes each field)"
        )
    first = errors[0]
    if first["type"] == "json_invalid":
        where = first["loc"][-1]
        return f"body: expected a JSON object, got invalid JSON ({first.get('ctx', {}).get('error')} at byte {where})"
    if first["type"] == "missing" and first["loc"][-1] == "prompt":
        return "prompt: expected a string or a list of strings, got no prompt field"
    if first["loc"] in ((), ("body",)):
        return (
            f"body: expected a JSON object (Content-Type: application/json), got {type(first['input']).__name__} "
            f"({first['msg']})"
        )
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


async def respond(result, call: schema.Call, queue_wait: float) -> Response:
    """The response to a finished call: its error raised for the handlers, else JSON or PNG."""
    if isinstance(result, SdrtError):
        raise result
    if isinstance(result, Exception):  # not an SdrtError: wrapped here, logged with its id
        error = InternalError()
        log.error("request %s: generation failed unexpectedly", error.request_id, exc_info=result)
        raise error
    if call.response_format == "png":
        png = await asyncio.to_thread(schema.encode_png, result.images[0])
        return Response(png, media_type="image/png", headers=schema.png_headers(result, queue_wait))
    return JSONResponse(await asyncio.to_thread(schema.json_body, result, queue_wait))


def register_loras(pipe, folder: Path | str | None) -> list[str]:
    """Serve the adapters in ``folder``: each ``*.safetensors`` file registered under its stem (read and fitted
    to the model now, so a bad file stops the start-up naming it). Requests name adapters only by these names:
    the pipeline refuses paths from here on."""
    pipe.lora_paths = False
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--lora-dir: expected a folder of .safetensors LoRA files, got {str(folder)!r}")
    names = []
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors" and path.is_file():
            pipe.register_lora(path.stem, path)
            names.append(path.stem)
        else:
            log.warning("--lora-dir: skipping %s (not a .safetensors file)", path.name)
    log.info("LoRA adapters served from %s: %s", folder, ", ".join(names) or "none")
    return names


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, by its Content-Length or (chunked) as it
    arrives, before the app reads any of it; the app then gets the body whole."""

    def __init__(self, app, max_bytes: int, count: Count | None = None):
        self.app, self.max_bytes, self.count = app, max_bytes, count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = int(dict(scope["headers"]).get(b"content-length", 0))  # the server has checked it is a number
        if declared > self.max_bytes:
            return await self._refuse(f"{declared:,} bytes", scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse("more", scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, got: str, scope, receive, send) -> None:
        if self.count is not None:
            self.count("bad_request")
        limit = f"{self.max_bytes:,} bytes ({self.max_bytes / 2**20:g} MB)"
        message = f"request body: expected at most {limit}, got {got} (send smaller images, or raise --max-body-mb)"
        await error_response(413, "payload_too_large", message)(scope, receive, send)


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""


OPEN_PATHS = ("/healthz", "/readyz")  # liveness and readiness probes answer without a key


class ApiKey:
    """ASGI middleware: every request but the probes (OPEN_PATHS) must carry ``Authorization: Bearer <key>``;
    others get 401. The comparison takes the same time whatever the key sent (hmac.compare_digest)."""

    def __init__(self, app, key: str, count: Count | None = None):
        self.app, self.key, self.count = app, key.encode(), count

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self.key):
            return await self.app(scope, receive, send)
        if self.count is not None:
            self.count("bad_request")
        got = "no Authorization header" if not scheme else "another key" if scheme.lower() == "bearer" else scheme
        response = error_response(401, "unauthorized", f"Authorization: expected 'Bearer <the service's API key>', "
                                  f"got {got}")  # fmt: skip
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_allowed_hosts(bind: str) -> tuple[str, ...]:
    """Bound to loopback: only the names of loopback, so a web page cannot reach the service by DNS rebinding
    (its requests carry the attacker's host name). Bound elsewhere: any ("*"), unless --allowed-hosts says."""
    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    return LOOPBACK_NAMES if loopback else ("*",)


class AllowedHosts:
    """ASGI middleware: the Host header's name (port aside) must be one of ``hosts`` ("*" allows any, "*.example.com"
    a domain's subdomains); others get 400 in sdrt's error format."""

    def __init__(self, app, hosts: tuple[str, ...], count: Count | None = None):
        self.app, self.hosts, self.count = app, tuple(h.lower() for h in hosts), count

    def allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):  # [::1]:8000
            name = name[1 : name.find("]")] if "]" in name else name
        elif name.count(":") == 1:
            name = name.partition(":")[0]
        for pattern in self.hosts:
            if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return True
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or "*" in self.hosts:
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")
        if self.allowed(host):
            return await self.app(scope, receive, send)
        if self.count is not None:
            self.count("bad_request")
        shown = host[:100] if host else "none"
        message = f"Host: expected one of {', '.join(self.hosts)} (--allowed-hosts), got {shown!r}"
        await error_response(400, "invalid_host", message)(scope, receive, send)


class RateLimit:
    """ASGI middleware: a token bucket per client (its API key when it sends one, else its address): ``rate``
    generation requests per second on average, bursts of ``burst``; beyond, 429 with Retry-After. The probes and
    /metrics are not counted. Buckets of clients idle for a minute are forgotten (memory stays bounded)."""

    def __init__(self, app, rate: float, burst: int, count: Count | None = None, clock=time.monotonic):
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise InputError(f"--rate-limit: expected a rate > 0 per second and a burst >= 1, got {rate}:{burst}")
        self.app, self.rate, self.burst, self.count, self.clock = app, rate, burst, count, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update)

    def take(self, client: str) -> float:
        """0 when the client may go now (a token taken), else the seconds until it may."""
        now = self.clock()
        if len(self.buckets) > 10_000:
            self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
        tokens, last = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self.buckets[client] = (tokens - 1, now)
            return 0.0
        self.buckets[client] = (tokens, now)
        return (1 - tokens) / self.rate

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in (*OPEN_PATHS, "/metrics"):
            return await self.app(scope, receive, send)
        key = _header(scope, b"authorization")
        client = f"key:{hash(key)}" if key else f"addr:{(scope.get('client') or ('?',))[0]}"
        wait = self.take(client)
        if wait == 0:
            return await self.app(scope, receive, send)
        if self.count is not None:
            self.count("overloaded")
        message = (f"client: expected at most {self.rate:g} requests per second (bursts of {self.burst}; "
                   f"--rate-limit), got more (retry after {math.ceil(wait)} s)")  # fmt: skip
        await error_response(429, "rate_limited", message, math.ceil(wait))(scope, receive, send)

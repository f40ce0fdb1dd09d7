"""What the local service and the Ray Serve deployment share over HTTP: errors as status codes, the body size
limit, and the response for a result.

Every error answers ``{"error": {"type": ..., "message": ...}}``; a runtime error's message is the runtime's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from sdrt.runtime.errors import InputError, SdrtError
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
        counted("error")  # NumericalError, or a backend's failure sdrt names
        log.error("request failed: %s: %s", type(e).__name__, e)
        return error_response(500, type(e).__name__, str(e))


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
    if isinstance(result, Exception):  # not the call's fault, nor one sdrt names: a backend's own failure
        raise ServiceError(500, "internal_error", f"generation failed: {type(result).__name__}: {result}", "error")
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

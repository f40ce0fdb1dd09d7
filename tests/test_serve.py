"""sdrt serve: the real service (uvicorn on 127.0.0.1, a free port, a thread) on the tiny model, driven over HTTP.

A request gets exactly the library's image for the same arguments; every bad call the runtime refuses is refused
over HTTP with the runtime's message; overload, timeouts, disconnects, NaN and backend failures get their status
codes and are counted; concurrent requests share batches; the service drains on shutdown."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from bad_input_cases import CALL_CASES, call_kwargs, make_scratch
from PIL import Image

from sdrt.runtime.errors import SdrtError
from sdrt.serve import schema
from sdrt.serve.app import DrainingServer, ServeConfig, create_app

SMALL = {"num_inference_steps": 2, "height": 64, "width": 64}
RNG = np.random.default_rng(0)
PICTURE = (RNG.random((64, 64, 3)) * 255).astype(np.uint8)
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 16:48] = 255


# -- harness --------------------------------------------------------------------------------------
@contextmanager
def serving(pipe, ready: bool = True, drain_s: float = 0.0, **config):
    """The service on a free port in a background thread; yields (client, service, server)."""
    app = create_app(pipe, ServeConfig(**config))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), drain_s=drain_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60) as client:
            _until(lambda: server.started, "the server to start")
            if ready:
                _until(lambda: client.get("/readyz").status_code == 200, "/readyz to say ready")
            yield client, app.state.service, server
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert not thread.is_alive()


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Gate:
    """A session wrapper: each run says it has begun, then waits until the test opens the gate."""

    def __init__(self, inner):
        self.inner, self.entered, self.opened = inner, threading.Event(), threading.Event()

    def run(self, feed):
        self.entered.set()
        assert self.opened.wait(60), "the test never opened the gate"
        return self.inner.run(feed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Broken:
    """A session wrapper that returns NaN, or raises what a backend might."""

    def __init__(self, inner, nan: bool):
        self.inner, self.nan = inner, nan

    def run(self, feed):
        if not self.nan:
            raise RuntimeError("device lost")
        return {k: np.full_like(v, np.nan) for k, v in self.inner.run(feed).items()}

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def swap(runtime_pipeline):
    """``swap(name, wrapper)``: wrap one of the shared pipeline's sessions for a test; restored (and every gate
    opened) afterwards."""
    saved, wrappers = dict(runtime_pipeline.sessions), []

    def wrap(name: str, make):
        wrappers.append(make(saved[name]))
        runtime_pipeline.sessions[name] = wrappers[-1]
        return wrappers[-1]

    yield wrap
    for w in wrappers:
        if isinstance(w, Gate):
            w.opened.set()
    runtime_pipeline.sessions.update(saved)


@pytest.fixture(scope="module")
def server(runtime_pipeline):
    with serving(runtime_pipeline) as running:
        yield running


def post(client, body: dict, **kwargs) -> httpx.Response:
    return client.post(
        "/v1/images/generations", content=json.dumps(body), headers={"Content-Type": "application/json"}, **kwargs
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def decode(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def metric(client, name: str, **labels) -> float:
    """One sample of /metrics (0 when absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{selector}}}" if selector else "")) + r" (\S+)"
    found = re.search(rf"^{pattern}$", client.get("/metrics").text, re.MULTILINE)
    return float(found[1]) if found else 0.0


# -- a request gets the library's image ---------------------------------------------------------
REQUESTS = {
    "text-to-image, size": (
        dict(prompt="a red cube", seed=7, num_inference_steps=2, size="64x48"),
        dict(prompt="a red cube", seed=7, num_inference_steps=2, width=64, height=48),
    ),
    "two images, guidance, scheduler": (
        dict(prompt="a cow", negative_prompt="blur", seed=3, n=2, guidance_scale=3.0, scheduler="euler-a", **SMALL),
        dict(
            prompt="a cow",
            negative_prompt="blur",
            seed=3,
            num_images_per_prompt=2,
            guidance_scale=3.0,
            scheduler="euler-a",
            **SMALL,
        ),
    ),  # fmt: skip
    "image-to-image": (
        dict(prompt="a lake", seed=5, image=b64(png(PICTURE)), strength=0.6, num_inference_steps=4),
        dict(prompt="a lake", seed=5, image=Image.fromarray(PICTURE), strength=0.6, num_inference_steps=4),
    ),
    "inpainting, denoising_end": (
        dict(prompt="a door", seed=9, image=b64(png(PICTURE)), mask_image=b64(png(MASK)), denoising_end=0.5, **SMALL),
        dict(
            prompt="a door",
            seed=9,
            image=Image.fromarray(PICTURE),
            mask_image=Image.fromarray(MASK),
            denoising_end=0.5,
            **SMALL,
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", REQUESTS)
def test_a_request_gets_the_librarys_image(server, runtime_pipeline, name):
    client, _, _ = server
    body, call = REQUESTS[name]
    response = post(client, body)
    assert response.status_code == 200, response.text
    got = response.json()
    want = runtime_pipeline(**call)
    assert got["seed"] == body["seed"] and isinstance(got["created"], int)
    assert len(got["data"]) == len(want.images)
    for item, image in zip(got["data"], want.images):
        np.testing.assert_array_equal(decode(item["b64_json"]), image)
    assert {"queue_wait", "text_encoder", "denoise", "vae_decoder", "total"} <= set(got["timings"])


def test_png_response_carries_seed_and_timings_in_headers(server, runtime_pipeline):
    client, _, _ = server
    response = post(client, dict(prompt="a lighthouse", seed=11, response_format="png", **SMALL))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    want = runtime_pipeline("a lighthouse", seed=11, **SMALL).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(response.content))), want)
    assert response.headers["x-seed"] == "11"
    assert re.fullmatch(r"queue_wait;dur=[\d.]+(, \w+;dur=[\d.]+)+", response.headers["server-timing"])
    assert "denoise;dur=" in response.headers["server-timing"]


# -- bad requests: the runtime's own message, or the service's for what only it reads -------------
NOT_JSON = {  # cases whose values JSON (or a PNG) cannot carry
    "prompt=b'bytes'", "image path missing", "image with NaN", "image float values > 1", "image of 1 dimension",
    "image latents with NaN", "mask_image with NaN",
}  # fmt: skip


def as_request(case, tmp) -> tuple[dict, dict]:
    """The JSON body standing for a call case, and the runtime call it becomes (images as the service decodes
    them)."""
    body, call = {}, {}
    for key, value in call_kwargs(case, tmp).items():
        if key not in schema.FIELDS:  # refused by name, whatever its value
            body[key] = call[key] = None
        elif key in ("image", "mask_image", "control_image") and isinstance(value, (np.ndarray, str)):
            if isinstance(value, str):
                data = open(value, "rb").read()
            else:
                data = png(np.round(value * 255).astype(np.uint8).squeeze())
            body[key], call[key] = b64(data), data
        else:
            body[key] = call[key] = list(value) if isinstance(value, tuple) else value
    return body, call


# Cases that name LoRA files by path: over HTTP a request names registered adapters only, so each gets the same
# refusal, naming the registered ones (tests/test_lora.py: test_service_serves_registered_adapters_by_name_only).
BY_PATH = {c.id for c in CALL_CASES if "loras" in c.kwargs}
# Cases for a pipeline loaded with ControlNets: this server's has none (tests/test_controlnet.py serves one and
# checks its control_image requests).
WITH_CONTROLNETS = {c.id for c in CALL_CASES if c.controlnets}


@pytest.mark.parametrize(
    "case",
    [c for c in CALL_CASES if c.id not in NOT_JSON | BY_PATH | WITH_CONTROLNETS and c.model == "tiny"],
    ids=lambda c: c.id,
)
def test_bad_call_gets_the_runtimes_message(server, runtime_pipeline, tmp_path, case):
    client, _, _ = server
    make_scratch(tmp_path)
    body, call = as_request(case, tmp_path)
    response = post(client, body)
    error = response.json()["error"]
    unknown = sorted(set(body) - set(schema.FIELDS))
    if unknown:  # arguments the HTTP API does not offer (latents, eta, callback, SDXL's, ...)
        assert response.status_code == 422 and error["type"] == "invalid_request"
        assert all(repr(name) in error["message"] for name in unknown), error
        return
    for key in ("image", "mask_image", "control_image"):
        if isinstance(call.get(key), bytes):
            try:
                call[key] = schema.decode_image(key, b64(call[key]))
            except SdrtError as e:  # not an image: only the service reads it
                assert response.status_code == 400 and error["message"] == str(e)
                assert error["message"].startswith(f"{key}: expected a base64-encoded PNG or JPEG")
                return
        elif key in call and call[key] is not None:  # a number, a list: only the service reads it
            assert response.status_code == 400 and error["message"].startswith(f"{key}: expected a base64")
            return
    with pytest.raises(SdrtError) as refused:
        runtime_pipeline(**call)
    assert response.status_code == 400, response.text
    assert error == {"type": type(refused.value).__name__, "message": str(refused.value)}
    assert isinstance(refused.value, case.error) and case.says in error["message"]


def test_json_cannot_express_only_these_cases():
    assert NOT_JSON <= {c.id for c in CALL_CASES}, "a case was renamed: update NOT_JSON"


def _bomb() -> bytes:
    out = io.BytesIO()
    Image.new("1", (5000, 4000)).save(out, format="PNG")  # 20 million pixels in a few kilobytes
    return out.getvalue()


UNDECODABLE = {
    "not base64": ("image", "%%%", "image: expected a base64-encoded PNG or JPEG, got invalid base64"),
    "text": (
        "image",
        b64(b"hello world"),
        "image: expected a base64-encoded PNG or JPEG, got 11 bytes starting b'hello wo'",
    ),
    "truncated PNG": (
        "mask_image",
        b64(png(PICTURE)[:5000]),
        "mask_image: expected a complete PNG or JPEG, got one PIL",
    ),
    "too many pixels": ("image", b64(_bomb()), "image: expected at most 16,777,216 pixels, got 5000x4000"),
    "data URL": ("image", "data:image/png;base64," + b64(b"GIF89a"), "image: expected a base64-encoded PNG or JPEG"),
}


@pytest.mark.parametrize("name", UNDECODABLE)
def test_images_the_service_cannot_decode_are_400(server, name):
    client, _, _ = server
    field, value, says = UNDECODABLE[name]
    body = {"prompt": "a", "image": b64(png(PICTURE)), field: value}
    response = post(client, body)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(says), response.text[:300]


SCHEMA_ERRORS = {
    "unknown field": ({"prompt": "a", "stepz": 3}, "got unknown 'stepz'"),
    "no prompt": ({"seed": 1}, "prompt: expected a string or a list of strings, got no prompt field"),
    "size malformed": ({"prompt": "a", "size": "big"}, "size: expected 'WIDTHxHEIGHT' such as '512x512', got 'big'"),
    "size and height": ({"prompt": "a", "size": "64x64", "height": 64}, "size: expected size or height/width"),
    "n and num_images_per_prompt": ({"prompt": "a", "n": 1, "num_images_per_prompt": 1}, "n: expected n or"),
    "response_format": ({"prompt": "a", "response_format": "url"}, "response_format: expected one of b64_json, png"),
}


@pytest.mark.parametrize("name", SCHEMA_ERRORS)
def test_unreadable_body_is_422_with_a_clear_message(server, name):
    client, _, _ = server
    body, says = SCHEMA_ERRORS[name]
    response = post(client, body)
    assert response.status_code == 422 and says in response.json()["error"]["message"], response.text


@pytest.mark.parametrize(
    "content, says",
    [(b'{"prompt": ', "body: expected a JSON object, got invalid JSON"), (b"[1, 2]", "body: expected a JSON object")],
)
def test_malformed_json_is_422(server, content, says):
    client, _, _ = server
    response = client.post("/v1/images/generations", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["error"]["message"].startswith(says), response.text


def test_png_of_several_images_is_400(server):
    client, _, _ = server
    response = post(client, {"prompt": "a", "n": 2, "response_format": "png"})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("response_format: 'png' returns one image, got a request")


def test_body_over_the_limit_is_413(runtime_pipeline):
    with serving(runtime_pipeline, max_body_mb=0.01) as (client, _, _):
        big = {"prompt": "x" * 20_000}
        response = post(client, big)  # Content-Length says it
        assert response.status_code == 413 and "expected at most 10,485 bytes" in response.text

        def chunks():  # chunked: no Content-Length, counted as it arrives
            yield json.dumps(big).encode()

        response = client.post("/v1/images/generations", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"
        assert post(client, dict(prompt="small", seed=0, **SMALL)).status_code == 200
        assert metric(client, "sdrt_requests_total", outcome="bad_request") == 2


# -- overload, disconnects, timeouts, failures ---------------------------------------------------
def background_post(client, body: dict) -> dict:
    """POST in a thread; the returned dict gets the response (key "response") when it comes."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(response=post(client, body)), daemon=True)
    thread.start()
    out["thread"] = thread
    return out


def test_full_queue_503_and_a_disconnected_client_frees_its_slot(runtime_pipeline, swap):
    with serving(runtime_pipeline, max_batch=1, queue_size=1) as (client, _, _):
        gate = swap("unet", Gate)
        running = background_post(client, dict(prompt="first", seed=1, **SMALL))
        assert gate.entered.wait(30)
        with pytest.raises(httpx.ReadTimeout):  # queued, then its client gives up
            post(client, dict(prompt="leaves", seed=2, **SMALL), timeout=0.5)
        _until(lambda: metric(client, "sdrt_requests_total", outcome="cancelled") == 1, "the cancel to count")
        assert metric(client, "sdrt_queue_depth") == 0  # its slot is free again
        queued = background_post(client, dict(prompt="second", seed=3, **SMALL))
        _until(lambda: metric(client, "sdrt_queue_depth") == 1, "the second request to queue")
        response = post(client, dict(prompt="third", seed=4, **SMALL))
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["type"] == "overloaded"
        gate.opened.set()
        for job, (prompt, seed) in ((running, ("first", 1)), (queued, ("second", 3))):
            job["thread"].join(60)
            assert job["response"].status_code == 200
            want = runtime_pipeline(prompt, seed=seed, **SMALL).images[0]
            np.testing.assert_array_equal(decode(job["response"].json()["data"][0]["b64_json"]), want)
        counts = {o: metric(client, "sdrt_requests_total", outcome=o) for o in ("ok", "overloaded", "cancelled")}
        assert counts == {"ok": 2, "overloaded": 1, "cancelled": 1}
        assert metric(client, "sdrt_batch_images_count") == 2  # the one that left never ran


def test_request_past_its_timeout_is_504(runtime_pipeline, swap):
    with serving(runtime_pipeline, timeout_s=0.5) as (client, service, _):
        gate = swap("unet", Gate)
        t0 = time.perf_counter()
        response = post(client, dict(prompt="slow", seed=1, **SMALL))
        assert response.status_code == 504 and 0.5 <= time.perf_counter() - t0 < 10
        assert response.json()["error"]["message"].startswith("request: expected a result within 0.5 s")
        gate.opened.set()
        assert metric(client, "sdrt_requests_total", outcome="timeout") == 1


@pytest.mark.parametrize("nan", [True, False], ids=["NaN", "backend exception"])
def test_failures_are_500_and_the_service_goes_on(runtime_pipeline, swap, nan):
    with serving(runtime_pipeline) as (client, _, _):
        swap("unet", lambda inner: Broken(inner, nan))
        response = post(client, dict(prompt="a", seed=1, **SMALL))
        assert response.status_code == 500
        error = response.json()["error"]
        if nan:
            assert error["type"] == "NumericalError" and error["message"].startswith("unet at step 1 of 2")
        else:
            # the library's own text stays in the log, under the request id the answer names
            assert error["type"] == "internal_error" and "device lost" not in error["message"]
            assert re.fullmatch(r"internal error: generation failed unexpectedly \(request id [0-9a-f]{12}; .*\)",
                                error["message"]), error  # fmt: skip
        runtime_pipeline.sessions["unet"] = runtime_pipeline.sessions["unet"].inner
        assert post(client, dict(prompt="a", seed=1, **SMALL)).status_code == 200
        assert metric(client, "sdrt_requests_total", outcome="error") == 1
        assert metric(client, "sdrt_requests_total", outcome="ok") == 1


# -- batching ------------------------------------------------------------------------------------
def test_concurrent_requests_share_batches_and_get_their_own_images(runtime_pipeline):
    prompts = [("a red cube", 21), ("a blue sphere", 22), ("a green cone", 23), ("a cat", 24)]
    with serving(runtime_pipeline, max_batch=4, batch_wait_ms=2000) as (client, _, _):
        jobs = [background_post(client, dict(prompt=p, seed=s, **SMALL)) for p, s in prompts]
        for job in jobs:
            job["thread"].join(60)
        batches, images = metric(client, "sdrt_batch_images_count"), metric(client, "sdrt_batch_images_sum")
        assert images == 4 and batches < 4, (batches, images)  # at least two requests ran as one batch
        assert metric(client, "sdrt_max_batch") == 4
        shared = [job["response"].json()["timings"].get("batch_size", 1) for job in jobs]
        assert max(shared) > 1  # and shared their UNet calls
        for job, (prompt, seed) in zip(jobs, prompts):
            want = runtime_pipeline(prompt, seed=seed, **SMALL).images[0]
            np.testing.assert_array_equal(decode(job["response"].json()["data"][0]["b64_json"]), want)
        text = client.get("/metrics").text
        for stage in ("queue_wait", "text_encoder", "denoise", "vae_decoder", "total"):
            assert f'sdrt_stage_seconds_count{{stage="{stage}"}} 4.0' in text


# -- readiness and shutdown ----------------------------------------------------------------------
def test_ready_after_warm_up_then_drains_on_shutdown(runtime_pipeline, swap):
    gate = swap("unet", Gate)
    with serving(runtime_pipeline, ready=False, drain_s=2.0) as (client, service, server):
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and response.json() == {"status": "warming up"}
        gate.opened.set()
        _until(lambda: client.get("/readyz").status_code == 200, "the warm-up")

        gate = swap("unet", Gate)
        in_flight = background_post(client, dict(prompt="in flight", seed=5, **SMALL))
        assert gate.entered.wait(30)
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn calls on SIGTERM
        response = client.get("/readyz")
        refused = post(client, dict(prompt="late", seed=6, **SMALL))
        assert time.monotonic() - t0 < 2.0, "the checks came after the drain window"
        assert response.status_code == 503 and response.json() == {"status": "draining"}
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error"]["message"].startswith("service: draining for shutdown")
        gate.opened.set()
        in_flight["thread"].join(60)
        assert in_flight["response"].status_code == 200  # the request in flight finished
        want = runtime_pipeline("in flight", seed=5, **SMALL).images[0]
        np.testing.assert_array_equal(decode(in_flight["response"].json()["data"][0]["b64_json"]), want)
        assert metric(client, "sdrt_requests_total", outcome="overloaded") == 1
        _until(lambda: server.should_exit, "the drain window to end")
    assert service.state == "draining"


# -- the command ---------------------------------------------------------------------------------
def test_sdrt_serve_explains_its_options_and_refuses_cleanly(tmp_path, capsys):
    import argparse

    from sdrt.runtime.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["serve"]._actions:
        assert action.help, f"sdrt serve {action.option_strings}: no help text"
    assert main(["serve", "--artifacts", str(tmp_path), "--max-batch", "0"]) == 2
    assert "sdrt serve: error: max_batch: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "sdrt serve: error: artifacts: expected" in err and "Traceback" not in err

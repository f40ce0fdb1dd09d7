"""sdrt serve against hostile requests (issue 22): one bad call never fails the calls batched with it, every error
(the framework's 404/405/unparseable bodies included) has sdrt's shape and a bounded message, unexpected failures
answer 500 with a request id and no library text, and the optional API key, Host allow-list and per-client rate
limit refuse what they should and nothing else."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from bad_input_cases import _big_png_header
from test_serve import SMALL, b64, background_post, decode, post, serving

from sdrt.runtime import InputError, InternalError
from sdrt.serve import api
from sdrt.serve.app import ServeConfig

KEY = "k" * 24


class FailsInGroups:
    """A session wrapper raising what no one names (a library's TypeError) whenever it gets more than one row per
    guidance half: calls fail only when batched, which run_batch must isolate by running them again alone."""

    def __init__(self, inner, always: bool = False):
        self.inner, self.always = inner, always

    def run(self, feed):
        if self.always or next(iter(feed.values())).shape[0] > 2:
            raise TypeError("TextEncodeInput must be Union[...] (a library's own message)")
        return self.inner.run(feed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


# -- run_batch: per-call isolation -----------------------------------------------------------------
def test_a_lone_surrogate_is_refused_in_its_slot_and_the_calls_batched_with_it_succeed(runtime_pipeline):
    calls = [dict(prompt="a red cube", seed=1, **SMALL), dict(prompt="\ud800", seed=2, **SMALL),
             dict(prompt="a blue cone", seed=3, **SMALL)]  # fmt: skip
    first, bad, third = runtime_pipeline.run_batch(calls)
    assert isinstance(bad, InputError) and "prompt: expected valid Unicode text, got a lone surrogate" in str(bad)
    for result, call in ((first, calls[0]), (third, calls[2])):
        np.testing.assert_array_equal(result.images, runtime_pipeline(**call).images)


def test_an_unexpected_failure_of_a_batch_reruns_each_call_alone(runtime_pipeline, monkeypatch, caplog):
    calls = [dict(prompt="a red cube", seed=1, **SMALL), dict(prompt="a blue cone", seed=2, **SMALL)]
    want = [runtime_pipeline(**call).images for call in calls]
    monkeypatch.setitem(runtime_pipeline.sessions, "unet", FailsInGroups(runtime_pipeline.sessions["unet"]))
    results = runtime_pipeline.run_batch(calls)
    for result, image in zip(results, want):
        np.testing.assert_array_equal(result.images, image)  # alone, each from its own seed: the same image
        assert result.timings.get("batch_size", 1) == 1
    monkeypatch.setitem(runtime_pipeline.sessions, "unet", FailsInGroups(runtime_pipeline.sessions["unet"], True))
    with caplog.at_level(logging.ERROR):
        errors = runtime_pipeline.run_batch(calls)
    assert all(isinstance(e, InternalError) for e in errors) and errors[0].request_id != errors[1].request_id
    assert "TextEncodeInput" not in str(errors[0])
    logged = [r for r in caplog.records if errors[0].request_id in r.getMessage()]
    assert logged and logged[0].exc_info and "TextEncodeInput" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (list(range(1_000_000)), "a list of 1,000,000 items, [0, 1, 2, ...]"),
        ({str(i): i for i in range(200_000)}, "a dict of 200,000 items, {'0': 0, '1': 1, '2': 2, ...}"),
        (10**5000, "height: expected at most 1,048,576 pixels, got an integer of about 5,001 digits"),
    ],
    ids=["1M-item list", "200k-key dict", "5000-digit integer"],
)
def test_a_huge_refused_value_is_summarized(runtime_pipeline, value, says):
    with pytest.raises(InputError) as info:
        runtime_pipeline("a cat", height=value)
    assert says in str(info.value) and len(str(info.value)) < 300


def test_no_message_outgrows_the_cap():
    from sdrt.runtime.errors import MAX_MESSAGE

    message = str(InputError("x: expected y, got " + "z" * 100_000))
    assert len(message) <= MAX_MESSAGE and message.endswith("(message cut: 100,019 characters in all)")


def test_truncation_an_empty_prompt_and_a_resized_mask_are_reported(runtime_pipeline):
    long = " ".join(["word"] * 100)
    result = runtime_pipeline(long, negative_prompt="", seed=1, **SMALL)
    assert len(result.warnings) == 1 and result.warnings[0].startswith("prompt: truncated to 77 tokens for text_en")
    assert "not read: 'word word word" in result.warnings[0]
    assert runtime_pipeline("a cat", seed=1, **SMALL).warnings == []
    assert runtime_pipeline("  ", seed=1, **SMALL).warnings == ["prompt: empty: the image follows no text"]
    mask = np.zeros((32, 32), np.float32)
    image = np.full((64, 64, 3), 0.5, np.float32)
    inpainted = runtime_pipeline("a cat", image=image, mask_image=mask, seed=1, **SMALL)
    assert inpainted.warnings == ["mask_image: resized from 32x32 to the output's 64x64 (as diffusers does)"]


# -- over HTTP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(runtime_pipeline):
    with serving(runtime_pipeline) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(runtime_pipeline):
    """The service with every guard on: a key, loopback's names only, 2 requests per second (bursts of 3)."""
    config = dict(api_key=KEY, allowed_hosts=api.LOOPBACK_NAMES, rate_limit=2.0, rate_burst=3)
    with serving(runtime_pipeline, ready=False, **config) as (client, service, _):
        client.headers["Authorization"] = f"Bearer {KEY}"
        yield client, service


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    return body["error"]


def test_framework_refusals_answer_in_sdrts_format(server):
    client = server[0]
    missing = client.get("/v2/nothing")
    assert missing.status_code == 404 and _error(missing)["type"] == "not_found"
    assert "expected one of POST /v1/images/generations" in _error(missing)["message"]
    wrong = client.get("/v1/images/generations")
    assert wrong.status_code == 405 and _error(wrong)["type"] == "method_not_allowed"
    assert wrong.headers["Allow"] == "POST"
    headers = {"Content-Type": "application/json"}
    bodies = {
        "not UTF-8": b'{"prompt": "\xff\xfe"}',
        "5000-digit integer": b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}",
        "100,000-deep nesting": b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }
    for what, body in bodies.items():
        response = client.post("/v1/images/generations", content=body, headers=headers)
        assert response.status_code in (400, 422), (what, response.status_code, response.text[:200])
        error = _error(response)
        assert error["type"] == "invalid_request" and len(error["message"]) < 400, (what, error)


def test_input_refusals_over_http_are_400_and_bounded(server):
    client = server[0]
    for body, says in (
        (dict(prompt="a", guidance_scale=1e308, **SMALL), "guidance_scale: expected a finite number in [0, 100]"),
        (dict(prompt="x" * 100_000, **SMALL), "prompt: expected at most 20,000 characters"),
        (dict(prompt="a", image=b64(_big_png_header(20000, 20000)), **SMALL), "got 400,000,000 pixels"),
    ):
        response = post(client, body)
        assert response.status_code == 400 and says in _error(response)["message"], response.text[:300]
    lone = client.post("/v1/images/generations", content=b'{"prompt": "\\ud800", "num_inference_steps": 2}',
                       headers={"Content-Type": "application/json"})  # fmt: skip
    assert lone.status_code == 400 and "lone surrogate" in _error(lone)["message"]
    long = post(client, dict(prompt=" ".join(["word"] * 100), seed=1, **SMALL))
    assert long.status_code == 200 and long.json()["warnings"][0].startswith("prompt: truncated to 77 tokens")
    as_png = post(client, dict(prompt=" ".join(["word"] * 100), seed=1, response_format="png", **SMALL))
    assert json.loads(as_png.headers["X-Sdrt-Warnings"])[0].startswith("prompt: truncated")


def test_the_api_key_guards_all_but_the_probes(guarded):
    client, _ = guarded
    anonymous = {"Authorization": ""}
    for headers, got in ((anonymous, "no Authorization header"), ({"Authorization": "Bearer wrong"}, "another key"),
                         ({"Authorization": f"Basic {KEY}"}, "Basic")):  # fmt: skip
        response = client.post("/v1/images/generations", json=dict(prompt="a", **SMALL), headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert _error(response) == {"type": "unauthorized", "message": "Authorization: expected 'Bearer <the "
                                    f"service's API key>', got {got}"}  # fmt: skip
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert client.get(path, headers=anonymous).status_code == 401, path
    for path in ("/healthz", "/readyz"):
        assert client.get(path, headers=anonymous).status_code in (200, 503), path  # open: probes carry no key
    assert client.get("/metrics").status_code == 200


def test_hosts_outside_the_allow_list_are_refused(guarded):
    client, _ = guarded
    evil = client.get("/metrics", headers={"Host": "evil.example"})
    assert evil.status_code == 400
    assert _error(evil) == {"type": "invalid_host", "message": "Host: expected one of localhost, 127.0.0.1, ::1 "
                            "(--allowed-hosts), got 'evil.example'"}  # fmt: skip
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
        assert client.get("/metrics", headers={"Host": host}).status_code == 200, host
    assert api.default_allowed_hosts("127.0.0.1") == api.default_allowed_hosts("::1") == api.LOOPBACK_NAMES
    assert api.default_allowed_hosts("0.0.0.0") == ("*",)
    hosts = api.AllowedHosts(None, ("*.example.com",))
    assert hosts.allowed("a.example.com:443") and not hosts.allowed("example.com.evil.net")


def test_the_rate_limit_is_per_client_with_retry_after(guarded):
    client, service = guarded
    statuses = [post(client, dict(prompt=1)).status_code for _ in range(4)]  # 422s: refused cheaply, still counted
    assert all(s in (400, 422) for s in statuses[:3]) and statuses[3] == 429
    limited = post(client, dict(prompt=1))
    assert _error(limited)["type"] == "rate_limited" and int(limited.headers["Retry-After"]) >= 1
    assert client.get("/metrics").status_code == 200  # not counted against the client
    now = [0.0]
    bucket = api.RateLimit(None, rate=2.0, burst=1, clock=lambda: now[0])
    assert bucket.take("a") == 0 and bucket.take("a") == pytest.approx(0.5) and bucket.take("b") == 0
    now[0] = 0.5
    assert bucket.take("a") == 0  # refilled at 2 per second


def test_docs_can_be_turned_off(runtime_pipeline):
    with serving(runtime_pipeline, ready=False, docs=False) as (client, _, _):
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path


def test_configuration_is_checked_and_read_from_the_command_line(monkeypatch):
    import argparse

    from sdrt.serve.cli import config_from_args, register_serve

    with pytest.raises(InputError, match=r"api_key: expected a string of at least 16 characters \(a guessable key is "
                                         r"none\), got 5 characters"):  # fmt: skip
        ServeConfig(api_key="short")
    parser = argparse.ArgumentParser()
    register_serve(parser.add_subparsers())
    monkeypatch.setenv("SDRT_API_KEY", KEY)
    config = config_from_args(parser.parse_args(["serve", "--artifacts", "a", "--rate-limit", "0.5:4", "--no-docs"]))
    assert (config.api_key, config.allowed_hosts, config.rate_limit, config.rate_burst, config.docs) == (
        KEY, api.LOOPBACK_NAMES, 0.5, 4, False)  # fmt: skip
    config = config_from_args(
        parser.parse_args(["serve", "--artifacts", "a", "--host", "0.0.0.0", "--api-key", "b" * 16])
    )
    assert (config.api_key, config.allowed_hosts, config.rate_limit) == ("b" * 16, ("*",), 0.0)
    from sdrt.runtime.errors import SdrtError

    with pytest.raises(SdrtError, match="--rate-limit: expected RATE"):
        config_from_args(parser.parse_args(["serve", "--artifacts", "a", "--rate-limit", "fast"]))


def test_hostile_and_valid_requests_in_one_batch_each_get_their_own_answer(runtime_pipeline):
    """Four requests arrive within one batch window: two valid ones get exactly the library's images, the hostile
    ones their 400s; the batch ran them together."""
    valid = [dict(prompt="a red cube", seed=21, **SMALL), dict(prompt="a blue sphere", seed=22, **SMALL)]
    hostile = [dict(prompt="\ud800", seed=23, **SMALL), dict(prompt="a", guidance_scale=1e308, seed=24, **SMALL)]
    with serving(runtime_pipeline, max_batch=4, batch_wait_ms=2000) as (client, _, _):
        jobs = [background_post(client, body) for body in (valid[0], hostile[0], valid[1], hostile[1])]
        for job in jobs:
            job["thread"].join(60)
    responses = [job["response"] for job in jobs]
    assert [r.status_code for r in responses] == [200, 400, 200, 400]
    for response, body in zip((responses[0], responses[2]), valid):
        np.testing.assert_array_equal(
            decode(response.json()["data"][0]["b64_json"]), runtime_pipeline(**body).images[0]
        )
        assert response.json()["timings"]["batch_size"] == 2  # the two valid ones shared the batch's UNet calls
    assert "lone surrogate" in responses[1].json()["error"]["message"]
    assert "guidance_scale" in responses[3].json()["error"]["message"]


def test_a_batch_that_fails_as_a_whole_answers_each_request_with_one_logged_id(caplog):
    """run_batch keeps each call's failure in its slot; should it fail itself, every job of the batch gets an
    InternalError naming one id, under which the traceback was logged (never the library's text)."""
    import asyncio

    from sdrt.serve.batcher import Batcher

    def broken(calls):
        raise TypeError("a library's own message")

    async def scenario():
        batcher = Batcher(broken, max_images=4, wait_s=0.05, queue_size=8)
        loop = asyncio.create_task(batcher.run())
        jobs = [batcher.submit({"prompt": p}, 1) for p in ("a", "b")]
        results = await asyncio.gather(*(job.future for job in jobs))
        loop.cancel()
        batcher.close()
        return results

    with caplog.at_level(logging.ERROR):
        first, second = asyncio.run(scenario())
    assert isinstance(first, InternalError) and first is second and "library" not in str(first)
    assert any(first.request_id in r.getMessage() and r.exc_info for r in caplog.records)

"""The Ray Serve deployment (sdrt.serve.ray_app): a local Ray with two CPU replicas serves the HTTP API and
returns the library's images; bad input gets the runtime's message, as from `sdrt serve`."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from sdrt.runtime.errors import InputError

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="needs the [ray] extra: pip install -e '.[ray]' (make venv has it)",
    ),
    # Ray Serve's own config models (ray/serve/_private/config.py), third-party noise
    pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field` is deprecated:DeprecationWarning"),
]

SMALL = {"num_inference_steps": 2, "height": 64, "width": 64}
PROMPTS = [("a red cube", 31), ("a blue sphere", 32), ("a green cone", 33), ("a cat", 34)]


def decode(b64_png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_png))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(tiny_artifacts):
    import ray
    from ray import serve

    from sdrt.serve import ray_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        application = ray_app.app({"artifacts": str(tiny_artifacts), "num_replicas": 2, "num_cpus": 1, "max_batch": 4})
        serve.run(application, name="sdrt", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_serve_the_librarys_images(ray_url, runtime_pipeline):
    from ray import serve

    status = serve.status().applications["sdrt"].deployments["Generator"]
    assert status.replica_states == {"RUNNING": 2}

    def generate(prompt_seed):
        prompt, seed = prompt_seed
        body = json.dumps(dict(prompt=prompt, seed=seed, **SMALL))
        with httpx.Client(base_url=ray_url, timeout=120) as client:
            return client.post("/v1/images/generations", content=body, headers={"Content-Type": "application/json"})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(generate, PROMPTS))
    print(f"{len(PROMPTS)} concurrent requests: {time.perf_counter() - t0:.2f} s")
    for response, (prompt, seed) in zip(responses, PROMPTS):
        assert response.status_code == 200, response.text[:300]
        want = runtime_pipeline(prompt, seed=seed, **SMALL).images[0]
        np.testing.assert_array_equal(decode(response.json()["data"][0]["b64_json"]), want)


def test_bad_input_gets_the_runtimes_message(ray_url, runtime_pipeline):
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a", "width": 72})
        unknown = client.post("/v1/images/generations", json={"prompt": "a", "latents": [0]})
    with pytest.raises(InputError) as refused:
        runtime_pipeline("a", width=72)
    assert response.status_code == 400
    assert response.json()["error"] == {"type": "InputError", "message": str(refused.value)}
    assert unknown.status_code == 422 and "got unknown 'latents'" in unknown.json()["error"]["message"]

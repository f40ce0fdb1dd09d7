"""The service on Ray Serve: the same request, responses and errors as ``sdrt serve``, on many replicas (on many
machines), each loading the pipeline once and batching with Ray Serve's ``@serve.batch`` through
``Pipeline.run_batch``.

    ray start --head                     # or an existing cluster (`serve run` alone starts a local Ray)
    serve run sdrt.serve.ray_app:app artifacts=artifacts/tiny-sd num_replicas=2

Arguments (``key=value``, see ``RayOptions``): ``artifacts`` (a path every node can read), ``backend``,
``num_replicas``, or ``min_replicas`` + ``max_replicas`` to autoscale on ``target_ongoing_requests``;
``num_cpus`` / ``num_gpus`` per replica (on a CPU, one replica per ``num_cpus`` cores; ``threads`` defaults to
``num_cpus``), ``max_batch`` (requests per batch), ``batch_wait_ms``, ``max_ongoing_requests`` (per replica),
``queue_size`` (requests Ray holds for a deployment before answering 503), ``lora_dir`` (adapters by name).

Differences from ``sdrt serve``: a batch counts requests rather than images (``@serve.batch``); queueing,
timeouts (``request_timeout_s`` of Serve's HTTP options) and metrics are Ray Serve's own; the body limit is
``DEFAULT_MAX_BODY_MB``; a replica takes traffic once its constructor, which runs the warm-up, has returned.
"""

import asyncio
import logging
import time

from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from sdrt.runtime import Pipeline
from sdrt.serve import api, schema

log = logging.getLogger("ray.serve")

DEFAULT_MAX_BODY_MB = 20
WARM_UP = {"prompt": "warm-up", "num_inference_steps": 1, "seed": 0}

http = FastAPI(title="sdrt on Ray Serve", summary="Stable Diffusion on exported graphs")
api.install_error_handlers(http)
http.add_middleware(api.BodyLimit, max_bytes=DEFAULT_MAX_BODY_MB * 2**20)


@serve.deployment
@serve.ingress(http)
class Generator:
    def __init__(
        self, artifacts: str, backend: str, threads: int, max_batch: int, batch_wait_s: float, lora_dir: str | None
    ):
        self.pipe = Pipeline.load(artifacts, backend=backend, threads=threads)
        api.register_loras(self.pipe, lora_dir)  # names only, from here on
        self.generate.set_max_batch_size(max_batch)
        self.generate.set_batch_wait_timeout_s(batch_wait_s)
        (result,) = self.pipe.run_batch([WARM_UP])  # before the replica takes traffic
        if isinstance(result, Exception):
            raise result
        log.info("sdrt: %s loaded on %s, warm-up %.2f s", artifacts, backend, result.timings["total"])

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.02)
    async def generate(self, calls: list[dict]) -> list:
        try:
            return await asyncio.to_thread(self.pipe.run_batch, calls)
        except Exception as e:  # a backend's own failure: every call of the batch gets it
            return [e] * len(calls)

    @http.post("/v1/images/generations", responses={200: {"content": {"image/png": {}}}})
    async def generations(self, body: schema.GenerationBody) -> Response:
        """Generate images; the same request, response and errors as `sdrt serve`."""
        t0 = time.perf_counter()
        call = await asyncio.to_thread(schema.to_call, body)
        result = await self.generate(call.kwargs)
        waited = time.perf_counter() - t0 - (0.0 if isinstance(result, Exception) else result.timings["total"])
        return await api.respond(result, call, max(0.0, waited))

    @http.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @http.get("/readyz")
    async def readyz(self) -> dict:
        return {"status": "ready"}  # a replica answers only after its warm-up

    def __del__(self):
        pipe = getattr(self, "pipe", None)
        if pipe is not None:
            pipe.close()


class RayOptions(BaseModel):
    """The arguments of ``serve run sdrt.serve.ray_app:app key=value ...``."""

    model_config = ConfigDict(extra="forbid")

    artifacts: str = Field(description="artifact directory, readable on every node")
    backend: str = "onnxruntime"
    num_replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0, description="with max_replicas: autoscale instead")
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="autoscaling: requests per replica to aim at")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (one replica per num_cpus cores)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU)")
    threads: int | None = Field(None, ge=0, description="threads per graph (default: num_cpus on a CPU)")
    max_batch: int = Field(4, ge=1, description="requests per batch")
    batch_wait_ms: float = Field(20.0, ge=0)
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica (default: 2 x max_batch)")
    queue_size: int = Field(32, ge=-1, description="requests waiting for a replica; more get 503 (-1: no limit)")
    lora_dir: str | None = Field(None, description="LoRA adapters to serve by name (every node reads the folder)")


def deployment_options(o: RayOptions) -> dict:
    """``Generator.options(...)`` for the arguments: replicas or autoscaling, resources, concurrency."""
    options = {
        "ray_actor_options": {"num_cpus": o.num_cpus, "num_gpus": o.num_gpus},
        "max_ongoing_requests": o.max_ongoing_requests or 2 * o.max_batch,  # a batch running, one filling
        "max_queued_requests": o.queue_size,
    }
    if o.max_replicas is None:
        options["num_replicas"] = o.num_replicas
    else:
        low = o.max_replicas if o.min_replicas is None else o.min_replicas
        options["autoscaling_config"] = {
            "min_replicas": min(low, o.max_replicas),
            "max_replicas": o.max_replicas,
            "target_ongoing_requests": o.target_ongoing_requests,
        }
    return options


def app(args: dict) -> Application:
    """The application builder for ``serve run sdrt.serve.ray_app:app artifacts=... [key=value ...]``."""
    o = args if isinstance(args, RayOptions) else RayOptions.model_validate(args)
    threads = o.threads if o.threads is not None else (max(1, int(o.num_cpus)) if o.num_gpus == 0 else 0)
    deployment = Generator.options(**deployment_options(o))
    return deployment.bind(o.artifacts, o.backend, threads, o.max_batch, o.batch_wait_ms / 1000, o.lora_dir)

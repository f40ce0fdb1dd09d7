"""The local service: one loaded Pipeline behind FastAPI, a bounded queue and a batcher, Prometheus metrics.

    POST /v1/images/generations   generate (JSON in; JSON with base64 PNGs, or PNG bytes, out)
    GET  /healthz                 liveness: the process answers
    GET  /readyz                  readiness: 200 once the warm-up generation has run; 503 before and when draining
    GET  /metrics                 Prometheus text: outcomes, stage latencies, queue depth, batch sizes

``create_app(pipe, ServeConfig(...))`` builds the app; ``sdrt serve`` loads the pipeline and runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sdrt.runtime.errors import InputError
from sdrt.serve import api, schema
from sdrt.serve.batcher import Batcher, Job, QueueFull

log = logging.getLogger(__name__)

OUTCOMES = ("ok", "bad_request", "overloaded", "timeout", "error", "cancelled")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGES = ("text_encoder", "denoise", "vae_decoder", "total")  # the GenerationResult.timings the metrics keep


@dataclass(frozen=True)
class ServeConfig:
    max_batch: int = 4  # images per run_batch call; 1: no batching
    batch_wait_ms: float = 20  # how long a batch waits for more requests after its first arrived
    queue_size: int = 32  # requests waiting beyond the running batch; more get 503
    timeout_s: float = 300  # per request, from arrival to response; then 504
    max_body_mb: float = 20  # request body limit; more gets 413
    warmup: bool = True  # one 1-step generation at the model's default size before /readyz says ready
    api_key: str | None = None  # Bearer token every route but /healthz and /readyz requires (None: no key)
    # Host header names served; ("*",) any. `sdrt serve` defaults to loopback's names when bound to loopback.
    allowed_hosts: tuple[str, ...] = ("*",)
    rate_limit: float = 0.0  # generation requests per second per client (0: no limit)
    rate_burst: int = 0  # requests a client may send at once (0: the rate rounded up, at least 1)
    docs: bool = True  # /docs, /redoc and /openapi.json

    def __post_init__(self):
        for name, low in (("max_batch", 1), ("queue_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}: expected an integer >= {low}, got {value!r}")
        for name, low_open in (("batch_wait_ms", False), ("timeout_s", True), ("max_body_mb", True)):
            value = getattr(self, name)
            if not (
                isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not low_open and value == 0)
            ):
                raise InputError(f"{name}: expected a finite number {'>' if low_open else '>='} 0, got {value!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or len(self.api_key) < 16):
            got = f"{len(self.api_key)} characters" if isinstance(self.api_key, str) else type(self.api_key).__name__
            raise InputError(
                f"api_key: expected a string of at least 16 characters (a guessable key is none), got {got}"
            )
        if not (isinstance(self.rate_limit, (int, float)) and math.isfinite(self.rate_limit) and self.rate_limit >= 0):
            raise InputError(f"rate_limit: expected requests per second >= 0 (0: no limit), got {self.rate_limit!r}")
        if isinstance(self.rate_burst, bool) or not isinstance(self.rate_burst, int) or self.rate_burst < 0:
            raise InputError(f"rate_burst: expected an integer >= 0, got {self.rate_burst!r}")
        if not self.allowed_hosts or not all(isinstance(h, str) and h for h in self.allowed_hosts):
            raise InputError(f"allowed_hosts: expected host names ('*' for any), got {self.allowed_hosts!r}")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sdrt_requests", "Generation requests by outcome", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome is exported from the start, at 0
        self.stage_seconds = Histogram(
            "sdrt_stage_seconds",
            "Seconds per stage of a successful request: the runtime's timings, and the wait in the queue",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge("sdrt_queue_depth", "Requests waiting for a batch", registry=self.registry)
        self.batch_images = Histogram(
            "sdrt_batch_images", "Images per run_batch call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.max_batch = Gauge("sdrt_max_batch", "Largest batch in images (--max-batch)", registry=self.registry)
        self.lora_switches = Counter(
            "sdrt_lora_switches",
            "Batches whose LoRA adapter set differed from the previous batch's, by whether its sessions were cached",
            ["cached"],
            registry=self.registry,
        )
        self.lora_switch_seconds = Histogram(
            "sdrt_lora_switch_seconds",
            "Seconds to switch adapter sets: merging weights and opening sessions, or a cache lookup",
            ["cached"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def count(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def batch(self, jobs: list[Job]) -> None:
        self.batch_images.observe(sum(job.images for job in jobs))

    def succeeded(self, result, queue_wait: float) -> None:
        self.count("ok")
        self.stage_seconds.labels("queue_wait").observe(queue_wait)
        for stage in STAGES:
            if stage in result.timings:
                self.stage_seconds.labels(stage).observe(result.timings[stage])
        if result.timings.get("lora_switch_first"):  # one count per switch, not per request of its batch
            cached = "true" if result.timings.get("lora_cached", True) else "false"
            self.lora_switches.labels(cached).inc()
            self.lora_switch_seconds.labels(cached).observe(result.timings["lora_switch"])

    def text(self) -> bytes:
        return generate_latest(self.registry)


class Service:
    """The state behind the routes: the pipeline, the batcher, readiness."""

    def __init__(self, pipe, config: ServeConfig):
        self.pipe, self.config, self.metrics = pipe, config, Metrics()
        self.state = "starting"  # then "warming up", "ready" (or "warm-up failed: ..."), "draining"
        self.batcher: Batcher | None = None

    def start(self) -> None:
        self.batcher = Batcher(
            self.pipe.run_batch,
            self.config.max_batch,
            self.config.batch_wait_ms / 1000,
            self.config.queue_size,
            on_batch=self.metrics.batch,
        )
        self.metrics.queue_depth.set_function(lambda: len(self.batcher))
        self.metrics.max_batch.set(self.config.max_batch)
        self.state = "warming up" if self.config.warmup else "ready"

    async def warm_up(self) -> None:
        """One 1-step generation at the model's default size, in the worker: the first run at a size allocates
        the backend's buffers, and /readyz should not say ready before that."""
        m = self.pipe.manifest
        call = {"prompt": "warm-up", "num_inference_steps": 1, "seed": 0}
        try:
            (result,) = await self.batcher.in_worker(self.pipe.run_batch, [call])
        except Exception as e:  # a backend's own failure; the service still answers, /readyz says why
            result = e
        if isinstance(result, Exception):
            self.state = f"warm-up failed: {type(result).__name__}: {result}"
            log.error("sdrt serve: %s", self.state)
            return
        if self.state == "warming up":
            self.state = "ready"
        seconds = result.timings["total"]
        log.info("sdrt serve: ready (warm-up at %dx%d: %.2f s)", m.default_width, m.default_height, seconds)

    def drain(self) -> None:
        """Stop taking requests (503) and say so on /readyz; queued and running ones still finish."""
        if self.state != "draining":
            queued = len(self.batcher or ())
            log.info("sdrt serve: draining: new requests get 503; %d queued and any running finish", queued)
        self.state = "draining"

    def retry_after(self) -> int:
        return max(1, math.ceil(self.batcher.last_batch_s if self.batcher else 1))

    async def generate(self, body: schema.GenerationBody, request: Request) -> Response:
        if self.state == "draining":
            raise api.ServiceError(
                503, "unavailable", "service: draining for shutdown, not taking new requests (retry after "
                "Retry-After seconds; another replica will take it)", "overloaded", self.retry_after()
            )  # fmt: skip
        call = await asyncio.to_thread(schema.to_call, body)
        try:
            job = self.batcher.submit(call.kwargs, call.images)
        except QueueFull:
            raise api.ServiceError(
                503, "overloaded", f"queue: expected fewer than {self.config.queue_size} waiting requests "
                "(--queue-size), got a full queue (retry after the Retry-After seconds)", "overloaded",
                self.retry_after(),
            ) from None  # fmt: skip
        result = await self._wait(job, request)
        response = await api.respond(result, call, job.queue_wait)
        self.metrics.succeeded(result, job.queue_wait)
        return response

    async def _wait(self, job: Job, request: Request):
        """The job's result; a client that leaves or a request past --timeout-s withdraws it."""
        left = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {job.future, left}, timeout=self.config.timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            left.cancel()
        if job.future in done:
            return job.future.result()
        self.batcher.withdraw(job)
        if left in done:
            raise api.ServiceError(499, "cancelled", "client: disconnected before its result", "cancelled")
        raise api.ServiceError(
            504, "timeout", f"request: expected a result within {self.config.timeout_s:g} s (--timeout-s), got "
            "none (fewer steps or images, retry later, or raise --timeout-s)", "timeout",
        )  # fmt: skip


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(pipe, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The service for a loaded pipeline (the caller keeps and closes it). Its lifespan runs the batcher and the
    warm-up, and drains on shutdown."""
    service = Service(pipe, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        tasks = [asyncio.create_task(service.batcher.run())]
        if config.warmup:
            tasks.append(asyncio.create_task(service.warm_up()))
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish by now
            service.drain()
            for task in tasks:
                task.cancel()
            service.batcher.close()

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="sdrt", summary="Stable Diffusion on exported graphs", lifespan=lifespan, **docs)
    app.state.service = service
    count = service.metrics.count
    api.install_error_handlers(app, count)
    # The last added runs first: the Host check, then the key, then the client's rate, then the body's size.
    app.add_middleware(api.BodyLimit, max_bytes=int(config.max_body_mb * 2**20), count=count)
    if config.rate_limit:
        burst = config.rate_burst or max(1, math.ceil(config.rate_limit))
        app.add_middleware(api.RateLimit, rate=config.rate_limit, burst=burst, count=count)
    if config.api_key is not None:
        app.add_middleware(api.ApiKey, key=config.api_key, count=count)
    app.add_middleware(api.AllowedHosts, hosts=config.allowed_hosts, count=count)

    @app.post("/v1/images/generations", responses={200: {"content": {"image/png": {}}}})
    async def generations(body: schema.GenerationBody, request: Request) -> Response:
        """Generate images. Errors answer {"error": {"type", "message"}}: 400 bad input (the runtime's message),
        413 body too large, 422 unreadable body, 500 NaN or a backend failure, 503 queue full or draining
        (Retry-After), 504 past --timeout-s."""
        return await service.generate(body, request)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": service.state}, status_code=200 if service.state == "ready" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the service at the first SIGTERM or SIGINT: /readyz and new requests get 503 at
    once. After ``drain_s`` seconds (time for a load balancer to see /readyz fail; 0: at once) uvicorn stops
    accepting connections, waits for the requests in flight, and exits. A second signal skips the wait."""

    def __init__(self, config: uvicorn.Config, drain_s: float = 0.0):
        super().__init__(config)
        self.drain_s, self._timer = drain_s, None

    def handle_exit(self, sig, frame) -> None:
        service = getattr(getattr(self.config.app, "state", None), "service", None)
        if isinstance(service, Service):
            service.drain()
        if self.drain_s > 0 and self._timer is None:
            self._timer = threading.Timer(self.drain_s, super().handle_exit, (sig, frame))
            self._timer.daemon = True
            self._timer.start()
            return
        if self._timer is not None:
            self._timer.cancel()
        super().handle_exit(sig, frame)

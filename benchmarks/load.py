"""Load on ``sdrt serve``: throughput, latency percentiles and refusals per level of concurrency.

For each level of concurrency C, a closed loop: C workers, each sending its next
``POST /v1/images/generations`` when its previous one has answered, until the level's requests are
sent; at most C requests are ever in flight. Every request carries a seed of its own. Before each level
one warm-up request, not counted; before the first, ``GET /readyz`` until it answers 200. Per level:
images/s and requests/s (of the 200 answers, over the level's wall time), p50/p95/p99/max latency of
the 200 answers, and counts by status (200, 4xx, 503, other: 5xx, 504, transport errors); what the
server's ``GET /metrics`` counted during the level (images per batch) and its per-request ``timings``.
A table is printed and one row per level is appended to ``benchmarks/results/load_<device>.jsonl``
(the machine described as ``sdrt bench`` rows describe it); ``sdrt bench report`` shows them beside the
latency rows. On a small machine the generator takes CPU from a server on the same machine: compare
rows made alike.

``--serve ARTIFACTS`` starts ``sdrt serve`` itself on a free loopback port, waits until it is ready,
runs the load and stops it (SIGTERM, then SIGKILL after ``--stop-timeout``)::

    python -m sdrt.benchmarks.load --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 32
    python -m sdrt.benchmarks.load --serve artifacts/tiny-sd --serve-args "--max-batch 4" --label batching-on
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from sdrt.benchmarks.cli import _size
from sdrt.runtime.errors import BackendError, InputError, SdrtError

LOAD_SCHEMA = 1  # rows of kind "load" number their own schema
GENERATIONS = "/v1/images/generations"
READY = "/readyz"
METRICS = "/metrics"
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
READY_POLL_S = 0.25
STATUS_CLASSES = ("200", "4xx", "503", "other")


# -- one request's outcome and a level's summary ---------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    status: int  # the HTTP status; 0 when no answer came (connection refused or reset, client timeout)
    latency_s: float  # from sending to the whole answer read
    images: int = 0  # images in a 200 answer
    error: str | None = None  # no answer, or a 200 answer without the images it promised
    retry_after_s: float | None = None
    timings: dict = field(default_factory=dict)  # the server's numeric timings, flattened
    detail: str = ""  # the start of a refusal's body (the server's reason)

    @property
    def status_class(self) -> str:
        if self.error is not None:
            return "other"
        if self.status == 200 or self.status == 503:
            return str(self.status)
        return "4xx" if 400 <= self.status < 500 else "other"


def percentiles(samples: list[float]) -> dict:
    """n, p50/p95/p99 (linear interpolation between order statistics, numpy's default), min, max, mean."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p95, p99 = (float(v) for v in np.percentile(a, (50, 95, 99)))
    return {
        "n": int(a.size),
        "p50": p50,
        "p95": p95,
        "p99": p99,
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """One level's figures. Throughput counts the 200 answers (and their images) over the level's wall
    time, from its first request sent to its last answer; latency percentiles are of the 200 answers
    (a refusal's fast 503 would flatter them), ``latency_all_s`` of every answer."""
    ok = [o for o in outcomes if o.status_class == "200"]
    images = sum(o.images for o in ok)
    classes = Counter(o.status_class for o in outcomes)
    timing_keys = sorted({k for o in ok for k in o.timings})
    return {
        "sent": len(outcomes),
        "wall_s": wall_s,
        "status": {c: classes.get(c, 0) for c in STATUS_CLASSES},
        "status_codes": {str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        "errors": dict(sorted(Counter(o.error for o in outcomes if o.error).items())),
        "images": images,
        "images_per_s": images / wall_s if wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "sent_per_s": len(outcomes) / wall_s if wall_s > 0 else 0.0,
        "latency_s": percentiles([o.latency_s for o in ok]),
        "latency_all_s": percentiles([o.latency_s for o in outcomes]),
        "server_timings": {
            k: percentiles([o.timings[k] for o in ok if k in o.timings]) for k in timing_keys
        },  # the server's own figures, as its answers name them
    }


# -- requests ---------------------------------------------------------------------------------------
def _numeric_leaves(value, prefix: str = "") -> dict[str, float]:
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)} if prefix else {}
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(_numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {}


def _retry_after(headers) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date, which `sdrt serve` does not send


async def send(client, body: dict) -> Outcome:
    """One POST; every failure becomes an Outcome (status 0 when no answer came), never an exception."""
    import httpx

    start = time.perf_counter()
    try:
        response = await client.post(GENERATIONS, json=body)
    except httpx.TimeoutException as e:
        return Outcome(0, time.perf_counter() - start, error=f"timeout ({type(e).__name__})")
    except httpx.HTTPError as e:
        return Outcome(0, time.perf_counter() - start, error=type(e).__name__)
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return Outcome(
            response.status_code,
            latency,
            retry_after_s=_retry_after(response.headers),
            detail=response.text.strip()[:300],
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
        return Outcome(200, latency, error="200 without a JSON `data` list")
    if not answer["data"]:
        return Outcome(200, latency, error="200 with no images")
    return Outcome(200, latency, len(answer["data"]), timings=_numeric_leaves(answer.get("timings") or {}))


@dataclass
class Level:
    concurrency: int
    outcomes: list[Outcome]
    wall_s: float
    in_flight_max: int
    seeds: tuple[int, int]  # first and last seed of the counted requests
    warmup: Outcome
    server_metrics: dict[str, float] | None = None  # what the server's /metrics counted during the level


class Seeds:
    """Every request of a run gets the next seed, warm-ups included: no two requests alike."""

    def __init__(self, first: int):
        self.next = first

    def take(self) -> int:
        self.next += 1
        return self.next - 1


async def closed_loop(
    client, body: dict, concurrency: int, requests: int, seeds: Seeds, respect_retry_after: bool = False
) -> tuple[list[Outcome], float, int, tuple[int, int]]:
    """``requests`` POSTs from ``concurrency`` workers, each sending its next when its previous has
    answered. Returns the outcomes in completion order, the wall time, the most requests ever in
    flight at once (never above ``concurrency``) and the first and last seed."""
    remaining = requests
    in_flight = in_flight_max = 0
    outcomes: list[Outcome] = []
    first_seed = seeds.next

    async def worker() -> None:
        nonlocal remaining, in_flight, in_flight_max
        while remaining > 0:  # one event loop: no await between the test and the decrement
            remaining -= 1
            request = {**body, "seed": seeds.take()}
            in_flight += 1
            in_flight_max = max(in_flight_max, in_flight)
            try:
                outcome = await send(client, request)
            finally:
                in_flight -= 1
            outcomes.append(outcome)
            if respect_retry_after and outcome.status == 503 and outcome.retry_after_s and remaining > 0:
                await asyncio.sleep(min(outcome.retry_after_s, 60.0))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return outcomes, time.perf_counter() - start, in_flight_max, (first_seed, seeds.next - 1)


# -- waiting for the server -------------------------------------------------------------------------
async def wait_ready(client, timeout_s: float, exited: Callable[[], str | None] = lambda: None) -> float:
    """Poll GET /readyz until it answers 200; returns the seconds waited. Raises BackendError saying what
    the last poll got when ``timeout_s`` passes, and at once when ``exited()`` reports the server gone."""
    import httpx

    start = time.monotonic()
    last = "no answer yet"
    while True:
        gone = exited()
        if gone:
            raise BackendError(f"load: expected the server to become ready, it exited: {gone}")
        try:
            response = await client.get(READY, timeout=min(5.0, max(timeout_s, 0.1)))
            if response.status_code == 200:
                return time.monotonic() - start
            last = f"status {response.status_code}: {response.text.strip()[:200]!r}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if time.monotonic() - start >= timeout_s:
            raise BackendError(
                f"load: expected GET {str(client.base_url).rstrip('/')}{READY} to answer 200 within {timeout_s:g} s, "
                f"the last try got {last} (is `sdrt serve` running there and warmed up? raise --ready-timeout "
                "for a large model)"
            )
        await asyncio.sleep(READY_POLL_S)


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+(\S+)(?:\s+-?\d+)?$")
CUMULATIVE = ("_total", "_sum", "_count")  # counters and histogram totals: their change over a level means something


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {``name{labels}``: value}; comments and lines that are not samples are skipped."""
    samples = {}
    for line in text.splitlines():
        m = SAMPLE.match(line.strip())
        if m and not line.startswith("#"):
            try:
                samples[m.group(1)] = float(m.group(2))
            except ValueError:
                pass
    return samples


def max_batch_from_metrics(samples: dict[str, float]) -> int | None:
    """The server's configured largest batch, if a metric whose name holds ``max_batch`` gives it (e.g. a
    gauge ``sdrt_max_batch 4``); None otherwise."""
    for key, value in samples.items():
        if "max_batch" in key.split("{")[0] and math.isfinite(value):
            return int(value)
    return None


def metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server counted during a level: the change of every counter and histogram sum and count
    that changed (e.g. ``sdrt_batch_images_sum`` over ``_count``: images per batch)."""
    return {
        k: v - before.get(k, 0.0)
        for k, v in sorted(after.items())
        if k.split("{")[0].endswith(CUMULATIVE) and v != before.get(k, 0.0)
    }


async def scrape(client) -> dict[str, float] | None:
    """GET /metrics as samples; None when the server has none to give."""
    import httpx

    try:
        response = await client.get(METRICS, timeout=10.0)
    except httpx.HTTPError:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


# -- a run: every level against one server ----------------------------------------------------------
@dataclass
class LoadConfig:
    url: str = DEFAULT_URL
    concurrency: tuple[int, ...] = (1, 4, 16)
    requests: int = 32  # counted requests per level (each level also sends one warm-up)
    body: dict = field(default_factory=lambda: {"prompt": DEFAULT_PROMPT})  # "seed" is set per request
    seed: int = 0  # the first request's seed; each later one the next
    label: str = ""
    results_dir: Path | None = None  # None: benchmarks/results
    save: bool = True
    ready_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    respect_retry_after: bool = False  # after a 503, a worker waits its Retry-After before its next request
    max_batch: int | None = None  # the server's largest batch from --serve-args; else asked of GET /metrics
    server: dict = field(default_factory=dict)  # how the server was started, when this run started it
    model: dict | None = None

    def check(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise InputError(f"load: expected concurrency levels >= 1, got {list(self.concurrency)}")
        if self.requests < 1:
            raise InputError(f"load: expected --requests >= 1 per level, got {self.requests}")
        if not isinstance(self.body, dict):
            raise InputError(f"load: expected the request body to be a JSON object, got {self.body!r:.80}")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"load: expected --url like {DEFAULT_URL}, got {self.url!r}")


def body_summary(body: dict) -> dict:
    """The body as sent, less the per-request seed, with a long prompt cut: what a row compares by."""
    out = {k: v for k, v in body.items() if k != "seed"}
    for key in ("prompt", "negative_prompt"):
        if isinstance(out.get(key), str) and len(out[key]) > 80:
            out[key] = out[key][:77] + "..."
    return out


def run_load(config: LoadConfig, progress: Callable[[str], None] = print, exited=lambda: None) -> list[dict]:
    """Every level against ``config.url``; append one row per level as it completes; return the rows.
    ``exited`` reports a server this run started as gone (waiting for readiness stops at once)."""
    config.check()
    return asyncio.run(_run(config, progress, exited))


async def _run(config: LoadConfig, progress, exited) -> list[dict]:
    import httpx

    base = config.url.rstrip("/")
    # trust_env=False: a proxy from the environment must not sit between the generator and the server.
    async with httpx.AsyncClient(base_url=base, trust_env=False) as control:
        waited = await wait_ready(control, config.ready_timeout_s, exited)
        progress(f"{base}{READY}: ready after {waited:.1f} s")
        max_batch, source = config.max_batch, "serve-args" if config.max_batch is not None else None
        if max_batch is None:
            max_batch = max_batch_from_metrics(await scrape(control) or {})
            source = "metrics" if max_batch is not None else None
    context = _context(config, base, max_batch, source)
    seeds = Seeds(config.seed)
    rows = []
    for concurrency in config.concurrency:
        level = await _level(config, base, concurrency, seeds, progress)
        row = _row(context, config, level)
        progress(_level_line(row))
        if config.save:
            _append(config, row, progress)
        rows.append(row)
    return rows


async def _level(config: LoadConfig, base: str, concurrency: int, seeds: Seeds, progress) -> Level:
    import httpx

    if config.requests < concurrency:
        progress(f"concurrency {concurrency}: only {config.requests} requests: at most that many in flight")
    timeout = httpx.Timeout(config.request_timeout_s, connect=min(30.0, config.request_timeout_s))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits, trust_env=False) as client:
        warmup = await send(client, {**config.body, "seed": seeds.take()})
        # The same body, but for its seed, goes with every request: refused once, all would be (429, a
        # rate limit, is the exception).
        if 400 <= warmup.status < 500 and warmup.status != 429:
            raise InputError(
                f"load: expected the server to accept POST {base}{GENERATIONS} with body "
                f"{json.dumps(body_summary(config.body))[:200]}, the warm-up request got {warmup.status}: "
                f"{warmup.detail!r} (fix --url, or --body or --prompt/--steps/--size)"
            )
        if warmup.status_class != "200":
            progress(f"concurrency {concurrency}: warm-up got {warmup.status or warmup.error}; measuring anyway")
        before = await scrape(client)
        outcomes, wall, in_flight_max, first_last = await closed_loop(
            client, config.body, concurrency, config.requests, seeds, config.respect_retry_after
        )
        after = await scrape(client) if before is not None else None
    counted = metrics_delta(before, after) if before is not None and after is not None else None
    return Level(concurrency, outcomes, wall, in_flight_max, first_last, warmup, counted)


# -- rows -------------------------------------------------------------------------------------------
def _context(config: LoadConfig, base: str, max_batch: int | None, source: str | None) -> dict:
    """What every row of one run shares; the machine as ``sdrt bench`` rows describe it (this
    machine's: `sdrt serve` under load is reached on loopback)."""
    from sdrt.benchmarks.bench import device_info, versions
    from sdrt.runtime.cpu_features import cpu_summary

    host = urlsplit(base).hostname or ""
    server = {
        "max_batch": max_batch,
        "max_batch_from": source,
        "on_this_machine": host in ("localhost", "::1") or host.startswith("127."),
        **config.server,
    }
    tools = versions()
    try:
        tools["httpx"] = metadata.version("httpx")
    except metadata.PackageNotFoundError:
        pass
    return {
        "device": device_info("onnxruntime"),
        "machine": {"cpu": cpu_summary()},
        "versions": tools,
        "server": server,
    }


def _row(context: dict, config: LoadConfig, level: Level) -> dict:
    return {
        "schema": LOAD_SCHEMA,
        "kind": "load",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "label": config.label,
        "url": config.url,
        **context,
        "model": config.model,
        "body": body_summary(config.body),
        "images_per_request": config.body.get("num_images_per_prompt", 1),
        "concurrency": level.concurrency,
        "requests": config.requests,
        "seeds": list(level.seeds),
        "respect_retry_after": config.respect_retry_after,
        "warmup": {"status": level.warmup.status, "latency_s": level.warmup.latency_s, "error": level.warmup.error},
        "in_flight_max": level.in_flight_max,
        **summarize(level.outcomes, level.wall_s),
        "server_metrics": level.server_metrics,
    }


def results_file(results_dir: Path, device: dict) -> Path:
    from sdrt.benchmarks.bench import device_slug

    return Path(results_dir) / f"load_{device_slug(device)}.jsonl"


def _append(config: LoadConfig, row: dict, progress) -> None:
    from sdrt.benchmarks.bench import RESULTS_DIR

    out = results_file(config.results_dir or RESULTS_DIR, row["device"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    progress(f"appended a row to {out}")


def _level_line(row: dict) -> str:
    s, lat = row["status"], row["latency_s"]
    latency = f"p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s" if lat["n"] else "no 200 answers"
    return (
        f"concurrency {row['concurrency']}: {row['sent']} requests in {row['wall_s']:.2f} s: "
        f"{row['images_per_s']:.3g} images/s, {row['requests_per_s']:.3g} requests/s, {latency}; "
        f"200 {s['200']}, 4xx {s['4xx']}, 503 {s['503']}, other {s['other']}"
    )


# -- a server of our own ----------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


OWN_FLAGS = ("--artifacts", "--host", "--port")  # the generator chooses these for a server it starts


def serve_command(artifacts: Path, port: int, serve_args: str = "", host: str = "127.0.0.1") -> list[str]:
    """``sdrt serve`` on ``host:port`` with the caller's further arguments (--max-batch, --queue-size...)."""
    extra = shlex.split(serve_args)
    for arg in extra:
        if arg.split("=", 1)[0] in OWN_FLAGS:
            raise InputError(
                f"--serve-args: expected options other than {', '.join(OWN_FLAGS)} (the load generator sets "
                f"those: --serve ARTIFACTS on a free loopback port), got {arg!r}"
            )
    return [
        sys.executable,
        "-m",
        "sdrt.runtime.cli",
        "serve",
        "--artifacts",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(port),
        *extra,
    ]


def max_batch_from_args(serve_args: str) -> int | None:
    """``--max-batch N`` (or ``--max-batch=N``) from the server's arguments, when given."""
    args = shlex.split(serve_args)
    for i, arg in enumerate(args):
        value = arg.partition("=")[2] if arg.startswith("--max-batch=") else None
        if arg == "--max-batch" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise InputError(f"--serve-args: expected --max-batch N with N an integer, got {value!r}") from None
    return None


class ServerProcess(AbstractContextManager):
    """A server started as a child process, its output in a log file; stopped on leaving: SIGTERM, and
    SIGKILL when it has not exited ``stop_timeout_s`` later. The log is removed after a clean stop."""

    def __init__(
        self,
        command: list[str],
        stop_timeout_s: float = 30.0,
        progress: Callable[[str], None] = print,
        log_dir: Path | None = None,  # None: the system's temporary folder
    ):
        self.command = command
        self.stop_timeout_s = stop_timeout_s
        self.progress = progress
        fd, name = tempfile.mkstemp(prefix="sdrt-serve-", suffix=".log", dir=log_dir)
        self.log_path = Path(name)
        self.returncode: int | None = None
        self.killed = False
        self._log = open(fd, "w")  # noqa: SIM115 - closed in stop()
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
            )
        except OSError as e:
            self._log.close()
            self.log_path.unlink(missing_ok=True)
            raise BackendError(f"load: expected to start `{shlex.join(command)}`, got {e}") from e
        progress(f"started `{shlex.join(command)}` (pid {self.process.pid}, log {self.log_path})")

    def exited(self) -> str | None:
        """None while it runs; once it has exited, its exit code and the end of its log."""
        code = self.process.poll()
        return None if code is None else f"exit code {code}{self.log_tail()}"

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return "; its last output:\n" + "\n".join(tail) if tail else " (it wrote nothing)"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        self._log.close()
        return self.returncode

    def __exit__(self, exc_type, exc, tb) -> None:
        code = self.stop()
        how = f"killed after {self.stop_timeout_s:g} s without exiting on SIGTERM" if self.killed else "stopped"
        clean = not self.killed and code in (0, -signal.SIGTERM) and exc_type is None
        self.progress(
            f"server pid {self.process.pid} {how} (exit code {code}){'' if clean else f'; log {self.log_path}'}"
        )
        if clean:
            self.log_path.unlink(missing_ok=True)


def run_with_server(
    config: LoadConfig,
    command: Callable[[int], list[str]],
    stop_timeout_s: float = 30.0,
    progress: Callable[[str], None] = print,
    log_dir: Path | None = None,
) -> list[dict]:
    """Start ``command(port)`` on a free loopback port, run the load against it, stop it."""
    port = free_port()
    config.url = f"http://127.0.0.1:{port}"
    with ServerProcess(command(port), stop_timeout_s, progress, log_dir) as server:
        return run_load(config, progress, exited=server.exited)


# -- the command line -------------------------------------------------------------------------------
def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.replace(" ", ",").split(",") if x)
    except ValueError:
        levels = ()
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"expected concurrency levels such as 1,4,16, got {text!r}")
    return levels


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdrt.benchmarks.load",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("--url", default=None, help=f"the server (default {DEFAULT_URL}; with --serve, its own)")
    p.add_argument("--concurrency", type=_levels, default=(1, 4, 16), help="levels of concurrency (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="counted requests per level, plus one warm-up (default 32)")
    p.add_argument("--body", default=None, help="the request body as a JSON object, or @FILE; seed is set per request")
    p.add_argument("--prompt", default=None, help=f"without --body: the prompt (default {DEFAULT_PROMPT!r})")
    p.add_argument(
        "--steps", type=int, default=None, help="without --body: num_inference_steps (default: the server's)"
    )
    p.add_argument("--size", type=_size, default=None, help="without --body: HEIGHTxWIDTH (default: the server's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="without --body: guidance_scale")
    p.add_argument("--images-per-prompt", type=int, default=None, help="without --body: num_images_per_prompt")
    p.add_argument(
        "--seed", type=int, default=0, help="the first request's seed; each later request the next (default 0)"
    )
    p.add_argument("--label", default=None, help="names this configuration in rows and tables (default: --serve-args)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder of the results file load_<device>.jsonl (default benchmarks/results)",
    )
    p.add_argument("--no-save", action="store_true", help="print the table only; append no rows")
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for GET /readyz to answer 200 (default 600)"
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take (default 600)")
    p.add_argument(
        "--respect-retry-after", action="store_true", help="after a 503, a worker waits its Retry-After first"
    )
    p.add_argument("--serve", type=Path, default=None, metavar="ARTIFACTS", help="start `sdrt serve` on these")
    p.add_argument("--serve-args", default="", help='with --serve: further arguments, e.g. "--max-batch 4"')
    p.add_argument(
        "--stop-timeout", type=float, default=30.0, help="with --serve: seconds from SIGTERM to SIGKILL (default 30)"
    )
    return p


def request_body(args: argparse.Namespace) -> dict:
    shaped = [
        n for n in ("prompt", "steps", "size", "guidance_scale", "images_per_prompt") if getattr(args, n) is not None
    ]
    if args.body is not None:
        if shaped:
            raise InputError(f"load: expected --body or --{shaped[0].replace('_', '-')} and the like, got both")
        text = args.body
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text()
            except OSError as e:
                raise InputError(f"--body: expected a readable JSON file, could not read {text[1:]}: {e}") from e
        try:
            body = json.loads(text)
        except ValueError as e:
            raise InputError(f"--body: expected a JSON object, got a parse error: {e}") from e
        if not isinstance(body, dict):
            raise InputError(f"--body: expected a JSON object, got {text[:80]!r}")
        return body
    body: dict = {"prompt": args.prompt or DEFAULT_PROMPT}
    if args.size is not None:
        body["height"], body["width"] = args.size
    if args.steps is not None:
        body["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        body["guidance_scale"] = args.guidance_scale
    if args.images_per_prompt is not None:
        body["num_images_per_prompt"] = args.images_per_prompt
    return body


def _model(artifacts: Path) -> dict | None:
    from sdrt.runtime.manifest import Manifest

    try:
        m = Manifest.load(artifacts, verify_hashes=False)  # the server verifies; this only names the model
    except SdrtError:
        return None
    return {"family": m.family, "source": m.source.get("model") or m.source.get("path"), "artifacts": str(artifacts)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.serve is not None and args.url is not None:
            raise InputError("load: expected --url or --serve (which starts its own server on a free port), got both")
        if args.serve is None and args.serve_args:
            raise InputError("load: --serve-args is for the server --serve starts; got no --serve")
        config = LoadConfig(
            url=args.url or DEFAULT_URL,
            concurrency=args.concurrency,
            requests=args.requests,
            body=request_body(args),
            seed=args.seed,
            label=args.label if args.label is not None else args.serve_args.strip(),
            results_dir=args.out,
            save=not args.no_save,
            ready_timeout_s=args.ready_timeout,
            request_timeout_s=args.request_timeout,
            respect_retry_after=args.respect_retry_after,
        )
        config.check()
        if args.serve is None:
            rows = run_load(config)
        else:
            if not args.serve.is_dir():
                raise InputError(f"--serve: expected an artifact directory, got {args.serve} (make engines makes one)")
            serve_command(args.serve, 0, args.serve_args)  # refuses --port and the like before starting anything
            config.max_batch = max_batch_from_args(args.serve_args)
            config.server = {"serve_args": args.serve_args, "artifacts": str(args.serve)}
            config.model = _model(args.serve)
            rows = run_with_server(
                config, lambda port: serve_command(args.serve, port, args.serve_args), args.stop_timeout
            )
    except SdrtError as e:
        print(f"sdrt.benchmarks.load: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name != "httpx":
            raise
        print(
            "sdrt.benchmarks.load: error: expected httpx to be installed, it is not (pip install httpx)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("sdrt.benchmarks.load: interrupted", file=sys.stderr)
        return 130
    from sdrt.benchmarks.report import load_table

    print(load_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

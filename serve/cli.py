"""``sdrt serve``: load the artifacts once and serve them over HTTP (see ``sdrt.serve.app``).

This module is imported by every ``sdrt`` command (the entry point registers the subcommand), so it imports
nothing of the ``[serve]`` extra until the command runs."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from sdrt.runtime.backends import BACKEND_NAMES, COMPUTE_PRECISIONS
from sdrt.runtime.cli import _HelpFormatter
from sdrt.runtime.errors import SdrtError

log = logging.getLogger("sdrt")

DESCRIPTION = """\
Serve an artifact directory over HTTP. The pipeline is loaded once; requests wait in a bounded queue and
run in batches of up to --max-batch images (waiting at most --batch-wait-ms for a batch to fill) in one
worker thread.

  POST /v1/images/generations   JSON in (prompt, size or height/width, seed, image, ...); JSON out with
                                base64 PNGs, or PNG bytes with "response_format": "png"
  GET  /healthz /readyz         liveness; readiness (after a warm-up generation; 503 while draining)
  GET  /metrics                 Prometheus text
  GET  /docs                    the request's fields

Status codes: 400 bad input (the runtime's message) or a Host not in --allowed-hosts, 401 no --api-key,
404/405 no such route or method, 413 body over --max-body-mb, 422 unreadable body, 429 over --rate-limit,
500 NaN, a backend failure or an unexpected one (logged under the request id it names), 503 queue full or
draining (with Retry-After), 504 past --timeout-s. Every error is {"error": {"type", "message"}}.
Bound to loopback, only localhost names are served (no DNS rebinding); bound elsewhere, set --api-key
(or SDRT_API_KEY) and --allowed-hosts.
SIGTERM drains: /readyz and new requests get 503 (for --drain-s seconds), queued and running requests
finish, then it exits. A second SIGTERM or Ctrl+C skips the --drain-s wait."""

EPILOG = """\
examples:
  sdrt serve --artifacts artifacts/tiny-sd --port 8000
  curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' \\
      -d '{"prompt": "a lighthouse at dusk", "size": "256x256", "seed": 0, "response_format": "png"}' -o out.png"""


def register_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="an HTTP service for exported artifacts: batching, metrics, health checks ([serve] extra)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *BACKEND_NAMES),
        help="inference backend; auto: the one `sdrt engines` measured fastest among those that passed their check "
        "on this CPU (onnxruntime fp32 without a measurement); the log says which and why",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=COMPUTE_PRECISIONS,
        help="compute precision (default: fp32 for a named backend, auto's choice with --backend auto)",
    )
    p.add_argument("--threads", type=int, default=0, help="threads per graph (0: the backend's default, every core)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch", type=int, default=4, help="images per batch (1: no batching)")
    p.add_argument("--batch-wait-ms", type=float, default=20, help="how long a batch waits to fill")
    p.add_argument("--queue-size", type=int, default=32, help="requests that may wait; more get 503")
    p.add_argument("--timeout-s", type=float, default=300, help="per request, arrival to response; then 504")
    p.add_argument("--max-body-mb", type=float, default=20, help="request body limit; more gets 413")
    p.add_argument(
        "--drain-s",
        type=float,
        default=0,
        help="after SIGTERM, keep answering 503 (/readyz included) this long before closing the port, so a load "
        "balancer sees it (e.g. 10); requests in flight finish either way",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        default=None,
        help="LoRA adapters to serve: every .safetensors file there, by its name without suffix; a request asks "
        'for them as "loras": [{"name": NAME, "scale": 0.8}] (never by path)',
    )
    p.add_argument(
        "--controlnet",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a ControlNet directory to serve (repeatable; the model exported with --controlnet-unet); requests "
        'then may send "control_image" (base64), one per ControlNet, in this order',
    )
    p.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /healthz and /readyz (16 characters or more; "
        "default: the SDRT_API_KEY environment variable, which keeps the key out of the process list; none: open)",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="NAME",
        help="Host header names served (others get 400), e.g. sd.example.com or '*.example.com'; '*' allows any. "
        "Default: localhost, 127.0.0.1 and ::1 when --host is a loopback address (no DNS rebinding from a web page), "
        "any otherwise",
    )
    p.add_argument(
        "--rate-limit",
        default=None,
        metavar="RATE[:BURST]",
        help="per client (its API key, else its address): at most RATE generation requests per second on average, "
        "BURST at once (default: RATE rounded up); more get 429 with Retry-After. Default: no limit",
    )
    p.add_argument("--no-docs", action="store_true", help="do not serve /docs, /redoc and /openapi.json")
    p.set_defaults(func=run_serve)


def parse_rate_limit(text: str | None) -> tuple[float, int]:
    """``"RATE[:BURST]"`` -> (rate, burst); None -> (0, 0): no limit."""
    if text is None:
        return 0.0, 0
    rate, _, burst = text.partition(":")
    try:
        value, count = float(rate), int(burst) if burst else 0
    except ValueError:
        value, count = float("nan"), 0
    if not (value > 0 and value < float("inf")) or count < 0:
        raise SdrtError(f"--rate-limit: expected RATE[:BURST] such as 2 or 0.5:4 (requests per second), got {text!r}")
    return value, count


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from sdrt.serve.api import register_loras
        from sdrt.serve.app import DrainingServer, create_app
    except ModuleNotFoundError as e:
        raise SdrtError(f"expected {e.name} to be installed, it is not (pip install 'sdrt[serve]')") from None
    from sdrt.runtime import Pipeline

    config = config_from_args(args)
    with Pipeline.load(
        args.artifacts,
        backend=args.backend,
        precision=args.precision,
        threads=args.threads,
        controlnets=args.controlnet,
    ) as pipe:
        log.info("loaded %s on %s in %.2f s (%s)", args.artifacts, pipe.choice, pipe.load_timings["total"],
                 "as asked" if args.backend != "auto" else "backend auto")  # fmt: skip
        register_loras(pipe, args.lora_dir)
        app = create_app(pipe, config)
        server = uvicorn.Config(app, host=args.host, port=args.port, log_level="info")
        DrainingServer(server, drain_s=args.drain_s).run()
    return 0


def config_from_args(args: argparse.Namespace):
    """The service's configuration from the command line (and SDRT_API_KEY)."""
    from sdrt.serve.api import default_allowed_hosts
    from sdrt.serve.app import ServeConfig

    rate, burst = parse_rate_limit(args.rate_limit)
    key = args.api_key if args.api_key is not None else os.environ.get("SDRT_API_KEY") or None
    hosts = tuple(args.allowed_hosts) if args.allowed_hosts else default_allowed_hosts(args.host)
    if key is None and hosts == ("*",):
        log.warning("serving %s with no API key and any Host: anyone who reaches the port may generate "
                    "(--api-key, --allowed-hosts)", args.host)  # fmt: skip
    return ServeConfig(
        args.max_batch, args.batch_wait_ms, args.queue_size, args.timeout_s, args.max_body_mb,
        api_key=key, allowed_hosts=hosts, rate_limit=rate, rate_burst=burst, docs=not args.no_docs,
    )  # fmt: skip

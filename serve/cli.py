"""``sdrt serve``: load the artifacts once and serve them over HTTP (see ``sdrt.serve.app``).

This module is imported by every ``sdrt`` command (the entry point registers the subcommand), so it imports
nothing of the ``[serve]`` extra until the command runs."""

from __future__ import annotations

import argparse
import logging
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

Status codes: 400 bad input (the runtime's message), 413 body over --max-body-mb, 422 unreadable body,
500 NaN or a backend failure, 503 queue full or draining (with Retry-After), 504 past --timeout-s.
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
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from sdrt.serve.api import register_loras
        from sdrt.serve.app import DrainingServer, ServeConfig, create_app
    except ModuleNotFoundError as e:
        raise SdrtError(f"expected {e.name} to be installed, it is not (pip install 'sdrt[serve]')") from None
    from sdrt.runtime import Pipeline

    config = ServeConfig(args.max_batch, args.batch_wait_ms, args.queue_size, args.timeout_s, args.max_body_mb)
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

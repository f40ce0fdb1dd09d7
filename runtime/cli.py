"""The ``sdrt`` command. Subcommands are plugged in through the ``sdrt.commands`` entry-point group,
so the runtime never imports the export or benchmark packages: ``sdrt export`` exists when the
``[export]`` extra is installed, and says how to get it when it is not."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import metadata
from pathlib import Path

from sdrt.runtime import schedulers
from sdrt.runtime.backends import BACKEND_NAMES, COMPUTE_PRECISIONS
from sdrt.runtime.errors import SdrtError

log = logging.getLogger("sdrt")

# Modules that only an extra brings, and which extra: a missing one is an install step, not a bug.
EXTRA_MODULES = {m: "export" for m in ("torch", "diffusers", "transformers", "onnx", "onnxscript", "safetensors")}
EXTRA_MODULES |= {"matplotlib": "bench"}


def register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="text to image with exported artifacts (no torch)",
        description="Generate images from a prompt with an artifact directory built by `sdrt export`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for a batch of prompts")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (empty when omitted)")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="PNG path; several images get -0, -1, ...")
    p.add_argument("--height", type=int, default=None, help="pixels; the model's default when omitted")
    p.add_argument("--width", type=int, default=None, help="pixels; the model's default when omitted")
    p.add_argument("--steps", type=int, default=50, help="number of denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance; <= 1 disables it")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--seed", type=int, default=None, help="random seed for the initial latents (random when omitted)")
    p.add_argument(
        "--rng",
        default="torch",
        choices=("torch", "numpy"),
        help="random stream: 'torch' reproduces torch.Generator('cpu').manual_seed(seed), so a seed gives "
        "diffusers' image; 'numpy' uses NumPy's PCG64",
    )
    p.add_argument(
        "--scheduler",
        default=None,
        metavar="NAME",
        help="override the model's scheduler, keeping its betas and prediction type: "
        + ", ".join(sorted(schedulers.ALIASES))
        + " (or a diffusers class name such as EulerDiscreteScheduler); default: the model's own",
    )
    p.add_argument("--backend", default="onnxruntime", choices=BACKEND_NAMES, help="inference backend")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=COMPUTE_PRECISIONS,
        help="compute precision: fp32 runs each graph in its exported types (fp32, fp16 or int8 artifacts); "
        "bf16 lowers fp32 compute on CPUs with AVX-512 BF16 or AMX (backend openvino). A precision the "
        "backend or CPU lacks is an error, never a silent change",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="neither use nor fill the per-machine compiled-graph caches under the artifacts' engines/ folder",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads per session (0: onnxruntime's default)")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="tensorrt backend with static-shape engines: capture the UNet's launch once as a CUDA graph and replay it",
    )
    p.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the artifacts at load time")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    import time

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.progress import StepProgress

    t0 = time.perf_counter()
    with Pipeline.load(
        args.artifacts,
        backend=args.backend,
        verify_hashes=not args.no_verify,
        threads=args.threads,
        cuda_graph=args.cuda_graph,
        precision=args.precision,
        cache=not args.no_cache,
    ) as pipe:
        load_s = time.perf_counter() - t0
        loads = pipe.load_timings
        graphs = pipe.graph_precisions()
        result = pipe(
            prompt=args.prompt if len(args.prompt) > 1 else args.prompt[0],
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            num_images_per_prompt=args.num_images,
            seed=args.seed,
            scheduler=args.scheduler,
            rng=args.rng,
            callback=StepProgress(),
        )
    paths = result.save(args.out)
    t = result.timings
    n, h, w = result.images.shape[:3]
    print(
        f"wrote {', '.join(map(str, paths))}: {n} image(s) {w}x{h}, seed {result.seed}, {args.steps} steps in "
        f"{t['total']:.2f} s (text {t['text_encoder'] * 1e3:.0f} ms, denoise {t['denoise']:.2f} s, "
        f"vae {t['vae_decoder'] * 1e3:.0f} ms; load {load_s:.2f} s: "
        + ", ".join(f"{name} {loads[name]:.2f}" for name in pipe.sessions)
        + f"); {args.backend}, compute {args.precision}, graphs "
        + ", ".join(f"{name} {graphs[name]}" for name in pipe.sessions)
    )
    return 0


def _unavailable(name: str, error: ImportError):
    def fail(args: argparse.Namespace) -> int:
        raise SdrtError(f"sdrt {name}: expected its module to import, got: {error} (reinstall sdrt)")

    return fail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion deployment toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sdrt {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = sorted(metadata.entry_points(group="sdrt.commands"), key=lambda ep: ep.name)
    for ep in commands:
        try:
            register = ep.load()  # command modules import their heavy dependencies only when they run
        except ImportError as e:
            p = sub.add_parser(ep.name, help=f"(unavailable: {e})")
            p.set_defaults(func=_unavailable(ep.name, e))
            continue
        register(sub)
    if not commands:  # running from a source tree without installing: the runtime's own command
        register_generate(sub)
    return parser


def _version() -> str:
    try:
        return metadata.version("sdrt")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our own progress at INFO; other libraries (onnxruntime, the ONNX exporter) only warn.
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("sdrt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args) or 0
    except SdrtError as e:
        print(f"sdrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in EXTRA_MODULES:
            raise
        print(
            f"sdrt {args.command}: error: expected {e.name} to be installed, it is not "
            f"(pip install 'sdrt[{EXTRA_MODULES[e.name]}]')",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

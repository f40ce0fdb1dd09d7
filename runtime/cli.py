"""The ``sdrt`` command. Subcommands are plugged in through the ``sdrt.commands`` entry-point group,
so the runtime never imports the export or benchmark packages: ``sdrt export`` exists when the
``[export]`` extra is installed, and says how to get it when it is not."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sdrt.runtime import schedulers
from sdrt.runtime.backends import BACKEND_NAMES, COMPUTE_PRECISIONS
from sdrt.runtime.errors import ArtifactError, InputError, SdrtError

log = logging.getLogger("sdrt")

# Modules that only an extra brings, and which extra: a missing one is an install step, not a bug.
EXTRA_MODULES = {m: "export" for m in ("torch", "diffusers", "transformers", "onnx", "onnxscript", "safetensors")}
EXTRA_MODULES |= {"matplotlib": "bench", "onnxruntime": "cpu"}


GENERATE_DESCRIPTION = """\
Generate images from a prompt with an artifact directory built by `sdrt export` (or an optimum
ONNX export). The task follows from the options:

  text-to-image   --prompt alone.
  image-to-image  --image PATH: the image is encoded, noised to --strength and denoised toward the
                  prompt; only the last strength x steps run. The output keeps the image's size
                  unless --height/--width are given (the image is then resized); either way it
                  must be a multiple of the model's spatial multiple, which an error names.
  inpainting      --image PATH --mask PATH: repaints where the mask is white, keeps where it is
                  black. An inpainting model (9-channel UNet) sees the mask; an ordinary model
                  (SD 1.x/2.x, SDXL base) re-imposes the kept region at every step. Image and mask
                  are resized to --height/--width (default: the model's size).
  SDXL refiner    --refiner ARTIFACTS (ensemble of experts): the base (--artifacts) runs the first
                  --high-noise-frac of the schedule and hands its latents to the refiner, which runs
                  the rest with the same prompt, steps, guidance and seed and writes the images.

--steps and --guidance-scale default to diffusers' values for the model family and task: 50
steps at guidance 7.5 (SDXL 5.0, but 7.5 for inpainting), LCM models 4 steps at 8.5. Guidance
applies above 1; distilled models such as SD-Turbo run one to four steps without it
(--guidance-scale 0)."""

GENERATE_EPILOG = """\
examples:
  text to image:
    sdrt generate --artifacts artifacts/tiny-sd --prompt "a lighthouse at dusk" --seed 0 --out out.png
  image to image (keep more of the image with a lower --strength):
    sdrt generate --artifacts artifacts/tiny-sd --prompt "a lighthouse at dusk" --image in.png --strength 0.6
  inpainting (white mask pixels are repainted):
    sdrt generate --artifacts artifacts/tiny-sd-inpaint --prompt "a red door" --image in.png --mask mask.png
  SDXL base + refiner (base runs 80% of the 40 steps, the refiner the last 20%):
    sdrt generate --artifacts artifacts/tiny-sdxl --refiner artifacts/tiny-sdxl-refiner --prompt "a lighthouse" \\
        --steps 40 --high-noise-frac 0.8
  LCM and SD-Turbo, a few steps:
    sdrt generate --artifacts artifacts/tiny-lcm --prompt "a lighthouse" --steps 4
    sdrt generate --artifacts artifacts/tiny-sd-turbo --prompt "a lighthouse" --steps 1 --guidance-scale 0"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, except None and False (the help text says what omitting the option does);
    the description and the examples keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def register_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="text to image, image to image, inpainting, SDXL base + refiner with exported artifacts (no torch)",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory (holds manifest.json)")
    p.add_argument("--prompt", required=True, action="append", help="text prompt; repeat for a batch of prompts")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (empty when omitted)")
    p.add_argument("--out", type=Path, default=Path("image.png"), help="PNG path; several images get -0, -1, ...")
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="pixels; when omitted: the --image's height for image-to-image, else the model's default",
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="pixels; when omitted: the --image's width for image-to-image, else the model's default",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="number of denoising steps (default: the model family's: 50; LCM 4). With --image only the last "
        "strength x steps run",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance; <= 1 disables it (default: the model family's for the task: 7.5; SDXL "
        "5.0, 7.5 for inpainting; LCM 8.5, which LCM takes as an embedding, not as a second UNet row)",
    )
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed of every draw (initial noise, image encoding, sampler noise); random when omitted",
    )
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
        + " (or a diffusers class name such as EulerDiscreteScheduler); default: the model's own "
        "(with --refiner: applies to both models)",
    )

    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA adapter (.safetensors, diffusers/peft or kohya format) at SCALE (default 1); repeatable "
        "for several adapters. Applied at run time, without re-export (with --refiner: the base only)",
    )
    control = p.add_argument_group("ControlNet (the model exported with --controlnet-unet)")
    control.add_argument(
        "--controlnet",
        action="append",
        default=[],
        type=Path,
        metavar="DIR",
        help="a ControlNet directory (sdrt export --controlnet); repeatable, each with its --control-image",
    )
    control.add_argument(
        "--control-image",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="the control image of each --controlnet, in order (resized to the output size)",
    )
    control.add_argument(
        "--control-scale",
        action="append",
        default=[],
        type=float,
        metavar="S",
        help="the conditioning scale of each --controlnet, in order (default: diffusers' for the task)",
    )
    control.add_argument("--guess-mode", action="store_true", help="ControlNets see the prompt's rows only")
    task = p.add_argument_group("image to image and inpainting")
    task.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="PATH",
        help="an image file to start from: image-to-image, or inpainting with --mask",
    )
    task.add_argument(
        "--mask",
        type=Path,
        default=None,
        metavar="PATH",
        help="inpainting mask (needs --image): white = repaint, black = keep; read as grayscale, split at 50%%",
    )
    task.add_argument(
        "--strength",
        type=float,
        default=None,
        metavar="F",
        help="how far the --image is noised, 0 < F <= 1: 1 replaces it, lower keeps more of it "
        "(default: the family's: image-to-image 0.8, SDXL 0.3; inpainting 1, SDXL 0.9999)",
    )

    xl = p.add_argument_group("SDXL: base + refiner, and micro-conditioning")
    xl.add_argument(
        "--refiner",
        type=Path,
        default=None,
        metavar="ARTIFACTS",
        help="artifacts of an SDXL refiner: the base (--artifacts) denoises the first --high-noise-frac of the "
        "schedule and returns latents, the refiner continues from them (same prompt, steps, guidance and "
        "seed) and writes the images",
    )
    xl.add_argument(
        "--high-noise-frac",
        type=float,
        default=None,
        metavar="F",
        help="with --refiner: the fraction of the schedule the base runs, 0 < F < 1 (default 0.8)",
    )
    xl.add_argument(
        "--denoising-end",
        type=float,
        default=None,
        metavar="F",
        help="stop denoising at this fraction of the schedule, 0 < F < 1, and decode what is there "
        "(without --refiner; with it, use --high-noise-frac)",
    )
    xl.add_argument(
        "--original-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="SDXL micro-conditioning: the size the image is said to have been before cropping "
        "(default: the output size)",
    )
    xl.add_argument(
        "--crop-top-left",
        type=int,
        nargs=2,
        default=None,
        metavar=("TOP", "LEFT"),
        help="SDXL micro-conditioning: the crop's top-left corner in pixels (default 0 0: uncropped)",
    )
    xl.add_argument(
        "--target-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="SDXL base micro-conditioning: the intended output size (default: the output size)",
    )
    xl.add_argument(
        "--aesthetic-score",
        type=float,
        default=None,
        metavar="F",
        help="SDXL refiner micro-conditioning: the aesthetic score to steer toward (default 6.0)",
    )
    xl.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=None,
        metavar="F",
        help="SDXL refiner micro-conditioning: the score of the unconditional (negative) rows (default 2.5)",
    )

    run = p.add_argument_group("backend")
    run.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *BACKEND_NAMES),
        help="inference backend; auto: the CPU backend and precision `sdrt engines` measured fastest among those "
        "that passed their check against fp32 on this CPU (onnxruntime fp32 when it measured none); the last "
        "line says which ran and why",
    )
    run.add_argument(
        "--precision",
        default=None,
        choices=COMPUTE_PRECISIONS,
        help="compute precision (default: fp32 for a named backend; auto's choice with --backend auto): fp32 runs "
        "each graph in its exported types (fp32, fp16 or int8 artifacts); bf16 lowers fp32 compute on CPUs with "
        "AVX-512 BF16 or AMX (backend openvino). A precision the backend or CPU lacks, or one that failed its "
        "check on this CPU, is an error, never a silent change",
    )
    run.add_argument(
        "--no-cache",
        action="store_true",
        help="neither use nor fill the per-machine compiled-graph caches under the artifacts' engines/ folder",
    )
    run.add_argument("--threads", type=int, default=0, help="CPU threads per session (0: onnxruntime's default)")
    run.add_argument(
        "--cuda-graph",
        action="store_true",
        help="tensorrt backend with static-shape engines: capture the UNet's launch once as a CUDA graph and replay it",
    )
    run.add_argument("--no-verify", action="store_true", help="skip sha256 checks of the artifacts at load time")
    p.set_defaults(func=_generate)


# Micro-conditioning options: the Pipeline argument each sets, and the model families' kinds of
# micro-conditioning (sdrt.runtime.families.Family.micro_conditioning) that take it.
MICRO_OPTIONS = {
    "original_size": ("original_size", ("sdxl", "refiner")),
    "crop_top_left": ("crops_coords_top_left", ("sdxl", "refiner")),
    "target_size": ("target_size", ("sdxl",)),
    "aesthetic_score": ("aesthetic_score", ("refiner",)),
    "negative_aesthetic_score": ("negative_aesthetic_score", ("refiner",)),
}


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_generate_args(args: argparse.Namespace) -> None:
    """What the command line alone shows to be wrong, said in its options' names before any model loads."""
    if args.mask is not None and args.image is None:
        raise InputError(
            f"--mask: inpainting repaints an image, expected --image PATH with --mask, got only --mask {args.mask}"
        )
    for name in ("image", "mask"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise InputError(f"--{name}: expected an image file, got {str(path)!r}, which {what}")
    if args.strength is not None and args.image is None:
        raise InputError(
            f"--strength: applies to image-to-image and inpainting, expected --image PATH, got --strength "
            f"{args.strength} alone"
        )
    if args.refiner is not None and args.mask is not None:
        raise InputError(
            "--refiner: the base hands its latents over for image-to-image; inpainting (--mask) with a refiner "
            "is not supported, expected --refiner or --mask"
        )
    if args.refiner is None:
        if args.high_noise_frac is not None:
            raise InputError(
                "--high-noise-frac: splits the schedule between a base and its refiner, expected --refiner "
                "ARTIFACTS with it (or --denoising-end to stop one model early)"
            )
    elif args.denoising_end is not None:
        raise InputError(
            "--denoising-end: with --refiner the base's share of the schedule is --high-noise-frac, "
            f"got --denoising-end {args.denoising_end}"
        )
    for name in ("high_noise_frac", "denoising_end"):
        value = getattr(args, name)
        if value is not None and not 0.0 < value < 1.0:
            raise InputError(f"{_option(name)}: expected a fraction strictly between 0 and 1, got {value}")


def _check_model_options(args: argparse.Namespace, pipe, refiner_family) -> None:
    """What the loaded model shows to be wrong, said in the command line's terms: a model that cannot do
    the task the options ask for, a micro-conditioning option that none of the models takes."""
    if pipe.family.micro_conditioning == "refiner" and args.image is None:
        raise InputError(
            f"--artifacts: {args.artifacts} is an SDXL refiner, which refines an image; expected --image PATH, "
            f"or these artifacts as --refiner behind an SDXL base (--artifacts BASE --refiner {args.artifacts})"
        )
    if pipe.dims.inpainting and args.mask is None:
        raise InputError(
            f"--artifacts: {args.artifacts} is an inpainting model (9-channel UNet); expected --image PATH and "
            "--mask PATH"
        )
    families = [pipe.family] + ([refiner_family] if refiner_family else [])
    kinds = {f.micro_conditioning for f in families}
    names = " and ".join(f.name for f in families)
    for dest, (_, takers) in MICRO_OPTIONS.items():
        if getattr(args, dest) is not None and not kinds.intersection(takers):
            which = " or ".join({"sdxl": "an SDXL base", "refiner": "an SDXL refiner"}[k] for k in takers)
            raise InputError(
                f"{_option(dest)}: micro-conditioning of {which}, expected such a model, got {names} artifacts"
            )


@dataclass
class _Stage:
    """One model's run, for the summary line."""

    label: str  # "" for a single model; "base", "refiner"
    pipe: object  # the (closed) Pipeline: its sessions, load timings and graph precisions
    result: object  # its GenerationResult
    load_s: float
    encoded_image: bool  # whether it encoded an --image (prepare_latents then holds the VAE encoder)

    def timings(self) -> str:
        t, loads = self.result.timings, self.pipe.load_timings
        parts = [f"text {t['text_encoder'] * 1e3:.0f} ms"]
        if "lora" in t:
            parts.insert(0, f"LoRA merge and sessions {t['lora']:.2f} s")
        if self.encoded_image:
            parts.append(f"image encode {t['prepare_latents'] * 1e3:.0f} ms")
        parts.append(f"denoise {t['denoise']:.2f} s")
        if "vae_decoder" in t:  # absent when the stage returned latents
            parts.append(f"vae {t['vae_decoder'] * 1e3:.0f} ms")
        parts.append(
            f"load {self.load_s:.2f} s: " + ", ".join(f"{n} {loads[n]:.2f}" for n in loads if n in self.pipe.sessions)
        )
        return self._labelled(", ".join(parts))

    def graphs(self) -> str:
        precisions = self.pipe.graph_precisions()
        return self._labelled(", ".join(f"{n} {precisions[n]}" for n in self.pipe.sessions))

    def _labelled(self, text: str) -> str:
        return f"{self.label}: {text}" if self.label else text


def _generate(args: argparse.Namespace) -> int:
    import time

    from sdrt.runtime.lora import parse_cli_arg
    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.pipeline import Pipeline
    from sdrt.runtime.progress import StepProgress

    _check_generate_args(args)
    refiner_family = None
    if args.refiner is not None:  # a wrong refiner path fails before the base runs, not after
        try:
            refiner_family = Manifest.load(args.refiner, verify_hashes=False).model_family
        except ArtifactError as e:
            raise ArtifactError(f"--refiner: {e}") from e
    load = dict(
        backend=args.backend,
        verify_hashes=not args.no_verify,
        threads=args.threads,
        cuda_graph=args.cuda_graph,
        precision=args.precision,
        cache=not args.no_cache,
    )
    call = dict(  # what the base and the refiner share
        prompt=args.prompt if len(args.prompt) > 1 else args.prompt[0],
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        scheduler=args.scheduler,
        rng=args.rng,
    )
    for dest, (argument, _) in MICRO_OPTIONS.items():
        value = getattr(args, dest)
        if value is not None:
            call[argument] = tuple(value) if isinstance(value, list) else value
    handoff = None
    if args.refiner is not None:
        handoff = 0.8 if args.high_noise_frac is None else args.high_noise_frac
    stages: list[_Stage] = []

    t0 = time.perf_counter()
    # The SDXL base of a handoff returns latents (no VAE decoder); the refiner takes latents (no encoder).
    encoder = ("vae_encoder",) if args.image is not None else ()
    base_parts = ("vae_decoder", *encoder) if handoff is None else encoder
    if len(args.control_image) != len(args.controlnet) or len(args.control_scale) not in (0, len(args.controlnet)):
        raise InputError(
            f"--control-image/--control-scale: expected one per --controlnet ({len(args.controlnet)}), got "
            f"{len(args.control_image)} images and {len(args.control_scale)} scales"
        )
    controls = {}
    if args.controlnet:
        controls = dict(control_image=[str(p) for p in args.control_image], guess_mode=args.guess_mode)
        if args.control_scale:
            controls["controlnet_conditioning_scale"] = args.control_scale
    with Pipeline.load(args.artifacts, components=base_parts, controlnets=args.controlnet, **load) as pipe:
        load_s = time.perf_counter() - t0
        _check_model_options(args, pipe, refiner_family)
        task = "text-to-image" if args.image is None else "image-to-image" if args.mask is None else "inpainting"
        defaults = pipe.family.defaults(pipe.dims, task)
        steps = defaults["num_inference_steps"] if args.steps is None else args.steps
        guidance = defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
        result = pipe(
            **call,
            image=args.image,
            mask_image=args.mask,
            strength=args.strength,
            height=args.height,
            width=args.width,
            seed=args.seed,
            denoising_end=args.denoising_end if handoff is None else handoff,
            output_type="uint8" if handoff is None else "latent",
            callback=StepProgress("denoising" if handoff is None else "base"),
            loras=[parse_cli_arg(item) for item in args.lora],
            **controls,
        )
        stages.append(_Stage("" if handoff is None else "base", pipe, result, load_s, args.image is not None))
    if args.image is not None:
        default = pipe.family.default_strength if args.mask is None else pipe.family.inpainting_strength
        task += f" at strength {default if args.strength is None else args.strength:g}"
    if handoff is not None:  # SDXL's ensemble of experts: the refiner continues from the base's latents
        t0 = time.perf_counter()
        with Pipeline.load(args.refiner, components=("vae_decoder",), **load) as refiner:
            load_s = time.perf_counter() - t0
            result = refiner(
                **call,
                image=result.latents,
                seed=result.seed,
                denoising_start=handoff,
                callback=StepProgress("refiner"),
            )
            stages.append(_Stage("refiner", refiner, result, load_s, False))
        task += f", base + refiner split at {handoff:g}"
    elif args.denoising_end is not None:
        task += f", stopped at {args.denoising_end:g} of the schedule"

    for folder in args.controlnet:
        task += f", ControlNet {folder.name}"
    for applied in stages[0].result.loras:
        task += f", LoRA {applied['name']} x {applied['scale']:g}"
    paths = result.save(args.out)
    n, h, w = result.images.shape[:3]
    seconds = sum(stage.result.timings["total"] for stage in stages)
    print(
        f"wrote {', '.join(map(str, paths))}: {n} image(s) {w}x{h}, {task}, seed {result.seed}, "
        f"guidance {guidance:g}, {steps} steps in {seconds:.2f} s ("
        + "; ".join(stage.timings() for stage in stages)
        + f"); {stages[0].pipe.backend}, compute {stages[0].pipe.precision} ({_why(stages[0].pipe, args)}), graphs "
        + "; ".join(stage.graphs() for stage in stages)
    )
    return 0


def _why(pipe, args: argparse.Namespace) -> str:
    """How the backend and precision were picked: as asked, or backend auto's measured choice and its reason."""
    return f"backend auto: {pipe.choice}" if args.backend == "auto" else "as asked"


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

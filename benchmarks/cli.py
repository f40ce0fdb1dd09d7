"""``sdrt bench`` (measure) and ``sdrt bench report`` (merge result files into a table and a chart)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdrt.runtime.errors import InputError


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 512x512, got {text!r}")
    return int(h), int(w)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure latency per component, per step and end to end, beside diffusers; or merge results",
        description=(
            "`sdrt bench --artifacts DIR [DIR...]`: for every artifact directory, backend and compute precision "
            "(one process each) and every batch, size and step count, run the sdrt pipeline and diffusers' "
            "StableDiffusionPipeline (PyTorch, same folder, latents, scheduler and threads; its own process) in "
            "interleaved rounds after warming up until steady; measure the machine's fp32 matmul rate once; print "
            "a table and append self-describing rows to benchmarks/results/<device>.jsonl. "
            "`sdrt bench report FILE... [--baseline DEVICE] [--price DEVICE=USD_PER_HOUR ...]`: merge result files "
            "from many machines into report.md, report.png and compare.png (the devices side by side per case, "
            "speedup against the baseline, images/s, cost per image)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("action", nargs="?", default="run", choices=("run", "report"), help="measure, or report on files")
    p.add_argument("files", nargs="*", type=Path, help="report: result files (.jsonl) to merge")
    p.add_argument(
        "--artifacts",
        type=Path,
        nargs="+",
        default=None,
        help="run: artifact directories of one model, e.g. fp32 and its `sdrt quantize` copy (default: artifacts/tiny-sd)",
    )
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="run: benchmark SD 1.5's full architecture with random weights (models/sd15-random, "
        "exported to artifacts/sd15-random when missing; no download)",
    )
    p.add_argument("--backends", nargs="+", default=None, help="run: backends to measure (default: all available here)")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        help="run: compute precisions (default: fp32 and every other one; those a backend or CPU lacks give a row "
        "saying why)",
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1], help="run: images per call")
    p.add_argument("--sizes", nargs="+", type=_size, default=[(256, 256)], help="run: image sizes, HEIGHTxWIDTH")
    p.add_argument("--steps", nargs="+", type=int, default=[20], help="run: denoising steps")
    p.add_argument("--runs", type=int, default=5, help="run: timed runs (pairs) per case")
    p.add_argument("--warmups", type=int, default=2, help="run: least warm-up runs (more until two agree within 5%%)")
    p.add_argument(
        "--guidance-scale", type=float, default=7.5, help="run: classifier-free guidance (doubles the UNet batch)"
    )
    p.add_argument("--scheduler", default=None, help="run: scheduler override for both implementations")
    p.add_argument("--threads", type=int, default=0, help="run: CPU threads for both (0: all cores available)")
    p.add_argument("--no-baseline", action="store_true", help="run: skip diffusers")
    p.add_argument(
        "--baseline-dtypes",
        nargs="+",
        default=None,
        choices=("fp32", "bf16"),
        help="run: torch dtypes of the diffusers baselines on the CPU, one process each, e.g. bf16 alone (default: "
        "fp32, and bf16 when bf16 is among the precisions measured: PyTorch bf16 through oneDNN is what a PyTorch user gets on a "
        "CPU with AMX or AVX-512 BF16; where the CPU lacks both, its row says why it is no baseline)",
    )
    p.add_argument(
        "--optimum-folder",
        type=Path,
        default=None,
        help="run: an optimum ONNX export of the same model; adds optimum's onnxruntime pipeline as a second "
        "baseline, run in optimum's own environment (e.g. models/tiny-sd-optimum, made by make test)",
    )
    p.add_argument(
        "--optimum-python",
        type=Path,
        default=Path(".venv-optimum/bin/python"),
        help="run: the Python of optimum's environment",
    )
    p.add_argument(
        "--loras",
        nargs="+",
        default=[],
        metavar="PATH[:SCALE]",
        help="run: LoRA files; every sdrt variant is then measured three ways in the same rounds: without "
        "adapters, with the first file on every call, and switching on every call between the first file and "
        "the second (with one file: that file and no adapters)",
    )
    p.add_argument(
        "--random-loras",
        type=int,
        default=0,
        metavar="N",
        help="run: write N LoRA files with random factors for the artifacts (diffusers format, no download) into "
        "--lora-dir and measure them as with --loras",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="run: rank of the --random-loras files")
    p.add_argument(
        "--lora-modes",
        nargs="+",
        default=["base", "one", "switching"],
        choices=("base", "one", "switching"),
        help="run: which of the three ways to measure with --loras/--random-loras (one process each: on a full-size "
        "model each cached adapter set holds its own copy of the adapted graphs, so fewer at once use less memory)",
    )
    p.add_argument(
        "--lora-modules",
        default="linear",
        choices=("linear", "all"),
        help="run: what the --random-loras files adapt: every Linear layer of the UNet and text encoders, or "
        "the convolutions too (LoCon)",
    )
    p.add_argument(
        "--controlnets",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="run: ControlNet artifact directories (sdrt export --controlnet): every sdrt variant and diffusers run "
        "without and with them (plain and controlled calls of one process), in the same rounds, on a control image of "
        "the case's size; "
        "the rows give a ControlNet step's cost relative to a plain step (the model needs --controlnet-unet)",
    )
    p.add_argument(
        "--lora-dir", type=Path, default=Path("build/loras"), help="run: where --random-loras writes its files"
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="run: the device's peak TFLOP/s, for the fraction achieved"
    )
    p.add_argument(
        "--matmul-size",
        type=int,
        default=2048,
        help="run: N of the NxNxN fp32 MatMul that measures the machine's achievable rate",
    )
    p.add_argument(
        "--results-dir", type=Path, default=None, help="run: where <device>.jsonl goes (default: benchmarks/results)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/report"),
        help="report: folder for report.md, report.png and compare.png",
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DEVICE",
        help="report: the device the others' speedups are against: its key (the report's device table lists "
        "them) or a part of its key or label naming it alone; without it, the first file's device",
    )
    p.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="DEVICE=USD_PER_HOUR",
        help="report: a device's price per hour, for the cost per image (repeat for each device); DEVICE as for "
        "--baseline",
    )
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.action == "report":
        from sdrt.benchmarks.report import (
            COMPARE_CHART,
            compare,
            comparison_markdown,
            load_rows,
            markdown_table,
            measured,
            write_report,
        )

        if not args.files:
            raise InputError("bench report: expected one or more result files (.jsonl), got none")
        md, png, bars = write_report(args.files, args.out, args.baseline, args.price)
        rows = load_rows(args.files)
        print(markdown_table(rows))
        if measured(rows):
            print("\n" + comparison_markdown(compare(rows, args.baseline, args.price)))
            print(f"wrote {md}, {png} ({bars} bars) and {md.parent / COMPARE_CHART}")
        else:
            print(f"wrote {md}")
        return 0
    if args.files:
        raise InputError(f"bench: files are for `sdrt bench report`, got {[str(f) for f in args.files]}")
    from sdrt.benchmarks.bench import (
        RESULTS_DIR,
        BenchConfig,
        available_backends,
        check_measured,
        run_benchmark,
        summary_table,
    )

    artifacts = tuple(args.artifacts or [Path("artifacts/tiny-sd")])
    if args.random_weights:
        artifacts = tuple(args.artifacts or [Path("artifacts/sd15-random")])
        _ensure_random_sd15(artifacts[0])
    loras = _bench_loras(args, artifacts[0])
    config = BenchConfig(
        loras=loras,
        lora_modes=tuple(args.lora_modes),
        controlnets=tuple(args.controlnets),
        artifacts=artifacts,
        backends=tuple(args.backends or available_backends()),
        precisions=tuple(args.precisions) if args.precisions else None,
        matmul_size=args.matmul_size,
        batches=tuple(args.batches),
        sizes=tuple(args.sizes),
        steps=tuple(args.steps),
        runs=args.runs,
        warmups=args.warmups,
        guidance=args.guidance_scale,
        scheduler=args.scheduler,
        threads=args.threads,
        baseline=not args.no_baseline,
        baseline_dtype=_baseline_dtypes(args)[0],
        baseline_dtypes=_baseline_dtypes(args)[1:],
        peak_tflops=args.peak_tflops,
        optimum_folder=args.optimum_folder,
        optimum_python=args.optimum_python,
        results_dir=args.results_dir or RESULTS_DIR,
    )
    rows = run_benchmark(config)
    print(summary_table(rows))
    check_measured(rows)  # exit 2 only when nothing at all could be measured
    return 0


def _baseline_dtypes(args: argparse.Namespace) -> tuple[str, ...]:
    """--baseline-dtypes, or fp32 and, when bf16 is among the precisions measured, bf16."""
    if args.baseline_dtypes:
        return tuple(args.baseline_dtypes)
    return ("fp32", "bf16") if args.precisions is None or "bf16" in args.precisions else ("fp32",)


def _bench_loras(args: argparse.Namespace, artifacts: Path) -> tuple[tuple[str, float], ...]:
    """--loras as (path, scale) pairs, after the --random-loras files written for ``artifacts``."""
    from sdrt.runtime.lora import parse_cli_arg

    loras = [parse_cli_arg(item) for item in args.loras]
    if args.random_loras < 0:
        raise InputError(f"--random-loras: expected a count of 0 or more, got {args.random_loras}")
    if args.random_loras:
        from sdrt.benchmarks.random_lora import write_random_lora

        for i in range(args.random_loras):
            out = args.lora_dir / f"random-{artifacts.name}-{args.lora_modules}-r{args.lora_rank}-{i}.safetensors"
            write_random_lora(artifacts, out, rank=args.lora_rank, seed=i, modules=args.lora_modules)
            print(f"wrote {out} (random factors, rank {args.lora_rank}, {args.lora_modules} layers)")
            loras.append((str(out), 1.0))
    return tuple(loras)  # run_benchmark reads each file before any worker starts


def _ensure_random_sd15(artifacts: Path) -> None:
    from sdrt.export.build import export_pipeline
    from sdrt.export.random_model import is_current, write_random_model

    model = Path("models/sd15-random")
    manifest = artifacts / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text()).get("source", {}).get("path")
        if source and Path(source).resolve() != model.resolve():
            raise InputError(
                f"--random-weights: expected {artifacts} to hold the SD 1.5-shaped random model's artifacts, it holds "
                f"{source}'s (use --artifacts artifacts/sd15-random, or `make bench ARTIFACTS=artifacts/sd15-random`)"
            )
    if not is_current(model, "sd15"):
        print(f"building SD 1.5's architecture with random weights in {model} (no download)")
        write_random_model(model, preset="sd15")
    export_pipeline(str(model), artifacts)  # a no-op when up to date


def register_random_lora(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "random-lora",
        help="write a LoRA file with random factors for an artifact directory (to try adapters without one)",
        description=(
            "Write a diffusers-format LoRA (.safetensors) with seeded random factors for every Linear layer (or every "
            "layer, with --modules all) of the UNet and text encoder(s) the artifacts' LoRA map records. No torch, "
            "no download: for trying `--lora` and `loras=` and for `sdrt bench --random-loras`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory written by `sdrt export`")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--rank", type=int, default=16, help="rank of every layer's update")
    p.add_argument("--seed", type=int, default=0, help="seed of the random factors")
    p.add_argument("--modules", default="linear", choices=("linear", "all"), help="Linear layers, or convolutions too")
    p.add_argument("--std", type=float, default=0.02, help="standard deviation of the up factors (the update's size)")
    p.set_defaults(func=_random_lora)


def _random_lora(args: argparse.Namespace) -> int:
    from sdrt.benchmarks.random_lora import write_random_lora
    from sdrt.runtime.lora import load_file

    out = write_random_lora(args.artifacts, args.out, args.rank, args.seed, args.modules, args.std)
    lora = load_file(out)
    print(
        f"wrote {out}: {lora.modules} layers, rank {args.rank}, {lora.bytes / 2**20:.1f} MiB, sha256 {lora.sha256[:12]}"
    )
    return 0

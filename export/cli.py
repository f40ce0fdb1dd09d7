"""``sdrt export`` and ``sdrt random-model``. Heavy imports happen inside the handlers, so that
``sdrt --help`` stays fast and a missing ``[export]`` extra is reported as such."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdrt.runtime.families import ALL_COMPONENTS


def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a diffusers pipeline to an ONNX artifact directory",
        description=(
            "Export a diffusers Stable Diffusion pipeline (local folder or hub id) to ONNX with dynamic batch, "
            "height and width; check every graph against PyTorch; write manifest.json. An unchanged re-run "
            "does nothing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None, help="diffusers pipeline folder, or hub id such as org/name")
    p.add_argument(
        "--controlnet",
        default=None,
        metavar="FOLDER",
        help="instead of --model: a diffusers ControlNetModel folder, exported to its own artifact directory (--out); "
        "with --base ARTIFACTS, checked first against the model it is for",
    )
    p.add_argument("--base", type=Path, default=None, help="with --controlnet: the model's artifact directory")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) for a hub id")
    p.add_argument("--out", type=Path, required=True, help="artifact directory to write (replaced atomically)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (17 or newer)")
    p.add_argument(
        "--components",
        nargs="+",
        default=[],
        choices=ALL_COMPONENTS,
        help="components to export (default: all of the model family's; the VAE encoder may be left out)",
    )
    p.add_argument(
        "--controlnet-unet",
        action="store_true",
        help="also export unet_control: the UNet taking ControlNet residuals (the plain UNet still runs alone "
        "when no ControlNet is loaded)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16"),
        help="precision of the graphs; fp16 keeps the parts known to overflow in fp32 (SD 2.x attention, "
        "SDXL's VAE) and keeps float32 graph inputs and outputs",
    )
    p.add_argument(
        "--component-precision",
        nargs="+",
        default=[],
        metavar="COMPONENT=PRECISION",
        help="per-component override, e.g. vae_decoder=fp32 or unet=fp16 (precisions: fp32, fp16, fp16+fp32-attention)",
    )
    p.add_argument(
        "--optimize",
        nargs="*",
        default=["slim"],
        metavar="STEP",
        help="graph optimizations after export, in order: 'slim' (onnxslim: constant folding and cleanup), "
        "'ort-fusion' (onnxruntime transformer fusions; the graphs then run in onnxruntime only). "
        "Give no STEP to skip all",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="FOLDER",
        help="a VAE folder to export in place of the model's own (decoder and encoder), e.g. a tiny autoencoder "
        "(diffusers AutoencoderTiny: TAESD for SD 1.x/2.x, TAESDXL for SDXL); recorded in the manifest",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="read a part's pickle checkpoint (.bin) when it has no safetensors weights; unpickling can run "
        "arbitrary code, so only for models from a source you trust (by default only safetensors are read)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="merge a LoRA adapter (.safetensors: diffusers/peft or kohya format) into the weights before the "
        "export, at SCALE (default 1); repeatable. The manifest records each file's sha256 and scale. For "
        "adapters chosen per request instead, see `sdrt generate --lora`",
    )
    p.add_argument(
        "--drop-t5",
        action="store_true",
        help="SD 3: leave out the T5 text encoder (4.7 B parameters in SD 3/3.5): not loaded, not exported; the "
        "runtime passes zeros in its place, as diffusers does with text_encoder_3=None (prompt adherence drops "
        "somewhat, memory and time much more)",
    )
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="try the export even when the estimate (every part in float32, plus the largest part's export) "
        "exceeds this machine's available memory",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the check of each graph against PyTorch")
    p.add_argument("--force", action="store_true", help="rebuild even when the artifacts are up to date")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from sdrt.export.build import ExportOptions, export_pipeline
    from sdrt.runtime.errors import ExportError
    from sdrt.runtime.lora import parse_cli_arg

    if (args.model is None) == (args.controlnet is None):
        raise ExportError("export: expected --model (a pipeline) or --controlnet (a ControlNetModel folder), got "
                          + ("both" if args.model else "neither"))  # fmt: skip
    if args.controlnet is not None:
        from sdrt.export.controlnet import export_controlnet

        m = export_controlnet(args.controlnet, args.out, args.base, args.opset, not args.no_verify, args.allow_pickle)
        check = m.component.verification
        err = f", max abs error vs PyTorch {check['max_abs_error']:.2e}" if check else ""
        print(f"exported a {m.family} ControlNet ({len(m.component.outputs)} residuals) to {args.out}{err}")
        return 0
    if args.base is not None:
        raise ExportError("--base: expected only with --controlnet")

    overrides = []
    for item in args.component_precision:
        name, sep, value = item.partition("=")
        if not sep:
            raise ExportError(f"--component-precision: expected COMPONENT=PRECISION, got {item!r}")
        overrides.append((name, value))
    options = ExportOptions(
        opset=args.opset,
        components=tuple(dict.fromkeys([*args.components, *(["unet_control"] if args.controlnet_unet else [])])),
        verify=not args.no_verify,
        precision=args.precision,
        component_precision=tuple(overrides),
        optimizations=tuple(args.optimize),
        vae=args.vae,
        allow_pickle=args.allow_pickle,
        loras=tuple(parse_cli_arg(item) for item in args.lora),
        drop_t5=args.drop_t5,
        memory_check=not args.skip_memory_check,
    )
    report = export_pipeline(args.model, args.out, options, revision=args.revision, force=args.force)
    m = report.manifest
    if report.built:
        print(f"{'component':13s} {'precision':20s} {'nodes':>7s} {'MB':>9s} {'max abs err':>11s} {'PSNR dB':>8s}")
        for c in m.components.values():
            v = c.verification
            err = "n/a" if not v else f"{v['max_abs_error']:.2e}"
            db = "n/a" if not v else f"{v['psnr_db']:.1f}"
            nodes = c.optimization.get("steps", [{}])[-1].get("nodes_after", "?")
            mb = sum(f.bytes for f in c.files) / 1e6
            print(f"{c.name:13s} {c.precision:20s} {nodes:>7} {mb:9.1f} {err:>11s} {db:>8s}")
        vae = f" with {m.vae['class']} from {m.vae['source']['path']}" if m.vae.get("source") else ""
        print(f"exported {m.family} model{vae} to {args.out} in {m.build['seconds']['total']:.1f} s")
    return 0


def register_random_model(sub: argparse._SubParsersAction) -> None:
    from sdrt.export.random_model import PRESETS

    p = sub.add_parser(
        "random-model",
        help="build a random-weight SD pipeline folder (the tiny default model, tiny SDXL/LCM/inpaint/turbo "
        "variants, a tiny TAESD, ControlNets, or SD 1.5-shaped)",
        description=(
            "Write a random-weight Stable Diffusion pipeline (diffusers folder) built locally from known configs "
            "with a fixed seed, with CLIP's real BPE tokenizer taken from the open_clip_torch package. "
            "'tiny' is the embedded default model; 'sd15' has SD 1.5's full architecture (3.4 GB UNet). "
            "Tiny variants, each loadable by its diffusers pipeline class: 'tiny-sdxl' (two text encoders, "
            "text_time micro-conditioning), 'tiny-sdxl-refiner' (text_encoder_2 only, aesthetic score), "
            "'tiny-sd-inpaint' (9-channel UNet), 'tiny-lcm' (guidance-embedding UNet, LCM scheduler), "
            "'tiny-sd-turbo' (tiny with Euler ancestral, trailing spacing); 'tiny-taesd' is a lone "
            "AutoencoderTiny folder that stands in for the VAE of tiny and tiny-sdxl; 'tiny-controlnet', "
            "'tiny-sdxl-controlnet' and 'sd15-controlnet' are lone ControlNetModel folders for tiny, tiny-sdxl and "
            "sd15 (sdrt export --controlnet)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="architecture to build")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    p.set_defaults(func=_random_model)


def _random_model(args: argparse.Namespace) -> int:
    from sdrt.export.random_model import is_current, write_random_model

    if is_current(args.out, args.preset, args.seed) and not args.force:
        print(f"{args.out} is up to date (same preset, recipe and seed): nothing to do (use --force to rebuild)")
        return 0
    write_random_model(args.out, preset=args.preset, seed=args.seed)  # logs what it wrote
    return 0


def register_engines(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "engines",
        help="build this machine's engines: onnxruntime CPU engines, and TensorRT engines where a GPU is",
        description=(
            "Build the per-machine forms of an artifact directory's ONNX graphs. onnxruntime CPU engines: each "
            "graph with onnxruntime-only fusions (MultiHeadAttention, SkipLayerNorm, GELU) and onnxruntime's "
            "optimizations for this CPU's instruction set, saved with pre-packed weights into "
            "engines/onnxruntime-cpu_<isa>_ort<version>/, so that loading skips that work (--no-cpu skips them). "
            "TensorRT engines: one per component with one optimization profile from the batch and image-size "
            "ranges below, into engines/<device-key>/ (GPU name, compute capability, TensorRT version, "
            "precision). Engines already built from the same ONNX and options are kept; the others are rebuilt, "
            "with the reason. On a machine without an NVIDIA GPU or without tensorrt this prints the profiles "
            "and one line saying why no TensorRT engine was built, and exits 0."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="artifact directory written by `sdrt export`")
    p.add_argument("--batch", default="1:1:4", help="images per call, N or MIN:OPT:MAX (the UNet's is doubled for CFG)")
    p.add_argument("--height", default="256:512:1024", help="image height in pixels, N or MIN:OPT:MAX")
    p.add_argument("--width", default="256:512:1024", help="image width in pixels, N or MIN:OPT:MAX")
    p.add_argument("--precision", default="fp16", choices=("fp16", "bf16", "fp32"), help="engine precision")
    p.add_argument("--optimization-level", type=int, default=3, help="TensorRT builder optimization level, 0..5")
    p.add_argument(
        "--workspace-gb", type=float, default=None, help="builder workspace limit in GiB (default: TensorRT's)"
    )
    p.add_argument("--components", nargs="+", default=None, help="components to build (default: all exported)")
    p.add_argument(
        "--controlnet",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="ControlNet artifact directories (sdrt export --controlnet) for this model: their onnxruntime CPU "
        "engines are built too, each in its own engines/ folder",
    )
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (default: in the device folder)")
    p.add_argument("--force", action="store_true", help="rebuild even the engines that are up to date")
    p.add_argument(
        "--require", action="store_true", help="fail (exit 1) instead of skipping when TensorRT is unavailable"
    )
    p.add_argument(
        "--refittable",
        action="store_true",
        help="build engines whose weights can be replaced after the build (TensorRT refit), which LoRA adapters "
        "chosen per request need on the tensorrt backend",
    )
    p.add_argument(
        "--no-cpu",
        action="store_true",
        help="skip the onnxruntime CPU engines (graphs optimized once for this CPU, loaded in about a second)",
    )
    p.add_argument(
        "--no-choice",
        action="store_true",
        help="skip measuring every CPU backend in every precision it offers here (onnxruntime fp32; OpenVINO fp32, "
        "bf16, fp16 where the CPU has them) at the --height/--width optimum, checking each image against fp32 "
        "and recording the fastest that passed for --backend auto (engines/cpu-choice_*.json)",
    )
    p.add_argument(
        "--no-fusions",
        action="store_true",
        help="CPU engines without onnxscript's onnxruntime fusions (MultiHeadAttention, SkipLayerNorm, GELU)",
    )
    p.add_argument(
        "--no-lora-graphs",
        action="store_true",
        help="do not keep the fused graphs of the UNet and text encoders beside their CPU engines (saves their size "
        "on disk; LoRA adapter sessions then start from the portable graph, without the engine's fusions)",
    )
    p.set_defaults(func=_engines)


def _engines(args: argparse.Namespace) -> int:
    from sdrt.export.engines import EngineOptions, build_engines
    from sdrt.runtime.errors import BackendError
    from sdrt.runtime.manifest import Manifest
    from sdrt.runtime.profiles import Range, ShapeRanges, input_profile
    from sdrt.runtime.tensorrt_backend import current_device

    ranges = ShapeRanges(
        Range.parse(args.batch, "--batch"), Range.parse(args.height, "--height"), Range.parse(args.width, "--width")
    )
    components = tuple(args.components or ALL_COMPONENTS)
    options = EngineOptions(
        ranges=ranges,
        precision=args.precision,
        optimization_level=args.optimization_level,
        workspace_bytes=None if args.workspace_gb is None else int(args.workspace_gb * 2**30),
        components=components,
        timing_cache=args.timing_cache,
        refittable=args.refittable,
    )
    manifest = Manifest.load(args.artifacts)
    if not args.no_cpu:
        _cpu_engines(args.artifacts, components, args.force, not args.no_fusions, not args.no_lora_graphs)
        for folder in args.controlnet:
            from sdrt.export.cpu_engines import build_controlnet_engines

            _print_cpu_report(build_controlnet_engines(folder, args.artifacts, args.force, fuse=not args.no_fusions))
    if not args.no_cpu:
        _openvino_engines(args.artifacts, ranges, components, args.force)
    if not args.no_cpu and not args.no_choice:
        from sdrt.export.choose import measure_choice, up_to_date

        kept = None if args.force else up_to_date(args.artifacts, ranges.height.opt, ranges.width.opt)
        if kept is None:
            measure_choice(args.artifacts, ranges.height.opt, ranges.width.opt)
        else:
            print(f"backend auto runs {kept.chosen or 'onnxruntime fp32'} here: measured before for this CPU, these "
                  "graphs and libraries (--force measures again)")  # fmt: skip
    print(
        f"shape profiles ({'static' if ranges.is_static else 'dynamic'}: batch {ranges.batch}, "
        f"height {ranges.height}, width {ranges.width}):"
    )
    for name in options.components:
        if name in manifest.components:
            for tensor, (lo, opt, hi) in input_profile(manifest.components[name], manifest, ranges).items():
                print(f"  {name:13s} {tensor:22s} min {lo}  opt {opt}  max {hi}")
    for folder in args.controlnet:
        from sdrt.runtime.controlnet import ControlNetManifest

        for graph in ControlNetManifest.load(folder).graphs:
            for tensor, (lo, opt, hi) in input_profile(graph, manifest, ranges).items():
                print(f"  {graph.name:13s} {tensor:22s} min {lo}  opt {opt}  max {hi}")
    try:
        device = current_device()
    except BackendError as e:
        line = f"TensorRT engines skipped: {e}. The ONNX artifacts in {args.artifacts} run with --backend onnxruntime."
        print(line)
        return 1 if args.require else 0
    report = build_engines(args.artifacts, device, options, force=args.force)
    if args.controlnet:
        print("TensorRT engines for ControlNets are not built yet: load them with an onnxruntime backend")
    kept = [p.component for p in report.plans if p.component not in report.built]
    print(
        f"engines for {device.name} (sm{device.compute_capability[0]}{device.compute_capability[1]}, TensorRT "
        f"{device.tensorrt_version}) in {report.folder}: built {report.built or 'none'}, up to date {kept or 'none'}"
    )
    return 0


def _openvino_engines(artifacts: Path, ranges, components: tuple[str, ...], force: bool) -> None:
    """OpenVINO IR engines (fp16 weights; the UNet also static at the optimum) where OpenVINO offers bf16 or fp16:
    fp32 sessions read the ONNX, so on a CPU with neither there is nothing to build."""
    from sdrt.runtime import backends

    record = backends.get("openvino")
    if record.unavailable_reason() is not None:
        print(f"OpenVINO IR engines skipped: {record.unavailable_reason()}")
        return
    lower = [p for p in record.precisions() if p != "fp32"]
    if not lower:
        print("OpenVINO IR engines skipped: OpenVINO offers only fp32 on this CPU, which reads the ONNX")
        return
    from sdrt.export.openvino_engines import build_openvino_engines

    report = build_openvino_engines(artifacts, ranges, components, force)
    built = ", ".join(f"{n} (error {report.errors[n]:.1e} vs the ONNX)" for n in report.built) or "none"
    print(f"OpenVINO IR engines for {'/'.join(lower)} in {report.folder}: built {built}, up to date "
          f"{', '.join(report.kept) or 'none'}")  # fmt: skip


def _cpu_engines(artifacts: Path, components: tuple[str, ...], force: bool, fuse: bool, lora_sources: bool) -> None:
    from sdrt.export.cpu_engines import build_cpu_engines

    _print_cpu_report(build_cpu_engines(artifacts, components, force=force, fuse=fuse, lora_sources=lora_sources))


def _print_cpu_report(report) -> None:
    built = ", ".join(f"{name} ({report.reasons[name]})" for name in report.built) or "none"
    print(f"onnxruntime CPU engines in {report.folder}: built {built}, up to date {', '.join(report.kept) or 'none'}")


def register_quantize(sub: argparse._SubParsersAction) -> None:
    from sdrt.export.quantize import ACTIVATION_TYPES, CALIBRATION_PROMPTS, HELD_OUT_PROMPTS, QUANTIZABLE

    p = sub.add_parser(
        "quantize",
        help="int8 post-training quantization of an fp32 artifact directory (UNet; VAE decoder on request)",
        description=(
            "Write an int8 copy of an fp32 artifact directory: the chosen components' graphs are quantized "
            "by onnxruntime (QDQ: int8 per-channel weights on Conv, MatMul and Gemm; activation ranges "
            "calibrated on the inputs recorded while the fp32 pipeline generates from built-in prompts). "
            "The manifest records, per component, the error against the fp32 graph on held-out inputs and, "
            "end to end, the PSNR of the int8 pipeline's images against the fp32 pipeline's (same seeds). "
            "The output is written atomically; an unchanged re-run does nothing."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", type=Path, required=True, help="fp32 artifact directory written by `sdrt export`")
    p.add_argument("--out", type=Path, required=True, help="int8 artifact directory to write (replaced atomically)")
    p.add_argument(
        "--components",
        nargs="+",
        default=["denoiser"],
        choices=QUANTIZABLE,
        help="components to quantize ('denoiser': the family's, the UNet or SD 3's transformer)",
    )
    p.add_argument(
        "--calibration-prompts",
        type=int,
        default=8,
        help=f"built-in prompts to calibrate on (1-{len(CALIBRATION_PROMPTS)}); each step's UNet input is a sample",
    )
    p.add_argument("--calibration-steps", type=int, default=8, help="denoising steps per calibration prompt")
    p.add_argument(
        "--calibration-size", default="256x256", metavar="HxW", help="image size of calibration and check runs"
    )
    p.add_argument(
        "--verification-prompts",
        type=int,
        default=2,
        help=f"held-out prompts (1-{len(HELD_OUT_PROMPTS)}) for the measured error against fp32",
    )
    p.add_argument(
        "--activations",
        default="uint8",
        choices=ACTIVATION_TYPES,
        help="activation type: uint8 (asymmetric; onnxruntime's and OpenVINO's fast CPU path) or int8 "
        "(symmetric; what TensorRT's explicit quantization accepts)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    p.set_defaults(func=_quantize)


def _quantize(args: argparse.Namespace) -> int:
    from sdrt.export.quantize import QuantizeOptions, parse_size, quantize_artifacts

    height, width = parse_size(args.calibration_size)
    options = QuantizeOptions(
        components=tuple(dict.fromkeys(args.components)),
        calibration_prompts=args.calibration_prompts,
        calibration_steps=args.calibration_steps,
        calibration_height=height,
        calibration_width=width,
        verification_prompts=args.verification_prompts,
        activation_type=args.activations,
    )
    report = quantize_artifacts(args.artifacts, args.out, options, force=args.force)
    m = report.manifest
    if not report.built:
        print(f"{args.out} is up to date (same source artifacts, options and tool versions): nothing to do")
        return 0
    print(f"{'component':13s} {'precision':9s} {'MB':>7s} {'max abs err':>11s} {'PSNR dB':>8s}  (against fp32)")
    for name in options.components:
        c = m.components[name]
        v = c.verification
        mb = sum(f.bytes for f in c.files) / 1e6
        print(f"{name:13s} {c.precision:9s} {mb:7.1f} {v['max_abs_error']:11.3g} {v['psnr_db']:8.1f}")
    q = m.build["quantization"]
    e2e = q["end_to_end"]
    print(
        f"images against fp32 (same seeds, {len(e2e['per_image'])} held-out prompts): PSNR {e2e['psnr_db']:.1f} dB, "
        f"max abs difference {e2e['max_abs_difference']}/255"
    )
    print(f"wrote {args.out} in {q['seconds']['total']:.1f} s")
    return 0

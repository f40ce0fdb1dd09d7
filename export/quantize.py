"""int8 post-training quantization of an artifact directory: ``artifacts/NAME`` -> ``artifacts/NAME-int8``.

The calibration inputs are the denoiser's (the UNet's, or SD 3's transformer's) and the VAE decoder's real inputs, recorded while sdrt's own
fp32 pipeline generates images from a fixed list of prompts: the latents, timesteps and text
embeddings the quantized graph will see in service, at every step of the schedule. onnxruntime's
``quantize_static`` then writes a QDQ graph (QuantizeLinear/DequantizeLinear around Conv, MatMul
and Gemm), which onnxruntime's CPU provider fuses into integer kernels and OpenVINO's ONNX frontend
reads as FakeQuantize: one int8 artifact for both backends.

The error is measured, never assumed: each quantized graph against the fp32 graph on held-out
inputs (other prompts and seeds than the calibration's), and the whole int8 pipeline's images
against the fp32 pipeline's for the same seeds. Both go into the manifest.

The output directory is complete or absent (built in a temporary sibling, renamed into place), and
an unchanged re-run does nothing (fingerprint of the source manifest, the options, the tool
versions and this file).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from sdrt.export.atomic import atomic_directory
from sdrt.runtime.engine_cache import ENGINES_DIR
from sdrt.runtime.errors import ExportError
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import MANIFEST_NAME, Component, FileRecord, Manifest

log = logging.getLogger(__name__)

# "denoiser" is the family's (the UNet, or SD 3's transformer), as the default names it for every family.
DENOISER = "denoiser"
QUANTIZABLE = (DENOISER, "unet", "transformer", "vae_decoder")
# Weight-bearing ops. Softmax, normalizations and elementwise ops stay float: they are cheap, and
# quantizing them only adds requantization error between the integer kernels.
OP_TYPES = ("Conv", "MatMul", "Gemm")
ACTIVATION_TYPES = ("uint8", "int8")

# Varied subjects, styles and lighting, so the activation ranges cover more than one kind of image.
CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old fisherman, dramatic lighting, 85mm",
    "a bowl of ramen on a wooden table, food photography",
    "isometric pixel art of a tiny medieval village",
    "a snowy mountain lake at sunrise, wide angle",
    "a red sports car on a wet city street at night, neon reflections",
    "a macro photo of a honeybee on a sunflower",
    "an oil painting of a stormy sea in the style of Turner",
    "a cozy library with leather armchairs and a fireplace",
    "a cyberpunk samurai, concept art, highly detailed",
    "a golden retriever puppy playing in autumn leaves",
    "a minimalist logo of a fox, flat vector",
    "the interior of a gothic cathedral, light through stained glass",
    "a bustling market in Marrakech, street photography",
    "a chalk drawing of a dragon on a blackboard",
)
# Never used for calibration: the error is measured on inputs the ranges were not fitted to.
HELD_OUT_PROMPTS = (
    "a cat sleeping on a windowsill in the afternoon sun",
    "an aerial view of a river delta, satellite image",
    "a still life of lemons and a blue vase, impressionist",
    "a robot gardener watering tomato plants",
)
NEGATIVE_PROMPT = "blurry, low quality"  # a non-empty unconditional branch, as most users run it
CALIBRATION_SEED = 1000
HELD_OUT_SEED = 2000


@dataclass(frozen=True)
class QuantizeOptions:
    components: tuple[str, ...] = (DENOISER,)
    calibration_prompts: int = 8  # taken in order from CALIBRATION_PROMPTS, one seed each
    calibration_steps: int = 8  # denoising steps per prompt: every step's UNet input is one sample
    # 256 px: activation ranges are per channel and per tensor, not per pixel, so a smaller image
    # covers them at a quarter of the cost of 512 px (SD 1.5's UNet: ~2 s per call at 256 px here).
    calibration_height: int = 256
    calibration_width: int = 256
    guidance_scale: float = 7.5
    verification_prompts: int = 2  # held-out prompts for the graph and end-to-end error
    # uint8 (asymmetric) activations with int8 weights is the pair onnxruntime's x86 kernels and
    # OpenVINO's CPU plugin are built around (u8s8 dot products); int8 symmetric activations are
    # what TensorRT's explicit quantization requires.
    activation_type: str = "uint8"

    def __post_init__(self):
        unknown = [c for c in self.components if c not in QUANTIZABLE]
        if unknown or not self.components:
            raise ExportError(
                f"components: expected one or more of {', '.join(QUANTIZABLE)}, got {list(self.components)} "
                "(the text encoder is small and runs once per image: quantizing it does not pay)"
            )
        limits = (
            ("calibration prompts", self.calibration_prompts, len(CALIBRATION_PROMPTS)),
            ("verification prompts", self.verification_prompts, len(HELD_OUT_PROMPTS)),
            ("calibration steps", self.calibration_steps, 1000),
        )
        for what, value, most in limits:
            if not 1 <= value <= most:
                raise ExportError(f"{what}: expected 1 to {most}, got {value}")
        if self.calibration_height <= 0 or self.calibration_width <= 0:
            raise ExportError(
                f"calibration size: expected positive pixels, got {self.calibration_height}x{self.calibration_width}"
            )
        if self.activation_type not in ACTIVATION_TYPES:
            raise ExportError(
                f"activation type: expected one of {', '.join(ACTIVATION_TYPES)}, got {self.activation_type!r}"
            )


@dataclass
class QuantizeReport:
    manifest: Manifest
    built: bool  # False when the output was already up to date


def parse_size(text: str) -> tuple[int, int]:
    """``"256x256"`` -> (256, 256)."""
    height, sep, width = text.lower().partition("x")
    if sep and height.isdigit() and width.isdigit():
        return int(height), int(width)
    raise ExportError(f"calibration size: expected HEIGHTxWIDTH in pixels such as 256x256, got {text!r}")


def input_fingerprint(source: Path, options: QuantizeOptions) -> str:
    """sha256 over the source manifest (which holds every source file's hash), the options, the tool
    versions and this module's code."""
    from sdrt.export.build import tool_versions  # onnx, torch: imported when a command runs, not when it registers

    h = hashlib.sha256()
    h.update(sha256_file(Path(source) / MANIFEST_NAME).encode())
    h.update(
        json.dumps(
            {"options": asdict(options), "versions": tool_versions(), "code": sha256_file(Path(__file__))},
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def quantize_artifacts(
    source: Path, out_dir: Path, options: QuantizeOptions = QuantizeOptions(), force: bool = False
) -> QuantizeReport:
    from sdrt.export.build import tool_versions, up_to_date

    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    manifest, options = _check_source(source, out_dir, options)
    fingerprint = input_fingerprint(source, options)
    if not force:
        existing = up_to_date(out_dir, fingerprint)
        if existing is not None:
            log.info("%s is up to date (same source artifacts, options and tool versions): nothing to do", out_dir)
            return QuantizeReport(existing, built=False)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    calibration = _record_runs(source, options, CALIBRATION_PROMPTS[: options.calibration_prompts], CALIBRATION_SEED)
    seconds["calibration_runs"] = time.perf_counter() - t0
    log.info(
        "calibration: %d fp32 runs (%d steps at %dx%d) recorded %s in %.1f s",
        options.calibration_prompts,
        options.calibration_steps,
        options.calibration_height,
        options.calibration_width,
        ", ".join(f"{len(calibration.feeds[c])} {c} inputs" for c in options.components),
        seconds["calibration_runs"],
    )
    t0 = time.perf_counter()
    held_out = _record_runs(source, options, HELD_OUT_PROMPTS[: options.verification_prompts], HELD_OUT_SEED)
    seconds["reference_runs"] = time.perf_counter() - t0
    log.info("reference: %d held-out fp32 runs in %.1f s", options.verification_prompts, seconds["reference_runs"])

    with atomic_directory(out_dir) as tmp:
        _copy_artifacts(source, tmp, manifest, options.components)
        int8 = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))  # a deep copy
        for i, name in enumerate(options.components, 1):
            t0 = time.perf_counter()
            log.info("[%d/%d] %s: quantizing to int8 (QDQ, %s)", i, len(options.components), name, ", ".join(OP_TYPES))
            int8.components[name] = _quantize_component(
                source, tmp, manifest.components[name], calibration.feeds[name], options
            )
            t1 = time.perf_counter()
            int8.components[name].verification = _verify_graph(tmp, int8.components[name], held_out)
            check = int8.components[name].verification
            seconds[name] = time.perf_counter() - t0
            log.info(
                "[%d/%d] %s: verified against fp32 on %d held-out inputs in %.1f s: max abs error %.3g, PSNR %.1f dB",
                i,
                len(options.components),
                name,
                check["samples"],
                time.perf_counter() - t1,
                check["max_abs_error"],
                check["psnr_db"],
            )
        int8.build = {
            **int8.build,
            # Not the source's fingerprint: `sdrt export --out` on this folder must not take it for its fp32 build.
            "input_fingerprint": fingerprint,
            "versions": tool_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        int8.save(tmp)  # the pipeline below loads the directory through its manifest
        t0 = time.perf_counter()
        end_to_end = _verify_pipeline(tmp, held_out, options)
        seconds["end_to_end"] = time.perf_counter() - t0
        log.info(
            "end to end: image PSNR %.1f dB against fp32 (max abs difference %d of 255) over %d held-out images "
            "in %.1f s",
            end_to_end["psnr_db"],
            end_to_end["max_abs_difference"],
            len(end_to_end["per_image"]),
            seconds["end_to_end"],
        )
        seconds["total"] = time.perf_counter() - started
        int8.build["quantization"] = {
            "source": {
                "artifacts": str(source.absolute()),
                "manifest_sha256": sha256_file(source / MANIFEST_NAME),
                "input_fingerprint": manifest.build.get("input_fingerprint"),
            },
            "components": list(options.components),
            "options": asdict(options) | {"components": list(options.components)},
            "end_to_end": end_to_end,
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        int8.save(tmp)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - started)
    return QuantizeReport(int8, built=True)


def _check_source(source: Path, out_dir: Path, options: QuantizeOptions) -> tuple[Manifest, QuantizeOptions]:
    """The source's manifest, checked, and the options with "denoiser" resolved to the family's."""
    if not (source / MANIFEST_NAME).is_file():
        raise ExportError(
            f"source artifacts: expected an sdrt artifact directory with {MANIFEST_NAME} in {source}, found none "
            "(build one with `sdrt export`; optimum folders carry no hashes or verification to start from)"
        )
    if source.resolve() == out_dir.resolve():
        raise ExportError(
            f"--out: expected a directory other than the source, got {out_dir} for both (e.g. {source.name}-int8)"
        )
    manifest = Manifest.load(source, verify_hashes=True)
    denoiser = manifest.model_family.denoiser
    options = replace(
        options, components=tuple(dict.fromkeys(denoiser if c == DENOISER else c for c in options.components))
    )
    for name in options.components:
        if name not in manifest.components:
            raise ExportError(
                f"{name}: expected it among the source's components {sorted(manifest.components)}, got none"
            )
        precision = manifest.components[name].precision
        if precision != "fp32":
            raise ExportError(
                f"{name}: expected an fp32 graph to quantize, got {precision} in {source} "
                "(quantize the fp32 export: `sdrt export` without --precision)"
            )
    m = manifest.spatial_multiple
    for what, value in (("height", options.calibration_height), ("width", options.calibration_width)):
        if value % m:
            raise ExportError(f"calibration {what}: expected a multiple of {m} pixels for this model, got {value}")
    return manifest, options


# -- calibration and reference runs ------------------------------------------------------------------
class RecordingSession:
    """Wraps a session (same contract) and keeps a copy of every feed and output."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs
        self.feeds: list[dict[str, np.ndarray]] = []
        self.results: list[dict[str, np.ndarray]] = []

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.inner.run(feed)
        self.feeds.append({k: np.array(v, copy=True) for k, v in feed.items()})
        self.results.append({k: np.array(v, copy=True) for k, v in result.items()})
        return result

    def close(self) -> None:
        self.inner.close()


@dataclass
class Recording:
    prompts: list[str]
    seeds: list[int]
    feeds: dict[str, list[dict[str, np.ndarray]]]  # per component, every call's inputs
    results: dict[str, list[dict[str, np.ndarray]]]  # and its outputs, in the same order
    images: list[np.ndarray]  # uint8 (height, width, 3) per prompt


def _generate(pipe, prompt: str, seed: int, options: QuantizeOptions):
    return pipe(
        prompt,
        negative_prompt=NEGATIVE_PROMPT,
        height=options.calibration_height,
        width=options.calibration_width,
        num_inference_steps=options.calibration_steps,
        guidance_scale=options.guidance_scale,
        seed=seed,
    )


def _record_runs(artifacts: Path, options: QuantizeOptions, prompts, first_seed: int) -> Recording:
    from sdrt.runtime.pipeline import Pipeline

    seeds = [first_seed + i for i in range(len(prompts))]
    # The portable graphs, not a per-machine cache from engines/: the reference is the fp32 graph itself,
    # and loading must not write into the source. Hashes were checked by the caller.
    with Pipeline.load(artifacts, backend="onnxruntime", verify_hashes=False, cache=False) as pipe:
        recorders = {name: RecordingSession(pipe.sessions[name]) for name in QUANTIZABLE if name in pipe.sessions}
        pipe.sessions.update(recorders)
        images = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds), 1):
            t0 = time.perf_counter()
            images.append(_generate(pipe, prompt, seed, options).images[0])
            log.info("    fp32 run %d/%d (seed %d) in %.1f s", i, len(prompts), seed, time.perf_counter() - t0)
    return Recording(
        list(prompts),
        seeds,
        {name: r.feeds for name, r in recorders.items()},
        {name: r.results for name, r in recorders.items()},
        images,
    )


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], names: dict[str, str]):
        self._feeds = [{names.get(k, k): v for k, v in feed.items()} for feed in feeds]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        if self._next % 8 == 0 or self._next == len(self._feeds):  # minutes on a full-size UNet: show progress
            log.info("    calibration sample %d/%d", self._next, len(self._feeds))
        return self._feeds[self._next - 1]

    def __len__(self) -> int:
        return len(self._feeds)


# -- the output directory -----------------------------------------------------------------------------
def _copy_artifacts(source: Path, tmp: Path, manifest: Manifest, replaced: tuple[str, ...]) -> None:
    """Everything of the source but the graphs being replaced, as hard links: no GBs copied, and safe
    because every sdrt step writes new files rather than changing one in place. TensorRT and
    OpenVINO engine caches are not carried: they belong to the fp32 graphs."""
    skip = {f.path for name in replaced for f in manifest.components[name].files}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if rel.parts[0] == ENGINES_DIR or rel.as_posix() in skip or rel.as_posix() == MANIFEST_NAME:
            continue
        target = tmp / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, target)


def _link_or_copy(path: Path, target: Path) -> None:
    try:
        os.link(path, target)
    except OSError:  # another file system, or no hard links
        shutil.copy2(path, target)


def _quantize_component(
    source: Path, tmp: Path, fp32: Component, feeds: list[dict[str, np.ndarray]], options: QuantizeOptions
) -> Component:
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from sdrt.export import graph

    started = time.perf_counter()
    src_graph = source / fp32.path
    # onnxruntime writes its shape-inferred copy next to the graph it is given: work on links in a
    # scratch folder of the temporary directory, so the source directory never sees a stray file.
    scratch = tmp / f".quantize-{fp32.name}"
    scratch.mkdir()
    for f in fp32.files:
        if f.path.endswith(".data"):  # onnx refuses hard-linked external data ("potential hardlink attack")
            shutil.copyfile(source / f.path, scratch / Path(f.path).name)
        else:
            _link_or_copy(source / f.path, scratch / Path(f.path).name)
    # No quant_pre_process: its symbolic shape inference fails on the dynamo-exported UNet ("Incomplete
    # symbolic shape inference"), onnxslim already folded the constants, and quantize_static runs ONNX
    # shape inference itself (so onnxruntime's "consider pre-processing" warning is expected).
    external = graph.data_path(src_graph).exists()
    before = graph.stats(src_graph)
    activation_matmuls = activation_matmul_nodes(src_graph)
    quantized = scratch / "int8.onnx"
    quantize_static(
        str(scratch / src_graph.name),
        str(quantized),
        _FeedReader(feeds, fp32.graph_names),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(OP_TYPES),
        per_channel=True,
        # 7-bit weights would only avoid u8s8 overflow on x86 CPUs without VNNI (pre-2019); they cost accuracy.
        reduce_range=False,
        activation_type=QuantType.QUInt8 if options.activation_type == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        # The calibration graph emits only ReduceMin/ReduceMax of each tensor (a few floats per sample),
        # so memory does not grow with the number of samples. CalibMaxIntermediateOutputs is left
        # unset on purpose: onnxruntime (1.32 included) discards the collected ranges when it is
        # reached instead of merging them (microsoft/onnxruntime#18893, fix #20226 never merged).
        use_external_data_format=external,
        calibrate_method=CalibrationMethod.MinMax,
        # Only MatMuls with a weight: attention's activation x activation products (q k^T, probabilities
        # x v) would carry the scores' and softmax's dynamic range in 8 bits. Excluded by name because
        # the MatMulConstBOnly option is honoured by the QOperator format only, not by QDQ.
        nodes_to_exclude=activation_matmuls,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": options.activation_type == "int8"},
    )
    graph.release_memory()
    path = tmp / fp32.path
    path.touch()  # graph.save replaces the files at `path`; it decides internal or external weights
    graph.save(onnx.load(str(quantized)), path)
    shutil.rmtree(scratch)
    # graph.record_step logs and records it as every other graph step (nodes and bytes before/after, time).
    step = graph.record_step(
        "int8",
        before,
        path,
        started,
        tool=f"onnxruntime {onnxruntime.__version__} quantize_static",
        format="QDQ",
        weights="int8, symmetric, per output channel",
        activations=f"{options.activation_type}, {'symmetric' if options.activation_type == 'int8' else 'asymmetric'}, "
        "per tensor, static ranges (MinMax calibration)",
        op_types=list(OP_TYPES),
        quantized_nodes=quantized_node_counts(path),
        float_matmuls=len(activation_matmuls),  # activation x activation (attention), kept float
        float_nodes="attention's activation x activation MatMuls, normalizations, softmax, elementwise ops",
        calibration={
            "method": "MinMax",
            "prompts": list(CALIBRATION_PROMPTS[: options.calibration_prompts]),
            "negative_prompt": NEGATIVE_PROMPT,
            "first_seed": CALIBRATION_SEED,
            "steps": options.calibration_steps,
            "height": options.calibration_height,
            "width": options.calibration_width,
            "guidance_scale": options.guidance_scale,
            "samples": len(feeds),
        },
    )
    log.info("    int8: quantized %s", step["quantized_nodes"])
    optimization = dict(fp32.optimization)
    optimization["steps"] = [*fp32.optimization.get("steps", []), step]
    return replace(
        fp32,
        files=[FileRecord.of(tmp, f) for f in graph.graph_files(path)],
        precision="int8",
        verification={},
        optimization=optimization,
        lora_targets={},  # int8 weights cannot take a float update: LoRA on int8 artifacts is fused at export
    )


def activation_matmul_nodes(path: Path) -> list[str]:
    """Names of the MatMul nodes whose both operands are activations (no weight initializer)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]


def quantized_node_counts(path: Path) -> dict[str, int]:
    """Per op type, the nodes whose weight (second input) comes out of a DequantizeLinear of an
    integer initializer: the nodes that really run on int8 weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    int_inits = {t.name for t in model.graph.initializer if t.data_type in integer}
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int_inits}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in OP_TYPES and len(node.input) > 1 and node.input[1] in dequantized:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# -- measured error ------------------------------------------------------------------------------------
def _verify_graph(tmp: Path, component: Component, held_out: Recording) -> dict:
    """The int8 graph against the fp32 graph's recorded outputs on the held-out inputs (the same
    figures as the export's check against PyTorch, with the fp32 graph as the reference)."""
    from sdrt.export.onnx_export import psnr
    from sdrt.runtime.session import OrtSession

    session = OrtSession(tmp, component)
    errors, ref_abs = [], 0.0
    try:
        for feed, want in zip(held_out.feeds[component.name], held_out.results[component.name]):
            got = session.run(feed)
            for spec in component.outputs:
                if not np.isfinite(got[spec.name]).all():
                    raise ExportError(
                        f"{component.name}: expected finite outputs from the int8 graph, got non-finite values "
                        f"for inputs of shapes {_shapes(feed)} (calibrate with more "
                        "prompts or steps, or keep this component fp32)"
                    )
                errors.append(np.abs(got[spec.name].astype(np.float64) - want[spec.name].astype(np.float64)))
                ref_abs = max(ref_abs, float(np.abs(want[spec.name]).max()))
    finally:
        session.close()
    err = np.concatenate([e.ravel() for e in errors])
    scale = max(1.0, ref_abs)
    return {
        "reference": "fp32 ONNX graph of the source artifacts (onnxruntime CPU)",
        "inputs": f"{len(errors)} held-out inputs recorded from the fp32 pipeline",
        "prompts": held_out.prompts,
        "seeds": held_out.seeds,
        "samples": len(errors),
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "reference_max_abs": ref_abs,
        "relative_error": float(err.max()) / scale,
        "psnr_db": psnr(float(np.mean(err**2)), scale),
    }


def _verify_pipeline(tmp: Path, held_out: Recording, options: QuantizeOptions) -> dict:
    """The int8 pipeline's images against the fp32 pipeline's, same prompts and seeds."""
    from sdrt.export.onnx_export import psnr
    from sdrt.runtime.pipeline import Pipeline

    with Pipeline.load(tmp, backend="onnxruntime", verify_hashes=False, cache=False) as pipe:
        images = [_generate(pipe, p, s, options).images[0] for p, s in zip(held_out.prompts, held_out.seeds)]
    return image_difference(held_out.images, images) | {
        "reference": "fp32 pipeline of the source artifacts, same prompts and seeds (onnxruntime CPU)",
        "prompts": held_out.prompts,
        "negative_prompt": NEGATIVE_PROMPT,
        "seeds": held_out.seeds,
        "height": options.calibration_height,
        "width": options.calibration_width,
        "steps": options.calibration_steps,
        "guidance_scale": options.guidance_scale,
        "psnr_peak": 255,
        "per_image": [psnr(_mse(a, b), 255.0) for a, b in zip(held_out.images, images)],
    }


def image_difference(reference: list[np.ndarray], images: list[np.ndarray]) -> dict:
    """PSNR (peak 255) over all pixels of all images, and the largest pixel difference."""
    from sdrt.export.onnx_export import psnr

    ref = np.stack(reference).astype(np.float64)
    got = np.stack(images).astype(np.float64)
    return {
        "psnr_db": psnr(float(np.mean((ref - got) ** 2)), 255.0),
        "max_abs_difference": int(np.abs(ref - got).max()),
        "mean_abs_difference": float(np.abs(ref - got).mean()),
    }


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _shapes(feed: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in feed.items()}

"""Build an artifact directory from a diffusers pipeline: ONNX graphs, tokenizer, scheduler, manifest.

The whole directory is built in a temporary sibling and renamed into place only when every file
exists and every component passed its check against PyTorch. An unchanged re-run (same source
files, options and tool versions, checked by content hashes) does no work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.export import graph, lora_map, memory
from sdrt.export.atomic import atomic_directory
from sdrt.export.modules import LoadedPipeline, family_of, load_pipeline, resolve_source, source_files
from sdrt.export.onnx_export import DEFAULT_OPSET, export_onnx, reference_outputs, verify_onnx
from sdrt.runtime.engine_cache import ENGINES_DIR
from sdrt.runtime.errors import ArtifactError, ExportError
from sdrt.runtime.families import ALL_COMPONENTS, OPTIONAL_COMPONENTS, Family, sizes
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import Component, FileRecord, Manifest, TokenizerInfo

log = logging.getLogger(__name__)

TOOLS = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "onnxslim")

# The modules whose code decides what the artifacts contain (not the CLI or the engine builder).
ARTIFACT_CODE = (
    "build.py", "graph.py", "memory.py", "modules.py", "onnx_export.py", "lora_map.py", "../runtime/families.py", "../runtime/lora.py",
)  # fmt: skip

PRECISIONS = ("fp32", "fp16")
# Per-component precisions: fp16 everywhere, except the parts known to overflow in fp16.
COMPONENT_PRECISIONS = ("fp32", "fp16", "fp16+fp32-attention")


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    components: tuple[str, ...] = ()  # empty: every component of the model's family
    verify: bool = True
    seed: int = 0  # for verification inputs
    precision: str = "fp32"  # of every component, unless the family's exceptions or an override say otherwise
    component_precision: tuple[tuple[str, str], ...] = ()  # overrides, e.g. (("vae_decoder", "fp32"),)
    optimizations: tuple[str, ...] = graph.DEFAULT_OPTIMIZATIONS
    vae: str | None = None  # a VAE folder (AutoencoderKL or AutoencoderTiny) replacing the model's own
    # Read pickle checkpoints (.bin) where a part has no safetensors weights: unpickling can run code.
    allow_pickle: bool = False
    # LoRA adapters merged into the weights before the export: (path to a .safetensors file, scale).
    loras: tuple[tuple[str, float], ...] = ()
    drop_t5: bool = False  # leave out the T5 encoder (SD 3): not loaded, not exported; the runtime passes zeros
    memory_check: bool = True  # refuse, before loading, an export this machine's memory cannot hold

    def __post_init__(self):
        unknown = [c for c in self.components if c not in ALL_COMPONENTS]
        if unknown:
            raise ExportError(f"components: expected names from {', '.join(ALL_COMPONENTS)}, got {unknown}")
        if self.opset < 17:
            raise ExportError(f"opset: expected 17 or newer, got {self.opset}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, value in self.component_precision:
            if name not in ALL_COMPONENTS or value not in COMPONENT_PRECISIONS:
                raise ExportError(
                    f"component precision: expected COMPONENT=PRECISION with a component from "
                    f"{', '.join(ALL_COMPONENTS)} and a precision from {', '.join(COMPONENT_PRECISIONS)}, "
                    f"got {name}={value}"
                )
        bad = [o for o in self.optimizations if o not in graph.OPTIMIZATIONS]
        if bad:
            raise ExportError(f"optimizations: expected names from {', '.join(graph.OPTIMIZATIONS)}, got {bad}")

    def precision_of(self, component: str, family: Family) -> str:
        """The component's precision: the override if given, else fp32, else fp16 bar the family's exceptions."""
        overrides = dict(self.component_precision)
        if component in overrides:
            return overrides[component]
        if self.precision == "fp32":
            return "fp32"
        return family.fp16_exceptions.get(component, "fp16")

    def dropped(self, family: Family) -> tuple[str, ...]:
        """The text encoders left out (--drop-t5, or a --components list without them), which the pipeline runs
        without (SD 3's T5)."""
        t5 = tuple(r.component for r in family.text_encoders if r.kind == "t5")
        if self.drop_t5 and not t5:
            raise ExportError(f"--drop-t5: the {family.name} family has no T5 text encoder to leave out")
        if self.drop_t5 and [c for c in t5 if c in self.components]:
            raise ExportError(f"--drop-t5: expected no {', '.join(t5)} in --components as well, got both")
        listed = [c for c in self.components if c not in OPTIONAL_COMPONENTS]
        skipped = [c for c in family.optional_text_encoders() if listed and c not in listed]
        return tuple(dict.fromkeys([*(t5 if self.drop_t5 else ()), *skipped]))

    def components_of(self, family: Family) -> tuple[str, ...]:
        """The components to export for ``family``: all of them unless a subset was asked for (and the optional
        ones, such as the UNet that takes ControlNet residuals, only when asked for)."""
        optional = tuple(c for c in OPTIONAL_COMPONENTS if c in self.components)
        dropped = self.dropped(family)
        if not [c for c in self.components if c not in OPTIONAL_COMPONENTS]:
            return (*(c for c in family.components() if c not in dropped), *optional)
        alien = [c for c in self.components if c not in (*family.components(), *OPTIONAL_COMPONENTS)]
        if alien:
            raise ExportError(
                f"components: expected names from the {family.name} family's {', '.join(family.components())}, "
                f"got {alien}"
            )
        needed = [
            c for c in family.components()
            if c not in ("vae_encoder", *family.optional_text_encoders()) and c not in self.components
        ]  # fmt: skip
        if needed:
            raise ExportError(f"components: text-to-image needs {', '.join(needed)}; got {list(self.components)}")
        return (*(c for c in family.components() if c in self.components), *optional)


@dataclass
class ExportReport:
    manifest: Manifest
    built: bool  # False when the artifacts were already up to date
    seconds: dict[str, float] = field(default_factory=dict)


def tool_versions() -> dict[str, str]:
    versions = {}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = "not installed"
    return versions


def input_fingerprint(source: Path, options: ExportOptions) -> str:
    """sha256 over every source file's content hash, the export options, the tool versions and
    sdrt's own export code (so a changed exporter rebuilds even at the same version number)."""
    h = hashlib.sha256()
    vae = Path(options.vae) if options.vae else None
    for path in source_files(source, vae, options.allow_pickle):
        where = path.relative_to(source) if path.is_relative_to(source) else Path("vae-override") / path.name
        h.update(f"{where.as_posix()}\0{sha256_file(path)}\n".encode())
    for path, scale in options.loras:
        if not Path(path).is_file():
            raise ExportError(f"lora: expected a .safetensors file, got {path!r}, which does not exist")
        h.update(f"lora\0{sha256_file(Path(path))}\0{float(scale)!r}\n".encode())
    here = Path(__file__).parent
    code = {Path(name).name: sha256_file(here / name) for name in ARTIFACT_CODE}
    h.update(
        json.dumps({"options": options.__dict__, "versions": tool_versions(), "code": code}, sort_keys=True).encode()
    )
    return h.hexdigest()


def up_to_date(out_dir: Path, fingerprint: str) -> Manifest | None:
    """The existing manifest when it was built from the same inputs and its files are intact."""
    try:
        manifest = Manifest.load(out_dir, verify_hashes=True)
    except ArtifactError as e:
        if (out_dir / "manifest.json").exists():
            log.info("existing artifacts in %s are not usable (%s): rebuilding", out_dir, e)
        return None
    if manifest.build.get("input_fingerprint") != fingerprint:
        log.info("inputs changed since %s was built: rebuilding", out_dir)
        return None
    return manifest


def export_pipeline(
    model: str,
    out_dir: Path,
    options: ExportOptions = ExportOptions(),
    revision: str | None = None,
    force: bool = False,
) -> ExportReport:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    source = resolve_source(model, revision, options.allow_pickle)
    fingerprint = input_fingerprint(source, options)
    if not force:
        existing = up_to_date(out_dir, fingerprint)
        if existing is not None:
            log.info(
                "%s is up to date (same source files, options and tool versions): nothing to do (--force rebuilds)",
                out_dir,
            )
            return ExportReport(existing, built=False)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    log.info("loading %s", source)
    if options.vae and not Path(options.vae).is_dir():
        raise ExportError(f"vae: expected a folder holding an AutoencoderKL or AutoencoderTiny, got {options.vae!r}")
    pipe = load_pipeline(
        source,
        Path(options.vae) if options.vae else None,
        options.allow_pickle,
        skip=options.dropped(family_of(source)[0]),
        memory_check=options.memory_check,
    )
    names = options.components_of(pipe.family)
    fused = lora_map.fuse(pipe.parts, [(Path(p), s) for p, s in options.loras]) if options.loras else []
    seconds["load"] = time.perf_counter() - t0
    with atomic_directory(out_dir) as tmp:
        components = {}
        for i, name in enumerate(names, 1):
            t0 = time.perf_counter()
            log.info("[%d/%d] %s: exporting to ONNX (opset %d)", i, len(names), name, options.opset)
            components[name] = _export_component(pipe, name, tmp, options, _releaser(pipe, name, names[i:]))
            seconds[name] = time.perf_counter() - t0
            check = components[name].verification
            log.info(
                "[%d/%d] %s: done in %.1f s, %s, %.1f MB, max abs error vs PyTorch %s",
                i,
                len(names),
                name,
                seconds[name],
                components[name].precision,
                sum(f.bytes for f in components[name].files) / 1e6,
                f"{check['max_abs_error']:.2e} (PSNR {check['psnr_db']:.1f} dB)" if check else "not checked",
            )
        tokenizers = {folder: _write_tokenizer(pipe, folder, tmp) for folder in pipe.tokenizers}
        (tmp / "scheduler").mkdir()
        shutil.copyfile(source / "scheduler" / "scheduler_config.json", tmp / "scheduler" / "scheduler_config.json")
        _carry_engines(out_dir, tmp)
        manifest = _manifest(pipe, model, revision, components, tokenizers, options, fingerprint, seconds)
        if fused:
            manifest.build["fused_loras"] = fused
        manifest.build["seconds"]["total"] = time.perf_counter() - started
        manifest.save(tmp)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - started)
    return ExportReport(manifest, built=True, seconds=seconds)


def _releaser(pipe: LoadedPipeline, name: str, later: tuple[str, ...]) -> Callable[[], None] | None:
    """What frees ``name``'s PyTorch part once it is exported, or None when it must stay: a later component is
    made from it (the UNet of unet_control), it carries LoRA targets to map after the graph steps, or it is the VAE
    (small, and the manifest reads its config)."""
    part = pipe.part_of(name)
    if part == "vae" or name in lora_map.ADAPTABLE or any(pipe.part_of(c) == part for c in later):
        return None

    def release() -> None:
        pipe.parts.pop(part, None)
        graph.release_memory()
        log.info("    released %s's PyTorch weights", part)

    return release


def _carry_engines(out_dir: Path, tmp: Path) -> None:
    """Keep the TensorRT engines of the directory being replaced (hard links: no copy, and the old
    directory stays intact until the rename). `sdrt engines` then rebuilds only those whose ONNX
    source changed, by fingerprint."""
    import os

    old = out_dir / ENGINES_DIR
    if old.is_dir():
        try:
            shutil.copytree(old, tmp / ENGINES_DIR, copy_function=os.link)
        except OSError:  # another file system, or no hard links: copy
            shutil.rmtree(tmp / ENGINES_DIR, ignore_errors=True)
            shutil.copytree(old, tmp / ENGINES_DIR)
        log.info("kept %s (engines are rebuilt by `sdrt engines` only where the ONNX changed)", old)


def _export_component(
    pipe: LoadedPipeline, name: str, root: Path, options: ExportOptions, release: Callable[[], None] | None = None
) -> Component:
    """Export, optimize and check one component. ``release``: called once PyTorch is done with the component's
    part (after the export and the reference outputs), to free it before the graph steps, when no later
    component needs it."""
    dims = pipe.dims
    spec = pipe.family.specs(dims)[name]
    module = pipe.module(name)
    rng = np.random.default_rng(options.seed)
    m = dims.latent_multiple
    # Distinct sizes for every symbolic dimension, so the exporter cannot mistake one for another.
    # T5's tokens (SD 3) differ from every other size too; T5 has its own vocabulary.
    vocab = dims.t5_vocab_size if spec.ort_model_type == "t5" else dims.vocab_size
    trace = spec.sample(sizes(dims, batch=2, latent_height=2 * m, latent_width=3 * m, t5_tokens=24), rng, vocab)
    other = spec.sample(sizes(dims, batch=1, latent_height=3 * m, latent_width=2 * m, t5_tokens=13), rng, vocab)
    path = root / "onnx" / f"{name}.onnx"
    t0 = time.perf_counter()
    export_onnx(spec, module, trace, path, options.opset)
    graph.release_memory()
    # PyTorch's outputs now: the part can then leave memory (release) before its graph is optimized and checked.
    references = reference_outputs(spec, module, [trace, other]) if options.verify else []
    if release is not None:
        del module
        release()
    steps = [{"step": "export", "tool": f"torch.onnx (dynamo) {torch_version()}", **_stats_now(path, t0)}]
    log.info(
        "    export: %d nodes, %.1f MB in %.1f s",
        steps[0]["nodes_after"],
        steps[0]["bytes_after"] / 1e6,
        steps[0]["seconds"],
    )
    for step in options.optimizations:
        if step == "slim" and not memory.slim_fits(path):
            steps.append(graph.skipped_step("slim", path, memory.slim_skip_reason(path)))
            log.info("    slim: skipped (%s)", steps[-1]["reason"])
        elif step == "slim":
            steps.append(graph.slim(path))
        elif step == "ort-fusion":
            steps.append(graph.ort_fusion(path, spec.ort_model_type))
    precision = options.precision_of(name, pipe.family)
    if precision != "fp32":
        islands = ("attention",) if precision == "fp16+fp32-attention" else ()
        steps.append(graph.to_fp16(path, islands))
    verification = {}
    if options.verify:
        t0 = time.perf_counter()
        verification = verify_onnx(spec, references, path, [trace, other], precision)
        graph.release_memory()
        log.info(
            "    verify: max abs error %.2e, PSNR %.1f dB at 2 shapes in %.1f s",
            verification["max_abs_error"],
            verification["psnr_db"],
            time.perf_counter() - t0,
        )
    lora_targets, lora_summary = {}, {}
    if name in lora_map.ADAPTABLE:
        t0 = time.perf_counter()
        import torch

        args = tuple(torch.from_numpy(trace[t.name]) for t in spec.inputs)
        part = pipe.parts[lora_map.WEIGHTS_OF.get(name, name)]
        lora_targets, lora_summary = lora_map.lora_targets(
            part, path, lambda: lora_map.unreachable_modules(part, module, args)
        )
        unused = f", {lora_summary['unused']} no output depends on" if lora_summary.get("unused") else ""
        log.info(
            "    LoRA map: %d of %d Linear/Conv2d weights located in the graph%s in %.1f s",
            lora_summary["mapped"], lora_summary["modules"], unused, time.perf_counter() - t0,
        )  # fmt: skip
    optimization = {"steps": steps}
    if lora_summary:
        optimization["lora_map"] = lora_summary
    if "ort-fusion" in options.optimizations:
        optimization["runs_in"] = "onnxruntime only (com.microsoft contrib operators)"
    return Component(
        name=name,
        files=[FileRecord.of(root, f) for f in graph.graph_files(path)],
        opset=options.opset,
        precision=precision,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        verification=verification,
        optimization=optimization,
        lora_targets=lora_targets,
    )


def torch_version() -> str:
    import torch

    return torch.__version__


def _stats_now(path: Path, started: float) -> dict:
    s = graph.stats(path)
    return {"nodes_after": s["nodes"], "bytes_after": s["bytes"], "seconds": round(time.perf_counter() - started, 3)}


def _write_tokenizer(pipe: LoadedPipeline, folder: str, root: Path) -> TokenizerInfo:
    """Whatever layout the source used (vocab.json + merges.txt, or tokenizer.json), write the
    ``tokenizers`` file the runtime loads."""
    tokenizer = pipe.tokenizers[folder]
    out = root / folder
    out.mkdir()
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    if tokenizer.pad_token_id is None:
        raise ExportError(
            f"{folder}: expected a pad token (SD 1.x pads with <|endoftext|>, SD 2.x and SDXL's second with '!'), "
            "got none"
        )
    t5 = any(r.tokenizer == folder and r.kind == "t5" for r in pipe.family.text_encoders)
    return TokenizerInfo(
        path=folder,
        # T5's: the default max_sequence_length (a call may ask for another, up to the tokenizer's limit)
        max_length=pipe.dims.t5_default_length if t5 else pipe.dims.text_length,
        pad_token_id=int(tokenizer.pad_token_id),
        files=[FileRecord.of(root, out / "tokenizer.json")],
    )


def _manifest(pipe, model, revision, components, tokenizers, options, fingerprint, seconds) -> Manifest:
    dims = pipe.dims
    vae = {
        "kind": dims.vae_kind,
        "class": type(pipe.vae).__name__,
        # SD 3's VAE: latents = (encoded - shift) * scale, decoded as latents / scale + shift
        "shift_factor": float(pipe.vae.config.get("shift_factor") or 0.0),
        **({"source": pipe.vae_source} if pipe.vae_source else {}),
    }
    return Manifest(
        sdrt_version=tool_versions()["sdrt"],
        source={
            "model": model,
            "revision": revision,
            "path": str(pipe.source),
            "pipeline": pipe.model_index.get("_class_name"),
        },
        family=pipe.family.name,
        prediction_type=pipe.scheduler_config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=dims.vae_scale_factor,
        latent_channels=dims.latent_channels,
        text_length=dims.text_length,
        spatial_multiple=dims.spatial_multiple,
        default_height=dims.sample_size * dims.vae_scale_factor,
        default_width=dims.sample_size * dims.vae_scale_factor,
        tokenizers=tokenizers,
        scheduler_config="scheduler/scheduler_config.json",
        components=components,
        dims=dims.to_dict(),
        pipeline_options={
            "force_zeros_for_empty_prompt": bool(pipe.model_index.get("force_zeros_for_empty_prompt", False)),
            "requires_aesthetics_score": bool(pipe.model_index.get("requires_aesthetics_score", False)),
        },
        vae=vae,
        build={
            "input_fingerprint": fingerprint,
            "versions": tool_versions(),
            "options": {
                **options.__dict__,
                "components": list(components),
                "component_precision": dict(options.component_precision),
                "optimizations": list(options.optimizations),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": dict(seconds),
        },
    )

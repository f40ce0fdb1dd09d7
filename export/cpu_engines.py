"""Build onnxruntime CPU engines (see ``sdrt.runtime.ort_cpu_engines``) from an artifact directory.

Per component: onnxscript's onnxruntime fusions on the portable graph (scaled-dot-product attention
into MultiHeadAttention, whose CPU kernel never materializes the (heads, tokens, tokens) score
matrix; LayerNorm with its residual into SkipLayerNormalization; GELU), then onnxruntime's own
graph optimizations at their highest level, saved with the weights (pre-packed ones included)
in an external data file; then a check against the portable graph at a small shape. An engine is
rebuilt only when missing or stale (another ONNX, another onnxruntime), with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.export.graph import release_memory
from sdrt.runtime.engine_cache import onnx_fingerprint
from sdrt.runtime.errors import ExportError
from sdrt.runtime.families import ALL_COMPONENTS
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.ort_cpu_engines import (
    CpuEngineRecord,
    engine_bytes,
    engine_folder,
    isa_key,
    ort_version,
    read_records,
    stale_reason,
    write_records,
)
from sdrt.runtime.profiles import Range, ShapeRanges, input_profile

log = logging.getLogger(__name__)

COMPONENTS = ALL_COMPONENTS  # those of them the artifacts have
# The engine must compute what the portable graph computes: fusions reorder float arithmetic, so
# the bound is relative to the output's scale, as for the export's own fp32 check.
TOLERANCE = 1e-3


@dataclass
class CpuEngineReport:
    folder: Path
    built: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


def build_cpu_engines(
    root: Path,
    components: tuple[str, ...] | None = None,
    force: bool = False,
    threads: int = 0,
    fuse: bool = True,
    lora_sources: bool = True,
    manifest: Manifest | None = None,
    targets: dict[str, Component] | None = None,
) -> CpuEngineReport:
    """Build the missing or stale engines of ``root`` for this CPU; ``fuse=False`` skips onnxscript's
    fusions (onnxruntime's own optimizations still run). ``lora_sources``: keep the fused graph of every
    component a LoRA adapts, for adapter sessions as fast as the engine (CpuEngineRecord.lora_source).
    ``targets``: the graphs of ``root`` to build for (default: the manifest's components), with ``manifest``
    the model whose dims give their shapes (default: ``root``'s own manifest)."""
    root = Path(root)
    manifest = Manifest.load(root) if manifest is None else manifest
    available = manifest.components if targets is None else targets
    folder = engine_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    records = read_records(folder)
    report = CpuEngineReport(folder)
    wanted = [c for c in (components or (*COMPONENTS, *available)) if c in available]
    wanted = list(dict.fromkeys(wanted))
    for i, name in enumerate(wanted, 1):
        component = available[name]
        fingerprint = onnx_fingerprint(root, component)
        record = records.get(name)
        reason = "--force" if force else stale_reason(record, folder, fingerprint)
        if reason is None and record is not None and record.fused != fuse:
            reason = "fusions " + ("asked for" if fuse else "turned off")
        wants_source = lora_sources and fuse and bool(component.lora_targets)
        if reason is None and record is not None and bool(record.lora_source) != wants_source:
            reason = "a graph for LoRA adapters " + ("asked for" if wants_source else "no longer asked for")
        if reason is None:
            report.kept.append(name)
            continue
        log.info("[%d/%d] %s: building the onnxruntime CPU engine (%s)", i, len(wanted), name, reason)
        records[name] = build_one(root, manifest, component, folder, fingerprint, threads, fuse, wants_source)
        write_records(folder, records)  # after each engine: an interrupted build keeps the finished ones
        report.built.append(name)
        report.reasons[name] = reason
    return report


def build_controlnet_engines(
    controlnet_root: Path, base_root: Path, force: bool = False, threads: int = 0, fuse: bool = True
) -> CpuEngineReport:
    """The CPU engine of a ControlNet artifact directory (``sdrt export --controlnet``), in its own ``engines/``,
    shaped by the model it fits (``base_root``), so that its sessions load as fast and run as fused as the UNet's."""
    from sdrt.runtime.controlnet import ControlNetManifest

    cn = ControlNetManifest.load(Path(controlnet_root))
    base = Manifest.load(Path(base_root))
    cn.check_fits(base, where=f"controlnet ({controlnet_root})")
    return build_cpu_engines(
        controlnet_root, force=force, threads=threads, fuse=fuse, lora_sources=False, manifest=base,
        targets={c.name: c for c in cn.graphs},
    )  # fmt: skip


def build_one(
    root: Path,
    manifest: Manifest,
    component: Component,
    folder: Path,
    fingerprint: str,
    threads: int = 0,
    fuse: bool = True,
    lora_source: bool = False,
) -> CpuEngineRecord:
    started = time.perf_counter()
    work = folder / f".building-{component.name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    source_name, source_bytes = "", 0
    try:
        t0 = time.perf_counter()
        fused, fusions = root / component.path, {}
        if fuse:
            fused, fusions = fuse_for_onnxruntime(fused, work / f"{component.name}.lora.onnx")
            log.info("    fusions: %s in %.1f s", fusions or "none", time.perf_counter() - t0)
        t0 = time.perf_counter()
        name = f"{component.name}.onnx"
        optimize_and_save(fused, work / name, threads)
        log.info("    onnxruntime optimization saved in %.1f s", time.perf_counter() - t0)
        if lora_source:
            why_not = lora_source_problem(fused, component)
            if why_not:
                log.warning(
                    "    no graph for LoRA adapters: %s (adapter sessions start from the portable graph)", why_not
                )
            else:
                source_name = fused.name
        if not source_name:  # not kept: its disk goes back before the check
            for f in work.glob("*.lora.onnx*"):
                f.unlink()
        t0 = time.perf_counter()
        verification = verify_engine(root, manifest, component, work / name, threads)
        log.info(
            "    check against the portable graph: max abs error %.2e (scale %.2e) in %.1f s",
            verification["max_abs_error"],
            verification["scale"],
            time.perf_counter() - t0,
        )
        for f in (name, f"{name}.data"):
            (work / f).replace(folder / f)
        # The fused graph for adapters goes in only beside a checked engine; a rebuild that keeps none removes the
        # one an earlier build kept (--no-lora-graphs is there to give that disk back).
        for f in (f"{component.name}.lora.onnx", f"{component.name}.lora.onnx.data"):
            if source_name:
                (work / f).replace(folder / f)
            else:
                (folder / f).unlink(missing_ok=True)
        if source_name:
            source_bytes = engine_bytes(folder / source_name)
            log.info("    kept the fused graph for LoRA adapters (%.0f MB)", source_bytes / 1e6)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        release_memory()
    path = folder / name
    return CpuEngineRecord(
        component=component.name,
        file=name,
        onnx_fingerprint=fingerprint,
        onnxruntime_version=ort_version(),
        isa=isa_key(),
        fused=fuse,
        fusions=fusions,
        verification=verification,
        bytes=engine_bytes(path),
        seconds=round(time.perf_counter() - started, 2),
        lora_source=source_name,
        lora_source_bytes=source_bytes,
    )


def lora_source_problem(graph: Path, component: Component) -> str | None:
    """Why the fused ``graph`` cannot take adapter weights (None: it can): every weight the LoRA map names must
    still be there, under its name and shape, in external data (what add_external_initializers replaces)."""
    from sdrt.runtime.onnx_proto import read_initializers

    wanted = {t["initializer"]: t for t in component.lora_targets.values() if t["layout"] != "unused"}
    found = read_initializers(graph, wanted)
    for name, target in wanted.items():
        shape = tuple(target["shape"]) if target["layout"] == "same" else tuple(reversed(target["shape"]))
        init = found.get(name)
        if init is None:
            return f"the fusions replaced weight {name!r}"
        if tuple(init.dims) != shape or not init.location:
            return f"weight {name!r} is {list(init.dims)} {'external' if init.location else 'inline'}, expected {list(shape)} external"
    return None


def fuse_for_onnxruntime(source: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """onnxscript's onnxruntime fusions; the fused graph keeps its weights in ``<out>.data``."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(source))  # external weights are memory-mapped, not read
    with _quiet("onnxscript", "onnx_ir"):  # they log every pass at INFO
        model, counts = optimize_for_ort(model)
    ir.save(model, str(out), external_data=out.name + ".data")
    del model
    release_memory()
    return out, {k: v for k, v in counts.items() if v}


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def optimize_and_save(source: Path, out: Path, threads: int = 0) -> None:
    """onnxruntime's optimizations at their highest level, saved with pre-packed weights as external data."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its warning that the result is hardware-specific is why we key by ISA
    if threads:
        options.intra_op_num_threads = threads
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    del session
    if not out.is_file():
        raise ExportError(f"{out}: expected onnxruntime to save the optimized graph, found nothing")
    if not out.with_name(out.name + ".data").is_file():  # a graph with no large weight: keep the layout uniform
        out.with_name(out.name + ".data").write_bytes(b"")


def sample_feed(component: Component, manifest: Manifest, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs at the smallest shape the model accepts (one image of one spatial multiple), by graph name."""
    m = manifest.spatial_multiple
    shapes = input_profile(component, manifest, ShapeRanges(Range(1, 1, 1), Range(m, m, m), Range(m, m, m)))
    feed = {}
    specs = {component.graph_names.get(s.name, s.name): s for s in component.inputs}
    for name, (shape, _, _) in shapes.items():
        dtype = np.dtype(specs[name].dtype)
        if dtype.kind == "f":
            feed[name] = rng.standard_normal(shape).astype(dtype)
        else:  # token ids: any id every tokenizer of the model has (SD 3's T5 vocabulary is its own)
            dims = manifest.model_dims
            high = min(400, *(v for v in (dims.vocab_size, dims.t5_vocab_size) if v))
            feed[name] = rng.integers(0, high, size=shape).astype(dtype)
    if "timestep" in feed:
        feed["timestep"] = np.full(feed["timestep"].shape, 500, feed["timestep"].dtype)
    return feed


def verify_engine(root: Path, manifest: Manifest, component: Component, engine: Path, threads: int = 0) -> dict:
    """Max abs error of the engine against the portable graph (run one after the other: both are large)."""
    import onnxruntime as ort

    feed = sample_feed(component, manifest, np.random.default_rng(0))
    outputs = {}
    # The reference is what the runtime runs without an engine: the portable graph at onnxruntime's
    # highest level (for int8 graphs that means integer kernels, not QDQ simulated in float).
    for path, level in (
        (root / component.path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        (engine, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        outputs[path] = session.run(None, feed)
        del session
        release_memory()
    reference, got = outputs[root / component.path], outputs[engine]
    error = max(float(np.abs(a - b).max()) for a, b in zip(reference, got))
    scale = max(float(np.abs(a).max()) for a in reference)
    bound = tolerance(component, scale)
    if not np.isfinite(error) or error > bound:
        raise ExportError(
            f"{component.name}: the onnxruntime CPU engine differs from the portable graph: expected max abs error "
            f"<= {bound:.2e}, got {error:.2e} (`sdrt engines --no-fusions` builds one without onnxscript's fusions)"
        )
    return {
        "max_abs_error": error,
        "bound": bound,
        "scale": scale,
        "shapes": {k: list(v.shape) for k, v in feed.items()},
    }


def tolerance(component: Component, scale: float) -> float:
    """How far the engine may be from the portable graph.

    Float graphs: fusions only reorder float arithmetic, so 1e-3 of the output's scale. int8 graphs:
    a fused op changes its float inputs by an ulp, which moves some values across a quantization step,
    so the engine and the portable graph are two int8 approximations of the same fp32 graph (SD 1.5's
    UNet: 26.8 dB apart, each 26.6 dB from fp32 on the same random input). They may then differ by up to
    the sum of their errors: twice the error ``sdrt quantize`` measured against fp32.
    """
    measured = component.verification.get("max_abs_error") if component.precision == "int8" else None
    if measured:
        return 2.0 * float(measured)
    return TOLERANCE * max(scale, 1.0)

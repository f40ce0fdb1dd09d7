"""OpenVINO engines: each graph saved as OpenVINO IR with fp16 weights, for the bf16 and fp16 sessions.

From the ONNX, OpenVINO's CPU plugin reads fp32 weights and keeps them beside the repacked bf16 ones
it computes with: SD 1.5's UNet peaked at 6.4 GiB in a process that ran it at 512x512, above PyTorch
bf16's 5.2 GiB. The IR holds the weights in fp16 (half the bytes; OpenVINO memory-maps them), so the
same session peaks at ~3.7 GiB and loads from its compiled-model cache in well under a second. fp16
weights computed in bf16 lose nothing bf16 keeps (bf16 has 8 mantissa bits, fp16 11); values beyond
fp16's range stay fp32 (OpenVINO's compression leaves them). fp32 sessions keep reading the ONNX, so
fp32 stays exact.

The UNet also gets a static-shape IR at the profile's optimum (``sdrt engines --batch/--height/--width``,
the guided batch): OpenVINO plans a static graph's memory and kernels once, ~10% faster per step than
the dynamic graph on an AMX Xeon. A call of another shape runs the dynamic IR, compiled on first use.

Each engine is checked against the ONNX in fp32 (the only difference is the weights' fp16 rounding),
and rebuilt only when missing or stale (another ONNX, OpenVINO version or optimum shape).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime.engine_cache import onnx_fingerprint
from sdrt.runtime.errors import ExportError
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.openvino_backend import (
    IR_RECORDS,
    STATIC_COMPONENTS,
    IrRecord,
    ir_folder,
    ir_stale_reason,
    openvino_version,
    read_ir_records,
)
from sdrt.runtime.profiles import ShapeRanges, input_profile

log = logging.getLogger(__name__)

# The IR in fp32 against the ONNX in fp32: only the weights' rounding to fp16 differs, relative to the output's scale.
TOLERANCE = 2e-2


@dataclass
class IrReport:
    folder: Path
    built: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)  # component -> relative error against the ONNX


def build_openvino_engines(
    root: Path, ranges: ShapeRanges, components: tuple[str, ...] | None = None, force: bool = False
) -> IrReport:
    """The missing or stale IR engines of ``root`` (dynamic for every component; static at the optimum of
    ``ranges`` for the UNet)."""
    import openvino as ov

    root = Path(root)
    manifest = Manifest.load(root)
    folder = ir_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    records = read_ir_records(folder)
    report = IrReport(folder)
    wanted = [c for c in (components or manifest.components) if c in manifest.components]
    for name in wanted:
        component = manifest.components[name]
        static = _static_shapes(component, manifest, ranges) if name in STATIC_COMPONENTS else None
        fingerprint = onnx_fingerprint(root, component)
        reason = "--force" if force else ir_stale_reason(records.get(name), folder, fingerprint, static)
        if reason is None:
            report.kept.append(name)
            continue
        log.info("%s: building the OpenVINO IR engine (%s)", name, reason)
        t0 = time.perf_counter()
        core = ov.Core()
        stem = f"{name}-{fingerprint[:16]}"
        for old in folder.glob(f"{name}-*"):
            old.unlink()
        files = {"file": _save(core, root / component.path, folder / f"{stem}.xml", None)}
        if static:
            files["static_file"] = _save(
                core, root / component.path, folder / f"{stem}-static.xml", (component, static)
            )
        error = _verify(core, root, component, folder / files["file"], manifest, ranges)
        records[name] = IrRecord(
            component=name, onnx_fingerprint=fingerprint, openvino_version=openvino_version(), static_shapes=static or {},
            verification={"relative_error": error}, seconds=time.perf_counter() - t0, **files,
        )  # fmt: skip
        (folder / IR_RECORDS).write_text(json.dumps({k: asdict(v) for k, v in sorted(records.items())}, indent=2))
        report.built.append(name)
        report.errors[name] = error
    return report


def _static_shapes(component: Component, manifest: Manifest, ranges: ShapeRanges) -> dict[str, list[int]]:
    """The profile's optimum shape of every input (scalar inputs stay as they are)."""
    profile = input_profile(component, manifest, ranges)
    return {name: list(opt) for name, (_, opt, _) in profile.items() if name not in component.scalar_inputs}


def _save(core, onnx_path: Path, xml: Path, static: tuple[Component, dict] | None) -> str:
    """Write the IR (weights compressed to fp16) through a temporary name; returns the file's name."""
    import openvino as ov

    model = core.read_model(str(onnx_path))
    if static is not None:
        component, shapes = static
        model.reshape({component.graph_names.get(n, n): shape for n, shape in shapes.items()})
    tmp = xml.with_name(xml.stem + ".partial.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=True)
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    except (RuntimeError, OSError) as e:
        for f in (tmp, tmp.with_suffix(".bin")):
            f.unlink(missing_ok=True)
        raise ExportError(f"{onnx_path}: saving OpenVINO IR to {xml} failed: {e}") from e
    return xml.name


def _verify(core, root: Path, component: Component, xml: Path, manifest: Manifest, ranges: ShapeRanges) -> float:
    """The IR against the ONNX, both in fp32 at the profile's smallest shape: largest error relative to the
    output's scale; ExportError beyond TOLERANCE (the IR would not compute the same function)."""
    from sdrt.runtime.session import to_graph_feed

    rng = np.random.default_rng(0)
    profile = input_profile(component, manifest, ranges)
    feed = {}
    for spec in component.inputs:
        shape = profile[spec.name][0] if spec.name in profile else ()
        if np.issubdtype(np.dtype(spec.dtype), np.integer):
            feed[spec.name] = rng.integers(0, 500, shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    names = {s.name: component.graph_names.get(s.name, s.name) for s in component.inputs}
    graph_feed = to_graph_feed(component.name, names, set(component.scalar_inputs), feed)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    want = core.compile_model(str(root / component.path), "CPU", config).create_infer_request().infer(graph_feed)
    got = core.compile_model(str(xml), "CPU", config).create_infer_request().infer(graph_feed)
    error = 0.0
    for i in range(len(want)):
        a, b = np.asarray(want[i], np.float64), np.asarray(got[i], np.float64)
        error = max(error, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)))
    if not error <= TOLERANCE:
        for f in xml.parent.glob(f"{xml.stem.removesuffix('-static')}*"):
            f.unlink()
        raise ExportError(
            f"{component.name}: expected the OpenVINO IR (fp16 weights) within {TOLERANCE:g} of the ONNX relative to "
            f"the output's scale, got {error:.3g}; no IR was kept (sessions read the ONNX)"
        )
    return error

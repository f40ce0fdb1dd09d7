"""One component to ONNX (torch.export-based exporter) and its check against PyTorch in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from sdrt.export.specs import ComponentSpec
from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# Past this many bytes of weights a graph cannot be one protobuf (2 GiB limit): weights go to a .data file.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000
# Max abs error allowed against PyTorch, relative to the reference output's largest magnitude (>= 1).
TOLERANCE = {"float32": 1e-3}


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def export_onnx(spec: ComponentSpec, module: torch.nn.Module, sample: dict[str, np.ndarray], path: Path, opset: int):
    """Export ``module`` to ``path`` with the spec's names and dynamic axes; return the files written."""
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    external = weight_bytes(module) > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter prints its own progress and deprecation chatter; keep it for the debug log only.
    chatter = io.StringIO()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            opset_version=opset,
            dynamo=True,
            dynamic_axes=spec.dynamic_axes,
            optimize=True,
            verbose=False,
        )
    log.debug("%s exporter output:\n%s", spec.name, chatter.getvalue())
    if external:
        program.save(str(path), external_data=True)
        model = onnx.load(str(path), load_external_data=False)  # keeps the references to the .data file
    else:
        model = program.model_proto
    name_symbolic_dims(model, spec)
    onnx.save(model, str(path))
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def name_symbolic_dims(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Give graph inputs and outputs the spec's dimension names (the exporter writes expressions
    such as ``2*(((H - 1)//2)) + 2`` for outputs), so every tool sees the declared contract."""
    declared = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        if value.name not in declared:
            raise ExportError(
                f"{spec.name}: exported graph has tensor {value.name!r}, expected one of {list(declared)}"
            )
        dims = value.type.tensor_type.shape.dim
        want = declared[value.name].shape
        if len(dims) != len(want):
            raise ExportError(f"{spec.name} {value.name!r}: expected rank {len(want)}, exported rank {len(dims)}")
        for dim, d in zip(dims, want):
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d


def verify_onnx(
    spec: ComponentSpec,
    module: torch.nn.Module,
    path: Path,
    feeds: list[dict[str, np.ndarray]],
    precision: str = "float32",
) -> dict:
    """Run the ONNX graph in onnxruntime (CPU) and the module in PyTorch on each feed; compare outputs.

    Returns the figures recorded in the manifest; raises ExportError when an output is over tolerance.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tolerance = TOLERANCE[precision]
    checks = []
    for feed in feeds:
        with torch.no_grad():
            ref = module(*(torch.from_numpy(feed[t.name]) for t in spec.inputs))
        ref = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run([t.name for t in spec.outputs], feed)
        shape = {k: list(v.shape) for k, v in feed.items()}
        for t, got, want in zip(spec.outputs, outs, ref):
            want = want.numpy()
            if got.shape != want.shape:
                raise ExportError(
                    f"{spec.name} {t.name}: expected shape {want.shape} from PyTorch, ONNX gave {got.shape}"
                )
            err = np.abs(got.astype(np.float64) - want.astype(np.float64))
            scale = max(1.0, float(np.abs(want).max()))
            checks.append(
                {
                    "output": t.name,
                    "input_shapes": shape,
                    "max_abs_error": float(err.max()),
                    "mean_abs_error": float(err.mean()),
                    "reference_max_abs": float(np.abs(want).max()),
                    "relative_error": float(err.max()) / scale,
                }
            )
    worst = max(c["relative_error"] for c in checks)
    result = {
        "backend": f"onnxruntime {ort.__version__} CPU",
        "tolerance": tolerance,
        "max_abs_error": max(c["max_abs_error"] for c in checks),
        "passed": worst <= tolerance,
        "checks": checks,
    }
    if not result["passed"]:
        bad = max(checks, key=lambda c: c["relative_error"])
        raise ExportError(
            f"{spec.name}: ONNX output {bad['output']!r} differs from PyTorch by {bad['max_abs_error']:.3g} "
            f"(relative {bad['relative_error']:.3g}) at input shapes {bad['input_shapes']}; expected at most "
            f"{tolerance} relative to the output scale (the exporter or an operator changed the numerics)"
        )
    return result

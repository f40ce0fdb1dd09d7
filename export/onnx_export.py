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

from sdrt.export import graph
from sdrt.runtime.errors import ExportError
from sdrt.runtime.families import ComponentSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
# Allowed difference from the float32 PyTorch module, per precision of the graph: the max abs error
# relative to the reference output's largest magnitude (at least 1), and the least PSNR (dB, peak =
# that magnitude). fp16 keeps ~3 significant digits per operation; through a UNet's ~1,000 ops
# the relative error stays below 1e-2 on well-scaled models.
TOLERANCE = {
    "fp32": {"relative_max_error": 1e-3, "min_psnr_db": 60.0},
    "fp16": {"relative_max_error": 5e-2, "min_psnr_db": 30.0},
}


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def export_onnx(spec: ComponentSpec, module: torch.nn.Module, sample: dict[str, np.ndarray], path: Path, opset: int):
    """Export ``module`` to ``path`` with the spec's names and dynamic axes; return the files written."""
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    external = weight_bytes(module) > graph.EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter prints its own progress and deprecation chatter; keep it for the debug log only.
    # (It also warns, once per process, that torchvision's detection operators are not registered.)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
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
    return graph.graph_files(path)


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


def reference_outputs(
    spec: ComponentSpec, module: torch.nn.Module, feeds: list[dict[str, np.ndarray]]
) -> list[tuple[np.ndarray, ...]]:
    """The module's float32 outputs on each feed, in the spec's output order: computed right after the export, so
    the module can leave memory before the graph is optimized and checked (a 10 GB transformer and its 10 GB
    graph need not be in memory at once)."""
    outputs = []
    with torch.no_grad():
        for feed in feeds:
            ref = module(*(torch.from_numpy(feed[t.name]) for t in spec.inputs))
            outputs.append(tuple(r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))))
    return outputs


def verify_onnx(
    spec: ComponentSpec,
    references: list[tuple[np.ndarray, ...]],
    path: Path,
    feeds: list[dict[str, np.ndarray]],
    precision: str = "fp32",
) -> dict:
    """Run the ONNX graph in onnxruntime (CPU) on each feed; compare its outputs with PyTorch's (``references``,
    from :func:`reference_outputs` on the same feeds).

    Returns the figures recorded in the manifest; raises ExportError when an output is over tolerance.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Pre-packed copies of the weights would add GBs for a full-size UNet, only to be run twice.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    tolerance = TOLERANCE[precision.split("+")[0]]
    checks = []
    for feed, ref in zip(feeds, references, strict=True):
        outs = session.run([t.name for t in spec.outputs], feed)
        shape = {k: list(v.shape) for k, v in feed.items()}
        for t, got, want in zip(spec.outputs, outs, ref):
            if got.shape != want.shape:
                raise ExportError(
                    f"{spec.name} {t.name}: expected shape {want.shape} from PyTorch, ONNX gave {got.shape}"
                )
            if not np.isfinite(got).all():
                raise ExportError(
                    f"{spec.name} {t.name}: the {precision} graph produced non-finite values at input shapes "
                    f"{shape} (overflow; keep this component in fp32 with --component-precision {spec.name}=fp32)"
                )
            err = np.abs(got.astype(np.float64) - want.astype(np.float64))
            scale = max(1.0, float(np.abs(want).max()))
            mse = float(np.mean(err**2))
            checks.append(
                {
                    "output": t.name,
                    "input_shapes": shape,
                    "max_abs_error": float(err.max()),
                    "mean_abs_error": float(err.mean()),
                    "reference_max_abs": float(np.abs(want).max()),
                    "relative_error": float(err.max()) / scale,
                    "psnr_db": psnr(mse, scale),
                }
            )
    result = {
        "reference": f"PyTorch {torch.__version__} float32 CPU",
        "backend": f"onnxruntime {ort.__version__} CPU",
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_error": max(c["max_abs_error"] for c in checks),
        "mean_abs_error": max(c["mean_abs_error"] for c in checks),
        "relative_error": max(c["relative_error"] for c in checks),
        "psnr_db": min(c["psnr_db"] for c in checks),
        "checks": checks,
    }
    result["passed"] = (
        result["relative_error"] <= tolerance["relative_max_error"] and result["psnr_db"] >= tolerance["min_psnr_db"]
    )
    if not result["passed"]:
        bad = max(checks, key=lambda c: (c["relative_error"], -c["psnr_db"]))
        raise ExportError(
            f"{spec.name}: {precision} ONNX output {bad['output']!r} differs from PyTorch by {bad['max_abs_error']:.3g} "
            f"(relative {bad['relative_error']:.3g}, PSNR {bad['psnr_db']:.1f} dB) at input shapes "
            f"{bad['input_shapes']}; expected relative error <= {tolerance['relative_max_error']} and PSNR >= "
            f"{tolerance['min_psnr_db']} dB (the exporter, an optimization or the precision changed the numerics)"
        )
    return result


def psnr(mse: float, peak: float) -> float:
    """Peak signal-to-noise ratio in dB; capped at 200 dB for exact matches (JSON has no infinity)."""
    return 200.0 if mse == 0 else min(200.0, 10 * float(np.log10(peak**2 / mse)))

"""FLOPs of one call of an ONNX graph at given input shapes, counted from the graph.

Shapes are propagated by onnxruntime's symbolic shape inference (weights are not loaded:
initializers keep their dims), then the multiply-accumulate operators are counted, 2 FLOPs per multiply-add:

    Conv / ConvTranspose   2 * N * C_out * prod(out spatial) * (C_in / groups) * prod(kernel)
    MatMul / Gemm          2 * prod(batch dims) * M * K * N

Everything else (normalization, activations, softmax, elementwise) is memory-bound and left out,
as in the usual "UNet FLOPs" figures. The tests hold the count against PyTorch's FlopCounterMode.
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import shape_inference


def _dims(value_info) -> list[int] | None:
    shape = value_info.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def count_flops(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> dict:
    """``{"total": FLOPs, "by_op": {op: FLOPs}, "uncounted": [...]}`` for one call at ``input_shapes``."""
    model = onnx.load(str(path), load_external_data=False)
    for value in model.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    # Weights kept as external data are not loaded; shape inference needs only their shapes, so
    # they become graph inputs of the same type and shape.
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        model.graph.initializer.remove(t)
        model.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:  # onnxruntime's symbolic inference resolves the exporter's computed Reshape targets
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - any failure there: fall back to ONNX's own inference
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int] | None] = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        shapes[v.name] = _dims(v)
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)

    by_op: dict[str, int] = {}
    uncounted = []
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        a = shapes.get(node.input[0])
        b = shapes.get(node.input[1])
        out = shapes.get(node.output[0])
        if a is None or b is None or out is None:
            uncounted.append(node.name)
            continue
        if node.op_type == "Conv":  # weight (C_out, C_in / groups, k...): C_in / groups is its 2nd dim
            flops = 2 * out[0] * out[1] * math.prod(out[2:]) * b[1] * math.prod(b[2:])
        elif node.op_type == "ConvTranspose":  # weight (C_in, C_out / groups, k...): each input scatters
            flops = 2 * a[0] * a[1] * math.prod(a[2:]) * b[1] * math.prod(b[2:])
        elif node.op_type == "MatMul":
            k = a[-1]
            flops = 2 * math.prod(out) * k
        else:  # Gemm: (M, K) x (K, N), maybe transposed
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            k = a[0] if trans_a else a[1]
            flops = 2 * math.prod(out) * k
        by_op[node.op_type] = by_op.get(node.op_type, 0) + int(flops)
    return {"total": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}

"""Steps on an exported ONNX graph: cleanup, onnxruntime fusions, fp16 conversion.

Every step reads the graph at ``path`` and writes it back in place (the caller works inside the
temporary build directory), returning a record for the manifest with node counts, sizes and time.
Graphs whose weights pass 2 GB are always written with their weights as external data
(``<name>.onnx.data``): a protobuf cannot hold more, and a step that forgets this fails only at
save time, after minutes of work and many GB of memory.
"""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

import onnx

from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

# Past this many bytes of weights a graph cannot be one protobuf (2 GiB limit): weights go to a .data file.
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

OPTIMIZATIONS = ("slim", "ort-fusion")
DEFAULT_OPTIMIZATIONS = ("slim",)


def data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def graph_files(path: Path) -> list[Path]:
    """The graph and, when it has one, its external data file."""
    return [path] + ([data_path(path)] if data_path(path).exists() else [])


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def stats(path: Path) -> dict:
    """Node count by op type and bytes on disk of the graph at ``path`` (weights not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    return {
        "nodes": sum(ops.values()),
        "bytes": sum(p.stat().st_size for p in graph_files(path)),
        "ops": dict(sorted(ops.items())),
    }


def save(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` (weights loaded in memory) to ``path``; external data when over the threshold.

    The old graph and data file are removed first: onnx appends to an existing data file.
    """
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    for old in graph_files(path):
        old.unlink()
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path(path).name,
            size_threshold=1024,
        )
    else:
        onnx.save(model, str(path))
    return graph_files(path)


def release_memory() -> None:
    """Hand freed memory back to the OS. A step on a 3.4 GB graph frees GBs of protobuf and NumPy
    buffers that glibc would otherwise keep in the process, stacking up the peak across steps."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def record_step(name: str, before: dict, path: Path, started: float, **extra) -> dict:
    """The manifest record of a graph step (nodes and bytes before and after, seconds, ``extra``), logged."""
    release_memory()
    after = stats(path)
    record = {
        "step": name,
        "nodes_before": before["nodes"],
        "nodes_after": after["nodes"],
        "bytes_before": before["bytes"],
        "bytes_after": after["bytes"],
        "seconds": round(time.perf_counter() - started, 3),
        **extra,
    }
    log.info(
        "    %s: %d -> %d nodes, %.1f -> %.1f MB in %.1f s",
        name,
        record["nodes_before"],
        record["nodes_after"],
        before["bytes"] / 1e6,
        after["bytes"] / 1e6,
        record["seconds"],
    )
    return record


def skipped_step(name: str, path: Path, reason: str) -> dict:
    """The manifest record of a graph step not taken, and why."""
    s = stats(path)
    return {"step": name, "skipped": True, "reason": reason, "nodes_before": s["nodes"], "nodes_after": s["nodes"],
            "bytes_before": s["bytes"], "bytes_after": s["bytes"], "seconds": 0.0}  # fmt: skip


def slim(path: Path) -> dict:
    """Constant folding, dead-node and redundant-op elimination, shape cleanup (onnxslim)."""
    import onnxslim

    started, before = time.perf_counter(), stats(path)
    # onnxslim's shape inference serializes the whole model, which fails past 2 GB
    # ("EncodeError: Failed to serialize proto"); the folding and cleanup passes do not need it.
    large = data_path(path).exists()
    model = onnxslim.slim(str(path), no_shape_infer=large)
    if model is None:
        raise ExportError(f"{path.name}: onnxslim failed to optimize the graph (see its log above)")
    save(model, path)
    return record_step(
        "slim", before, path, started, tool=f"onnxslim {onnxslim.__version__}", shape_inference=not large
    )


def ort_fusion(path: Path, model_type: str, num_heads: int = 0, hidden_size: int = 0) -> dict:
    """onnxruntime's transformer fusions (attention, LayerNorm, GELU, ...), CPU-safe subset.

    The fused graph uses onnxruntime contrib operators (com.microsoft domain): it runs in
    onnxruntime only, not in TensorRT or other ONNX consumers. The manifest records that.
    """
    import onnxruntime
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    started, before = time.perf_counter(), stats(path)
    options = FusionOptions(model_type)
    # These fuse into CUDA-only contrib kernels; the CPU provider would have no kernel for them.
    for flag in (
        "enable_group_norm",
        "enable_skip_group_norm",
        "enable_bias_splitgelu",
        "enable_bias_add",
        "enable_nhwc_conv",
        "enable_packed_qkv",
        "enable_packed_kv",
    ):
        if hasattr(options, flag):
            setattr(options, flag, False)
    model = onnx.load(str(path))
    optimized = optimize_model(
        model,
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,
        optimization_options=options,
        use_gpu=False,
    )
    save(optimized.model, path)
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    return record_step(
        "ort-fusion",
        before,
        path,
        started,
        tool=f"onnxruntime {onnxruntime.__version__}",
        fused=fused,
        runs_in="onnxruntime only",
    )


def attention_score_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computing attention probabilities: every Softmax, and the MatMul (with
    any scaling in between) that produces its input, i.e. softmax(q k^T * scale).

    These are the nodes diffusers runs in float32 for SD 2.x (``upcast_attention``), where fp16
    overflows.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        names.append(node.name)
        current = producer.get(node.input[0])
        while current is not None and current.op_type in ("Mul", "Div", "Add", "Cast"):
            names.append(current.name)
            current = producer.get(current.input[0])
        if current is not None and current.op_type == "MatMul":
            names.append(current.name)
    return names


def to_fp16(path: Path, fp32_islands: tuple[str, ...] = ()) -> dict:
    """Convert float32 weights and compute to float16 with onnxruntime's converter; graph inputs and
    outputs stay float32, so every backend and the runtime feed the same arrays. ``fp32_islands``
    keeps parts in float32 (``"attention"``: attention scores and softmax)."""
    import onnxruntime
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    started, before = time.perf_counter(), stats(path)
    node_block_list: list[str] = []
    unknown = [i for i in fp32_islands if i != "attention"]
    if unknown:
        raise ExportError(f"fp32 islands: expected 'attention', got {unknown}")
    if "attention" in fp32_islands:
        node_block_list = attention_score_nodes(onnx.load(str(path), load_external_data=False))
    # From a path the converter runs shape inference file to file, which works past 2 GB.
    model = convert_float_to_float16(
        str(path), keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST), node_block_list=node_block_list
    )
    save(model, path)
    return record_step(
        "fp16",
        before,
        path,
        started,
        tool=f"onnxruntime {onnxruntime.__version__} float16 converter",
        fp32_nodes=len(node_block_list),
        fp32_islands=list(fp32_islands),
    )

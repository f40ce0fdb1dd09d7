"""The machine's achievable matmul rate, measured: the yardstick for "how much of this CPU does the UNet use".

A peak from a spec sheet says little about what a library reaches on a shared or throttled machine,
so ``sdrt bench`` times one large square MatMul, with the benchmark's thread count, once per run:
fp32 in onnxruntime (the engine of the default backend) and, where OpenVINO offers bf16 on this
CPU, bf16 in OpenVINO. Each rate is the median over repeats after warm-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from sdrt.runtime.errors import BackendError

log = logging.getLogger(__name__)

SIZE = 2048  # M = N = K: large enough that the kernels, not the call, dominate
WARMUPS = 2
MIN_REPEATS = 5
BUDGET_S = 2.0  # repeats continue until this much time is spent (at least MIN_REPEATS)


def _time(call: Callable[[], object], budget_s: float) -> list[float]:
    for _ in range(WARMUPS):
        call()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < MIN_REPEATS or time.perf_counter() - started < budget_s:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _result(engine: str, precision: str, size: int, threads: int, samples: list[float]) -> dict:
    """``gflops`` from the fastest repeat: what the machine reaches. On a shared (virtual) machine a
    neighbour's load only ever slows a repeat, and the median of a 2 s window was seen at 128 and at
    191 GFLOP/s on the same machine minutes apart; the median is kept beside it."""
    median, best = float(np.median(samples)), float(np.min(samples))
    flops = 2 * size**3
    return {
        "engine": engine,
        "precision": precision,
        "shape": [size, size, size],
        "threads": threads,
        "repeats": len(samples),
        "median_s": median,
        "best_s": best,
        "gflops": flops / best / 1e9,
        "gflops_median": flops / median / 1e9,
    }


def ort_fp32(size: int, threads: int, budget_s: float = BUDGET_S) -> dict:
    """A @ B with B a constant, as a model's weights are: onnxruntime pre-packs it once, as it does
    the UNet's (with B an input, every call would pay the packing and understate the machine)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
        initializer=[numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.standard_normal((size, size), dtype=np.float32)}
    return _result("onnxruntime", "fp32", size, threads, _time(lambda: session.run(None, feed), budget_s))


def openvino_matmul(size: int, threads: int, precision: str, budget_s: float = BUDGET_S) -> dict:
    """A @ B with B a constant, compiled by OpenVINO's CPU plugin in ``precision`` (fp32 or bf16)."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([size, size], np.float32, name="a")
    b = ops.constant(rng.standard_normal((size, size), dtype=np.float32))
    model = ov.Model([ops.matmul(a, b, False, False)], [a], "matmul")
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    feed = [rng.standard_normal((size, size), dtype=np.float32)]
    return _result("openvino", precision, size, threads, _time(lambda: request.infer(feed), budget_s))


def measure(threads: int, size: int = SIZE, budget_s: float = BUDGET_S) -> dict:
    """{"fp32": {...}, "bf16": {...} or {"unsupported": why}}: GFLOP/s per precision on this machine.

    fp32 is the better of onnxruntime and OpenVINO (where installed): the rate this machine is shown
    to reach, which is what a UNet's share of it should be measured against."""
    from sdrt.runtime import backends

    fp32 = [ort_fp32(size, threads, budget_s)]
    if backends.get("openvino").unavailable_reason() is None:
        fp32.append(openvino_matmul(size, threads, "fp32", budget_s))
    out = {"fp32": max(fp32, key=lambda r: r["gflops"])}
    out["fp32"]["candidates"] = {r["engine"]: r["gflops"] for r in fp32}
    try:
        backends.check_usable(backends.get("openvino"), "bf16")
    except BackendError as e:
        out["bf16"] = {"engine": "openvino", "precision": "bf16", "unsupported": str(e)}
    else:
        out["bf16"] = openvino_matmul(size, threads, "bf16", budget_s)
    for name, r in out.items():
        if "gflops" in r:
            log.info(
                "matmul %s %s: %.1f GFLOP/s (%d threads)", name, "x".join(map(str, r["shape"])), r["gflops"], threads
            )
    return out

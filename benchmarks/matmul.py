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
    median = float(np.median(samples))
    return {
        "engine": engine,
        "precision": precision,
        "shape": [size, size, size],
        "threads": threads,
        "repeats": len(samples),
        "median_s": median,
        "gflops": 2 * size**3 / median / 1e9,
    }


def ort_fp32(size: int, threads: int, budget_s: float = BUDGET_S) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((size, size), dtype=np.float32) for n in ("a", "b")}
    return _result("onnxruntime", "fp32", size, threads, _time(lambda: session.run(None, feed), budget_s))


def openvino_bf16(size: int, threads: int, budget_s: float = BUDGET_S) -> dict:
    import openvino as ov
    import openvino.opset13 as ops

    a = ops.parameter([size, size], np.float32, name="a")
    b = ops.parameter([size, size], np.float32, name="b")
    model = ov.Model([ops.matmul(a, b, False, False)], [a, b], "matmul")
    config = {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": threads}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    rng = np.random.default_rng(0)
    feed = [rng.standard_normal((size, size), dtype=np.float32) for _ in range(2)]
    return _result("openvino", "bf16", size, threads, _time(lambda: request.infer(feed), budget_s))


def measure(threads: int, size: int = SIZE, budget_s: float = BUDGET_S) -> dict:
    """{"fp32": {...}, "bf16": {...} or {"unsupported": why}}: GFLOP/s per precision on this machine."""
    from sdrt.runtime import backends

    out = {"fp32": ort_fp32(size, threads, budget_s)}
    try:
        backends.check_usable(backends.get("openvino"), "bf16")
    except BackendError as e:
        out["bf16"] = {"engine": "openvino", "precision": "bf16", "unsupported": str(e)}
    else:
        out["bf16"] = openvino_bf16(size, threads, budget_s)
    for name, r in out.items():
        if "gflops" in r:
            log.info(
                "matmul %s %s: %.1f GFLOP/s (%d threads)", name, "x".join(map(str, r["shape"])), r["gflops"], threads
            )
    return out

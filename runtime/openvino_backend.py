"""The OpenVINO backend: the same ONNX graphs, compiled by OpenVINO's CPU plugin.

Written against OpenVINO's Python API (``Core.read_model`` / ``compile_model`` / ``InferRequest``),
imported only inside these functions, so importing ``sdrt.runtime`` costs only NumPy.

Precision is always set explicitly: on a CPU with bfloat16 support OpenVINO's CPU plugin runs
float32 graphs in bf16 unless told otherwise, which would change images without anyone asking.
``fp32`` is the default and runs everywhere; ``bf16`` (and ``fp16``) only where OpenVINO reports the
capability, and a request for one the CPU lacks is refused rather than quietly run in another.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime.cpu_features import cpu_summary
from sdrt.runtime.errors import ArtifactError, BackendError, InputError
from sdrt.runtime.manifest import Component
from sdrt.runtime.session import check_feed, check_graph_inputs, to_graph_feed

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sdrt[openvino]', i.e. openvino>=2026.4.1"
DEVICE = "CPU"
# sdrt's precision names -> OpenVINO's element type names (INFERENCE_PRECISION_HINT values).
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# OpenVINO's OPTIMIZATION_CAPABILITIES entries -> sdrt's precision names; the others (INT8, BIN,
# WINOGRAD, EXPORT_IMPORT) are not inference precisions of a float graph.
CAPABILITIES = {"FP32": "fp32", "BF16": "bf16", "FP16": "fp16"}


def _openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"openvino is not installed ({e}; {INSTALL_HINT})") from None
    return openvino


def unavailable_reason() -> str | None:
    """Why the OpenVINO backend cannot run here (not installed, no CPU device), or None."""
    try:
        ov = _openvino()
    except BackendError as e:
        return str(e)
    try:
        devices = ov.Core().available_devices
    except RuntimeError as e:
        return f"openvino {ov.__version__} failed to start: {e}"
    if DEVICE not in devices:
        return f"openvino {ov.__version__} finds no CPU device (devices: {devices})"
    return None


def cpu_capabilities() -> list[str]:
    """OpenVINO's own list for the CPU (``OPTIMIZATION_CAPABILITIES``), e.g. ['FP32', 'INT8', 'BF16']."""
    return list(_openvino().Core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def cpu_precisions() -> list[str]:
    """The inference precisions OpenVINO's CPU plugin offers on this machine, fp32 first."""
    offered = {CAPABILITIES[c] for c in cpu_capabilities() if c in CAPABILITIES}
    return [p for p in PRECISIONS if p in offered]


def check_precision(precision: str) -> None:
    """InputError for a name sdrt does not know; BackendError for one this CPU does not offer."""
    if precision not in PRECISIONS:
        raise InputError(f"openvino precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    offered = cpu_precisions()
    if precision not in offered:
        summary = cpu_summary()
        flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in summary["flags"].items())
        raise BackendError(
            f"openvino precision {precision!r}: expected one this CPU offers, OpenVINO reports {offered} "
            f"(OPTIMIZATION_CAPABILITIES) on {summary['model']} ({flags}); use precision='fp32', which every CPU runs"
        )


def compile_config(precision: str, threads: int = 0, cache_dir: Path | None = None) -> dict[str, str]:
    """The CPU plugin's properties for one session."""
    config = {
        # Never left to the default: that is bf16 on CPUs that have it.
        "INFERENCE_PRECISION_HINT": PRECISIONS[precision],
        # One image batch at a time, as fast as possible: no throughput streams.
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def cache_folder(root: Path, component: Component, precision: str = "fp32") -> Path:
    """``engines/openvino_<version>/<component>-<fingerprint>-<precision>/``: keyed by the ONNX content (the
    manifest's hashes), so a compiled blob is never taken for a re-exported graph, and by the inference
    precision, because OpenVINO's own key does not cover it.

    OpenVINO 2026.4's CPU plugin names one blob for a model path whatever INFERENCE_PRECISION_HINT was
    (its CACHING_PROPERTIES hold only FULL_DEVICE_NAME): compiled in bf16 after an fp32 compile into the
    same folder, it imports the fp32 blob and applies bf16 to that already-transformed graph, which on an
    AMX Xeon returned NaN for every output (the issue of `make bench`, whose fp32 worker loads first). One
    folder per precision keeps each blob to the precision it was compiled in."""
    from sdrt.runtime.engine_cache import ENGINES_DIR, onnx_fingerprint

    version = _openvino().__version__.split("-")[0]
    name = f"{component.name}-{onnx_fingerprint(root, component)[:16]}-{precision}"
    return Path(root) / ENGINES_DIR / f"openvino_{version}" / name


# -- IR engines (built by `sdrt engines`, sdrt.export.openvino_engines) -----------------------------------
IR_RECORDS = "engines.json"
STATIC_COMPONENTS = ("unet",)  # those that get a static-shape IR at the profile's optimum
IR_PRECISIONS = ("bf16", "fp16")  # sessions that read the IR (fp16 weights); fp32 reads the ONNX, exactly


@dataclass
class IrRecord:
    component: str
    file: str  # the dynamic IR, in the folder
    onnx_fingerprint: str
    openvino_version: str
    static_file: str = ""  # the static-shape IR, when built
    static_shapes: dict = field(default_factory=dict)  # sdrt input name -> shape of the static IR
    verification: dict = field(default_factory=dict)
    seconds: float = 0.0


def openvino_version() -> str:
    return _openvino().__version__.split("-")[0]


def ir_folder(root: Path) -> Path:
    from sdrt.runtime.engine_cache import ENGINES_DIR

    return Path(root) / ENGINES_DIR / f"openvino_{openvino_version()}" / "ir"


def read_ir_records(folder: Path) -> dict[str, IrRecord]:
    try:
        return {k: IrRecord(**v) for k, v in json.loads((Path(folder) / IR_RECORDS).read_text()).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s is unreadable (%s): its IR engines are ignored", Path(folder) / IR_RECORDS, e)
        return {}


def ir_stale_reason(record: IrRecord | None, folder: Path, fingerprint: str, static: dict | None = None) -> str | None:
    """Why this IR cannot serve the component (None: it can); ``static``: the static shapes wanted, if any."""
    if record is None:
        return "no IR yet"
    if record.onnx_fingerprint != fingerprint:
        return "the ONNX was re-exported since the IR was built"
    if record.openvino_version != openvino_version():
        return f"built by OpenVINO {record.openvino_version}, this is {openvino_version()}"
    for name in filter(None, (record.file, record.static_file)):
        if not (Path(folder) / name).is_file() or not (Path(folder) / name).with_suffix(".bin").is_file():
            return f"{Path(folder) / name} or its weights are missing"
    if static is not None and static != record.static_shapes:
        return f"static shapes {record.static_shapes or 'none'} built, {static} asked for"
    return None


def find_ir(root: Path, component: Component) -> tuple[IrRecord | None, str]:
    """The IR engine for ``component`` (this OpenVINO, this ONNX), or None and why not."""
    from sdrt.runtime.engine_cache import onnx_fingerprint
    from sdrt.runtime.manifest import check_inside

    folder = ir_folder(root)
    record = read_ir_records(folder).get(component.name)
    reason = ir_stale_reason(record, folder, onnx_fingerprint(root, component))
    if record is None or reason:
        return None, f"{component.name}: {reason} (`sdrt engines` builds OpenVINO IR engines)"
    for name in filter(None, (record.file, record.static_file)):
        check_inside(folder, name, f"{folder}/{IR_RECORDS} {component.name}")
    return record, ""


def _usable_cache_dir(cache_dir: Path | None) -> Path | None:
    """``cache_dir``, created if needed; None (no cache, with a warning) when it cannot be written,
    e.g. artifacts on a read-only volume: the cache only saves load time, so it is not worth failing for."""
    if cache_dir is None:
        return None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        if not os.access(cache_dir, os.W_OK):
            raise PermissionError("no write permission")
    except OSError as e:
        log.warning("openvino: compiled-model cache %s is not writable (%s); compiling without it", cache_dir, e)
        return None
    return Path(cache_dir)


def _loaded_from_cache(compiled) -> bool:
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except RuntimeError:  # a plugin that does not report it
        return False


def _with_weights(ov, model, path: Path, weights: Mapping[str, np.ndarray]):
    """``model`` with the Constants named after the initializers in ``weights`` holding those values."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    missing = [name for name in weights if name not in constants]
    if missing:
        raise ArtifactError(
            f"{path}: expected OpenVINO's model to hold the initializers {missing[:3]} as constants, it does not "
            "(this graph cannot take LoRA weights on OpenVINO; fuse the adapter with `sdrt export --lora`)"
        )
    for name, value in weights.items():
        old = constants[name]
        if tuple(old.get_output_shape(0)) != tuple(value.shape):
            raise ArtifactError(
                f"{path}: constant {name!r}: expected shape {tuple(old.get_output_shape(0))}, got {value.shape}"
            )
        new = ov.opset13.constant(np.ascontiguousarray(value), name=name)
        old.output(0).replace(new.output(0))
    model.validate_nodes_and_infer_types()
    return model


class OpenVINOSession:
    """One graph compiled for the CPU with one InferRequest, created once and reused by every ``run``.

    Concurrent ``run`` calls are serialized by a lock: they would share that request and its output
    buffers. (Each call already uses every core the session was given.)
    ``cache_dir`` keeps OpenVINO's compiled model there, keyed by the graph's content and the
    properties above, so the next session for the same graph and precision loads without compiling.
    After loading: ``precision`` (what the compiled model runs in, checked), ``load_seconds`` (read
    and compile, or read and load from the cache) and ``loaded_from_cache``.
    """

    def __init__(
        self,
        root: Path,
        component: Component,
        threads: int = 0,
        precision: str = "fp32",
        cache_dir: Path | None = None,
        weights: Mapping[str, np.ndarray] | None = None,
        ir: IrRecord | None = None,
    ):
        """``ir``: the component's IR engine (``sdrt engines``) to read instead of the ONNX: its static-shape IR
        compiled now when it has one (calls of other shapes compile the dynamic IR on first use), else the
        dynamic IR."""
        ov = _openvino()
        self.name = component.name
        self.inputs, self.outputs = component.inputs, component.outputs
        check_precision(precision)
        self._names = {s.name: component.graph_names.get(s.name, s.name) for s in (*self.inputs, *self.outputs)}
        self._scalars = set(component.scalar_inputs)
        start = time.perf_counter()
        self._core = ov.Core()
        self._onnx = Path(root) / component.path
        folder = ir_folder(root) if ir else None
        self.source = (folder / ir.file) if ir and folder else self._onnx  # the graph compiled for other shapes
        self._config = compile_config(precision, threads, _usable_cache_dir(cache_dir))
        self._precision_asked = precision
        self._static_shapes: dict[str, tuple[int, ...]] = {}
        self._static = self._dynamic = None
        self._static_request = self._request = None
        self.calls = {"static": 0, "dynamic": 0}  # which compiled graph ran each call
        if ir and folder and ir.static_file:
            self._static = self._compile(folder / ir.static_file)
            self._static_request = self._static.create_infer_request()
            self._static_shapes = {self._names[n]: tuple(v) for n, v in ir.static_shapes.items()}
            compiled = self._static
        elif weights:
            # LoRA-merged weights: the initializers' Constants replaced in the read model, then compiled
            # (constant folding and weight repacking see the new values, as if the file held them).
            compiled = self._dynamic = self._compile(self._onnx, weights)
        else:
            compiled = self._dynamic = self._compile(self.source)
        if self._dynamic is not None:
            self._request = self._dynamic.create_infer_request()
        self.precision = precision
        self._lock = threading.Lock()
        self._output_names = [self._names[o.name] for o in self.outputs]
        self.loaded_from_cache = self._config.get("CACHE_DIR") is not None and _loaded_from_cache(compiled)
        self.load_seconds = time.perf_counter() - start
        log.info(
            "openvino %s: %s on CPU, %s, loaded in %.2f s%s",
            self.name,
            self.precision,
            f"static IR {dict(ir.static_shapes)} (other shapes: dynamic IR)" if self._static else self.source.name,
            self.load_seconds,
            " (compiled model from the cache)" if self.loaded_from_cache else "",
        )

    def _compile(self, path: Path, weights: Mapping[str, np.ndarray] | None = None):
        """``path`` compiled with the session's properties, its inputs and precision checked."""
        ov = _openvino()
        try:
            if weights:
                compiled = self._core.compile_model(
                    _with_weights(ov, self._core.read_model(str(path)), path, weights), DEVICE, self._config
                )
            elif self._config.get("CACHE_DIR") is not None:
                # Compiled from the path, a cache hit imports the compiled blob without reading the graph
                # (seconds for SD 1.5's UNet). OpenVINO keys a path by its name, size and mtime, not by
                # its external data file, so the caller must give a folder keyed by the graph's content
                # (the registry's is named after the ONNX fingerprint the manifest's hashes make).
                compiled = self._core.compile_model(str(path), DEVICE, self._config)
            else:
                compiled = self._core.compile_model(self._core.read_model(str(path)), DEVICE, self._config)
        except RuntimeError as e:
            raise ArtifactError(
                f"{path}: expected a graph OpenVINO can read and compile for the CPU with {self._config}, got: {e} "
                "(re-run the export, or `sdrt engines --force`, if the graph is damaged)"
            ) from e
        check_graph_inputs(
            path, [self._names[s.name] for s in self.inputs], [i.get_any_name() for i in compiled.inputs]
        )
        self._check_compiled_precision(compiled, self._precision_asked)
        return compiled

    @staticmethod
    def _check_compiled_precision(compiled, precision: str) -> str:
        """What the compiled model will really run in; a BackendError when OpenVINO chose otherwise."""
        actual = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if actual != PRECISIONS[precision]:
            raise BackendError(
                f"openvino precision: expected the compiled model to run in {PRECISIONS[precision]} "
                f"({precision}), OpenVINO chose {actual} (use precision='fp32')"
            )
        return precision

    def runtime_precisions(self) -> dict[str, int]:
        """How many computing nodes of the compiled model run in each precision, e.g. {"bf16": 598, "f32": 60}:
        what OpenVINO really compiled (the hint sets the precision of the heavy ops; others may stay f32)."""
        return runtime_precisions(self._static if self._static is not None else self._dynamic)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Checked here because OpenVINO would cast a wrong dtype silently.
        check_feed(self.name, self.inputs, feed)
        graph_feed = to_graph_feed(self.name, self._names, self._scalars, feed)
        static = bool(self._static_shapes) and all(
            tuple(np.shape(v)) == self._static_shapes.get(k, tuple(np.shape(v))) for k, v in graph_feed.items()
        )
        try:
            # share_outputs=False copies each output into an array of its own: the request reuses its
            # output tensors on the next call, so views would change under the caller.
            with self._lock:
                if static:
                    request = self._static_request
                else:
                    if self._request is None:  # a shape the static IR does not take: the dynamic one, once
                        log.info("openvino %s: shapes %s differ from the static IR's; compiling %s", self.name,
                                 {k: np.shape(v) for k, v in graph_feed.items()}, self.source.name)  # fmt: skip
                        self._dynamic = self._compile(self.source)
                        self._request = self._dynamic.create_infer_request()
                    request = self._request
                results = request.infer(graph_feed, share_inputs=False, share_outputs=False)
                self.calls["static" if static else "dynamic"] += 1
        except RuntimeError as e:
            raise BackendError(f"openvino {self.name}: inference failed: {e}") from e
        return {o.name: results[name] for o, name in zip(self.outputs, self._output_names)}

    def close(self) -> None:
        self._request = self._static_request = None
        self._dynamic = self._static = None


# Nodes of the execution graph that hold or move data rather than compute it.
_NOT_COMPUTE = {"Const", "Input", "Output", "Reorder", "Reshape", "ShapeOf", "Transpose", "Concatenation", "Split",
                "Gather", "StridedSlice"}  # fmt: skip


def runtime_precisions(compiled) -> dict[str, int]:
    """Computing nodes of a compiled model per runtime precision (its execution graph's ``runtimePrecision``)."""
    counts: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if "layerType" not in info or info["layerType"].astype(str) in _NOT_COMPUTE:
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "unknown"
        counts[precision] = counts.get(precision, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# Intermediate outputs larger than this are not added when locating a non-finite value (attention scores at
# 512 px are ~1 GB each); the nodes after them narrow it down.
LOCATE_MAX_BYTES = 64 * 2**20
LOCATE_OUTPUTS = 160  # intermediate outputs per compile


def first_nonfinite(path: Path, graph_feed: dict[str, np.ndarray], precision: str, threads: int = 0) -> str:
    """Which node first outputs NaN or infinity when the graph at ``path`` runs ``graph_feed`` (its inputs by
    the graph's own names) in ``precision``: one sentence.

    Compiles the graph with intermediate outputs (every k-th float node in execution order, then every node
    between the last finite one and the first non-finite one). Extra outputs can keep OpenVINO from fusing
    the nodes around them; when the fault lies inside such a fusion, every output may come out finite, and
    the sentence says so."""
    ov = _openvino()
    core = ov.Core()
    ops = [
        op
        for op in core.read_model(str(path)).get_ordered_ops()
        if op.get_type_name() not in ("Constant", "Parameter", "Result")
        and op.get_output_size() == 1
        and op.get_output_element_type(0).is_real()
    ]

    def nonfinite(subset: list[int]) -> tuple[int | None, int]:
        """The first index in ``subset`` whose node's output is non-finite, and how many outputs were checked."""
        model = core.read_model(str(path))
        by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        outputs, index = [], []
        for i in subset:
            op = by_name.get(ops[i].get_friendly_name())
            if op is None:
                continue
            outputs.append(op.output(0))
            index.append(i)
        added = model.add_outputs(outputs) if outputs else []
        compiled = core.compile_model(model, DEVICE, compile_config(precision, threads))
        results = compiled.create_infer_request().infer(graph_feed, share_outputs=False)
        checked = 0
        for i, out in zip(index, added):  # by name: an output the graph already had is not added twice
            value = np.asarray(results[compiled.output(out.get_any_name())])
            if value.nbytes > LOCATE_MAX_BYTES:
                continue
            checked += 1
            if not np.isfinite(value).all():
                return i, checked
        return None, checked

    step = max(1, len(ops) // LOCATE_OUTPUTS)
    try:
        first, checked = nonfinite(list(range(0, len(ops), step)))
        if first is not None and step > 1:
            start = max(0, first - step + 1)
            narrowed, more = nonfinite(list(range(start, first + 1)))
            first, checked = (narrowed if narrowed is not None else first), checked + more
    except RuntimeError as e:
        raise BackendError(f"openvino {Path(path).name}: compiling with intermediate outputs failed: {e}") from e
    if first is None:
        return (
            f"every one of {checked} intermediate outputs checked in {precision} is finite: the fault lies in a "
            "fusion those outputs prevent (e.g. an attention or convolution subgraph)"
        )
    op = ops[first]
    inputs = ", ".join(f"{i.get_source_output().get_node().get_type_name()} "
                       f"{i.get_source_output().get_node().get_friendly_name()!r}" for i in op.inputs()[:3])  # fmt: skip
    return (
        f"the first non-finite value in {precision} comes from node {op.get_friendly_name()!r} "
        f"({op.get_type_name()}, node {first + 1} of {len(ops)} in execution order; its inputs: {inputs})"
    )

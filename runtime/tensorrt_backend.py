"""The native TensorRT backend: engines from ``engines/<device-key>/``, run on one CUDA stream.

Written against NVIDIA's TensorRT 10 Python API (``Runtime``, ``ICudaEngine``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``) and cuda-python's
runtime bindings for memory, copies, streams and CUDA graphs: no torch. Both are imported only
here, only when the backend is used. Device buffers are allocated once per tensor at the size of
the engine's profile maximum and reused for every call; a request outside the profile is refused
before anything runs, naming the allowed range.

None of this can run on a machine without an NVIDIA GPU; ``tests/test_gpu.py`` checks it where
one exists. The decisions it relies on (profiles, device keys, staleness) live in pure modules
(``profiles``, ``engine_cache``) with their own tests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdrt.runtime.engine_cache import (
    DeviceInfo,
    EngineManifest,
    check_engine_for_runtime,
    cuda_version_string,
    find_engine_folder,
    onnx_fingerprint,
    parse_nvidia_driver_version,
)
from sdrt.runtime.errors import ArtifactError, BackendError
from sdrt.runtime.manifest import Component
from sdrt.runtime.profiles import check_shapes, max_bytes
from sdrt.runtime.session import check_feed, to_graph_feed

log = logging.getLogger(__name__)

INSTALL_HINT = "on an NVIDIA machine: pip install 'sdrt[gpu]' (tensorrt, cuda-python)"


def tensorrt_module():
    """The real ``tensorrt`` module, or BackendError saying why not."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError(f"tensorrt is not installed ({e}; {INSTALL_HINT})") from None
    # tensorrt-stubs alone makes `import tensorrt` succeed as an empty namespace package.
    if not hasattr(trt, "Builder") or not getattr(trt, "__version__", None):
        raise BackendError(f"the installed 'tensorrt' package has no TensorRT library behind it ({INSTALL_HINT})")
    return trt


def cuda_runtime():
    """cuda-python's runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.8)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise BackendError(f"cuda-python is not installed ({INSTALL_HINT})") from None
    return cudart


def _check(result, what: str):
    """cuda-python returns (error, *values); raise on an error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BackendError(f"CUDA error in {what}: {err}")
    return values[0] if len(values) == 1 else values


def current_device(index: int = 0) -> DeviceInfo:
    """Name, compute capability and TensorRT version of CUDA device ``index``; BackendError when
    there is none, naming every reason (no tensorrt, no cuda-python, no driver, no device)."""
    reasons = []
    trt = cudart = None
    try:
        trt = tensorrt_module()
    except BackendError as e:
        reasons.append(str(e))
    try:
        cudart = cuda_runtime()
        err, count = cudart.cudaGetDeviceCount()
        if int(err) != 0 or not count:
            reasons.append(f"no CUDA device (cudaGetDeviceCount: {err})")
    except BackendError as e:
        reasons.append(str(e))
    if reasons or trt is None or cudart is None:
        raise BackendError("; ".join(reasons))
    prop = _check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(
        name.rstrip("\0"),
        (int(prop.major), int(prop.minor)),
        trt.__version__,
        int(prop.totalGlobalMem),
        sm_count=int(getattr(prop, "multiProcessorCount", 0)),
        driver_version=nvidia_driver_version(),
        cuda_version=_cuda_version(cudart.cudaRuntimeGetVersion),
        cuda_driver_version=_cuda_version(cudart.cudaDriverGetVersion),
    )


def _cuda_version(query) -> str:
    """A CUDA version query's answer as text ("12.8"), or "" when it fails: it only describes the device."""
    try:
        err, version = query()
        return cuda_version_string(int(version)) if int(err) == 0 else ""
    except Exception:  # noqa: BLE001 - an unreadable version is recorded as unknown
        return ""


def nvidia_driver_version(path: Path = Path("/proc/driver/nvidia/version")) -> str:
    """The NVIDIA driver's version as Linux reports it, or "" (another OS, or no driver)."""
    try:
        return parse_nvidia_driver_version(path.read_text())
    except OSError:
        return ""


def unavailable_reason() -> str | None:
    try:
        current_device()
    except BackendError as e:
        return str(e)
    return None


class TensorRTSession:
    """One engine: ``run(feed) -> outputs`` with the Session contract of the onnxruntime backend."""

    def __init__(
        self,
        root: Path,
        component: Component,
        precision: str | None = None,
        use_cuda_graph: bool = False,
        weights: Mapping[str, np.ndarray] | None = None,
    ):
        tensorrt_module()  # a usable TensorRT, or a clear error
        import tensorrt as trt  # (imported by name, so the type checker sees TensorRT's signatures)

        self._cudart = cudart = cuda_runtime()
        device = current_device()
        folder, key = find_engine_folder(root, device, precision)
        manifest = EngineManifest.load(folder)
        record = manifest.engines.get(component.name)
        if record is None:
            raise ArtifactError(f"{folder}: no engine for {component.name} (build it with `sdrt engines`)")
        check_engine_for_runtime(record, manifest, device, key, onnx_fingerprint(root, component))

        self.name = component.name
        self.inputs, self.outputs = component.inputs, component.outputs
        # The engine's tensors carry the graph's names (optimum's differ from ours); profiles use them too.
        self._names = {t.name: component.graph_names.get(t.name, t.name) for t in (*self.inputs, *self.outputs)}
        self._scalars = set(component.scalar_inputs)
        self.profile = {k: (tuple(lo), tuple(opt), tuple(hi)) for k, (lo, opt, hi) in record.profile.items()}
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine((folder / record.file).read_bytes())
        if self._engine is None:
            raise BackendError(f"{folder / record.file}: TensorRT could not deserialize the engine (see its log)")
        if weights:
            self._refit(folder / record.file, weights)
        self._context = self._engine.create_execution_context()
        self._stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        if not self._context.set_optimization_profile_async(0, int(self._stream)):
            raise BackendError(f"{self.name}: TensorRT refused optimization profile 0")

        # One device buffer per tensor, sized for the profile maximum, bound once.
        self._dtypes, self._buffers = {}, {}
        output_max = {k: tuple(v) for k, v in record.output_max.items()}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape_max = self.profile[name][2] if name in self.profile else output_max[name]
            nbytes = max(max_bytes(shape_max, dtype.itemsize), dtype.itemsize)
            self._buffers[name] = _check(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
            self._dtypes[name] = dtype
            self._context.set_tensor_address(name, int(self._buffers[name]))
        self._use_cuda_graph = use_cuda_graph and all(lo == hi for lo, _, hi in self.profile.values())
        self._graph_exec = None
        # One context, stream and set of device buffers: concurrent calls take turns.
        self._lock = threading.Lock()

    def _refit(self, path: Path, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the engine's weights by ``weights`` (initializer name -> values; LoRA-merged), with
        TensorRT's Refitter: this session's own deserialized copy of the engine, so other sessions of
        the same engine keep theirs. Needs an engine built refittable (``sdrt engines --refittable``)."""
        import tensorrt as trt

        if not self._engine.refittable:
            raise BackendError(
                f"{path}: expected a refittable engine for LoRA adapters at run time, got one built without "
                "refit; rebuild with `sdrt engines --refittable` (or fuse the adapters with `sdrt export --lora`)"
            )
        refitter = trt.Refitter(self._engine, self._logger)
        refittable = set(refitter.get_all_weights())
        self._refit_arrays = []  # TensorRT reads the host arrays during refit_cuda_engine
        for name, value in weights.items():
            if name not in refittable:
                raise BackendError(
                    f"{path}: expected weight {name!r} to be refittable in this engine, TensorRT folded it into "
                    "another layer; fuse this adapter at export time instead (`sdrt export --lora`)"
                )
            array = np.ascontiguousarray(value)
            self._refit_arrays.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise BackendError(f"{path}: TensorRT refused new values for weight {name!r} (shape {array.shape})")
        if not refitter.refit_cuda_engine():
            missing = list(refitter.get_missing_weights())
            raise BackendError(f"{path}: TensorRT refit failed (weights still missing: {missing[:5]})")
        self._refit_arrays = []

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self.inputs, feed)
        feed = to_graph_feed(self.name, self._names, self._scalars, feed)
        check_shapes(self.name, self.profile, {k: v.shape for k, v in feed.items()})
        with self._lock:
            return self._run(feed)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = []
        for name, value in feed.items():
            host = np.ascontiguousarray(value, dtype=self._dtypes[name])
            hosts.append(host)  # keep alive until the stream is synchronized
            if not self._context.set_input_shape(name, host.shape):
                raise BackendError(f"{self.name}: TensorRT refused shape {host.shape} for input {name!r}")
            _check(
                cudart.cudaMemcpyAsync(self._buffers[name], host.ctypes.data, host.nbytes, kind_h2d, stream),
                "cudaMemcpyAsync H2D",
            )
        if self._use_cuda_graph:
            self._launch_graph()
        elif not self._context.execute_async_v3(int(stream)):
            raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed (see its log)")
        outputs = {}
        for spec in self.outputs:
            graph_name = self._names[spec.name]
            shape: tuple[int, ...] = tuple(self._context.get_tensor_shape(graph_name)[:])  # Dims[:] is a tuple
            host = np.empty(shape, dtype=self._dtypes[graph_name])
            _check(
                cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[graph_name], host.nbytes, kind_d2h, stream),
                "cudaMemcpyAsync D2H",
            )
            outputs[spec.name] = host
        _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return {k: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v for k, v in outputs.items()}

    def _launch_graph(self) -> None:
        """Static shapes: capture the engine's launch once as a CUDA graph, then replay it (inputs are
        copied into the same device buffers before every replay)."""
        cudart, stream = self._cudart, self._stream
        if self._graph_exec is None:
            # The first run outside capture lets TensorRT finish its lazy setup.
            if not self._context.execute_async_v3(int(stream)):
                raise BackendError(f"{self.name}: TensorRT execute_async_v3 failed (see its log)")
            _check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
            _check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
            self._context.execute_async_v3(int(stream))
            graph = _check(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
            self._graph_exec = _check(cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        _check(cudart.cudaGraphLaunch(self._graph_exec, stream), "cudaGraphLaunch")

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_graph_exec", None) is not None:
            cudart.cudaGraphExecDestroy(self._graph_exec)
            self._graph_exec = None
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        for attr in ("_context", "_engine"):  # TensorRT frees them with the last reference
            self.__dict__.pop(attr, None)

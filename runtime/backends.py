"""The backend registry: one record per backend name, the only place backends are told apart.

A backend says where it runs, whether it can run on this machine (and why not), which compute
precisions it offers here, and how it opens a session for one component. ``Pipeline.load``, the
CLI and the benchmark look backends up here; adding a backend adds one ``Backend`` record. Backend
libraries are imported inside the functions that need them, so importing this module costs nothing.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import BackendError, InputError
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.profiles import ShapeRanges
from sdrt.runtime.session import Session

# Floating-point compute precisions a backend may run a graph in. "fp32" runs every graph as it was
# exported (an fp16 or int8 graph keeps its own types); "bf16" lowers fp32 compute to bfloat16 where
# the CPU has it. Never chosen silently: the default is fp32 everywhere.
COMPUTE_PRECISIONS = ("fp32", "bf16", "fp16")
# onnxruntime's execution providers, as its backends list them.
CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@dataclass(frozen=True)
class LoadOptions:
    """What a caller may ask of every backend; each backend uses what applies to it."""

    threads: int = 0  # CPU threads per session (0: the backend's default)
    precision: str = "fp32"  # compute precision, one of COMPUTE_PRECISIONS the backend offers
    cuda_graph: bool = False  # tensorrt, static-shape UNet engine: replay its launch as a CUDA graph
    trt_ranges: ShapeRanges | None = None  # onnxruntime-tensorrt: the shape ranges of its engines
    cache: bool = True  # use (and fill) per-machine compiled-graph caches under engines/
    # Initializer name -> replacement values (LoRA-merged weights): the session runs the graph with these
    # weights instead of the file's; its compiled-graph caches are not used (they hold the file's weights).
    weights: Mapping | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Backend:
    name: str
    device: str  # "cpu" or "gpu"
    description: str
    unavailable_reason: Callable[[], str | None]  # None when usable here
    precisions: Callable[[], tuple[str, ...]]  # compute precisions offered on this machine
    open: Callable[[Path, Manifest, Component, LoadOptions], Session]


# -- onnxruntime ----------------------------------------------------------------------------------
# The distributions that install the `onnxruntime` import package. pip treats them as unrelated
# projects, so two of them install into the same folder and overwrite each other's files (a CPU-only
# library under onnxruntime-gpu's metadata, or a mix of both): sdrt's extras `cpu` and `gpu` each
# bring one, and exactly one may be installed.
ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-rocm",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)
ORT_INSTALL_HINT = "pip install 'sdrt[cpu]' for the CPU, or 'sdrt[gpu]' on an NVIDIA machine"


@functools.cache
def _ort_distributions() -> tuple[tuple[str, str], ...]:
    """(name, version) of each onnxruntime distribution installed here; once per process (metadata scans are slow)."""
    from importlib import metadata

    found = []
    for name in ORT_DISTRIBUTIONS:
        try:
            found.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            pass
    return tuple(found)


def _ort_importable() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def check_onnxruntime_install() -> None:
    """BackendError unless exactly one onnxruntime distribution is installed, saying what is and how to fix it.

    None installed is accepted when ``onnxruntime`` imports anyway (a build installed under another name)."""
    found = _ort_distributions()
    if len(found) > 1:
        names = [name for name, _ in found]
        listed = ", ".join(f"{name} {version}" for name, version in found)
        raise BackendError(
            f"onnxruntime: expected one onnxruntime distribution installed, got {len(found)} ({listed}), which "
            f"overwrite each other's files in site-packages (pip uninstall -y {' '.join(names)} && pip install "
            "'sdrt[cpu]', or 'sdrt[gpu]' on an NVIDIA machine)"
        )
    if not found and not _ort_importable():
        raise BackendError(
            f"onnxruntime: expected one onnxruntime distribution installed, got none ({ORT_INSTALL_HINT})"
        )


def _gpu_swap_command() -> str:
    """How to replace the installed onnxruntime build by onnxruntime-gpu."""
    installed = " ".join(name for name, _ in _ort_distributions()) or "onnxruntime"
    return f"pip uninstall -y {installed} && pip install 'sdrt[gpu]'"


def _ort_unavailable(providers: tuple[str, ...]) -> Callable[[], str | None]:
    def reason() -> str | None:
        check_onnxruntime_install()  # a broken install is an error, not a backend this machine lacks
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"onnxruntime is not installed ({e}; {ORT_INSTALL_HINT})"
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            return (
                f"this onnxruntime ({ort.__version__}) lacks {', '.join(missing)}; it has "
                f"{', '.join(ort.get_available_providers())} (on an NVIDIA machine: {_gpu_swap_command()}, which "
                "installs onnxruntime-gpu)"
            )
        return None

    return reason


def _ort_open(providers: tuple[str, ...]) -> Callable[[Path, Manifest, Component, LoadOptions], Session]:
    """onnxruntime on ``providers`` (in order of preference; the CPU last, for what the others lack)."""

    def open_ort(root: Path, manifest: Manifest, component: Component, options: LoadOptions) -> Session:
        from sdrt.runtime.session import OrtSession

        provider_options = None
        if providers[0] == "TensorrtExecutionProvider":  # explicit profiles and engine caches
            from sdrt.runtime.ort_tensorrt import provider_options as trt_options

            provider_options = trt_options(root, component, manifest, options.trt_ranges or ShapeRanges())
        # Engines are made for the CPU provider; with adapter weights, their fused graph is the starting point.
        use_engine = options.cache and providers == (CPU,)
        return OrtSession(root, component, providers, options.threads, provider_options, use_engine, options.weights)

    return open_ort


def _fp32_only() -> tuple[str, ...]:
    return ("fp32",)


# -- TensorRT -------------------------------------------------------------------------------------
def _trt_unavailable() -> str | None:
    from sdrt.runtime.tensorrt_backend import unavailable_reason

    return unavailable_reason()


def _trt_precisions() -> tuple[str, ...]:
    # The engine folder's build precision (engines/<gpu>_..._<precision>/) decides; fp32 picks the
    # best folder present (fp16, bf16, then fp32), as before the registry existed.
    return ("fp32", "fp16", "bf16")


def _trt_open(root: Path, manifest: Manifest, component: Component, options: LoadOptions) -> Session:
    from sdrt.runtime.tensorrt_backend import TensorRTSession

    precision = None if options.precision == "fp32" else options.precision
    return TensorRTSession(
        root,
        component,
        precision,
        use_cuda_graph=options.cuda_graph and component.name == "unet",
        weights=options.weights,
    )


# -- OpenVINO -------------------------------------------------------------------------------------
def _ov_unavailable() -> str | None:
    from sdrt.runtime.openvino_backend import unavailable_reason

    return unavailable_reason()


def _ov_precisions() -> tuple[str, ...]:
    from sdrt.runtime.openvino_backend import cpu_precisions

    return tuple(cpu_precisions())


def _ov_open(root: Path, manifest: Manifest, component: Component, options: LoadOptions) -> Session:
    from sdrt.runtime.openvino_backend import IR_PRECISIONS, OpenVINOSession, cache_folder, find_ir

    cache_dir = cache_folder(root, component, options.precision) if options.cache and not options.weights else None
    ir = None
    if options.cache and not options.weights and options.precision in IR_PRECISIONS:
        ir, why_not = find_ir(root, component)
        if ir is None:
            logging.getLogger(__name__).info("openvino %s: reading the ONNX: %s", component.name, why_not)
    return OpenVINOSession(root, component, options.threads, options.precision, cache_dir, options.weights, ir)


def _ort_backend(name: str, device: str, description: str, providers: tuple[str, ...]) -> Backend:
    return Backend(name, device, description, _ort_unavailable(providers), _fp32_only, _ort_open(providers))


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        _ort_backend("onnxruntime", "cpu", "onnxruntime's CPU provider", (CPU,)),
        Backend(
            "openvino",
            "cpu",
            "OpenVINO on the CPU (pip install 'sdrt[openvino]'); bf16 where the CPU has it",
            _ov_unavailable,
            _ov_precisions,
            _ov_open,
        ),
        _ort_backend("onnxruntime-cuda", "gpu", "onnxruntime's CUDA provider (onnxruntime-gpu)", (CUDA, CPU)),
        _ort_backend(
            "onnxruntime-tensorrt", "gpu", "onnxruntime's TensorRT provider (onnxruntime-gpu)", (TRT, CUDA, CPU)
        ),
        Backend(
            "tensorrt",
            "gpu",
            "sdrt's own TensorRT engines (pip install 'sdrt[gpu]')",
            _trt_unavailable,
            _trt_precisions,
            _trt_open,
        ),
    )
}
BACKEND_NAMES = tuple(BACKENDS)


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"backend: expected one of {', '.join(BACKEND_NAMES)}, got {name!r}") from None


def available() -> list[str]:
    """The backends that can run on this machine."""
    return [name for name, b in BACKENDS.items() if b.unavailable_reason() is None]


def check_usable(backend: Backend, precision: str) -> None:
    """BackendError unless ``backend`` runs here in ``precision``, naming what is missing and what to use."""
    if precision not in COMPUTE_PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(COMPUTE_PRECISIONS)}, got {precision!r}")
    reason = backend.unavailable_reason()
    if reason:
        raise BackendError(
            f"backend {backend.name!r} is not available on this machine: {reason}. Use backend='onnxruntime' "
            "(--backend onnxruntime) to run the same artifacts on the CPU"
        )
    offered = backend.precisions()
    if precision not in offered:
        raise BackendError(
            f"precision: backend {backend.name!r} offers {', '.join(offered)} on this machine, got {precision!r}"
            + _precision_hint(backend, precision)
        )


def _precision_hint(backend: Backend, precision: str) -> str:
    if precision == "bf16" and backend.device == "cpu":
        from sdrt.runtime.cpu_features import has_bf16

        if not has_bf16():
            return " (this CPU has no bf16 instructions: AVX-512 BF16 or AMX; use precision='fp32')"
        return " (onnxruntime's CPU provider has no bf16 compute on x86; use backend='openvino' for bf16)"
    return " (use precision='fp32')"


def open_session(
    root: Path, manifest: Manifest, component: Component, backend: str, options: LoadOptions = LoadOptions()
) -> Session:
    """A session for ``component`` on ``backend`` after checking the backend and precision are usable here."""
    record = get(backend)
    check_usable(record, options.precision)
    return record.open(Path(root), manifest, component, options)

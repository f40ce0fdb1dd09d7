"""TensorRT engines from an artifact directory's ONNX graphs, through polygraphy's loaders.

One optimization profile per component, from the user's batch and image-size ranges (translated
into each input's min/opt/max by ``sdrt.runtime.profiles``); fp16 / bf16 / fp32; strongly typed
networks for graphs that are already fp16; builder optimization level; workspace limit; one timing
cache per device folder, shared by every build there. Engines are cached per device key
(``engines/<gpu>_<sm>_<trt>_<precision>/``) and rebuilt only when missing or stale, with the reason.

The loader chain (``NetworkFromOnnxPath`` -> ``CreateConfig`` -> ``EngineBytesFromNetwork``) is
polygraphy's, NVIDIA-maintained; building it imports nothing from TensorRT, so its configuration
is inspected by the tests on machines without a GPU. Only calling it needs TensorRT and a GPU.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.engine_cache import (
    ENGINE_PRECISIONS,
    ENGINES_DIR,
    DeviceInfo,
    EngineManifest,
    EngineRecord,
    device_key,
    onnx_fingerprint,
    profile_as_lists,
    stale_reason,
)
from sdrt.runtime.errors import ArtifactError, ExportError
from sdrt.runtime.families import ALL_COMPONENTS
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.profiles import ShapeRanges, input_profile, output_max_shapes

log = logging.getLogger(__name__)

ENGINE_COMPONENTS = ALL_COMPONENTS  # those of them the artifacts have


@dataclass(frozen=True)
class EngineOptions:
    ranges: ShapeRanges = ShapeRanges()
    precision: str = "fp16"  # fp16, bf16 or fp32: the engine's compute precision
    optimization_level: int = 3  # TensorRT builder optimization level, 0..5
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    components: tuple[str, ...] = ENGINE_COMPONENTS
    timing_cache: Path | None = None  # None: <device folder>/timing.cache
    # Weights replaceable after the build (TensorRT refit): what LoRA adapters at run time need.
    refittable: bool = False

    def __post_init__(self):
        if self.precision not in ENGINE_PRECISIONS:
            raise ExportError(f"precision: expected one of {', '.join(ENGINE_PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise ExportError(f"optimization level: expected 0..5, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ExportError(f"workspace: expected a positive size, got {self.workspace_bytes}")
        unknown = [c for c in self.components if c not in ENGINE_COMPONENTS]
        if unknown:
            raise ExportError(f"components: expected names from {', '.join(ENGINE_COMPONENTS)}, got {unknown}")


def build_options(component: Component, options: EngineOptions) -> dict:
    """What decides an engine besides its ONNX source and profile (recorded, and compared for staleness).

    A graph already converted to fp16 is built as a strongly typed network: its types are the
    contract, and TensorRT then takes no precision flags. An fp32 graph gets the requested
    precision as builder flags (TensorRT picks fp16/bf16 kernels where they are faster).
    """
    strongly_typed = component.precision.startswith("fp16")
    return {
        "precision": options.precision,
        "strongly_typed": strongly_typed,
        "fp16_flag": options.precision == "fp16" and not strongly_typed,
        "bf16_flag": options.precision == "bf16" and not strongly_typed,
        "optimization_level": options.optimization_level,
        "workspace_bytes": options.workspace_bytes,
        **({"refittable": True} if options.refittable else {}),  # absent when off: older records stay current
    }


def loader_chain(onnx_path: Path, profile: dict, build: dict, timing_cache: Path):
    """polygraphy's loaders for one engine: network from ONNX -> config with profile and timing cache
    -> serialized engine bytes. Nothing here touches TensorRT until the returned loader is called."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig
    from polygraphy.backend.trt import Profile as TrtProfile

    trt_profile = TrtProfile()
    for name, (lo, opt, hi) in profile.items():
        trt_profile.add(name, lo, opt, hi)
    # parse_from_file reads external data (unet.onnx.data) beside the graph.
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=build["strongly_typed"] or None)
    config = CreateConfig(
        fp16=build["fp16_flag"] or None,
        bf16=build["bf16_flag"] or None,
        profiles=[trt_profile],
        builder_optimization_level=build["optimization_level"],
        load_timing_cache=str(timing_cache),
        refittable=build.get("refittable") or None,
    )
    if build["workspace_bytes"]:
        limit = build["workspace_bytes"]

        def set_workspace(builder, network, config):
            from polygraphy import mod

            trt = mod.lazy_import("tensorrt>=8.5")
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, limit)

        config = PostprocessConfig(config, set_workspace)
    return EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache))


@dataclass
class EnginePlan:
    component: str
    onnx_path: Path
    profile: dict[str, list[list[int]]]
    output_max: dict[str, list[int]]
    build: dict
    onnx_print: str
    reason: str | None  # why it must be built; None when the cached engine is current


@dataclass
class EngineReport:
    device_key: str
    folder: Path
    plans: list[EnginePlan]
    engines: EngineManifest  # the folder's engine manifest as read (a new, empty one when there is none)
    built: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def plan_engines(root: Path, manifest: Manifest, device: DeviceInfo, options: EngineOptions) -> EngineReport:
    """What each engine's profile and options are, and whether (and why) it must be built."""
    key = device_key(device, options.precision)
    folder = Path(root) / ENGINES_DIR / key
    try:
        engines = EngineManifest.load(folder)
    except ArtifactError as e:  # no folder yet, or an unreadable one: everything gets built
        if folder.exists():
            log.info("%s", e)
        engines = EngineManifest(key, device)
    existing = engines.engines
    plans = []
    for name in options.components:
        if name not in manifest.components:
            continue  # e.g. an export without the VAE encoder
        component = manifest.components[name]
        # Keyed by the graph's tensor names, which the engine keeps (optimum's differ from ours).
        graph_name = component.graph_names.get
        inputs = input_profile(component, manifest, options.ranges)
        profile = profile_as_lists({graph_name(k, k): v for k, v in inputs.items()})
        outputs = {graph_name(k, k): list(v) for k, v in output_max_shapes(component, manifest, options.ranges).items()}
        build = build_options(component, options)
        fingerprint = onnx_fingerprint(root, component)
        reason = stale_reason(existing.get(name), folder, fingerprint, profile, build, device.tensorrt_version)
        plans.append(EnginePlan(name, Path(root) / component.path, profile, outputs, build, fingerprint, reason))
    return EngineReport(key, folder, plans, engines)


def build_engines(root: Path, device: DeviceInfo, options: EngineOptions, force: bool = False) -> EngineReport:
    """Build the missing or stale engines for ``device`` (needs TensorRT and a GPU); say which and why."""
    root = Path(root)
    manifest = Manifest.load(root)
    report = plan_engines(root, manifest, device, options)
    folder = report.folder
    folder.mkdir(parents=True, exist_ok=True)
    engines = report.engines
    timing_cache = options.timing_cache or folder / engines.timing_cache
    todo = [p for p in report.plans if force or p.reason]
    for plan in report.plans:
        if plan not in todo:
            log.info("%s: engine up to date in %s", plan.component, folder.name)
    for i, plan in enumerate(todo, 1):
        why = "forced (--force)" if force and not plan.reason else plan.reason
        log.info("[%d/%d] %s: building TensorRT engine (%s)", i, len(todo), plan.component, why)
        t0 = time.perf_counter()
        engine_bytes = loader_chain(plan.onnx_path, plan.profile, plan.build, timing_cache)()
        path = folder / f"{plan.component}.plan"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            tmp.write_bytes(bytes(engine_bytes))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.perf_counter() - t0
        engines.engines[plan.component] = EngineRecord(
            component=plan.component,
            file=path.name,
            sha256=sha256_file(path),
            bytes=path.stat().st_size,
            onnx_fingerprint=plan.onnx_print,
            profile=plan.profile,
            output_max=plan.output_max,
            options=plan.build,
            tensorrt_version=device.tensorrt_version,
            seconds=round(seconds, 1),
        )
        engines.save(folder)  # after every engine, so an interrupted run keeps what it finished
        report.built.append(plan.component)
        report.seconds[plan.component] = seconds
        log.info("[%d/%d] %s: %.1f MB in %.1f s", i, len(todo), plan.component, path.stat().st_size / 1e6, seconds)
    if not todo:
        engines.save(folder)
    return report

"""The second TensorRT route: onnxruntime's TensorRT execution provider, with the same profiles.

onnxruntime builds the engines itself on first use. Given explicit profiles it builds one engine
per graph for the whole range (instead of rebuilding whenever a new shape arrives), and with its
engine and timing caches enabled it reuses them across processes. The profiles come from the same
translation as sdrt's own engines (``profiles.input_profile``), and the cache lives beside them
under ``engines/onnxruntime-tensorrt/``.
"""

from __future__ import annotations

from pathlib import Path

from sdrt.runtime.engine_cache import ENGINES_DIR
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.profiles import ShapeRanges, input_profile

ORT_TRT_CACHE = "onnxruntime-tensorrt"


def shape_list(shapes: dict[str, tuple[int, ...]]) -> str:
    """onnxruntime's profile format: ``name:d0xd1x...,name2:...`` (as trtexec's --minShapes)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in sorted(shapes.items()))


def provider_options(
    root: Path, component: Component, manifest: Manifest, ranges: ShapeRanges, fp16: bool = True
) -> dict[str, str]:
    """TensorrtExecutionProvider options for one component: explicit min/opt/max profile for every
    dynamic input (all three are required together), engine and timing caches, precision."""
    profile = input_profile(component, manifest, ranges)
    names = component.graph_names
    dynamic = {names.get(k, k): v for k, v in profile.items() if v[0]}  # scalars have no dims to range
    cache = Path(root) / ENGINES_DIR / ORT_TRT_CACHE
    return {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_engine_cache_prefix": component.name,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": str(bool(fp16)),
        "trt_profile_min_shapes": shape_list({k: v[0] for k, v in dynamic.items()}),
        "trt_profile_opt_shapes": shape_list({k: v[1] for k, v in dynamic.items()}),
        "trt_profile_max_shapes": shape_list({k: v[2] for k, v in dynamic.items()}),
    }

"""Which machine a benchmark row was measured on: its identity, a stable key, a label for reports.

A row's ``device`` says what the machine is. A CPU: vendor, model name, family/model/stepping,
microarchitecture (Zen 3, Zen 4, Sapphire Rapids, ... where known; "unknown" otherwise), the
instruction sets that decide inference speed (AVX2, AVX-512 and its VNNI/BF16 parts, AVX-VNNI, AMX),
the CPUs this process may use, threads per core, the clock (cpufreq's maximum, else /proc/cpuinfo's
current MHz) and memory. A GPU: name, memory, compute capability, SM count, driver, CUDA and TensorRT
versions, and its host CPU as above (under ``host``; the host's cores, memory, platform and ISA key
also stay at the top level, where rows of schema 1 and 2 have them).

``device_key`` names the results file: a readable slug and a short hash of the stable identity
fields, ``cpu_amd-epyc_zen4_avx512-vnni-bf16_2c_<hash>`` or ``gpu_nvidia-h100-80gb-hbm3_sm90_<hash>``.
Volatile fields (the current MHz, exact memory bytes, kernel and software versions) are recorded but
not hashed, so one machine keeps its key from run to run, and machines that differ in any hashed
field get different keys. Rows written before these fields existed (no ``device_schema``) get their
old slug with ``-legacy`` appended: they stay loadable and visibly apart, since "AMD EPYC" there may
be a Zen 3 or a Zen 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from pathlib import Path

from sdrt.runtime import cpu_features
from sdrt.runtime.cpu_features import UNKNOWN, cpuinfo_fields, parse_identity

# Read at call time, so that a test can point them at a fake /proc/cpuinfo or /sys tree.
CPUINFO = cpu_features.CPUINFO
SYS_CPU = cpu_features.SYS_CPU

DEVICE_SCHEMA = 1  # version of the identity fields and of the key's recipe; absent in legacy rows
# The stable fields a key hashes (a GPU's also hash its host's).
CPU_IDENTITY = (
    "kind",
    "arch",
    "vendor",
    "name",
    "family",
    "model",
    "stepping",
    "microarchitecture",
    "features",
    "cores",
    "cpus_online",
    "threads_per_core",
    "memory_gib",
    "max_mhz",
)
GPU_IDENTITY = ("kind", "name", "compute_capability", "sm_count", "gpu_memory_gib")
# What a GPU row's device must carry (the GPU benchmark checks its rows against this).
GPU_FIELDS = (
    "device_schema",
    "name",
    "compute_capability",
    "sm_count",
    "gpu_memory_bytes",
    "driver_version",
    "cuda_version",
    "tensorrt_version",
    "host",
)
HASH_CHARS = 8


# -- what the machine is ---------------------------------------------------------------------------
def cpu_name(cpuinfo: Path | None = None) -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        name = cpuinfo_fields((cpuinfo or CPUINFO).read_text()).get("model name")
    except OSError:
        name = None
    return name or platform.processor() or platform.machine()


def _gib(n: int | None) -> int | None:
    return round(n / 2**30) if n else None


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def cpu_device(cpuinfo: Path | None = None, sys_cpu: Path | None = None) -> dict:
    """This machine's CPU as a row's ``device`` (``kind`` "cpu")."""
    from sdrt.runtime.ort_cpu_engines import isa_key

    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        text = ""
    ident = parse_identity(text)
    fields = cpuinfo_fields(text)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    memory = _memory_bytes()
    return {
        "device_schema": DEVICE_SCHEMA,
        "kind": "cpu",
        "name": ident["model_name"] if ident["model_name"] != UNKNOWN else cpu_name(cpuinfo),
        "vendor": ident["vendor"],
        "arch": platform.machine(),
        "family": ident["family"],
        "model": ident["model"],
        "stepping": ident["stepping"],
        "microarchitecture": ident["microarchitecture"],
        "features": ident["features"],
        "isa": isa_key(flags),  # the onnxruntime CPU engines' key (as in schema-2 rows)
        "cores": _usable_cpus(),  # CPUs this process may use; the threads a row used are its "threads"
        "cpus_online": ident["logical_cpus"] or os.cpu_count(),
        "threads_per_core": ident["threads_per_core"],
        "max_mhz": cpu_features.max_mhz(sys_cpu or SYS_CPU),  # the part's (cpufreq); None in most VMs
        "mhz": ident["mhz"],  # the kernel's current figure: volatile, not part of the key
        "memory_bytes": memory,
        "memory_gib": _gib(memory),
        "hypervisor": ident["hypervisor"],
        "platform": platform.platform(),
    }


def gpu_device(gpu, host: dict) -> dict:
    """A CUDA device (``sdrt.runtime.engine_cache.DeviceInfo``) on ``host`` (``cpu_device()``) as a row's
    ``device`` (``kind`` "gpu")."""
    return {
        "device_schema": DEVICE_SCHEMA,
        "kind": "gpu",
        "name": gpu.name,
        "compute_capability": list(gpu.compute_capability),
        "sm_count": gpu.sm_count or None,
        "gpu_memory_bytes": gpu.memory_bytes,
        "gpu_memory_gib": _gib(gpu.memory_bytes),
        "driver_version": gpu.driver_version or None,
        "cuda_version": gpu.cuda_version or None,
        "cuda_driver_version": gpu.cuda_driver_version or None,
        "tensorrt_version": gpu.tensorrt_version or None,
        # the host, where schema-2 GPU rows had it, and in full
        **{k: host.get(k) for k in ("cores", "memory_bytes", "platform", "isa")},
        "host": host,
    }


def device_info(backend: str) -> dict:
    """The device ``backend`` runs on here: the CPU, or for a GPU backend CUDA device 0 and its host."""
    from sdrt.runtime import backends

    host = cpu_device()
    if backends.get(backend).device != "gpu":
        return host
    from sdrt.runtime.tensorrt_backend import current_device

    return gpu_device(current_device(), host)


def missing_gpu_fields(device: dict) -> list[str]:
    """The GPU_FIELDS a GPU device lacks or leaves empty (all of them for a device that is not a GPU)."""
    if device.get("kind") != "gpu":
        return list(GPU_FIELDS)
    return [k for k in GPU_FIELDS if device.get(k) in (None, "", [])]


# -- its key and label -----------------------------------------------------------------------------
def is_legacy(device: dict) -> bool:
    """A device written before the identity fields (rows of schema 1 and 2 before issue 14)."""
    return "device_schema" not in device


def identity(device: dict) -> dict:
    """The stable fields the key hashes: no current MHz, exact memory or software versions."""
    if device.get("kind") == "gpu":
        ident = {k: device.get(k) for k in GPU_IDENTITY}
        host = device.get("host")
        ident["host"] = identity(host) if isinstance(host, dict) else None
        return ident
    return {k: device.get(k) for k in CPU_IDENTITY}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")


def legacy_slug(device: dict) -> str:
    """The file name rows of schema 1 and 2 were written under, e.g. ``cpu_amd-epyc_avx512-vnni-bf16_2c``."""
    name = _slug(re.sub(r"\(r\)|\(tm\)|cpu|@.*$", "", device["name"].lower()))
    if device["kind"] != "cpu":
        return f"gpu_{name}"
    isa = f"_{device['isa']}" if device.get("isa") else ""
    return f"cpu_{name}{isa}_{device['cores']}c"


def device_key(device: dict) -> str:
    """A file-name-safe key: equal for rows of one machine, different for different machines. Rows written
    before the identity fields existed get a key of their own, ending in ``-legacy``."""
    if is_legacy(device):
        return legacy_slug(device) + "-legacy"
    blob = json.dumps(identity(device), sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:HASH_CHARS]
    if device.get("kind") == "gpu":
        cc = "".join(str(v) for v in device.get("compute_capability") or ())
        return "_".join(filter(None, ("gpu", _slug(device["name"]) or "gpu", f"sm{cc}" if cc else "", digest)))
    name = _slug(re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$", "", str(device.get("name", "")).lower()))
    uarch = device.get("microarchitecture")
    uarch = _slug(re.sub(r"\s+(?=\d)", "", uarch)) if uarch and uarch != UNKNOWN else ""  # zen4, sapphire-rapids
    parts = ("cpu", name or "cpu", uarch, device.get("isa") or "")
    return "_".join(filter(None, (*parts, f"{device.get('cores')}c", digest)))


def feature_summary(features: list[str] | tuple[str, ...]) -> str:
    """The instruction set that matters most for inference among ``features``: "AMX", "AVX-512 bf16",
    "AVX-512 VNNI", "AVX-512", "AVX-VNNI", "AVX2", "SVE2", "SVE", "NEON", or ""."""
    have = set(features)
    for flag, text in (
        ("amx_bf16", "AMX"),
        ("avx512_bf16", "AVX-512 bf16"),
        ("avx512_vnni", "AVX-512 VNNI"),
        ("avx512f", "AVX-512"),
        ("avx_vnni", "AVX-VNNI"),
        ("avx2", "AVX2"),
        ("sve2", "SVE2"),
        ("sve", "SVE"),
        ("asimd", "NEON"),
    ):
        if flag in have:
            return text
    return ""


def device_label(device: dict) -> str:
    """A short human description, e.g. "AMD EPYC 9R14 (Zen 4, AVX-512 bf16, 2 cores)"."""
    if is_legacy(device):
        if device.get("kind") == "cpu":
            isa = f", {device['isa']}" if device.get("isa") else ""
            return f"{device['name']} ({device.get('cores', '?')} cores{isa}; legacy row)"
        return f"{device['name']} (legacy row)"
    if device.get("kind") == "gpu":
        cc = ".".join(str(v) for v in device.get("compute_capability") or ())
        parts = [f"sm {cc}" if cc else "", f"{device['sm_count']} SMs" if device.get("sm_count") else ""]
        parts.append(f"{device['gpu_memory_gib']} GiB" if device.get("gpu_memory_gib") else "")
        return f"{device['name']} ({', '.join(p for p in parts if p)})"
    uarch = device.get("microarchitecture")
    parts = [uarch if uarch and uarch != UNKNOWN else "", feature_summary(device.get("features") or ())]
    parts.append(f"{device.get('cores', '?')} cores")
    return f"{device['name']} ({', '.join(p for p in parts if p)})"

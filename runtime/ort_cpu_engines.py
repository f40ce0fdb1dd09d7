"""onnxruntime CPU engines: each graph as onnxruntime optimized it for this CPU, saved once per machine.

Creating an onnxruntime session for SD 1.5's 3.4 GB UNet spends 15-25 s in graph optimization and
weight pre-packing, on every load. ``sdrt engines`` does that work once (after onnxruntime-only
fusions such as MultiHeadAttention, which the portable ONNX cannot carry) and saves the result:
the optimized graph, with its weights, pre-packed ones included, in an external data file that
onnxruntime memory-maps at load. Loading it with graph optimization off then takes about a second.

The optimized graph holds layouts chosen for this CPU's instruction set (NCHWc blocks of 8 on AVX2,
16 on AVX-512) and is tied to the onnxruntime version, so engines live in one folder per
instruction-set key and onnxruntime version, ``engines/onnxruntime-cpu_<isa>_ort<version>/``, and
each one's record names the fingerprint of the ONNX it came from. The runtime uses an engine only
when all three match, and otherwise loads the portable graph and says why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime.cpu_features import cpu_flags
from sdrt.runtime.engine_cache import ENGINES_DIR, onnx_fingerprint
from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.manifest import Component, check_external_data, check_inside

log = logging.getLogger(__name__)

RECORDS = "engines.json"
SCHEMA_VERSION = 1
# Instruction-set extensions whose presence changes the kernels (and so the layouts and pre-packed
# weights) onnxruntime's CPU provider picks.
ISA_EXTRAS = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def isa_key(flags: set[str] | None = None) -> str:
    """``avx512-vnni-bf16``, ``avx2``, ...: the instruction sets an optimized graph depends on."""
    flags = cpu_flags() if flags is None else flags
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        base = "avx512"
    elif {"avx2", "fma"} <= flags:
        base = "avx2"
    elif flags:
        base = "sse"
    else:  # no /proc/cpuinfo (not Linux): name the machine instead
        import platform

        base = platform.machine().lower() or "cpu"
    extras = [e.replace("avx512_", "").replace("_tile", "").replace("_", "-") for e in ISA_EXTRAS if e in flags]
    return "-".join([base, *extras])


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def folder_name(isa: str | None = None, version: str | None = None) -> str:
    return f"onnxruntime-cpu_{isa or isa_key()}_ort{version or ort_version()}"


def engine_folder(root: Path) -> Path:
    return Path(root) / ENGINES_DIR / folder_name()


@dataclass
class CpuEngineRecord:
    component: str
    file: str  # relative to the engine folder; its data file is <file>.data
    onnx_fingerprint: str  # of the portable graph it was built from
    onnxruntime_version: str
    isa: str
    fused: bool = True  # onnxscript's onnxruntime fusions applied before onnxruntime's own optimizations
    fusions: dict = field(default_factory=dict)  # their counts (sdpa, mha, skip_layer_normalization, ...)
    verification: dict = field(default_factory=dict)  # against the portable graph
    bytes: int = 0
    seconds: float = 0.0
    # LoRA: the fused graph before onnxruntime's optimizations, every weight in external data ("" when not kept).
    # Sessions with adapter-merged weights start from it (onnxruntime's add_external_initializers replaces
    # weights before it optimizes), so they run the engine's fusions, layouts and pre-packing: as fast as it.
    lora_source: str = ""
    lora_source_bytes: int = 0


def read_records(folder: Path) -> dict[str, CpuEngineRecord]:
    """The folder's records; an unreadable file means no engines (they are rebuilt, not trusted)."""
    path = Path(folder) / RECORDS
    try:
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            return {}
        return {name: CpuEngineRecord(**r) for name, r in data["engines"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s is unreadable (%s): its engines are ignored", path, e)
        return {}


def write_records(folder: Path, records: dict[str, CpuEngineRecord]) -> None:
    path = Path(folder) / RECORDS
    tmp = path.with_suffix(".json.tmp")
    payload = {"schema_version": SCHEMA_VERSION, "engines": {k: asdict(v) for k, v in sorted(records.items())}}
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def stale_reason(record: CpuEngineRecord | None, folder: Path, fingerprint: str) -> str | None:
    """Why this engine cannot serve the component (None: it can)."""
    if record is None:
        return "no engine yet"
    if record.onnx_fingerprint != fingerprint:
        return "the ONNX was re-exported since the engine was built"
    if record.onnxruntime_version != ort_version():
        return f"built by onnxruntime {record.onnxruntime_version}, this is {ort_version()}"
    path = Path(folder) / record.file
    if not path.is_file() or not path.with_name(path.name + ".data").is_file():
        return f"{path} or its data file is missing"
    if record.bytes and engine_bytes(path) != record.bytes:
        return f"{path} changed since it was built (expected {record.bytes} bytes, got {engine_bytes(path)})"
    return None


def engine_bytes(path: Path) -> int:
    """The engine graph's size on disk with its data file."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def find_engine(root: Path, component: Component) -> tuple[Path | None, str]:
    """The engine graph for ``component`` on this CPU and onnxruntime, or None and the reason why not."""
    folder = engine_folder(root)
    if not folder.is_dir():
        return None, f"no onnxruntime CPU engines for this machine ({folder.name}); `sdrt engines` builds them"
    try:
        fingerprint = onnx_fingerprint(root, component)
    except (OSError, ArtifactError) as e:
        return None, f"cannot fingerprint {component.name}'s ONNX ({e})"
    record = read_records(folder).get(component.name)
    reason = stale_reason(record, folder, fingerprint)
    if record is None or reason:
        return None, f"{folder.name}/{component.name}: {reason} (`sdrt engines` rebuilds it)"
    # An engine folder may come with the artifacts from elsewhere: its graph and its one data file must
    # stay inside it, as the manifest's graphs must stay inside the artifact directory.
    path = check_inside(folder, record.file, f"{folder.name}/engines.json {component.name}")
    check_external_data(path, folder, listed={record.file, record.file + ".data"})
    return path, ""


def find_lora_source(root: Path, component: Component) -> tuple[Path | None, str]:
    """The fused graph adapter sessions start from (see ``CpuEngineRecord.lora_source``), or None and why not."""
    engine, why_not = find_engine(root, component)
    if engine is None:
        return None, why_not
    folder = engine_folder(root)
    record = read_records(folder)[component.name]
    if not record.lora_source:
        return None, f"{folder.name}/{component.name}: built without a graph for adapters (`sdrt engines --force`)"
    path = check_inside(folder, record.lora_source, f"{folder.name}/engines.json {component.name}")
    if not path.is_file() or not path.with_name(path.name + ".data").is_file():
        return None, f"{path} or its data file is missing (`sdrt engines --force` rebuilds it)"
    if engine_bytes(path) != record.lora_source_bytes:
        return None, f"{path} changed since it was built (`sdrt engines --force` rebuilds it)"
    check_external_data(path, folder, listed={record.lora_source, record.lora_source + ".data"})
    return path, ""

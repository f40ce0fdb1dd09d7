"""The TensorRT engine cache: device keys, the per-device engine manifest, staleness decisions.

Engines live under ``<artifacts>/engines/<device-key>/``, one folder per GPU model, compute
capability, TensorRT version and precision, because a TensorRT engine runs only on what it was
built for. Each folder holds the engines (``<component>.plan``), the timing cache shared by all
builds there, and ``engines.json``, which records for each engine its sha256, the fingerprint of
its ONNX source, its optimization profile and its build options. The builder rebuilds an engine
only when that record says it is missing or stale; the runtime refuses an engine whose record does
not match the artifacts or the machine. Pure Python: no tensorrt, no CUDA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime.errors import ArtifactError, BackendError
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import Component

ENGINES_DIR = "engines"
ENGINE_MANIFEST = "engines.json"
ENGINE_SCHEMA_VERSION = 1
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int]
    tensorrt_version: str  # e.g. "10.13.0.35"
    memory_bytes: int = 0
    # What benchmark rows record besides (none of it is in the engine folder's key); 0 or "" when unread.
    sm_count: int = 0  # streaming multiprocessors
    driver_version: str = ""  # the NVIDIA driver, e.g. "550.54.15"
    cuda_version: str = ""  # the CUDA runtime in use, e.g. "12.8"
    cuda_driver_version: str = ""  # the newest CUDA the driver supports, e.g. "12.4"

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_capability": list(self.compute_capability)}

    @classmethod
    def from_dict(cls, d: dict) -> DeviceInfo:
        cc = d["compute_capability"]
        extra = {k: d[k] for k in ("sm_count", "driver_version", "cuda_version", "cuda_driver_version") if k in d}
        return cls(d["name"], (int(cc[0]), int(cc[1])), d["tensorrt_version"], d.get("memory_bytes", 0), **extra)


def cuda_version_string(version: int) -> str:
    """CUDA's integer version (``cudaRuntimeGetVersion``, ``cudaDriverGetVersion``) as text: 12040 -> "12.4"."""
    return f"{version // 1000}.{version % 1000 // 10}" if version > 0 else ""


def parse_nvidia_driver_version(text: str) -> str:
    """The driver version in /proc/driver/nvidia/version ("NVRM version: NVIDIA UNIX x86_64 Kernel Module
    550.54.15  ..."), or "" when the text has none."""
    match = re.search(r"NVRM version:.*?\s(\d+\.\d+(?:\.\d+)?)\s", text + " ")
    return match.group(1) if match else ""


def device_key(device: DeviceInfo, precision: str) -> str:
    """``nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35_fp16``: a folder name safe on every file system."""
    if precision not in ENGINE_PRECISIONS:
        raise BackendError(f"engine precision: expected one of {', '.join(ENGINE_PRECISIONS)}, got {precision!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-") or "gpu"
    major, minor = device.compute_capability
    version = re.sub(r"[^0-9a-zA-Z.]+", "-", device.tensorrt_version)
    return f"{slug}_sm{major}{minor}_trt{version}_{precision}"


def onnx_fingerprint(root: Path, component: Component) -> str:
    """sha256 over the component's ONNX files (graph and external data), from the manifest's hashes;
    files without a recorded hash (folders from other tools) are hashed here."""
    h = hashlib.sha256()
    for record in component.files:
        digest = record.sha256 or sha256_file(Path(root) / record.path)
        h.update(f"{record.path}\0{digest}\n".encode())
    return h.hexdigest()


@dataclass
class EngineRecord:
    component: str
    file: str  # relative to the device folder
    sha256: str
    bytes: int
    onnx_fingerprint: str
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    output_max: dict[str, list[int]]  # output -> largest shape within the profile
    options: dict  # precision, strongly_typed, optimization level, workspace
    tensorrt_version: str
    seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> EngineRecord:
        return cls(**d)


@dataclass
class EngineManifest:
    device_key: str
    device: DeviceInfo
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    timing_cache: str = "timing.cache"
    schema_version: int = ENGINE_SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "device_key": self.device_key,
            "device": self.device.to_dict(),
            "timing_cache": self.timing_cache,
            "engines": {k: asdict(v) for k, v in self.engines.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> EngineManifest:
        return cls(
            device_key=d["device_key"],
            device=DeviceInfo.from_dict(d["device"]),
            engines={k: EngineRecord.from_dict(v) for k, v in d["engines"].items()},
            timing_cache=d.get("timing_cache", "timing.cache"),
            schema_version=d["schema_version"],
        )

    def save(self, folder: Path) -> Path:
        """Write ``engines.json`` atomically (a reader sees the old or the new file, never half of one)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ENGINE_MANIFEST
        tmp = path.with_name(f".{ENGINE_MANIFEST}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: Path) -> EngineManifest:
        path = Path(folder) / ENGINE_MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: expected an engine manifest, found none (build engines with `sdrt engines`)"
            ) from None
        except ValueError as e:
            raise ArtifactError(f"{path}: expected JSON, got a parse error: {e}") from e
        if data.get("schema_version") != ENGINE_SCHEMA_VERSION:
            raise ArtifactError(
                f"{path}: expected engine schema_version {ENGINE_SCHEMA_VERSION}, got {data.get('schema_version')!r} "
                "(rebuild with `sdrt engines --force`)"
            )
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: malformed engine manifest ({e}); rebuild with `sdrt engines --force`") from e


def profile_as_lists(profile: dict[str, tuple]) -> dict[str, list[list[int]]]:
    return {name: [list(s) for s in shapes] for name, shapes in sorted(profile.items())}


def stale_reason(
    record: EngineRecord | None,
    folder: Path,
    onnx_print: str,
    profile: dict[str, list[list[int]]],
    options: dict,
    tensorrt_version: str,
) -> str | None:
    """Why the engine must be (re)built, or None when the recorded engine is current."""
    if record is None:
        return "no engine built yet"
    path = Path(folder) / record.file
    if not path.is_file():
        return f"engine file {record.file} is missing"
    if path.stat().st_size != record.bytes or sha256_file(path) != record.sha256:
        return f"engine file {record.file} changed since it was built (size or sha256)"
    if record.onnx_fingerprint != onnx_print:
        return "its ONNX source changed (re-exported)"
    if record.tensorrt_version != tensorrt_version:
        return f"TensorRT changed from {record.tensorrt_version} to {tensorrt_version}"
    if record.profile != profile:
        return f"shape profile changed: {_short(record.profile)} -> {_short(profile)}"
    if record.options != options:
        changed = sorted(k for k in set(record.options) | set(options) if record.options.get(k) != options.get(k))
        return "build options changed: " + ", ".join(
            f"{k} {record.options.get(k)!r} -> {options.get(k)!r}" for k in changed
        )
    return None


def _short(profile: dict[str, list[list[int]]]) -> str:
    return "; ".join(f"{k} {v[0]}..{v[2]}" for k, v in profile.items())


def check_engine_for_runtime(
    record: EngineRecord, manifest: EngineManifest, device: DeviceInfo, key: str, onnx_print: str
) -> None:
    """What the runtime checks before loading an engine; each refusal names both values."""
    if manifest.device_key != key:
        raise BackendError(
            f"TensorRT engines: expected engines for this device ({key}), the folder holds {manifest.device_key}"
        )
    if record.tensorrt_version != device.tensorrt_version:
        raise BackendError(
            f"{record.component} engine: built with TensorRT {record.tensorrt_version}, this machine has "
            f"{device.tensorrt_version}; rebuild with `sdrt engines`"
        )
    if record.onnx_fingerprint != onnx_print:
        raise BackendError(
            f"{record.component} engine: built from ONNX {record.onnx_fingerprint[:16]}..., the artifacts now hold "
            f"{onnx_print[:16]}... (re-exported); rebuild with `sdrt engines`"
        )


def find_engine_folder(root: Path, device: DeviceInfo, precision: str | None = None) -> tuple[Path, str]:
    """The engine folder for this device: of the given precision, or else the one present, preferring
    fp16, then bf16, then fp32. BackendError naming what exists when none fits."""
    base = Path(root) / ENGINES_DIR
    wanted = [precision] if precision else ["fp16", "bf16", "fp32"]
    for p in wanted:
        key = device_key(device, p)
        if (base / key / ENGINE_MANIFEST).is_file():
            return base / key, key
    present = sorted(d.name for d in base.iterdir() if d.is_dir()) if base.is_dir() else []
    raise BackendError(
        f"TensorRT engines: expected {base}/{device_key(device, wanted[0])}"
        + ("" if precision else " (or the bf16/fp32 folder)")
        + f" for this device, found {present or 'no engines'}; build them on this machine with "
        f"`sdrt engines --artifacts {root}`"
    )

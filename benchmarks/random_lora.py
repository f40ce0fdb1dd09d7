"""LoRA files with random factors for an artifact directory, for ``sdrt bench --random-loras`` (no torch, no
download): written in the diffusers/peft format from the modules the export recorded (the manifest's
``lora_targets``: module name and weight shape), so they fit the artifacts by construction.

Their values only have to be finite and of a realistic size; what the benchmark measures (merging, opening
sessions, a step's time) depends on the rank and on which modules are adapted, not on the values.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.manifest import Manifest

ADAPTABLE = ("unet", "text_encoder", "text_encoder_2")
# "linear": the Linear layers (attention, feed-forward, projections): what most LoRA files adapt. "all": the
# convolutions too (LoCon), the largest adapter a file can be for the model.
MODULES = ("linear", "all")


def write_random_lora(
    artifacts: Path, out: Path, rank: int = 16, seed: int = 0, modules: str = "linear", std: float = 0.02
) -> Path:
    """A diffusers-format LoRA of ``rank`` on every mapped module of the UNet and text encoder(s) (``modules``:
    "linear" or "all") of ``artifacts``, alpha = rank (scale 1), factors drawn from a seeded generator."""
    if modules not in MODULES:
        raise InputError(f"random LoRA modules: expected one of {', '.join(MODULES)}, got {modules!r}")
    if not isinstance(rank, int) or rank < 1:
        raise InputError(f"random LoRA rank: expected a positive integer, got {rank!r}")
    manifest = Manifest.load(artifacts, verify_hashes=False)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for component in ADAPTABLE:
        spec = manifest.components.get(component)
        for module, target in sorted(((spec.lora_targets if spec else None) or {}).items()):
            shape = [int(d) for d in target["shape"]]
            if len(shape) == 4 and modules == "linear":
                continue
            out_features, inner = shape[0], shape[1:]
            r = min(rank, out_features, int(np.prod(inner)))
            down = rng.standard_normal((r, *inner), dtype=np.float32) / np.float32(np.sqrt(np.prod(inner)))
            up = rng.standard_normal((out_features, r) + ((1, 1) if len(shape) == 4 else ()), dtype=np.float32)
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up * np.float32(std)
    if not tensors:
        raise InputError(
            f"random LoRA: expected {artifacts} to record adaptable modules (manifest lora_targets), found none "
            "(re-export with this sdrt)"
        )
    meta = {f"{c}.lora_alpha": rank for c in ADAPTABLE} | {f"{c}.r": rank for c in ADAPTABLE}
    return write_safetensors(out, tensors, {"lora_adapter_metadata": json.dumps(meta)})


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """The safetensors format, float32/float16 only: header length, JSON header, the tensors' bytes. Written
    to a temporary name and renamed, so a reader never sees half a file."""
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset, blobs = 0, []
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[key] = {
            "dtype": dtypes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors 8-byte aligned, as safetensors writes them
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)
    return path

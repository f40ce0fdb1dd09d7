"""Will the export fit in memory? An estimate from the weight files' headers, checked before anything loads.

Export holds every part it exports in float32 (the text encoders, the denoiser, the VAE), and while one
component is exported and checked it holds more: the exporter's program, the saved graph read back by the
optimizer, and an onnxruntime session running beside PyTorch for the check. A 4.7 B-parameter T5-XXL alone
is 19 GB in float32, so SD 3 with T5 cannot be exported on a 24 GiB machine; finding that out after a
quarter of an hour of loading, by the kernel's OOM killer, is what this module prevents.

Parameter counts come from the safetensors headers (the JSON before the data: shapes and types), so nothing
is read beyond a few kilobytes per file; a pickle checkpoint (``--allow-pickle``) counts its file size.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from sdrt.runtime.errors import ExportError

# Peak bytes while exporting one component, beyond the float32 weights of the parts still loaded, as a multiple of
# that component's own weights: torch.onnx's exported program and the graph it writes. Once PyTorch's outputs are
# taken, a part no later component needs leaves memory, and the graph's check (an onnxruntime session, about the
# graph's size) runs in its place. Measured on the sd35-medium preset (9.9 GB transformer): estimate 17.9 GB; the
# export's peak RSS 20.5 GB, most of it the weights mapped from their fp32 safetensors files (page cache, which the
# kernel can drop); the machine's anonymous memory stayed under 7 GB. Models stored in bf16/fp16 hold real copies.
EXPORT_OVERHEAD = 0.5
# What the interpreter, torch, onnxruntime and the activations of the check take besides the weights.
BASE_BYTES = 2 * 1024**3
HEADER_LIMIT = 100 * 1024**2  # a larger safetensors header is not one


@dataclass(frozen=True)
class PartSize:
    name: str  # the pipeline folder: text_encoder_3, transformer, vae...
    parameters: int
    released: bool = False  # leaves memory once exported (no later component or LoRA map needs it)

    @property
    def float32_bytes(self) -> int:
        return 4 * self.parameters


def safetensors_parameters(path: Path) -> int:
    """The number of elements of every tensor in a safetensors file, read from its header alone."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > HEADER_LIMIT:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise ExportError(f"{path}: expected a safetensors file, could not read its header ({e})") from e
    total = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        n = 1
        for d in entry.get("shape", []):
            n *= int(d)
        total += n
    return total


def part_parameters(folder: Path, weights_name: str) -> int:
    """Parameters of one part (``model`` or ``diffusion_pytorch_model`` weights, single file or shards)."""
    index = folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return sum(safetensors_parameters(folder / s) for s in shards)
    single = folder / f"{weights_name}.safetensors"
    if single.is_file():
        return safetensors_parameters(single)
    pickles = [p for p in folder.glob(f"{weights_name}*.bin")]  # --allow-pickle: stored as float32 or less
    return sum(p.stat().st_size for p in pickles) // 2


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable (Linux), else the machine's physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate(parts: list[PartSize]) -> int:
    """Peak bytes of exporting ``parts``, in export order: all loaded at once, each exported in turn (with
    EXPORT_OVERHEAD beside it) and the released ones freed after their export."""
    resident = peak = sum(p.float32_bytes for p in parts)
    for p in parts:
        peak = max(peak, resident + int(EXPORT_OVERHEAD * p.float32_bytes))
        if p.released:
            resident -= p.float32_bytes
    return BASE_BYTES + peak


def check(parts: list[PartSize], droppable: tuple[str, ...], available: int | None = None) -> int:
    """Raise ExportError, naming the largest parts and what to leave out, when the export would not fit;
    return the estimate otherwise. ``droppable``: parts the pipeline runs without (SD 3's T5)."""
    need = estimate(parts)
    available = available_bytes() if available is None else available
    if need <= available:
        return need
    largest = sorted(parts, key=lambda p: -p.parameters)
    listed = ", ".join(
        f"{p.name} {p.parameters / 1e9:.2f} B parameters ({p.float32_bytes / 1e9:.1f} GB)" for p in largest
    )
    remedies = []
    kept = [p for p in parts if p.name not in droppable]
    if len(kept) < len(parts):
        without = estimate(kept)
        fits = "fits" if without <= available else f"still needs about {without / 1e9:.1f} GB"
        remedies.append(f"--drop-t5 leaves {', '.join(droppable)} out (the runtime passes zeros in its place, as "
                        f"diffusers does without it; the export then {fits})")  # fmt: skip
    remedies.append("export on a machine with more memory")
    remedies.append("--skip-memory-check tries anyway")
    raise ExportError(
        f"export would need about {need / 1e9:.1f} GB of memory (every part in float32: {listed}; and while one "
        f"is exported, {EXPORT_OVERHEAD:g}x its size beside them), this machine has "
        f"{available / 1e9:.1f} GB available: {'; or '.join(remedies)}"
    )


# onnxslim holds the whole graph as protobuf, its folded copy and the copy being written: about three times the
# graph's weights (seen: OOM at 23.7 GB while slimming a 9.9 GB graph, beside the 12 GB PyTorch pipeline).
SLIM_FACTOR = 3.0


def slim_fits(path: Path) -> bool:
    """Whether onnxslim can run on the graph at ``path`` in the memory available now. The exporter's own optimizer
    (torch.onnx's, optimize=True) has already folded constants, so a graph too large for slim loses little."""
    from sdrt.export import graph

    if not graph.data_path(path).exists():
        return True  # under 2 GB
    return SLIM_FACTOR * graph.stats(path)["bytes"] <= available_bytes()


def slim_skip_reason(path: Path) -> str:
    from sdrt.export import graph

    size = graph.stats(path)["bytes"]
    return (f"the {size / 1e9:.1f} GB graph needs about {SLIM_FACTOR * size / 1e9:.0f} GB to slim, "
            f"{available_bytes() / 1e9:.1f} GB available; the exporter's own optimizer folded its constants")  # fmt: skip

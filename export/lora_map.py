"""LoRA at export time: the map from a module's name to its weight in the exported graph, and fusing.

The exporter renames and transposes weights (``to_q.weight`` becomes a ``val_340`` holding its
transpose), so the map is found by content: each Linear and Conv2d weight of the PyTorch module is
looked up, as itself and as its transpose, in the graph's own dtype, among the graph's initializers.
A weight found exactly once becomes a target; one found nowhere, or whose bytes several initializers
or modules share (a tied or deduplicated weight, which one module's LoRA must not change for
another), is left out and counted, and a LoRA naming it is refused at run time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sdrt.runtime import lora as rt_lora
from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

# The components a LoRA adapts: the UNet and the text encoders (never the VAE), and the UNet that takes ControlNet
# residuals, whose weights are the UNet's (WEIGHTS_OF).
ADAPTABLE = ("unet", "text_encoder", "text_encoder_2", "unet_control")
WEIGHTS_OF = {"unet_control": "unet"}  # a graph -> the model part whose weights it holds, where the names differ


def _digest(array: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()


def adaptable_modules(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    for name, child in module.named_modules():
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and name:
            yield name, child


def unreachable_modules(part: torch.nn.Module, wrapper: torch.nn.Module, args: tuple) -> set[str]:
    """Names of ``part``'s adaptable modules that no output of ``wrapper(*args)`` depends on: autograd reaches
    no path from the outputs to their weights. (SDXL's first text encoder: its last layer, since the UNet takes
    the penultimate hidden states; the exporter leaves such layers out of the graph.)"""
    modules = dict(adaptable_modules(part))
    params = list(wrapper.parameters())
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        weights = [m.weight for m in modules.values()]
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = wrapper(*args)
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if torch.is_tensor(t)]
        total = sum(t.float().sum() for t in outputs if t.requires_grad)
        if not torch.is_tensor(total):
            return set(modules)
        grads = torch.autograd.grad(total, weights, allow_unused=True)
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
    return {name for name, g in zip(modules, grads) if g is None}


def lora_targets(
    module: torch.nn.Module, graph_path: Path, unreachable: Callable[[], set[str]] | None = None
) -> tuple[dict[str, dict], dict]:
    """(targets, summary): module -> {"initializer", "shape", "layout"} for the graph at ``graph_path``.

    ``unreachable``: asked only when some weights are not found, for the modules no output depends on; those
    are recorded with layout "unused" (no initializer): a LoRA may adapt them, and it changes nothing there."""
    model = onnx.load(str(graph_path), load_external_data=True)
    by_digest: dict[bytes, list[str]] = {}
    dtypes = set()
    for init in model.graph.initializer:
        if len(init.dims) < 2 or init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        array = numpy_helper.to_array(init)
        dtypes.add(array.dtype)
        by_digest.setdefault(_digest(array), []).append(init.name)
    del model
    found: dict[str, dict] = {}
    claimed: dict[str, list[str]] = {}
    missing, shared = [], []
    for name, child in adaptable_modules(module):
        weight = child.weight.detach().float().numpy()
        candidates = [(weight, "same")] + ([(weight.T, "transposed")] if weight.ndim == 2 else [])
        hits = []
        for value, layout in candidates:
            for dtype in dtypes:
                for init in by_digest.get(_digest(value.astype(dtype)), []):
                    hits.append((init, layout))
        hits = list(dict.fromkeys(hits))
        if len(hits) != 1:
            (missing if not hits else shared).append(name)
            continue
        init, layout = hits[0]
        claimed.setdefault(init, []).append(name)
        found[name] = {"initializer": init, "shape": list(weight.shape), "layout": layout}
    for names in claimed.values():
        if len(names) > 1:  # one initializer for several modules (equal weights): adapting one would change all
            shared += names
            for n in names:
                found.pop(n, None)
    unused = []
    if missing and unreachable is not None:
        dead = unreachable()
        unused = [n for n in missing if n in dead]
        missing = [n for n in missing if n not in dead]
        shapes = {n: list(child.weight.shape) for n, child in adaptable_modules(module)}
        for n in unused:
            found[n] = {"initializer": "", "shape": shapes[n], "layout": "unused"}
    mapped = len(found) - len(unused)
    summary = {"modules": mapped + len(unused) + len(missing) + len(shared), "mapped": mapped}
    if unused:
        summary["unused"] = len(unused)
        summary["unused_examples"] = unused[:3]
    if missing:
        summary["not_found"] = len(missing)
        summary["not_found_examples"] = missing[:3]
    if shared:
        summary["shared"] = len(shared)
        summary["shared_examples"] = shared[:3]
    return found, summary


def fuse(parts: dict[str, torch.nn.Module], loras: list[tuple[Path, float]]) -> list[dict]:
    """Add each adapter's update, times its scale, to the PyTorch weights (before the export); return
    what the manifest records. The files are read and fitted by the runtime's own reader."""
    records = []
    for path, scale in loras:
        lora = rt_lora.load_file(path)
        targets = {
            name: {
                m: rt_lora.Target("", tuple(child.weight.shape), "same") for m, child in adaptable_modules(parts[name])
            }
            for name in ADAPTABLE
            if name in parts
        }
        resolved = rt_lora.resolve(lora, targets)
        modules = 0
        for component, layers in resolved.items():
            named = dict(adaptable_modules(parts[component]))
            for module, layer in layers.items():
                weight = named[module].weight
                delta = torch.from_numpy(layer.delta().reshape(tuple(weight.shape)))
                with torch.no_grad():
                    weight.add_(delta.to(weight.dtype), alpha=float(scale))
                modules += 1
        if not modules:
            raise ExportError(f"lora {str(path)!r}: adapts no module of this model")
        log.info("fused LoRA %s (scale %g): %d modules", path, scale, modules)
        records.append({"path": str(path), "sha256": lora.sha256, "scale": float(scale), "format": lora.format,
                        "modules": modules})  # fmt: skip
    return records

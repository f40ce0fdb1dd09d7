"""LoRA adapters, torch-free: read the files users have, map them onto the exported graphs, merge.

Formats read (``.safetensors`` only: a pickle can run code when it is read):

- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (``text_encoder.``,
  ``text_encoder_2.`` for the text encoders), alpha from ``<module>.alpha`` keys or from the
  ``lora_adapter_metadata`` that diffusers writes (``<prefix>.lora_alpha``, ``<prefix>.alpha_pattern``);
  without an alpha the scale is 1, as peft's ``lora_alpha = r``. The older ``lora.down``/``lora.up``
  and ``lora_linear_layer.down``/``up`` spellings are the same thing.
- kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``,
  ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL) for the text encoders.

Linear and convolution layers both (LoCon: a ``k x k`` down and ``1 x 1`` up convolution). A
layer's update is ``scale * alpha / rank * up @ down``, reshaped to the weight's shape: the weight
peft's forward pass ``W x + scale * alpha / r * B (A x)`` adds up to.

Where each module's weight lives in the graph is not guessed: ``sdrt export`` records, per
component, module name -> initializer name, shape and layout (``Component.lora_targets``).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import ArtifactError, InputError, SdrtError


class LoraError(InputError):
    """A LoRA file cannot be read, does not fit the model, or asks for more than the limits allow."""


# What a LoRA key's prefix names: the component it adapts.
PEFT_PREFIXES = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# The spellings of a layer's two factors, A (down) and B (up).
DOWN = ("lora_A.weight", "lora.down.weight", "lora_linear_layer.down.weight", "lora_down.weight")
UP = ("lora_B.weight", "lora.up.weight", "lora_linear_layer.up.weight", "lora_up.weight")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Keys of adapter kinds that are not LoRA (LyCORIS LoHa/LoKr, DoRA's magnitudes, norms): refused by name.
UNSUPPORTED = {
    "hada_w1_a": "LoHa (LyCORIS)",
    "lokr_w1": "LoKr (LyCORIS)",
    "lora_magnitude_vector": "DoRA",
    "dora_scale": "DoRA",
    "diff_b": "full bias differences",
    "diff": "full weight differences",
    "lora_mid": "LoCon with a mid (Tucker) factor",
}
SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": "bf16"}
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class LoraLimits:
    """What one call may ask of the adapters: how many at once, the largest file, the largest rank,
    and how many adapter sets keep their merged sessions (each holds a copy of the weights it changes)."""

    max_adapters: int = 8
    max_file_bytes: int = 4 * 2**30
    max_rank: int = 1024
    max_scale: float = 100.0
    cached_sets: int = 2


@dataclass(frozen=True)
class Layer:
    """One adapted module: ``down`` (rank, in[, kh, kw]), ``up`` (out, rank[, 1, 1]), ``alpha``."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def shape(self) -> tuple[int, ...]:
        """The weight shape this layer's update has: (out, in) or (out, in, kh, kw)."""
        return (int(self.up.shape[0]), *map(int, self.down.shape[1:]))

    def delta(self) -> np.ndarray:
        """``alpha / rank * up @ down`` in float32, shaped as :meth:`shape`."""
        up = self.up.reshape(self.up.shape[0], -1).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)
        return (np.float32(self.factor) * (up @ down)).reshape(self.shape())


@dataclass
class LoraFile:
    """One adapter file, read and checked: its layers by component and module name (as written: dots
    for peft files, underscores for kohya files, resolved against a model by :func:`resolve`)."""

    path: Path
    sha256: str
    format: str  # "diffusers" or "kohya"
    layers: dict[str, dict[str, Layer]]  # component -> module -> layer
    bytes: int = 0

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def modules(self) -> int:
        return sum(len(v) for v in self.layers.values())


# -- reading ----------------------------------------------------------------------------------------
def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (float32/float16 arrays; bf16 widened to float32) and metadata of a safetensors file.

    The header is checked before any tensor is touched: JSON, offsets inside the file, each tensor's
    byte count equal to its shape's. (safetensors' own NumPy loader cannot read bf16, which many
    LoRA files are stored in.)"""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise LoraError(f"{path}: expected a safetensors file, got {size} bytes")
            (header_len,) = np.frombuffer(f.read(8), dtype="<u8")
            header_len = int(header_len)
            if header_len > min(MAX_HEADER, size - 8):
                raise LoraError(
                    f"{path}: expected a safetensors header of at most {min(MAX_HEADER, size - 8)} bytes, "
                    f"got a header length of {header_len} (not a safetensors file, or a damaged one)"
                )
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise LoraError(f"{path}: expected a JSON safetensors header, got {e}") from None
            if not isinstance(header, dict):
                raise LoraError(f"{path}: expected a JSON object as safetensors header, got {type(header).__name__}")
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + header_len else b""
    except OSError as e:
        raise LoraError(f"{path}: expected a readable LoRA file, got {e}") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraError(f"{path}: expected __metadata__ to be a JSON object, got {metadata!r:.80}")
    base, tensors = 8 + header_len, {}
    for key, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            lo, hi = int(lo), int(hi)
        except (KeyError, TypeError, ValueError):
            raise LoraError(
                f"{path}: tensor {key!r}: expected dtype, shape and data_offsets, got {info!r:.120}"
            ) from None
        if dtype not in SAFETENSORS_DTYPES:
            raise LoraError(
                f"{path}: tensor {key!r}: expected a float dtype ({', '.join(SAFETENSORS_DTYPES)}), got {dtype}"
            )
        item = 2 if dtype in ("F16", "BF16") else 8 if dtype == "F64" else 4
        count = math.prod(shape)
        if any(d < 0 for d in shape) or not 0 <= lo <= hi <= size - base or hi - lo != count * item:
            raise LoraError(
                f"{path}: tensor {key!r}: expected {count * item} bytes for shape {shape} {dtype} inside the "
                f"file's {size - base} data bytes, got offsets [{lo}, {hi}) (a damaged file)"
            )
        raw = np.frombuffer(data, dtype=np.uint16 if dtype == "BF16" else SAFETENSORS_DTYPES[dtype], count=count,
                            offset=base + lo)  # fmt: skip
        if dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        elif dtype == "F64":
            raw = raw.astype(np.float32)
        else:
            raw = raw.copy()  # the file's pages are not kept mapped
        tensors[key] = raw.reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_file(path: str | Path, limits: LoraLimits = LoraLimits()) -> LoraFile:
    """Read and check one LoRA file: safetensors only, known key formats, finite values, within limits."""
    path = Path(path)
    if not isinstance(path, Path) or not path.exists():
        raise LoraError(f"lora {str(path)!r}: expected an existing .safetensors file, got no such file")
    if path.is_dir():
        raise LoraError(f"lora {str(path)!r}: expected a .safetensors file, got a folder")
    if path.suffix.lower() in PICKLE_SUFFIXES or _looks_pickled(path):
        raise LoraError(
            f"lora {str(path)!r}: expected a .safetensors file, got a pickle ({path.suffix or 'no suffix'}): pickles "
            "can run code when read and are refused; convert it once with safetensors (e.g. "
            "`safetensors.torch.save_file(torch.load(f, weights_only=True), 'x.safetensors')`)"
        )
    size = path.stat().st_size
    if size > limits.max_file_bytes:
        raise LoraError(
            f"lora {str(path)!r}: expected a file of at most {_bytes(limits.max_file_bytes)}, got {_bytes(size)} "
            "(raise LoraLimits.max_file_bytes)"
        )
    tensors, metadata = read_safetensors(path)
    lora = parse(path, tensors, metadata, limits)
    lora.sha256, lora.bytes = sha256_of(path), size
    return lora


def _bytes(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def _looks_pickled(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or head == b"PK\x03\x04"


def parse(
    path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], limits: LoraLimits = LoraLimits()
) -> LoraFile:
    """Group a file's tensors into layers per component; refuse what is not a LoRA we can apply."""
    if not tensors:
        raise LoraError(f"lora {str(path)!r}: expected LoRA tensors, got an empty file")
    for key in tensors:
        for marker in set(key.split(".")) & set(UNSUPPORTED):
            kind = UNSUPPORTED[marker]
            if marker:
                raise LoraError(
                    f"lora {str(path)!r}: expected LoRA factors (lora_A/lora_B or lora_down/lora_up), got {kind} "
                    f"tensors (e.g. {key!r}), which sdrt does not apply"
                )
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        found = _split_key(key, kohya)
        if found is None:
            unknown.append(key)
            continue
        component, module, part = found
        groups.setdefault((component, module), {})[part] = value
    if unknown:
        raise LoraError(
            f"lora {str(path)!r}: expected keys of the diffusers/peft format (unet./text_encoder./text_encoder_2. + "
            f"lora_A/lora_B) or the kohya format (lora_unet_/lora_te_ + lora_down/lora_up/alpha), got {len(unknown)} "
            f"other keys, e.g. {', '.join(map(repr, unknown[:3]))}"
        )
    alphas = {} if kohya else _metadata_alphas(path, metadata)
    layers: dict[str, dict[str, Layer]] = {}
    for (component, module), parts in sorted(groups.items()):
        where = f"lora {str(path)!r} module {module!r} ({component})"
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"{where}: expected both factors (down/A and up/B), got only {sorted(parts)}")
        down, up = parts["down"], parts["up"]
        for name, value in (("down", down), ("up", up)):
            if value.ndim not in (2, 4):
                raise LoraError(f"{where}: expected the {name} factor to be 2-D or 4-D, got shape {list(value.shape)}")
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value)).sum())
                raise LoraError(f"{where}: expected finite values in the {name} factor, got {bad} NaN or infinite")
        rank = down.shape[0]
        if up.shape[1] != rank or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            raise LoraError(
                f"{where}: expected up of shape (out, {rank}[, 1, 1]) to match down {list(down.shape)}, "
                f"got {list(up.shape)}"
            )
        if rank > limits.max_rank:
            raise LoraError(f"{where}: expected rank at most {limits.max_rank}, got {rank} (raise LoraLimits.max_rank)")
        alpha = None
        if "alpha" in parts:
            a = parts["alpha"]
            if a.size != 1 or not np.isfinite(a).all():
                raise LoraError(f"{where}: expected alpha to be one finite number, got {a.reshape(-1)[:4].tolist()}")
            alpha = float(a.reshape(-1)[0])
        elif kohya:
            alpha = None  # kohya without alpha: alpha = rank
        else:
            alpha = alphas(component, module)
        layers.setdefault(component, {})[module] = Layer(down, up, alpha)
    return LoraFile(Path(path), "", "kohya" if kohya else "diffusers", layers)


def _split_key(key: str, kohya: bool) -> tuple[str, str, str] | None:
    """(component, module, "down" | "up" | "alpha") of one key, or None for a key of no known form."""
    if kohya:
        prefix = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        rest = key[len(prefix) :]
        for part, suffixes in (("down", (".lora_down.weight",)), ("up", (".lora_up.weight",)), ("alpha", (".alpha",))):
            for suffix in suffixes:
                if rest.endswith(suffix):
                    return KOHYA_PREFIXES[prefix], rest[: -len(suffix)], part
        return None
    head, _, rest = key.partition(".")
    if head not in PEFT_PREFIXES:
        return None
    for part, suffixes in (("down", DOWN), ("up", UP), ("alpha", ("alpha",))):
        for suffix in suffixes:
            if rest.endswith("." + suffix):
                return PEFT_PREFIXES[head], rest[: -len(suffix) - 1], part
    return None


def _metadata_alphas(path: Path, metadata: Mapping[str, str]):
    """alpha(component, module) from diffusers' ``lora_adapter_metadata`` (peft's LoraConfig per prefix)."""
    raw = metadata.get("lora_adapter_metadata")
    configs: dict[str, dict] = {}
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LoraError(f"lora {str(path)!r}: expected JSON in lora_adapter_metadata, got {e}") from None
        if not isinstance(packed, dict):
            raise LoraError(f"lora {str(path)!r}: expected a JSON object in lora_adapter_metadata, got {raw:.80}")
        for key, value in packed.items():
            prefix, _, name = key.partition(".")
            if prefix in PEFT_PREFIXES and name:
                configs.setdefault(PEFT_PREFIXES[prefix], {})[name] = value

    def alpha(component: str, module: str) -> float | None:
        config = configs.get(component)
        if not config:
            return None
        for pattern, value in (config.get("alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?({pattern})", module):
                return _finite_alpha(path, module, value)
        if config.get("lora_alpha") is None:
            return None
        return _finite_alpha(path, module, config["lora_alpha"])

    return alpha


def _finite_alpha(path: Path, module: str, value) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = math.nan
    if not math.isfinite(alpha):
        raise LoraError(f"lora {str(path)!r} module {module!r}: expected a finite lora_alpha, got {value!r}")
    return alpha


# -- fitting a file to a model ----------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where an adaptable module's weight is in one exported graph (recorded by ``sdrt export``)."""

    initializer: str
    shape: tuple[int, ...]  # the module's weight shape: (out, in) or (out, in, kh, kw)
    # "same": the initializer is the weight; "transposed": it is the weight's transpose (Linear); "unused": no
    # output depends on the module, so the graph leaves it out (no initializer) and an update of it changes nothing.
    layout: str

    @classmethod
    def from_dict(cls, d: Mapping) -> Target:
        return cls(str(d["initializer"]), tuple(int(x) for x in d["shape"]), str(d["layout"]))


def resolve(lora: LoraFile, targets: Mapping[str, Mapping[str, Target]]) -> dict[str, dict[str, Layer]]:
    """The file's layers keyed by module names of ``targets`` (component -> module -> Target).

    Refuses, naming them: a component the model lacks, modules that match nothing (how many, a few
    names), and the first module whose update has another shape than the model's weight."""
    out: dict[str, dict[str, Layer]] = {}
    # Components the model has first: a shape that differs there says more than a component it lacks.
    for component, layers in sorted(lora.layers.items(), key=lambda item: not targets.get(item[0])):
        where = f"lora {lora.name!r} ({lora.path})"
        known = targets.get(component)
        if not known:
            have = ", ".join(sorted(c for c in targets if targets[c])) or "none"
            raise LoraError(
                f"{where}: has {len(layers)} {component} modules, these artifacts have no adaptable {component} "
                f"(adaptable components: {have}); it is for another model"
            )
        names = {_canonical(component, m, lora.format): m for m in known}
        if lora.format == "kohya" and component == "unet":  # SDXL files name the SGM UNet kohya trains on
            per_block = _layers_per_block(known)
            own = {m: sgm_to_diffusers(m, per_block) or m for m in layers}
        else:
            own = {m: _canonical(component, m, lora.format) for m in layers}
        unmatched = [m for m in layers if own[m] not in names]
        if unmatched:
            raise LoraError(
                f"{where}: {len(unmatched)} of its {len(layers)} {component} modules match no layer of these "
                f"artifacts, e.g. {', '.join(map(repr, unmatched[:3]))}; refusing to apply it in part (a LoRA for "
                "another architecture, or a format sdrt does not map)"
            )
        resolved = {}
        for module, layer in layers.items():
            name = names[own[module]]
            target = known[name]
            want, got = target.shape, layer.shape()
            fits = got[0] == want[0] and math.prod(got[1:]) == math.prod(want[1:])
            if not fits or (len(got) == len(want) and got != want):
                raise LoraError(
                    f"{where}: module {name!r} ({component}) has weight shape {list(want)} in these artifacts, the "
                    f"adapter's update is {list(got)} (down {list(layer.down.shape)}, up {list(layer.up.shape)}): "
                    "it is for another architecture"
                )
            resolved[name] = layer
        out[component] = resolved
    return out


# kohya's SDXL LoRAs name the original (SGM) UNet that sd-scripts trains SDXL on: input_blocks / middle_block /
# output_blocks, numbered by layer. These are its names that are not inside a block, and a resnet's layers.
SGM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "out_2": "conv_out",
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
}
SGM_RESNET = {
    "in_layers_2": "conv1",
    "out_layers_3": "conv2",
    "emb_layers_1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}


def sgm_to_diffusers(name: str, layers_per_block: int) -> str | None:
    """A kohya UNet module name in SGM numbering (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``) as
    diffusers' UNet2DConditionModel names it, in kohya's underscores (``down_blocks_1_attentions_0_...``);
    None when ``name`` is not an SGM name. The numbering as diffusers' ``_maybe_map_sgm_blocks_to_diffusers``
    reads it: each down block has ``layers_per_block`` layers and then its downsampler, each up block one
    layer more; a layer's second index is its resnet (0), attention (1) or, in an up block, upsampler (2)."""
    if name in SGM_NAMES:
        return SGM_NAMES[name]
    found = re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)|middle_block_(\d+)_(.+)", name)
    if found is None:
        return None
    kind, i, j, rest, middle, middle_rest = found.groups()
    per = layers_per_block + 1
    if middle is not None:
        part = {"0": "resnets_0", "1": "attentions_0", "2": "resnets_1"}.get(middle)
        return None if part is None else f"mid_block_{part}_{SGM_RESNET.get(middle_rest, middle_rest)}"
    i, j = int(i), int(j)
    rest = SGM_RESNET.get(rest, rest)
    if kind == "input_blocks":
        if i < 1 or j > 1:
            return None
        block, layer = (i - 1) // per, (i - 1) % per
        if rest == "op":
            return f"down_blocks_{block}_downsamplers_0_conv"
        return f"down_blocks_{block}_{('resnets', 'attentions')[j]}_{layer}_{rest}"
    if j > 2:
        return None
    block, layer = i // per, i % per
    return f"up_blocks_{block}_{('resnets', 'attentions', 'upsamplers')[j]}_{layer if j < 2 else 0}_{rest}"


def _layers_per_block(targets: Mapping[str, Target]) -> int:
    """Resnets in the UNet's first down block (SD and SDXL: 2), read from the module names the export recorded."""
    found = [int(m.group(1)) for name in targets if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", name))]
    return max(found, default=1) + 1


def _canonical(component: str, module: str, format: str) -> str:
    """A module name as both sides can agree on: kohya's underscores for kohya files, and a text encoder's
    names without the ``text_model.`` level, which transformers 5's CLIP text models no longer have but
    LoRA files written for transformers 4 (and kohya's ``lora_te_text_model_...``) still name."""
    name = module.replace(".", "_") if format == "kohya" else module
    if component.startswith("text_encoder"):
        prefix = "text_model_" if format == "kohya" else "text_model."
        name = name[len(prefix) :] if name.startswith(prefix) else name
    return name


def merged_weights(
    bases: Mapping[str, np.ndarray],
    targets: Mapping[str, Target],
    adapters: Iterable[tuple[Mapping[str, Layer], float]],
) -> dict[str, np.ndarray]:
    """initializer -> base + sum(scale * delta) for every initializer an adapter touches, in the
    initializer's layout and dtype (summed in float32)."""
    sums: dict[str, np.ndarray] = {}
    for layers, scale in adapters:
        for module, layer in layers.items():
            target = targets[module]
            if target.layout == "unused":
                continue
            delta = layer.delta().reshape(target.shape)
            if target.layout == "transposed":
                delta = delta.T
            acc = sums.get(target.initializer)
            sums[target.initializer] = np.float32(scale) * delta if acc is None else acc + np.float32(scale) * delta
    out = {}
    for name, delta in sums.items():
        base = bases[name]
        out[name] = np.ascontiguousarray((base.astype(np.float32) + delta.reshape(base.shape)).astype(base.dtype))
    return out


def read_base_weights(root: Path, graph_path: str, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of initializers ``names`` of the graph at ``root / graph_path`` (inline or external data)."""
    from sdrt.runtime import onnx_proto

    path = Path(root) / graph_path
    wanted = sorted(set(names))
    found = onnx_proto.read_initializers(path, wanted)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ArtifactError(
            f"{path}: the manifest's LoRA map names initializers the graph lacks, e.g. {missing[:3]} (re-export)"
        )
    out = {}
    for name in wanted:
        init = found[name]
        if init.dtype not in ("float32", "float16"):
            raise ArtifactError(
                f"{path}: initializer {name!r}: expected float32 or float16 weights to adapt, got {init.dtype}"
            )
        file = path if not init.location else path.parent / init.location  # locations checked by Manifest.load
        dtype = np.dtype(init.dtype)
        count = math.prod(init.dims)
        if init.length != count * dtype.itemsize:
            raise ArtifactError(
                f"{path}: initializer {name!r}: expected {count * dtype.itemsize} bytes, got {init.length}"
            )
        with open(file, "rb") as f:
            f.seek(init.offset)
            raw = f.read(init.length)
        if len(raw) != init.length:
            raise ArtifactError(f"{file}: initializer {name!r} runs past the end of the file (re-export)")
        out[name] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(init.dims)
    return out


# -- what a call asks for ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSet:
    """The adapters of one call, checked: (file, scale) in a canonical order; ``key`` identifies it."""

    items: tuple[tuple[LoraFile, float], ...] = ()

    @property
    def key(self) -> tuple:
        return tuple((f.sha256, s) for f, s in self.items)

    def describe(self) -> list[dict]:
        return [{"name": f.name, "sha256": f.sha256, "scale": s} for f, s in self.items]


BASE = AdapterSet()


class RegisteredName(str):
    """An adapter name that may only mean a registered adapter, never a path: what a client of ``sdrt serve``
    sends is wrapped in it, so no request can make the server read a file it names, whatever the pipeline's
    ``lora_paths``."""


@dataclass
class Registry:
    """Adapter files by name (``register``) and by path, each read and checked once per file version."""

    limits: LoraLimits = field(default_factory=LoraLimits)
    names: dict[str, Path] = field(default_factory=dict)
    _files: dict[tuple, LoraFile] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, name: str, path: str | Path) -> LoraFile:
        if not isinstance(name, str) or not name:
            raise LoraError(f"lora name: expected a non-empty string, got {name!r}")
        lora = self.file(Path(path))
        self.names[name] = Path(path)
        return lora

    def file(self, path: Path) -> LoraFile:
        try:
            stat = path.stat()
        except OSError:
            raise LoraError(f"lora {str(path)!r}: expected an existing .safetensors file, got no such file") from None
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._files.get(key)
        if cached is not None:
            return cached
        lora = load_file(path, self.limits)
        with self._lock:
            self._files[key] = lora
        return lora

    def adapter_set(self, loras, allow_paths: bool = True) -> AdapterSet:
        """Check a call's ``loras``: a list of (registered name or path, scale) pairs (or dicts with
        ``name`` and ``scale``); at most ``limits.max_adapters``; finite scales; no file twice."""
        if loras is None:
            return BASE
        if isinstance(loras, (str, bytes, dict)) or not isinstance(loras, (list, tuple)):
            raise LoraError(f"loras: expected a list of (name or path, scale) pairs, got {type(loras).__name__}")
        if len(loras) > self.limits.max_adapters:
            raise LoraError(
                f"loras: expected at most {self.limits.max_adapters} adapters per call, got {len(loras)} "
                "(raise LoraLimits.max_adapters)"
            )
        items: dict[str, tuple[LoraFile, float]] = {}
        for i, entry in enumerate(loras):
            if isinstance(entry, Mapping):
                ref, scale = entry.get("name"), entry.get("scale", 1.0)
            elif isinstance(entry, (list, tuple)) and len(entry) == 2:
                ref, scale = entry
            else:
                raise LoraError(f"loras[{i}]: expected a (name or path, scale) pair, got {entry!r:.80}")
            if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
                raise LoraError(f"loras[{i}] scale: expected a number, got {scale!r:.40}")
            scale = float(scale)
            if not math.isfinite(scale) or abs(scale) > self.limits.max_scale:
                raise LoraError(
                    f"loras[{i}] scale: expected a finite number in [-{self.limits.max_scale:g}, "
                    f"{self.limits.max_scale:g}], got {scale}"
                )
            lora = self._lookup(i, ref, allow_paths)
            if lora.sha256 in items:
                raise LoraError(f"loras[{i}]: {ref!r} is the same file as an adapter named before it; name it once")
            items[lora.sha256] = (lora, scale)
        return AdapterSet(tuple(sorted(items.values(), key=lambda item: item[0].sha256)))

    def _lookup(self, i: int, ref, allow_paths: bool) -> LoraFile:
        if isinstance(ref, str) and ref in self.names:
            return self.file(self.names[ref])
        if not allow_paths or isinstance(ref, RegisteredName):
            known = ", ".join(sorted(self.names)) or "none"
            raise LoraError(f"loras[{i}] name: expected one of the registered adapters ({known}), got {ref!r:.80}")
        if isinstance(ref, LoraFile):
            return ref
        if not isinstance(ref, (str, os.PathLike)) or not str(ref):
            raise LoraError(f"loras[{i}]: expected a registered name or a path, got {ref!r:.80}")
        return self.file(Path(ref))


# -- sessions per adapter set -------------------------------------------------------------------------
class AdapterSessions:
    """Sessions of the adapted components (UNet, text encoders) per adapter set, built on first use and
    kept for the ``limits.cached_sets`` most recently used sets; the other components are the base's.

    The mechanism (chosen by measurement, README "LoRA adapters"): each set's weights are merged in
    NumPy (base + sum of scale * alpha / rank * up @ down) and handed to the backend as replacement
    initializers, so a step with adapters is a step of a graph with merged weights: no extra operators,
    no slower than the base. A set already cached costs a dictionary lookup to switch to.

    ``open(component, weights)`` opens one session with replaced initializers (the pipeline's backend)."""

    # Graphs that hold another component's weights (the UNet taking ControlNet residuals holds the UNet's): a file's
    # layers for that component adapt them too.
    SHARES_WEIGHTS = {"unet_control": "unet"}

    def __init__(self, root: Path, manifest, open_session, limits: LoraLimits = LoraLimits(), components=None):
        """``components``: the components the pipeline opened (default: all of the manifest's); only those are
        adapted, so a model's ``unet_control`` gets adapter sessions only where ControlNets are loaded."""
        self.root, self.manifest, self.limits = Path(root), manifest, limits
        self._open = open_session
        # every map the manifest has (a file's layers are resolved against the UNet's even where unet_control runs
        # its calls), and the components adapted here
        self._maps: dict[str, dict[str, Target]] = {
            name: {m: Target.from_dict(t) for m, t in c.lora_targets.items()}
            for name, c in manifest.components.items()
            if c.lora_targets
        }
        self.targets = {name: t for name, t in self._maps.items() if components is None or name in components}
        self._resolved: dict[str, dict[str, dict[str, Layer]]] = {}  # sha256 -> component -> module -> layer
        self._cache: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()  # the two dicts above
        self._build_lock = threading.Lock()  # one set built at a time: each costs sessions' worth of memory
        self.stats = {"builds": 0, "hits": 0, "build_seconds": 0.0}

    def check(self, adapters: AdapterSet) -> None:
        """Before any work: LoraError unless every file of ``adapters`` fits these artifacts, and BudgetError
        when the set is not cached and its sessions would not fit the memory available now."""
        per_component = self._per_component(adapters)
        if not per_component:
            return
        with self._lock:
            cached = adapters.key in self._cache
        if not cached:
            self._check_memory(per_component)

    def adapted(self, adapters: AdapterSet) -> set[str]:
        """The components whose sessions ``adapters`` changes."""
        return set(self._per_component(adapters)) if adapters.items else set()

    def _per_component(self, adapters: AdapterSet) -> dict[str, list[tuple[dict[str, Layer], float]]]:
        """component -> [(layers, scale)] of the modules the set changes (those no output depends on left out)."""
        per_component: dict[str, list[tuple[dict[str, Layer], float]]] = {}
        for lora, scale in adapters.items:
            for component, layers in self._layers(lora).items():
                if component not in self.targets:  # a graph this pipeline does not run (unet where unet_control does)
                    continue
                used = {m: layer for m, layer in layers.items() if self.targets[component][m].layout != "unused"}
                if used:  # a component whose adapted modules no output depends on keeps the base's session
                    per_component.setdefault(component, []).append((used, scale))
        return per_component

    def _check_memory(self, per_component: Mapping) -> None:
        from sdrt.runtime.validation import BudgetError, available_memory

        # A session of its own per adapted component: about that graph's size again, plus the merged weights.
        need = sum(sum(f.bytes for f in self.manifest.components[c].files) for c in per_component)
        free = available_memory()
        if free is not None and need > free:
            raise BudgetError(
                f"loras: the adapter set needs sessions of its own for {', '.join(per_component)}, about "
                f"{need / 2**20:,.0f} MiB, the machine has {free / 2**20:,.0f} MiB available now (fewer cached "
                "adapter sets, LoraLimits.cached_sets, or fuse the adapters with `sdrt export --lora`)"
            )

    def _layers(self, lora: LoraFile) -> dict[str, dict[str, Layer]]:
        with self._lock:
            done = self._resolved.get(lora.sha256)
        if done is None:
            if not self._maps:
                raise LoraError(
                    f"lora {lora.name!r}: these artifacts have no LoRA map (exported before sdrt recorded one, int8 "
                    "graphs, or a folder from another exporter): re-export with `sdrt export`, or fuse the adapter "
                    "with `sdrt export --lora`"
                )
            files = {c: t for c, t in self._maps.items() if c not in self.SHARES_WEIGHTS}
            done = resolve(lora, files)
            for graph, part in self.SHARES_WEIGHTS.items():  # the same modules, by the same names, in another graph
                if part in done and graph in self.targets:
                    done[graph] = {m: layer for m, layer in done[part].items() if m in self.targets[graph]}
            with self._lock:
                self._resolved[lora.sha256] = done
        return done

    def sessions(self, adapters: AdapterSet) -> tuple[dict, dict]:
        """(component -> session for the adapted components, info): info has ``cached`` (bool) and
        ``seconds`` (the time to get them: merging and opening on a miss, ~0 on a hit)."""
        t0 = time.perf_counter()
        if not adapters.items:
            return {}, {"cached": True, "seconds": 0.0}
        key = adapters.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats["hits"] += 1
        if hit is not None:
            return hit, {"cached": True, "seconds": time.perf_counter() - t0}
        with self._build_lock:
            with self._lock:
                hit = self._cache.get(key)
            if hit is None:
                with self._lock:
                    # Room first: the least recently used sets go before the new one is built, so memory holds
                    # at most cached_sets sets at a time. Dropped, not closed: a call still running on them
                    # keeps them alive until it ends.
                    while self._cache and len(self._cache) >= max(self.limits.cached_sets, 1):
                        self._cache.popitem(last=False)
                hit = self._build(adapters)
                with self._lock:
                    self._cache[key] = hit
                    self.stats["builds"] += 1
                    self.stats["build_seconds"] += time.perf_counter() - t0
                return hit, {"cached": False, "seconds": time.perf_counter() - t0}
        return hit, {"cached": True, "seconds": time.perf_counter() - t0}

    def _build(self, adapters: AdapterSet) -> dict:
        per_component = self._per_component(adapters)
        self._check_memory(per_component)  # again: memory may have gone since the call was checked
        sessions = {}
        for component, items in per_component.items():
            targets = self.targets[component]
            names = {targets[m].initializer for layers, _ in items for m in layers}
            bases = read_base_weights(self.root, self.manifest.components[component].path, names)
            weights = merged_weights(bases, targets, items)
            del bases
            sessions[component] = self._open(component, weights)
        return sessions


def parse_cli_arg(text: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` (the CLI's ``--lora``) -> (path, scale); scale 1 when absent."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not path:
            raise LoraError(f"--lora: expected PATH[:SCALE], got {text!r}")
        if not math.isfinite(scale):
            raise LoraError(f"--lora {text!r}: expected a finite scale, got {tail!r}")
        return path, scale
    return text, 1.0


__all__ = [
    "AdapterSessions",
    "AdapterSet",
    "BASE",
    "Layer",
    "LoraError",
    "LoraFile",
    "LoraLimits",
    "RegisteredName",
    "Registry",
    "SdrtError",
    "Target",
    "load_file",
    "merged_weights",
    "parse",
    "parse_cli_arg",
    "read_base_weights",
    "read_safetensors",
    "resolve",
]

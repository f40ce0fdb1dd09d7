"""The measured choice of backend and compute precision for an artifact directory on this CPU.

On a CPU with AMX or AVX-512 BF16, bf16 (or int8) kernels can run a UNet step 2-3x faster than fp32,
and which backend and precision is fastest *and correct* depends on the CPU, the libraries'
versions and the model. ``sdrt engines`` measures every CPU backend in every precision it offers
here (``sdrt.export.choose``), checks each one's image against the fp32 reference, and records the
result in ``engines/cpu-choice_<isa>_<cpu>.json``. ``Pipeline.load(backend="auto")`` (the CLI's
default) reads it: the fastest candidate that passed, or the fastest one in the precision asked for.
Nothing is chosen silently: the pipeline's ``choice`` says what ran and why, and a record that no
longer fits (another CPU, library version or export) is ignored with the reason, falling back to
onnxruntime in fp32, which every machine runs.

A precision that failed its check on this CPU (non-finite values, or an image too far from fp32's)
is refused when asked for by name, with what the check found, rather than run to a NaN image.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime.errors import BackendError
from sdrt.runtime.manifest import Manifest

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
AUTO = "auto"
FALLBACK = ("onnxruntime", "fp32")  # runs everywhere: what "auto" means without a usable record
# A candidate passes when its image is finite and at most this many 8-bit levels from the fp32 reference's
# on average (bf16 on a real SD 1.5 moves a 512x512 image by ~1-3 levels; a broken kernel by tens).
MAX_MEAN_LEVELS = 8.0
# For int8 artifacts the reference is onnxruntime's int8 pipeline, itself ~5 levels (RMS) from fp32 on SD 1.5-shaped
# weights: another backend's int8 kernels round differently and land as far from fp32 in another direction, so two
# correct int8 implementations differ by up to about twice the quantization error (OpenVINO's measured 8.0-8.3).
MAX_MEAN_LEVELS_INT8 = 16.0


def max_mean_levels(manifest: Manifest) -> float:
    """The bound for these artifacts: looser when a graph is quantized (int8)."""
    quantized = any(c.precision == "int8" for c in manifest.components.values())
    return MAX_MEAN_LEVELS_INT8 if quantized else MAX_MEAN_LEVELS


@dataclass
class Candidate:
    """One backend in one compute precision, as measured on this CPU."""

    backend: str
    precision: str
    status: str  # "ok", "failed" (ran, but wrong or non-finite) or "error" (could not load or run)
    reason: str = ""  # why it failed, e.g. the first non-finite node; "" when ok
    load_s: float | None = None
    text_encoder_ms: float | None = None
    unet_step_ms: float | None = None
    vae_decode_ms: float | None = None
    estimate_s: float | None = None  # text encoder + steps x UNet step + VAE decode, at the measured size
    mean_levels: float | None = None  # mean |difference| from the fp32 reference image, in 8-bit levels
    max_levels: int | None = None
    runtime_precisions: dict = field(default_factory=dict)  # OpenVINO: nodes per precision they really ran in

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


@dataclass
class Choice:
    """The record ``sdrt engines`` writes: every candidate measured, and the one chosen."""

    cpu: dict  # model name, isa key, the notable flags
    versions: dict  # onnxruntime, openvino
    fingerprints: dict  # component -> the ONNX fingerprint measured
    measured: dict  # size, steps, batch, threads
    candidates: list[Candidate]
    chosen: str = ""  # "<backend> <precision>", or "" when none passed
    schema_version: int = SCHEMA_VERSION

    def passed(self, precision: str | None = None) -> list[Candidate]:
        """The candidates that passed, fastest first (by their estimated end-to-end time)."""
        ok = [c for c in self.candidates if c.status == "ok" and (precision is None or c.precision == precision)]
        return sorted(ok, key=lambda c: c.estimate_s if c.estimate_s is not None else float("inf"))

    def get(self, backend: str, precision: str) -> Candidate | None:
        return next((c for c in self.candidates if (c.backend, c.precision) == (backend, precision)), None)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Choice:
        fields = {k: v for k, v in data.items() if k != "candidates"}
        return cls(**fields, candidates=[Candidate(**c) for c in data["candidates"]])


def decide(candidates: list[Candidate]) -> str:
    """The chosen candidate's name: the fastest that passed; "" when none did."""
    ok = [c for c in candidates if c.status == "ok" and c.estimate_s is not None]
    return min(ok, key=lambda c: c.estimate_s).name if ok else ""  # type: ignore[arg-type, return-value]


# -- where the record lives, and whether it still fits ---------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "cpu"


def cpu_key() -> dict:
    """What the record is keyed by: the CPU's model name and the instruction sets the kernels depend on."""
    from sdrt.runtime.cpu_features import cpu_summary
    from sdrt.runtime.ort_cpu_engines import isa_key

    summary = cpu_summary()
    return {"model": summary["model"], "isa": isa_key(), "flags": summary["flags"]}


def record_path(root: Path, cpu: dict | None = None) -> Path:
    from sdrt.runtime.engine_cache import ENGINES_DIR

    cpu = cpu or cpu_key()
    return Path(root) / ENGINES_DIR / f"cpu-choice_{cpu['isa']}_{_slug(cpu['model'])[:40]}.json"


def library_versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("onnxruntime", "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def fingerprints(root: Path, manifest: Manifest) -> dict:
    from sdrt.runtime.engine_cache import onnx_fingerprint

    return {name: onnx_fingerprint(root, c) for name, c in sorted(manifest.components.items())}


def write(root: Path, choice: Choice) -> Path:
    path = record_path(root, choice.cpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(choice.to_json(), indent=2) + "\n")
    tmp.replace(path)
    return path


def read(root: Path, manifest: Manifest) -> tuple[Choice | None, str]:
    """This CPU's record for the artifacts, or None and why there is none that fits."""
    path = record_path(root)
    try:
        choice = Choice.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None, f"no measured choice for this CPU ({path.name}; `sdrt engines` measures one)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"{path} is unreadable ({e}; `sdrt engines` measures a new one)"
    if choice.schema_version != SCHEMA_VERSION:
        return None, f"{path.name} has schema {choice.schema_version}, expected {SCHEMA_VERSION} (`sdrt engines`)"
    if choice.versions != library_versions():
        return None, (
            f"{path.name} was measured with {choice.versions}, this environment has {library_versions()} "
            "(`sdrt engines` measures again)"
        )
    try:
        now = fingerprints(root, manifest)
    except (OSError, ValueError) as e:
        return None, f"cannot fingerprint the graphs ({e})"
    changed = sorted(name for name, fp in choice.fingerprints.items() if now.get(name) != fp)
    if changed:
        return None, f"{path.name}: {', '.join(changed)} re-exported since it was measured (`sdrt engines`)"
    return choice, ""


@dataclass(frozen=True)
class Resolved:
    backend: str
    precision: str
    why: str  # one line for logs and the CLI's timing line


def resolve(root: Path, manifest: Manifest, precision: str | None = None) -> Resolved:
    """What ``backend="auto"`` runs: the record's fastest passing candidate (in ``precision`` when given),
    or onnxruntime fp32 when there is no usable record, or no candidate in that precision passed."""
    choice, why_not = read(root, manifest)
    if choice is None:
        if precision not in (None, "fp32"):
            raise BackendError(
                f"backend auto with precision {precision!r}: expected a measured choice for this CPU, got none "
                f"({why_not}); name the backend, e.g. --backend openvino --precision {precision}"
            )
        log.info("backend auto: %s; onnxruntime fp32", why_not)
        return Resolved(*FALLBACK, f"onnxruntime fp32 ({why_not})")
    passed = choice.passed(precision)
    if not passed:
        if precision not in (None, "fp32"):
            tried = "; ".join(f"{c.name}: {c.status} {c.reason}".strip() for c in choice.candidates
                              if c.precision == precision) or "none measured"  # fmt: skip
            raise BackendError(
                f"backend auto with precision {precision!r}: expected a candidate in {precision} that passed on this "
                f"CPU, got none ({tried}); use precision fp32"
            )
        return Resolved(*FALLBACK, "onnxruntime fp32 (no candidate passed its check on this CPU)")
    best = passed[0]
    others = ", ".join(f"{c.name} {c.estimate_s:.1f} s" for c in choice.passed()[:4] if c is not best)
    size = choice.measured
    why = (
        f"{best.name}, measured fastest{f' in {precision}' if precision else ''} on this CPU by `sdrt engines` "
        f"({best.estimate_s:.1f} s for {size['steps']} steps at {size['height']}x{size['width']}"
        f"{'; ' + others if others else ''})"
    )
    return Resolved(best.backend, best.precision, why)


def refusal(root: Path, manifest: Manifest, backend: str, precision: str) -> str | None:
    """Why ``backend`` in ``precision`` must not run these artifacts here: it failed its check on this CPU
    (as recorded by ``sdrt engines``). None when it passed, or was never measured."""
    if precision == "fp32":
        return None  # the reference itself: never refused by a comparison with itself
    choice, _ = read(root, manifest)
    candidate = choice.get(backend, precision) if choice else None
    if candidate is None or candidate.status != "failed":
        return None
    return (
        f"{backend} {precision} failed its check on this CPU ({choice.cpu['model']}) when `sdrt engines` measured "  # type: ignore[union-attr]
        f"it: {candidate.reason}. Use precision fp32, or --backend auto for the fastest precision that passed"
    )

"""``sdrt engines``' measurement of every CPU backend in every precision it offers here: which is fastest,
and which is correct on this CPU.

Each candidate (onnxruntime fp32; OpenVINO fp32, bf16 and fp16 where the CPU plugin offers them) loads
the artifacts as a user would (its compiled-graph cache filled on the way, so the next load is fast),
generates one warm-up image and one timed image at the measured size with a fixed seed, and is
compared with onnxruntime fp32's image for the same seed. It passes when every output is finite and
the image is within ``MAX_MEAN_LEVELS`` of the reference on average (``MAX_MEAN_LEVELS_INT8`` for
int8 artifacts, whose reference is onnxruntime's own int8 pipeline). A candidate whose output turns
non-finite is located: on OpenVINO, the first node (in execution order) whose output is NaN or
infinite, from a compile with intermediate outputs. The record (``sdrt.runtime.choice``) keeps every
candidate's timings, error and reason; ``backend="auto"`` runs the fastest that passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdrt.runtime import backends
from sdrt.runtime import choice as choice_record
from sdrt.runtime.choice import Candidate, Choice
from sdrt.runtime.errors import NumericalError, SdrtError
from sdrt.runtime.manifest import Manifest

log = logging.getLogger(__name__)

PROMPT = "a photograph of an astronaut riding a horse"
SEED = 1234
GUIDANCE = 7.5


class LastFeed:
    """Wraps a session and keeps its last feed: the input to re-run when an output turns non-finite."""

    def __init__(self, inner):
        self.inner = inner
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs
        self.feed: dict[str, np.ndarray] | None = None

    def run(self, feed):
        self.feed = feed
        return self.inner.run(feed)

    def close(self) -> None:
        self.inner.close()


def cpu_candidates() -> list[tuple[str, str]]:
    """(backend, precision) of every CPU backend usable here, in every precision it offers; fp32 first."""
    out = []
    for record in backends.BACKENDS.values():
        if record.device != "cpu" or record.unavailable_reason() is not None:
            continue
        out += [(record.name, p) for p in record.precisions()]
    return sorted(out, key=lambda bp: (bp != choice_record.FALLBACK, bp[1] != "fp32"))


def measure_choice(
    root: Path,
    height: int,
    width: int,
    steps: int = 20,
    measure_steps: int = 2,
    threads: int = 0,
    candidates: list[tuple[str, str]] | None = None,
    progress: Callable[[str], None] = print,
) -> Choice:
    """Measure ``candidates`` (default: every CPU backend and precision here) on the artifacts at
    ``height`` x ``width`` (one image, guided), estimate each one's time for ``steps`` steps, check each
    against onnxruntime fp32, and write the record. Returns it."""
    from sdrt.runtime.pipeline import Pipeline

    root = Path(root)
    manifest = Manifest.load(root)
    choice_record.record_path(root).unlink(missing_ok=True)  # measured afresh: no earlier verdict refuses a candidate
    asked = candidates or cpu_candidates()
    if asked[0] != choice_record.FALLBACK:
        asked = [choice_record.FALLBACK, *(c for c in asked if c != choice_record.FALLBACK)]
    reference: np.ndarray | None = None
    measured: list[Candidate] = []
    for backend, precision in asked:
        progress(f"measuring {backend} {precision} ({height}x{width}, {measure_steps} steps after a warm-up)")
        candidate = Candidate(backend, precision, "error")
        try:
            t0 = time.perf_counter()
            pipe = Pipeline.load(root, backend=backend, precision=precision, threads=threads, verify_hashes=False)
            candidate.load_s = time.perf_counter() - t0
        except SdrtError as e:
            candidate.reason = f"could not load: {e}"
            measured.append(candidate)
            progress(f"  {candidate.name}: {candidate.reason}")
            continue
        try:
            recorders = {name: LastFeed(s) for name, s in pipe.sessions.items()}
            pipe.sessions.update(recorders)
            candidate.runtime_precisions = _runtime_precisions(pipe)
            call = dict(height=height, width=width, guidance_scale=GUIDANCE, seed=SEED)
            pipe(PROMPT, num_inference_steps=1, **call)  # warm-up: first calls allocate and pick kernels
            result = pipe(PROMPT, num_inference_steps=measure_steps, **call)
            t = result.timings
            candidate.text_encoder_ms = 1e3 * t["text_encoder"]
            candidate.unet_step_ms = 1e3 * float(np.median(t["unet_calls"]))
            candidate.vae_decode_ms = 1e3 * t["vae_decoder"]
            candidate.estimate_s = (candidate.text_encoder_ms + steps * candidate.unet_step_ms
                                    + candidate.vae_decode_ms) / 1e3  # fmt: skip
            image = result.images[0]
            if reference is None:
                reference = image
            diff = np.abs(image.astype(np.int16) - reference.astype(np.int16))
            candidate.mean_levels, candidate.max_levels = float(diff.mean()), int(diff.max())
            bound = choice_record.max_mean_levels(manifest)
            if candidate.mean_levels > bound:
                candidate.status = "failed"
                candidate.reason = (
                    f"its image is {candidate.mean_levels:.1f} levels from onnxruntime fp32's on average (max "
                    f"{candidate.max_levels}), expected at most {bound:g}"
                )
            else:
                candidate.status = "ok"
        except NumericalError as e:
            candidate.status = "failed"
            candidate.reason = str(e) + _locate(root, manifest, backend, precision, threads, recorders, str(e))
        except SdrtError as e:
            candidate.reason = f"could not run: {e}"
        finally:
            pipe.close()
        measured.append(candidate)
        progress("  " + describe(candidate))
    record = Choice(
        cpu=choice_record.cpu_key(),
        versions=choice_record.library_versions(),
        fingerprints=choice_record.fingerprints(root, manifest),
        measured={
            "height": height,
            "width": width,
            "steps": steps,
            "measured_steps": measure_steps,
            "batch": 1,
            "guidance_scale": GUIDANCE,
            "threads": threads,
        },  # fmt: skip
        candidates=measured,
        chosen=choice_record.decide(measured),
    )
    path = choice_record.write(root, record)
    progress(f"backend auto runs {record.chosen or 'onnxruntime fp32 (no candidate passed)'} here (recorded in {path})")
    return record


def up_to_date(root: Path, height: int, width: int) -> Choice | None:
    """This CPU's record when it fits the artifacts, libraries and size: nothing to measure again."""
    record, _ = choice_record.read(Path(root), Manifest.load(Path(root), verify_hashes=False))
    if record is None or (record.measured.get("height"), record.measured.get("width")) != (height, width):
        return None
    return record


def describe(c: Candidate) -> str:
    if c.status != "ok":
        return f"{c.name}: {c.status}: {c.reason}"
    return (
        f"{c.name}: UNet step {c.unet_step_ms:,.0f} ms, text {c.text_encoder_ms:,.0f} ms, VAE decode "
        f"{c.vae_decode_ms:,.0f} ms, est. {c.estimate_s:.1f} s end to end; image {c.mean_levels:.2f} levels from "
        f"fp32 on average (max {c.max_levels}); load {c.load_s:.1f} s"
    )


def _runtime_precisions(pipe) -> dict:
    """OpenVINO: per component, how many nodes really ran in each precision (the compiled model's view)."""
    out = {}
    for name, session in pipe.sessions.items():
        inner = getattr(session, "inner", session)
        counts = getattr(inner, "runtime_precisions", None)
        if callable(counts):
            out[name] = counts()
    return out


def _locate(root: Path, manifest: Manifest, backend: str, precision: str, threads: int, recorders, error: str) -> str:
    """Where the first non-finite value came from (OpenVINO), as a sentence to append to the reason."""
    name = error.split(" ", 1)[0]
    recorder = recorders.get(name)
    if backend != "openvino" or recorder is None or recorder.feed is None or name not in manifest.components:
        return ""
    from sdrt.runtime.openvino_backend import first_nonfinite
    from sdrt.runtime.session import to_graph_feed

    component = manifest.components[name]
    names = {s.name: component.graph_names.get(s.name, s.name) for s in component.inputs}
    try:
        feed = to_graph_feed(name, names, set(component.scalar_inputs), recorder.feed)
        found = first_nonfinite(root / component.path, feed, precision, threads)
    except SdrtError as e:
        return f"; locating the first non-finite node failed: {e}"
    return f"; {found}"

"""``sdrt bench``: latency per component, per step and end to end, beside diffusers in the same run.

Every implementation runs in a process of its own (``worker.py``; optimum's in its own environment,
``optimum_worker.py``), so load time, resident memory after load and peak memory are each one's
own. The sdrt variants are every requested artifact directory (e.g. fp32 and its int8 copy) on
every backend in every compute precision; a combination this machine or backend lacks becomes a
row saying why instead of metrics. For every batch, image size and step count all of them, after
warming up until steady, run in interleaved rounds: each sdrt variant once, then each baseline
(diffusers/PyTorch; optimum) once. Each sdrt run is paired with the baseline runs of its round, so
machine noise that hits a round cancels in its ratios; the report gives the median ratio and its
spread. Once per bench run a large fp32 MatMul measures what this machine achieves (and bf16 where
OpenVINO has it), and each row gives its UNet's FLOP/s as a fraction of that. Rows are
self-describing (device, machine, versions, model, precisions, shapes, steps, scheduler) and appended
to ``benchmarks/results/<device>.jsonl``; ``sdrt bench report`` merges files from many machines into
one table and chart.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.benchmarks import matmul
from sdrt.benchmarks.devices import cpu_name, device_info, device_key  # noqa: F401 - cpu_name: re-exported
from sdrt.benchmarks.worker import RunTimes
from sdrt.runtime import backends
from sdrt.runtime.cpu_features import cpu_summary
from sdrt.runtime.errors import BackendError, InputError
from sdrt.runtime.families import sizes
from sdrt.runtime.manifest import Manifest

log = logging.getLogger(__name__)

ROW_SCHEMA = 2  # 2: one process per implementation, rows per backend and precision, the machine's matmul rate
RESULTS_DIR = Path(__file__).resolve().parent / "results"
STEADY = 0.05  # warm-up ends when two consecutive runs differ by less than this fraction
MAX_WARMUPS = 8


# -- statistics and the machine --------------------------------------------------------------------
def stats(samples: list[float]) -> dict:
    """Median, p10/p90, min/max, mean and the spread ((p90 - p10) / median) of ``samples``."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p10, med, p90 = (float(np.percentile(a, q)) for q in (10, 50, 90))
    return {
        "n": int(a.size),
        "median": med,
        "p10": p10,
        "p90": p90,
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
        "spread": (p90 - p10) / med if med else 0.0,
    }


# The machine's identity lives in devices.py; these names stay importable from here (load.py uses them).
device_slug = device_key  # the results file's name: <device_key>.jsonl


def denoiser_of(manifest: Manifest):
    """The component the loop calls every step (a UNet, or SD 3's transformer): what "UNet step" rows measure."""
    return manifest.components[manifest.model_family.denoiser]


def results_file(results_dir: Path, device: dict) -> Path:
    """Where rows measured on ``device`` are appended: one file per device key."""
    return Path(results_dir) / f"{device_key(device)}.jsonl"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for tool in ("sdrt", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "torch", "diffusers", "numpy"):
        try:
            out[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class Case:
    batch: int
    height: int
    width: int
    steps: int


# -- the implementations, one process each ---------------------------------------------------------
LOAD_TIMEOUT_S = 1800.0  # compiling SD 1.5 for a backend takes minutes on a small CPU; beyond this, a hang
RUN_TIMEOUT_BASE_S = 300.0  # per run request: this, plus ...
RUN_TIMEOUT_PER_STEP_S = 60.0  # ... this per denoising step of one 512x512 image (scaled by batch and pixels)


def run_timeout(case: Case) -> float:
    """How long one run of ``case`` may take before its worker counts as hung: generous (tens of times
    a slow CPU's time) because it only exists to turn a hang into an error."""
    units = case.batch * case.steps * case.height * case.width / (512 * 512)
    return RUN_TIMEOUT_BASE_S + RUN_TIMEOUT_PER_STEP_S * units


class Worker:
    """One implementation in its own process (``worker.py``; ``optimum_worker.py`` in optimum's
    environment), answering run requests in JSON lines. Every read has a deadline, and a worker that
    dies, errs or overruns raises an sdrt error naming the implementation, never a hang."""

    def __init__(self, name: str, command: list[str], load_timeout: float = LOAD_TIMEOUT_S):
        self.name = name
        self._tmp = tempfile.TemporaryDirectory(prefix="sdrt-bench-")
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")  # noqa: SIM115 - closed in close()
        log.debug("starting %s: %s", name, " ".join(command))
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name=f"bench-{name}", daemon=True).start()
        try:
            self.hello = self._read(load_timeout, "loading")
        except BaseException:
            self.close()
            raise
        self.last_reply: dict = {}

    def _pump(self) -> None:
        assert self._proc.stdout
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _read(self, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._proc.kill()
                raise BackendError(
                    f"bench: {self.name}: expected an answer to {what} within {timeout:.0f} s, got none; the worker "
                    f"was stopped{self._stderr_tail()}"
                ) from None
            if line is None:
                code = self._proc.wait(timeout=10)
                raise BackendError(
                    f"bench: {self.name}: the worker ended (exit code {code}) during {what}{self._stderr_tail()}"
                )
            if line.lstrip().startswith("{"):  # anything else is a library's chatter, not a reply
                break
        reply = json.loads(line)
        if "error" in reply:
            error = InputError if reply.get("type") == "InputError" else BackendError
            raise error(f"bench: {self.name}: {what} failed: {reply.get('type', 'error')}: {reply['error']}")
        return reply

    def _stderr_tail(self, lines: int = 15) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        tail = self._stderr.read().strip().splitlines()[-lines:]
        return "; its last output:\n" + "\n".join(tail) if tail else " (it wrote nothing to stderr)"

    def run(self, case: Case, args: tuple) -> RunTimes:
        prompts, height, width, steps, guidance, latents, *control = args
        path = Path(self._tmp.name) / "latents.npy"
        np.save(path, latents)
        request = {
            "prompts": list(prompts),
            "height": height,
            "width": width,
            "steps": steps,
            "guidance": guidance,
            "latents": str(path),
        }
        if control and control[0]:  # a PNG path: the image every ControlNet of the worker gets
            request["control_image"] = str(control[0])
        what = f"a run of batch {case.batch} {case.height}x{case.width} {case.steps} steps"
        try:
            assert self._proc.stdin
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:  # a dead worker's closed pipe: its end of output, and its stderr, say why
            self._read(10.0, what)
            raise BackendError(f"bench: {self.name}: the worker stopped reading requests") from None
        self.last_reply = r = self._read(run_timeout(case), what)
        return RunTimes(
            r["total"],
            r["text_encoder"],
            r["vae_decoder"],
            r["unet_calls"],
            r["step_walls"],
            r.get("scheduler_steps", []),
            r.get("lora_s"),
            r.get("lora_cached"),
            r.get("control_calls", []),
        )

    def memory(self) -> dict:
        """This implementation's own load time and memory, from its hello line and its latest reply."""
        return {
            "load_s": self.hello.get("load_s"),
            "rss_after_load_bytes": self.hello.get("rss_after_load_bytes"),
            "peak_rss_bytes": self.last_reply.get("peak_rss_bytes"),
        }

    def close(self) -> None:
        try:
            if self._proc.stdin:
                self._proc.stdin.close()
            self._proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            self._stderr.close()
            self._tmp.cleanup()


def _worker_command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "sdrt.benchmarks.worker", json.dumps(spec)]


@dataclass(frozen=True)
class Variant:
    """One sdrt configuration under test: an artifact directory on a backend in a compute precision."""

    artifacts: Path
    backend: str
    precision: str  # compute precision
    tag: str = ""  # the artifact directory's name, when several are measured
    # LoRA adapter sets used in turn, one per call (sets of (path, scale)): none for the base model.
    lora_sets: tuple[tuple[tuple[str, float], ...], ...] = ()
    lora_mode: str = ""  # "base", "one" or "switching" when the bench measures adapters
    controlnets: tuple[Path, ...] = ()  # ControlNet artifact directories run on every call

    @property
    def name(self) -> str:
        lora = f"lora:{self.lora_mode}" if self.lora_mode else ""
        control = "controlnet" if self.controlnets else ""
        return " ".join(filter(None, ("sdrt", self.backend, self.precision, self.tag, lora, control)))

    def start(self, threads: int, scheduler: str | None) -> Worker:
        spec = {
            "implementation": "sdrt",
            "artifacts": str(self.artifacts.absolute()),
            "backend": self.backend,
            "precision": self.precision,
            "threads": threads,
            "scheduler": scheduler,
            "lora_sets": [list(map(list, one)) for one in self.lora_sets],
            "controlnets": [str(Path(c).absolute()) for c in self.controlnets],
        }
        return Worker(self.name, _worker_command(spec))


# What each LoRA row runs: the base model, one adapter set on every call, or a change of set on every call.
LORA_MODES = ("base", "one", "switching")


def lora_variants(
    variant: Variant, loras: tuple[tuple[str, float], ...], modes: tuple[str, ...] = LORA_MODES
) -> list[Variant]:
    """``variant`` once per mode over ``loras`` (files with scales): the base model; the first file on every
    call ("one"); and, on every call, the other set than the call before ("switching": the first file,
    then the second, in turn; with a single file, that file and the base model in turn)."""
    if not loras:
        return [variant]
    unknown = [m for m in modes if m not in LORA_MODES]
    if unknown or not modes:
        raise InputError(f"--lora-modes: expected some of {', '.join(LORA_MODES)}, got {', '.join(modes) or 'none'}")
    first = (tuple(loras[0]),)
    second = (tuple(loras[1]),) if len(loras) > 1 else ()
    sets = {"base": (), "one": (first,), "switching": (first, second)}
    return [replace(variant, lora_sets=sets[mode], lora_mode=mode) for mode in LORA_MODES if mode in modes]


CONTROLLED = " controlnet"  # a diffusers worker's name ends in it when its pipeline has ControlNets
MISSING_BACKEND = "unknown"


def start_diffusers(
    source: Path,
    threads: int,
    scheduler: str | None,
    device: str = "cpu",
    dtype: str = "fp32",
    controlnets: tuple[Path, ...] = (),
    name: str = "diffusers",
) -> Worker:
    """diffusers/PyTorch on the CPU in fp32 or bf16, or on ``device`` (e.g. "cuda") in ``dtype`` (e.g. "fp16");
    with ``controlnets`` (ControlNetModel folders), diffusers' ControlNet pipeline for the model."""
    spec = {"implementation": "diffusers", "folder": str(source.absolute()), "threads": threads, "scheduler": scheduler}
    if (device, dtype) != ("cpu", "fp32"):
        spec |= {"device": device, "dtype": dtype}
    if controlnets:
        spec["controlnets"] = [str(Path(c).absolute()) for c in controlnets]
    worker = Worker(name + CONTROLLED if controlnets else name, _worker_command(spec))
    ran = (worker.hello.get("device", "cpu"), worker.hello.get("dtype", "fp32"))
    if ran != (device, dtype):
        worker.close()
        raise BackendError(
            f"bench: diffusers: expected the baseline on {device} in {dtype}, the worker ran it on {ran[0]} in "
            f"{ran[1]} (benchmarks/worker.py's DiffusersRunner must take the spec's device and dtype and name "
            "them in its hello)"
        )
    return worker


def start_optimum(folder: Path, python: Path, threads: int) -> Worker:
    """optimum's ORTStableDiffusionPipeline in optimum's own environment (``optimum_worker.py``)."""
    if not Path(python).is_file():
        raise InputError(
            f"optimum baseline: expected the Python of optimum's environment at {python}, found none "
            "(`make .venv-optimum/.installed` makes one)"
        )
    script = Path(__file__).with_name("optimum_worker.py")
    return Worker("optimum", [str(python), str(script), str(Path(folder).absolute()), str(threads)])


# -- one benchmark configuration ------------------------------------------------------------------
def warm_up(run: Callable[[], RunTimes], minimum: int) -> int:
    """Run until two consecutive end-to-end times agree within STEADY (onnxruntime needs more than
    one run before a large UNet call settles); return how many runs it took."""
    last = None
    for n in range(1, MAX_WARMUPS + 1):
        total = run().total
        if n >= minimum and last is not None and abs(total - last) <= STEADY * min(total, last):
            return n
        last = total
    return MAX_WARMUPS


def metrics(runs: list[RunTimes], batch: int) -> dict:
    calls = [c for r in runs for c in r.unet_calls]
    walls = [w for r in runs for w in r.step_walls]
    overhead = [o for r in runs for o in r.overhead]
    control = [c for r in runs for c in r.control_calls]
    out = {
        "end_to_end_s": stats([r.total for r in runs]),
        "images_per_s": stats([batch / r.total for r in runs]),
        "text_encoder_ms": stats([1e3 * r.text_encoder for r in runs]),
        "unet_step_ms": stats([1e3 * c for c in calls]),
        "step_wall_ms": stats([1e3 * w for w in walls]),
        "overhead_per_step_ms": stats([1e3 * o for o in overhead]),
        "overhead_fraction": stats([o / w for o, w in zip(overhead, walls) if w > 0]),
        "vae_decode_ms": stats([1e3 * r.vae_decoder for r in runs]),
    }
    lora = [r.lora_s for r in runs if r.lora_s is not None]
    if lora:  # getting each call's adapter sessions (the switch, when the set changed): cached after first use
        out["lora_ms"] = stats([1e3 * x for x in lora])
    schedule = [s for r in runs for s in r.scheduler_steps]
    if schedule:
        out["scheduler_step_ms"] = stats([1e3 * s for s in schedule])
    if control:  # each step's ControlNet calls, summed over the ControlNets
        out["controlnet_step_ms"] = stats([1e3 * c for c in control])
    return out


def ratios(ours: list[RunTimes], base: list[RunTimes]) -> dict:
    """Per interleaved pair: our time / the baseline's, per component and end to end."""
    pairs = list(zip(ours, base))
    return {
        "end_to_end": stats([a.total / b.total for a, b in pairs]),
        "unet_step": stats([float(np.median(a.unet_calls) / np.median(b.unet_calls)) for a, b in pairs]),
        "step_wall": stats(
            [
                float(np.median(a.step_walls) / np.median(b.step_walls))
                for a, b in pairs
                if a.step_walls and b.step_walls
            ]
        ),  # fmt: skip
        "text_encoder": stats([a.text_encoder / b.text_encoder for a, b in pairs if b.text_encoder]),
        "vae_decode": stats([a.vae_decoder / b.vae_decoder for a, b in pairs if b.vae_decoder]),
    }


@dataclass
class BenchConfig:
    artifacts: Path | tuple[Path, ...]  # one or more artifact directories of the same model (e.g. fp32 and int8)
    backends: tuple[str, ...] | None = None  # None: every backend available here
    precisions: tuple[str, ...] | None = None  # compute precisions; None: fp32 and every other one sdrt knows
    batches: tuple[int, ...] = (1,)
    sizes: tuple[tuple[int, int], ...] = ((256, 256),)
    steps: tuple[int, ...] = (20,)
    runs: int = 5
    warmups: int = 2
    guidance: float = 7.5
    scheduler: str | None = None
    threads: int = 0
    baseline: bool = True
    peak_tflops: float | None = None  # the device's peak, for the fraction achieved
    # Exactly these (artifacts, backend, compute precision) instead of every artifacts x backend x precision.
    variants: tuple[tuple[Path, str, str], ...] | None = None
    baseline_device: str = "cpu"  # where diffusers runs: "cpu", or "cuda" beside GPU backends
    baseline_dtype: str = "fp32"  # its torch dtype: fp32, or fp16 on a GPU
    # More diffusers baselines in other torch dtypes, each in its own process, e.g. ("bf16",): PyTorch bf16 on a CPU
    # with AMX or AVX-512 BF16 (where the CPU lacks them, a row saying why instead).
    baseline_dtypes: tuple[str, ...] = ()
    optimum_folder: Path | None = None  # an optimum export of the same model: optimum's pipeline as a baseline
    optimum_python: Path = Path(".venv-optimum/bin/python")
    # LoRA files (path, scale): each sdrt variant is measured as the base model, with the first file, and
    # switching sets on every call (LORA_MODES).
    loras: tuple[tuple[str, float], ...] = ()
    lora_modes: tuple[str, ...] = LORA_MODES  # e.g. ("base", "switching"): fewer processes, less memory at once
    # ControlNet artifact directories (sdrt export --controlnet): every variant, and diffusers, is measured without
    # and with them (plain and controlled calls of one process, two rows) on a control image at the case's size,
    # in the same rounds.
    controlnets: tuple[Path, ...] = ()
    prompt: str = "a photograph of an astronaut riding a horse"
    results_dir: Path = RESULTS_DIR
    matmul_size: int = matmul.SIZE  # the square MatMul that measures the machine's achievable rate
    matmul_budget_s: float = matmul.BUDGET_S

    def artifact_dirs(self) -> tuple[Path, ...]:
        return (Path(self.artifacts),) if isinstance(self.artifacts, (str, Path)) else tuple(map(Path, self.artifacts))

    def compute_precisions(self) -> tuple[str, ...]:
        return self.precisions or ("fp32", *(p for p in backends.COMPUTE_PRECISIONS if p != "fp32"))


def available_backends() -> list[str]:
    return backends.available()


def plan(config: BenchConfig) -> tuple[list[Variant], list[tuple[Variant, str]]]:
    """Every (artifacts, backend, compute precision) asked for: those this machine runs, and those it
    does not with the BackendError that says why."""
    dirs = config.artifact_dirs()
    if config.variants is not None:
        asked = [(Path(a), b, p) for a, b, p in config.variants]
    else:
        backends_asked = config.backends or available_backends()
        asked = [(a, b, p) for a in dirs for b in backends_asked for p in config.compute_precisions()]
    runnable, unsupported = [], []
    for artifacts, backend, precision in asked:
        variant = Variant(artifacts, backend, precision, artifacts.name if len(dirs) > 1 else "")
        try:
            backends.check_usable(backends.get(backend), precision)
        except BackendError as e:
            unsupported.append((variant, str(e)))
        else:
            # with ControlNets, one process per variant serves its plain and its controlled calls (two rows)
            runnable += [replace(one, controlnets=tuple(config.controlnets))
                         for one in lora_variants(variant, config.loras, config.lora_modes)]  # fmt: skip
    return runnable, unsupported


def _same_model(dirs: tuple[Path, ...]) -> dict[Path, Manifest]:
    # Hashes are checked by each worker's Pipeline.load; here only the layout is read.
    manifests = {d: Manifest.load(d, verify_hashes=False) for d in dirs}
    sources = {d: (m.family, m.source.get("path")) for d, m in manifests.items()}
    if len(set(sources.values())) > 1:
        raise InputError(
            f"--artifacts: expected directories of one model (e.g. fp32 and its `sdrt quantize` copy), got "
            f"{', '.join(f'{d} ({family}, from {src})' for d, (family, src) in sources.items())}"
        )
    return manifests


def run_benchmark(config: BenchConfig, progress=print) -> list[dict]:
    """Measure every case on every sdrt variant (and the baselines); append the rows; return them."""
    manifests = _same_model(config.artifact_dirs())
    manifest = next(iter(manifests.values()))
    source = Path(manifest.source.get("path", ""))
    if config.baseline and not (source / "model_index.json").is_file():
        raise InputError(
            f"baseline: expected the diffusers folder the artifacts were exported from at {source}, found none "
            "(pass --no-baseline, or re-export from a local folder)"
        )
    # Each LoRA file read and hashed once per run, before any worker starts (an unreadable one stops the run).
    loras = {path: _describe_lora(path) for path, _ in config.loras}
    controlnets = _check_controlnets(config, manifests)
    threads = config.threads or len(os.sched_getaffinity(0))
    variants, unsupported = plan(config)
    for variant, reason in unsupported:
        progress(f"{variant.name}: not measured: {reason}")
    for name, _, reason in _baselines(config):
        if reason:
            progress(f"{name}: not measured: {reason}")
    progress(f"measuring the machine's matmul rate ({config.matmul_size}^3, {threads} threads)")
    machine = {"cpu": cpu_summary(), "matmul": matmul.measure(threads, config.matmul_size, config.matmul_budget_s)}
    progress(f"matmul: {_matmul_line(machine['matmul'])}")
    gpu = next((v.backend for v in variants if backends.get(v.backend).device == "gpu"), None)
    if gpu is None and config.baseline and config.baseline_device != "cpu":
        gpu = "tensorrt"  # the GPU the baseline runs on names the file (CUDA device 0, as for the backends)
    context = Context(config, manifests, machine, threads, device_info(gpu or "onnxruntime"), loras, controlnets)
    ours: dict[Variant, Worker] = {}
    baselines: list[Worker] = []
    # What failed to load: a row each per case, with the error; the others are measured all the same.
    failed: list[Failure] = []
    try:
        for variant in variants:
            worker = _start(
                lambda v=variant: v.start(threads, config.scheduler), variant.name, failed, progress, variant=variant
            )
            if worker is not None:
                ours[variant] = worker
        # with ControlNets, diffusers' ControlNet pipeline and the model's own pipeline on the same modules, in one
        # process (two rows)
        folders = tuple(Path(c["source"]) for c in controlnets)
        for name, dtype in _baseline_dtypes(config):
            worker = _start(
                lambda d=dtype, n=name: start_diffusers(
                    source, threads, config.scheduler, config.baseline_device, d, folders, name=n
                ),
                name,
                failed,
                progress,
                {"backend": "pytorch", "precision": dtype},
            )
            if worker is not None:
                baselines.append(worker)
        if config.optimum_folder:
            worker = _start(
                lambda: start_optimum(config.optimum_folder, config.optimum_python, threads),
                "optimum",
                failed,
                progress,
                {"backend": "onnxruntime", "precision": "fp32"},
            )
            if worker is not None:
                baselines.append(worker)
        rows = []
        for case in _cases(config):
            case_rows = _measure(context, ours, baselines, case, progress)
            case_rows += [_unsupported_row(context, case, v, reason) for v, reason in unsupported]
            case_rows += [_failed_row(context, case, f) for f in failed]
            case_rows += [
                _baseline_unsupported_row(context, case, name, dtype, why)
                for name, dtype, why in _baselines(config)
                if why
            ]
            _append(context, case_rows, progress)
            rows += case_rows
    finally:
        for worker in [*ours.values(), *baselines]:
            worker.close()
    return rows


def check_measured(rows: list[dict]) -> None:
    """BackendError when no row of a bench run holds measurements: every implementation failed or was
    unsupported. A run that measured anything is a success, its failed rows saying what failed and why."""
    if any("metrics" in r for r in rows):
        return
    reasons = [f"{_row_name(r)}: {r.get('failed') or r.get('unsupported')}" for r in rows]
    raise BackendError(
        "bench: expected at least one implementation measured, got none"
        + (":\n" + "\n".join(dict.fromkeys(reasons)) if reasons else " (nothing was asked for)")
    )


def _row_name(row: dict) -> str:
    return " ".join(str(x) for x in (row.get("implementation"), row.get("backend"), row.get("precision")) if x)


@dataclass(frozen=True)
class Failure:
    """An implementation that failed during a bench run: at load (then for every case), or in one case's
    warm-up or rounds (for that case; the next case tries it again, unless its worker is gone)."""

    name: str
    phase: str  # "load", "warm-up" or "run N"
    error: str
    variant: Variant | None = None  # an sdrt variant's configuration; None for a baseline
    fields: dict = field(default_factory=dict, compare=False)  # a baseline's backend and precision


def _start(
    start: Callable[[], Worker], name: str, failed: list[Failure], progress, fields: dict | None = None,
    variant: Variant | None = None,
):  # fmt: skip
    """The started worker; None, with a Failure appended, when loading it raised an sdrt error."""
    try:
        return _started(start(), progress)
    except (BackendError, InputError) as e:
        progress(f"{name}: failed to load, recorded as a failed row: {e}")
        failed.append(Failure(name, "load", str(e), variant, fields or {}))
        return None


def _baseline_dtypes(config: BenchConfig) -> list[tuple[str, str]]:
    """(worker name, torch dtype) of each diffusers baseline this machine runs: the configured one, then
    the extra dtypes."""
    return [(name, dtype) for name, dtype, reason in _baselines(config) if reason is None]


def _baselines(config: BenchConfig) -> list[tuple[str, str, str | None]]:
    """(worker name, torch dtype, why it does not apply here or None) of each diffusers baseline asked for."""
    if not config.baseline:
        return []
    dtypes = [config.baseline_dtype, *(d for d in config.baseline_dtypes if d != config.baseline_dtype)]
    return [(baseline_name(config, d), d, baseline_unsupported(config.baseline_device, d)) for d in dtypes]


def baseline_name(config: BenchConfig, dtype: str) -> str:
    """ "diffusers" for the baseline in fp32 (or in the dtype of a GPU baseline), "diffusers <dtype>" for the others."""
    plain = dtype == "fp32" or (dtype == config.baseline_dtype and config.baseline_device != "cpu")
    return "diffusers" if plain else f"diffusers {dtype}"


def baseline_unsupported(device: str, dtype: str) -> str | None:
    """Why diffusers in ``dtype`` on ``device`` is no baseline here (None: it is): bf16 on a CPU without bf16
    instructions runs emulated, far slower than fp32 there, which no PyTorch user would choose."""
    from sdrt.runtime.cpu_features import BF16_FLAGS, cpu_summary, has_bf16

    if device == "cpu" and dtype == "bf16" and not has_bf16():
        return (
            f"PyTorch bf16 is no baseline on this CPU ({cpu_summary()['model']}): it has none of "
            f"{', '.join(BF16_FLAGS)}, so bf16 matmuls and convolutions are emulated, slower than fp32"
        )
    if device == "cpu" and dtype == "fp16":
        return "PyTorch fp16 on a CPU is no baseline: its kernels are emulated or missing; use fp32 or bf16"
    return None


def _check_controlnets(config: BenchConfig, manifests: dict[Path, Manifest]) -> list[dict]:
    """What the rows say of each ControlNet, after checking it fits every artifact directory (which must have
    unet_control) and, for the baseline, that the ControlNetModel folder it was exported from is here."""
    from sdrt.runtime.controlnet import ControlNetManifest

    out = []
    for folder in config.controlnets:
        cn = ControlNetManifest.load(Path(folder), verify_hashes=False)
        for root, manifest in manifests.items():
            cn.check_fits(manifest, where=f"--controlnets {folder}")
            if "unet_control" not in manifest.components:
                raise InputError(
                    f"--controlnets: expected the UNet taking ControlNet residuals (unet_control) in {root}, found "
                    "none (re-export the model with `sdrt export --controlnet-unet`)"
                )
        source = Path(cn.source.get("path") or "")
        if config.baseline and not (source / "config.json").is_file():
            raise InputError(
                f"--controlnets: expected the ControlNetModel folder {folder} was exported from at {source}, found "
                "none (it is diffusers' baseline; pass --no-baseline, or re-export from a local folder)"
            )
        out.append({"path": str(folder), "source": str(source), "family": cn.family,
                    "parameters_bytes": sum(f.bytes for g in cn.graphs for f in g.files)})  # fmt: skip
    return out


def _control_image(folder: Path, height: int, width: int) -> Path:
    """A deterministic control image at the case's size: edges of discs and bars, as a Canny map would give."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    edges = np.zeros((height, width), bool)
    for k, (cy, cx, r) in enumerate(((0.4, 0.35, 0.22), (0.65, 0.7, 0.15), (0.3, 0.8, 0.1))):
        d = np.hypot(y - cy * height, x - cx * width)
        edges |= np.abs(d - r * min(height, width)) < 1.5
        edges |= (np.abs(x - (0.15 + 0.3 * k) * width) < 1) & (y > height * 0.7)
    path = Path(folder) / f"control-{height}x{width}.png"
    Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[:, :, None], 3, axis=2)).save(path)
    return path


def _started(worker: Worker, progress) -> Worker:
    m = worker.memory()
    progress(
        f"{worker.name}: loaded in {m['load_s']:.1f} s, {(m['rss_after_load_bytes'] or 0) / 2**20:.0f} MiB resident"
    )
    return worker


def _matmul_line(rates: dict) -> str:
    return ", ".join(
        f"{name} {r['gflops']:.0f} GFLOP/s ({r['engine']})" if "gflops" in r else f"{name} not measured"
        for name, r in rates.items()
    )


def _cases(config: BenchConfig) -> list[Case]:
    return [Case(b, h, w, s) for b in config.batches for h, w in config.sizes for s in config.steps]


@dataclass
class Context:
    """What every row of one bench run shares."""

    config: BenchConfig
    manifests: dict[Path, Manifest]
    machine: dict
    threads: int
    device: dict  # the machine's: its GPU when a GPU backend is measured; names the results file
    loras: dict = field(default_factory=dict)  # LoRA file path -> what the rows say of it (_describe_lora)
    controlnets: list = field(default_factory=list)  # what the rows say of each ControlNet (_check_controlnets)

    def flops_graph(self) -> Path:
        """The UNet graph FLOPs are counted on: an fp32 one when measured (every variant is the same
        model; a quantized graph's integer ops would count differently), else the first."""
        fp32 = [d for d, m in self.manifests.items() if denoiser_of(m).precision == "fp32"]
        root = (fp32 or list(self.manifests))[0]
        return root / denoiser_of(self.manifests[root]).path


def _measure(ctx: Context, ours: dict[Variant, Worker], baselines: list[Worker], case: Case, progress) -> list[dict]:
    config, manifest = ctx.config, next(iter(ctx.manifests.values()))
    rng = np.random.default_rng(0)
    shape = (
        case.batch,
        manifest.latent_channels,
        case.height // manifest.vae_scale_factor,
        case.width // manifest.vae_scale_factor,
    )
    latents = rng.standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="sdrt-bench-control-") as tmp:
        control = _control_image(Path(tmp), case.height, case.width) if ctx.controlnets else None
        args = ([config.prompt] * case.batch, case.height, case.width, case.steps, config.guidance, latents, control)
        return _measure_rounds(ctx, ours, baselines, case, args, shape, progress)


@dataclass(frozen=True)
class Lane:
    """One row's runs: a worker, with or without the control image. A worker with ControlNets serves two lanes, its
    plain calls and its controlled ones, so a ControlNet step is compared with plain steps of the same process."""

    name: str
    worker: Worker
    control: bool = False
    variant: Variant | None = None  # an sdrt lane's configuration (without ControlNets for a plain lane)


def _lanes(ours: dict[Variant, Worker], baselines: list[Worker]) -> list[Lane]:
    lanes = []
    for variant, w in ours.items():
        if variant.controlnets:
            plain = replace(variant, controlnets=())
            lanes.append(Lane(plain.name, w, False, plain))
        lanes.append(Lane(w.name, w, bool(variant.controlnets), variant))
    for b in baselines:
        controlled = b.name.startswith("diffusers") and b.name.endswith(CONTROLLED)
        if controlled:
            lanes.append(Lane(b.name.removesuffix(CONTROLLED), b))
        lanes.append(Lane(b.name, b, controlled))
    return lanes


def _measure_rounds(ctx: Context, ours, baselines, case: Case, args: tuple, shape: tuple, progress) -> list[dict]:
    config = ctx.config
    label = f"batch {case.batch} {case.height}x{case.width} {case.steps} steps"
    plain_args = (*args[:6], None)
    warm = {}
    # A lane whose call fails (an error reply, a dead or hung worker) becomes a failed row of this case, and the
    # others go on: one broken precision must not cost the measurements of the rest.
    failures: dict[str, Failure] = {}

    def attempt(lane: Lane, phase: str, call: Callable):
        try:
            return call()
        except (BackendError, InputError) as e:
            progress(f"{label}: {lane.name} failed in {phase}, recorded as a failed row: {e}")
            failures[lane.name] = Failure(lane.name, phase, str(e), lane.variant, _baseline_fields(lane))
            return None

    lanes = _lanes(ours, baselines)
    for lane in lanes:
        progress(f"{label}: warming up {lane.name}")
        run = lambda lane=lane: lane.worker.run(case, args if lane.control else plain_args)  # noqa: E731
        warmups = attempt(lane, "warm-up", lambda run=run: warm_up(run, config.warmups))
        if warmups is not None:
            warm[lane.name] = warmups
    lanes = [lane for lane in lanes if lane.name not in failures]
    # Interleaved rounds: each sdrt lane once, then each baseline once, so every sdrt run has a
    # baseline run of the same round to pair with and noise that hits a round cancels in its ratios.
    runs: dict[str, list[RunTimes]] = {lane.name: [] for lane in lanes}
    for i in range(config.runs):
        for lane in lanes:
            if lane.name not in failures:
                one = attempt(
                    lane, f"run {i + 1}", lambda lane=lane: lane.worker.run(case, args if lane.control else plain_args)
                )
                if one is not None:
                    runs[lane.name].append(one)
        times = ", ".join(f"{name} {r[-1].total:.2f} s" for name, r in runs.items() if name not in failures)
        progress(f"{label}: run {i + 1}/{config.runs}: {times}")
    # A lane that failed part-way keeps no row of measurements: its runs could not be paired round by round.
    lanes = [lane for lane in lanes if lane.name not in failures]
    common = _common(ctx, case, shape)
    base_lanes = [lane for lane in lanes if lane.variant is None]
    rows = [_failed_row(ctx, case, f) for f in failures.values()]
    for lane in lanes:
        if lane.variant is None:
            continue
        variant, w = lane.variant, lane.worker
        row = _row(ctx, common, w, warm[lane.name], runs[lane.name], case) | _sdrt_fields(ctx, variant, w)
        if base_lanes:
            row["ratio_to"] = {b.name: ratios(runs[lane.name], runs[b.name]) for b in base_lanes}
        if variant.lora_mode not in ("", "base"):  # against the same variant without adapters, round by round
            base = replace(variant, lora_sets=(), lora_mode="base").name
            if base in runs:
                row.setdefault("ratio_to", {})["sdrt without LoRA"] = ratios(runs[lane.name], runs[base])
        if lane.control:  # against the same process's calls without a control image, round by round
            plain = replace(variant, controlnets=()).name
            if plain in runs:
                row.setdefault("ratio_to", {})["sdrt without ControlNet"] = ratios(runs[lane.name], runs[plain])
            row["controlnet"] = _controlnet_fields(ctx)
        elif w.name != lane.name:  # the plain calls of a process that has ControlNets loaded
            row["controlnets_loaded"] = len(ctx.controlnets)
        rows.append(row)
    for lane in base_lanes:
        b = lane.worker
        backend = "pytorch" if b.name.startswith("diffusers") else "onnxruntime"
        dtype = b.hello.get("dtype", "fp32")
        fields = {"backend": backend, "precision": dtype, "compute_precision": dtype, "graph_precision": dtype}
        # the diffusers class (optimum's worker names none)
        fields["pipeline"] = b.hello.get("pipeline" if lane.control or lane.name == b.name else "base_pipeline")
        device = ctx.device if b.hello.get("device", "cpu") != "cpu" else _cpu_device()
        row = _row(ctx, common, b, warm[lane.name], runs[lane.name], case) | fields | {"device": device}
        if lane.control:
            row["controlnet"] = _controlnet_fields(ctx)
            plain = lane.name.removesuffix(CONTROLLED)
            if plain in runs:
                row["ratio_to"] = {f"{plain} without ControlNet": ratios(runs[lane.name], runs[plain])}
        elif b.name != lane.name:
            row["controlnets_loaded"] = len(ctx.controlnets)
        rows.append(row)
    return rows


def _baseline_fields(lane: Lane) -> dict:
    """What a baseline lane's failed row says of it (an sdrt lane's variant says it all)."""
    if lane.variant is not None:
        return {}
    dtype = lane.worker.hello.get("dtype", "fp32")
    return {"backend": "pytorch" if lane.name.startswith("diffusers") else "onnxruntime", "precision": dtype}


def _failed_row(ctx: Context, case: Case, failure: Failure) -> dict:
    """A row for an implementation that failed in this case (or at load): what it was, where it failed, the error."""
    if failure.variant is not None:
        row = _row_head(ctx, case, _variant_device(failure.variant)) | _variant_fields(ctx, failure.variant)
    else:
        row = _row_head(ctx, case, _cpu_device()) | _baseline_row_fields(failure.name, failure.fields)
    return row | {"failed": failure.error, "failed_in": failure.phase, "lane": failure.name}


def _baseline_unsupported_row(ctx: Context, case: Case, name: str, dtype: str, reason: str) -> dict:
    fields = _baseline_row_fields(name, {"backend": "pytorch", "precision": dtype})
    return _row_head(ctx, case, _cpu_device()) | fields | {"lane": name, "unsupported": reason}


def _baseline_row_fields(name: str, fields: dict) -> dict:
    """What a baseline's row without measurements says of it: implementation, backend, precision."""
    precision = fields.get("precision", "fp32")
    return {
        "implementation": name.split()[0],
        "backend": fields.get("backend", MISSING_BACKEND),
        "graph_precision": precision,
        "compute_precision": precision,
        "precision": precision,
    }


def _controlnet_fields(ctx: Context) -> dict:
    return {"count": len(ctx.controlnets), "conditioning_scale": 1.0, "controlnets": ctx.controlnets}


def _common(ctx: Context, case: Case, shape: tuple[int, ...]) -> dict:
    from sdrt.benchmarks.flops import count_flops

    config, manifest = ctx.config, next(iter(ctx.manifests.values()))
    root = next(iter(ctx.manifests))
    dims = manifest.model_dims
    unet_batch = case.batch * (2 if config.guidance > 1 and not dims.time_cond_dim else 1)
    spec = manifest.model_family.specs(dims)[manifest.model_family.denoiser]
    flops = count_flops(ctx.flops_graph(), spec.input_shapes(sizes(dims, unet_batch, *shape[2:])))["total"]
    return {
        "schema": ROW_SCHEMA,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": ctx.device,
        "machine": ctx.machine,
        "versions": versions(),
        "model": {
            "family": manifest.family,
            "source": manifest.source.get("model") or manifest.source.get("path"),
            "unet_bytes": sum(f.bytes for f in denoiser_of(manifest).files),  # the denoiser's (UNet or transformer)
        },
        "threads": ctx.threads,
        "batch": case.batch,
        "height": case.height,
        "width": case.width,
        "steps": case.steps,
        "guidance_scale": config.guidance,
        "scheduler": config.scheduler or json.loads((root / manifest.scheduler_config).read_text())["_class_name"],
        "runs": config.runs,
        "unet_flops_per_call": flops,
    }


def _row(ctx: Context, common: dict, worker: Worker, warmups: int, runs: list[RunTimes], case: Case) -> dict:
    m = metrics(runs, case.batch)
    flops_per_s = common["unet_flops_per_call"] / (m["unet_step_ms"]["median"] / 1e3)
    row = {
        **common,
        "implementation": worker.name.split()[0],
        "warmup_runs": warmups,
        "metrics": m,
        "unet_tflops_achieved": flops_per_s / 1e12,
        "unet_fraction_of_matmul": flops_per_s / (ctx.machine["matmul"]["fp32"]["gflops"] * 1e9),
        **worker.memory(),
    }
    if ctx.config.peak_tflops:
        row["fraction_of_peak"] = row["unet_tflops_achieved"] / ctx.config.peak_tflops
    return row


def _sdrt_fields(ctx: Context, variant: Variant, worker: Worker) -> dict:
    denoiser = ctx.manifests[variant.artifacts].model_family.denoiser
    graph = worker.hello.get("graph_precisions", {}).get(denoiser, "fp32")
    fields = {
        "backend": variant.backend,
        "artifacts": str(variant.artifacts),
        "graph_precision": graph,
        "compute_precision": variant.precision,
        "precision": precision_label(graph, variant.precision),
        "load_timings": worker.hello.get("load_timings"),
        "device": device_info(variant.backend),
        "vae": ctx.manifests[variant.artifacts].vae.get("class", "AutoencoderKL"),  # AutoencoderTiny with --vae
    }
    if fields["device"]["kind"] == "gpu":
        fields["device_memory_used_bytes"] = worker.last_reply.get("device_memory_used_bytes")
    if variant.lora_mode:
        fields["lora"] = {
            "mode": variant.lora_mode,
            "sets": [[ctx.loras[path] | {"scale": scale} for path, scale in one] for one in variant.lora_sets],
            "first_use_s": worker.last_reply.get("lora_first_use_s"),
            "cache": worker.last_reply.get("lora_stats"),
        }
    return fields


def _describe_lora(path: str) -> dict:
    from sdrt.runtime.lora import load_file

    f = load_file(path)
    ranks = sorted({layer.rank for layers in f.layers.values() for layer in layers.values()})
    return {"name": f.name, "sha256": f.sha256, "format": f.format, "modules": f.modules, "ranks": ranks,
            "bytes": f.bytes}  # fmt: skip


def precision_label(graph: str, compute: str) -> str:
    """The precision a reader compares rows by: the graph's (fp32, int8, fp16), or the compute
    precision when the backend was asked for one other than fp32 (bf16); both when both differ."""
    if compute == "fp32":
        return graph
    return compute if graph == "fp32" else f"{graph}+{compute}"


def _unsupported_row(ctx: Context, case: Case, variant: Variant, reason: str) -> dict:
    return _row_head(ctx, case, _variant_device(variant)) | _variant_fields(ctx, variant) | {"unsupported": reason}


def _row_head(ctx: Context, case: Case, device: dict) -> dict:
    """What a row without measurements shares with every row: schema, time, device, machine, versions, the case."""
    return {
        "schema": ROW_SCHEMA,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "machine": ctx.machine,
        "versions": versions(),
        "model": {"source": next(iter(ctx.manifests.values())).source.get("path")},
        "threads": ctx.threads,
        "batch": case.batch,
        "height": case.height,
        "width": case.width,
        "steps": case.steps,
    }


def _variant_device(variant: Variant) -> dict:
    """The device an sdrt variant names: its backend's, or the CPU where that backend cannot run."""
    return device_info(variant.backend) if backends.get(variant.backend).unavailable_reason() is None else _cpu_device()


def _variant_fields(ctx: Context, variant: Variant) -> dict:
    graph = denoiser_of(ctx.manifests[variant.artifacts]).precision
    return {
        "implementation": "sdrt",
        "backend": variant.backend,
        "artifacts": str(variant.artifacts),
        "graph_precision": graph,
        "compute_precision": variant.precision,
        "precision": precision_label(graph, variant.precision),
    }


def _cpu_device() -> dict:
    return device_info("onnxruntime")


def _append(ctx: Context, rows: list[dict], progress) -> None:
    out = results_file(ctx.config.results_dir, ctx.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    progress(f"appended {len(rows)} rows to {out}")


def summary_table(rows: list[dict]) -> str:
    """The rows of one run as a Markdown table (the report merges files; this prints one run)."""
    from sdrt.benchmarks.report import markdown_table

    return markdown_table(rows)

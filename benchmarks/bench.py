"""``sdrt bench``: latency per component, per step and end to end, beside diffusers in the same run.

For every backend available here and every requested batch, image size and step count, the sdrt
pipeline and the diffusers/PyTorch baseline (same model folder, same scheduler, same latents, same
thread count) run in interleaved pairs after warming up until steady. Each pair gives a ratio, so
machine noise that hits both runs of a pair cancels; the report gives the median ratio and its
spread. Rows are self-describing (device, versions, model, precision, shapes, steps, scheduler)
and appended to ``benchmarks/results/<device>.jsonl``; ``sdrt bench report`` merges files from many
machines into one table and chart.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.manifest import Manifest

log = logging.getLogger(__name__)

ROW_SCHEMA = 1
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


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(backend: str) -> dict:
    info = {
        "kind": "cpu",
        "name": cpu_name(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0,
        "platform": platform.platform(),
    }
    if backend != "onnxruntime":
        from sdrt.runtime.tensorrt_backend import current_device

        gpu = current_device()
        info.update(kind="gpu", name=gpu.name, compute_capability=list(gpu.compute_capability))
        info["gpu_memory_bytes"] = gpu.memory_bytes
    return info


def device_slug(device: dict) -> str:
    name = re.sub(r"\(r\)|\(tm\)|cpu|@.*$", "", device["name"].lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"{device['kind']}_{name}_{device['cores']}c" if device["kind"] == "cpu" else f"gpu_{name}"


def versions() -> dict:
    out = {"python": platform.python_version()}
    for tool in ("sdrt", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "diffusers", "numpy"):
        try:
            out[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            pass
    return out


class PeakMemory:
    """Peak resident memory of this process during a block (Linux: VmHWM, reset through clear_refs)."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _vm_hwm()


def _vm_hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the two implementations -------------------------------------------------------------------
@dataclass
class RunTimes:
    """One generation: seconds per stage, and per denoising step."""

    total: float
    text_encoder: float
    vae_decoder: float
    unet_calls: list[float]
    step_walls: list[float]
    scheduler_steps: list[float] = field(default_factory=list)

    @property
    def overhead(self) -> list[float]:  # wall time of each step outside its UNet call
        return [w - u for w, u in zip(self.step_walls, self.unet_calls)]


class SdrtRunner:
    name = "sdrt"

    def __init__(self, artifacts: Path, backend: str, threads: int, scheduler: str | None):
        from sdrt.runtime import Pipeline

        self.backend = backend
        self.pipe = Pipeline.load(artifacts, backend=backend, threads=threads, scheduler=scheduler)

    def __call__(self, prompts, height, width, steps, guidance, latents) -> RunTimes:
        t0 = time.perf_counter()
        r = self.pipe(
            prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance, latents=latents
        )
        total = time.perf_counter() - t0
        t = r.timings
        return RunTimes(
            total, t["text_encoder"], t["vae_decoder"], t["unet_calls"], t["unet_steps"], t["scheduler_steps"]
        )

    def close(self) -> None:
        self.pipe.close()


class DiffusersRunner:
    """diffusers' StableDiffusionPipeline in PyTorch (fp32, CPU), timed by hooks on its modules."""

    name = "diffusers"

    def __init__(self, source: Path, threads: int, scheduler: str | None):
        import torch
        from diffusers import StableDiffusionPipeline

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None)
        self.pipe.set_progress_bar_config(disable=True)
        if scheduler:
            import diffusers

            from sdrt.runtime.schedulers import ALIASES

            class_name, options = ALIASES.get(scheduler, (scheduler, {}))
            self.pipe.scheduler = getattr(diffusers, class_name).from_config(self.pipe.scheduler.config, **options)
        self._calls: dict[str, list[float]] = {}
        for name, module in (("text_encoder", self.pipe.text_encoder), ("unet", self.pipe.unet)):
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        decode = self.pipe.vae.decode

        def timed_decode(*args, **kwargs):
            t0 = time.perf_counter()
            out = decode(*args, **kwargs)
            self._calls.setdefault("vae_decoder", []).append(time.perf_counter() - t0)
            return out

        self.pipe.vae.decode = timed_decode

    def _pre(self, name):
        def hook(module, args):
            self._start = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self._calls.setdefault(name, []).append(time.perf_counter() - self._start)

        return hook

    def __call__(self, prompts, height, width, steps, guidance, latents) -> RunTimes:
        self._calls = {}
        marks: list[float] = []

        def on_step_end(pipe, i, t, kwargs):
            marks.append(time.perf_counter())
            return kwargs

        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            self.pipe(
                prompts,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=torch.from_numpy(latents),
                output_type="np",
                callback_on_step_end=on_step_end,
            )
        total = time.perf_counter() - t0
        unet = self._calls.get("unet", [])
        # A step runs from the end of the previous one (the first: from its UNet call's start, less
        # the call itself, so the set-up before the loop is not charged to it).
        first_start = marks[0] - (unet[0] if unet else 0) if marks else t0
        walls = np.diff([first_start, *marks]).tolist() if marks else []
        if walls and unet:
            walls[0] = max(walls[0], unet[0])
        return RunTimes(
            total, sum(self._calls.get("text_encoder", [])), sum(self._calls.get("vae_decoder", [])), unet, walls
        )

    def close(self) -> None:
        self.pipe = None


class OptimumRunner:
    """optimum's ORTStableDiffusionPipeline, in optimum's own environment (``optimum_worker.py``),
    kept running so that runs interleave with ours as the diffusers ones do."""

    name = "optimum"

    def __init__(self, folder: Path, python: Path, threads: int):
        import subprocess
        import tempfile

        worker = Path(__file__).with_name("optimum_worker.py")
        if not Path(python).is_file():
            raise InputError(
                f"optimum baseline: expected the Python of optimum's environment at {python}, found none "
                "(`make .venv-optimum/.installed` makes one)"
            )
        self._tmp = tempfile.TemporaryDirectory(prefix="sdrt-bench-")
        self._proc = subprocess.Popen(
            [str(python), str(worker), str(folder), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        hello = self._proc.stdout.readline() if self._proc.stdout else ""
        if not hello.strip().startswith("{"):
            raise InputError(f"optimum baseline: the worker in {python} did not start (is optimum installed there?)")
        self.version = json.loads(hello).get("optimum", "")

    def __call__(self, prompts, height, width, steps, guidance, latents) -> RunTimes:
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
        assert self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise InputError("optimum baseline: the worker stopped (run it by hand to see why)")
        r = json.loads(line)
        return RunTimes(r["total"], r["text_encoder"], r["vae_decoder"], r["unet_calls"], r["step_walls"])

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)
        self._tmp.cleanup()


# -- one benchmark configuration ------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    batch: int
    height: int
    width: int
    steps: int


def warm_up(runner, case: Case, args: tuple, minimum: int) -> int:
    """Run until two consecutive end-to-end times agree within STEADY (onnxruntime needs more than
    one run before a large UNet call settles); return how many runs it took."""
    last = None
    for n in range(1, MAX_WARMUPS + 1):
        total = runner(*args).total
        if n >= minimum and last is not None and abs(total - last) <= STEADY * min(total, last):
            return n
        last = total
    return MAX_WARMUPS


def metrics(runs: list[RunTimes], batch: int) -> dict:
    calls = [c for r in runs for c in r.unet_calls]
    walls = [w for r in runs for w in r.step_walls]
    overhead = [o for r in runs for o in r.overhead]
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
    schedule = [s for r in runs for s in r.scheduler_steps]
    if schedule:
        out["scheduler_step_ms"] = stats([1e3 * s for s in schedule])
    return out


def ratios(ours: list[RunTimes], base: list[RunTimes]) -> dict:
    """Per interleaved pair: our time / the baseline's, per component and end to end."""
    pairs = list(zip(ours, base))
    return {
        "end_to_end": stats([a.total / b.total for a, b in pairs]),
        "unet_step": stats([float(np.median(a.unet_calls) / np.median(b.unet_calls)) for a, b in pairs]),
        "text_encoder": stats([a.text_encoder / b.text_encoder for a, b in pairs if b.text_encoder]),
        "vae_decode": stats([a.vae_decoder / b.vae_decoder for a, b in pairs if b.vae_decoder]),
    }


@dataclass
class BenchConfig:
    artifacts: Path
    backends: tuple[str, ...] = ("onnxruntime",)
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
    optimum_folder: Path | None = None  # an optimum export of the same model: optimum's pipeline as a baseline
    optimum_python: Path = Path(".venv-optimum/bin/python")
    prompt: str = "a photograph of an astronaut riding a horse"
    results_dir: Path = RESULTS_DIR


def available_backends() -> list[str]:
    import onnxruntime as ort

    found = ["onnxruntime"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        found.append("onnxruntime-cuda")
    from sdrt.runtime.tensorrt_backend import unavailable_reason

    if unavailable_reason() is None:
        found.append("tensorrt")
    return found


def run_benchmark(config: BenchConfig, progress=print) -> list[dict]:
    """Measure every case on every backend (and the baseline); append the rows; return them."""
    manifest = Manifest.load(config.artifacts)
    source = Path(manifest.source.get("path", ""))
    if config.baseline and not (source / "model_index.json").is_file():
        raise InputError(
            f"baseline: expected the diffusers folder the artifacts were exported from at {source}, found none "
            "(pass --no-baseline, or re-export from a local folder)"
        )
    threads = config.threads or len(os.sched_getaffinity(0))
    rows = []
    baselines = [DiffusersRunner(source, threads, config.scheduler)] if config.baseline else []
    if config.optimum_folder:
        baselines.append(OptimumRunner(config.optimum_folder, config.optimum_python, threads))
    for backend in config.backends:
        device = device_info(backend)
        runner = SdrtRunner(config.artifacts, backend, threads, config.scheduler)
        unet_path = config.artifacts / manifest.components["unet"].path
        try:
            for batch in config.batches:
                for height, width in config.sizes:
                    for steps in config.steps:
                        case = Case(batch, height, width, steps)
                        rows += _measure(
                            config, manifest, device, backend, runner, baselines, case, threads, unet_path, progress
                        )
        finally:
            runner.close()
    for base in baselines:
        base.close()
    return rows


def _measure(config, manifest, device, backend, runner, baselines, case, threads, unet_path, progress):
    from sdrt.benchmarks.flops import count_flops

    guided = config.guidance > 1
    rng = np.random.default_rng(0)
    shape = (
        case.batch,
        manifest.latent_channels,
        case.height // manifest.vae_scale_factor,
        case.width // manifest.vae_scale_factor,
    )
    latents = rng.standard_normal(shape).astype(np.float32)
    args = ([config.prompt] * case.batch, case.height, case.width, case.steps, config.guidance, latents)
    label = f"{backend} batch {case.batch} {case.height}x{case.width} {case.steps} steps"
    progress(f"{label}: warming up")
    warm = {"sdrt": warm_up(runner, case, args, config.warmups)}
    for b in baselines:
        warm[b.name] = warm_up(b, case, args, config.warmups)
    ours: list[RunTimes] = []
    base: dict[str, list[RunTimes]] = {b.name: [] for b in baselines}
    with PeakMemory() as mem:
        for i in range(config.runs):  # interleaved: each of our runs is paired with one of each baseline
            ours.append(runner(*args))
            for b in baselines:
                base[b.name].append(b(*args))
            times = "".join(f", {name} {runs[-1].total:.2f} s" for name, runs in base.items())
            progress(f"{label}: run {i + 1}/{config.runs} sdrt {ours[-1].total:.2f} s{times}")
    unet_batch = case.batch * (2 if guided else 1)
    lat = shape[2:]
    flops = count_flops(
        unet_path,
        {
            "sample": (unet_batch, manifest.latent_channels, *lat),
            "timestep": (unet_batch,),
            "encoder_hidden_states": (unet_batch, manifest.text_length, _cross_dim(manifest)),
        },
    )["total"]
    common = {
        "schema": ROW_SCHEMA,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": device,
        "versions": versions(),
        "model": {
            "family": manifest.family,
            "source": manifest.source.get("model") or manifest.source.get("path"),
            "unet_bytes": sum(f.bytes for f in manifest.components["unet"].files),
        },
        "threads": threads,
        "batch": case.batch,
        "height": case.height,
        "width": case.width,
        "steps": case.steps,
        "guidance_scale": config.guidance,
        "scheduler": config.scheduler
        or json.loads((config.artifacts / manifest.scheduler_config).read_text())["_class_name"],
        "runs": config.runs,
        "peak_rss_bytes": mem.peak,
        "device_memory_used_bytes": _device_memory_used() if device["kind"] == "gpu" else None,
        "unet_flops_per_call": flops,
    }
    ours_metrics = metrics(ours, case.batch)
    tflops = flops / (ours_metrics["unet_step_ms"]["median"] / 1e3) / 1e12
    row = {
        **common,
        "implementation": "sdrt",
        "backend": backend,
        "precision": manifest.components["unet"].precision,
        "warmup_runs": warm["sdrt"],
        "metrics": ours_metrics,
        "unet_tflops_achieved": tflops,
    }
    if config.peak_tflops:
        row["fraction_of_peak"] = tflops / config.peak_tflops
    rows = [row]
    if baselines:
        row["ratio_to"] = {name: ratios(ours, runs) for name, runs in base.items()}
    for name, runs in base.items():
        base_metrics = metrics(runs, case.batch)
        rows.append(
            {
                **common,
                "implementation": name,
                "backend": "pytorch" if name == "diffusers" else "onnxruntime",
                "precision": "fp32",
                "warmup_runs": warm[name],
                "metrics": base_metrics,
                "unet_tflops_achieved": flops / (base_metrics["unet_step_ms"]["median"] / 1e3) / 1e12,
            }
        )
    out = config.results_dir / f"{device_slug(device)}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    progress(f"{label}: appended {len(rows)} rows to {out}")
    return rows


def _device_memory_used() -> int | None:
    """GPU memory in use after the timed runs (engines, buffers, activations stay allocated, so this is
    the high-water mark of a static-buffer backend), from cudaMemGetInfo."""
    try:
        from sdrt.runtime.tensorrt_backend import cuda_runtime

        err, free, total = cuda_runtime().cudaMemGetInfo()
        return int(total - free) if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - a figure we cannot read is reported as unknown
        return None


def _cross_dim(manifest: Manifest) -> int:
    return int(manifest.components["unet"].inputs[2].shape[2])


def summary_table(rows: list[dict]) -> str:
    """The rows of one run as a Markdown table (the report merges files; this prints one run)."""
    from sdrt.benchmarks.report import markdown_table

    return markdown_table(rows)

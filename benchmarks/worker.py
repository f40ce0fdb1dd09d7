"""One implementation under benchmark, in a process of its own: ``python -m sdrt.benchmarks.worker SPEC``.

``sdrt bench`` starts one worker per implementation (each sdrt artifact directory, backend and
compute precision; diffusers) so that load time, resident memory and peak memory are each
implementation's own, not the sum over everything the bench process happens to hold. SPEC is one
JSON object: ``{"implementation": "sdrt", "artifacts", "backend", "precision", "threads",
"scheduler"}`` or ``{"implementation": "diffusers", "folder", "threads", "scheduler"}``, each with an optional
``"controlnets"`` (sdrt: ControlNet artifact directories; diffusers: ControlNetModel folders) whose calls take
the request's ``"control_image"`` (a PNG path), one for every ControlNet.

The protocol is the optimum worker's (``optimum_worker.py``): a hello line once loaded (load
seconds, RSS after load), then one JSON request per line on stdin (prompts, size, steps, guidance,
a .npy file of latents) and one JSON line of timings per request on stdout, each with the peak
RSS so far. A failure is one ``{"error": ..., "type": ...}`` line, never a traceback the parent
must parse; the traceback goes to stderr, which the parent keeps for its error message.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np


@dataclass
class RunTimes:
    """One generation: seconds per stage, and per denoising step."""

    total: float
    text_encoder: float
    vae_decoder: float
    unet_calls: list[float]
    step_walls: list[float]
    scheduler_steps: list[float] = field(default_factory=list)
    lora_s: float | None = None  # getting the call's adapter sessions: merge and open, ~0 from the cache
    lora_cached: bool | None = None
    control_calls: list[float] = field(default_factory=list)  # per step: its ControlNet calls, summed

    @property
    def overhead(self) -> list[float]:  # wall time of each step outside its UNet (and ControlNet) calls
        control = self.control_calls or [0.0] * len(self.unet_calls)
        return [w - u - c for w, u, c in zip(self.step_walls, self.unet_calls, control)]


def proc_status_bytes(key: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes; 0 when unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak resident memory so far (VmHWM; getrusage where there is no /proc)."""
    peak = proc_status_bytes("VmHWM")
    if peak:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SdrtRunner:
    name = "sdrt"

    def __init__(
        self,
        artifacts: Path,
        backend: str,
        precision: str,
        threads: int,
        scheduler: str | None,
        lora_sets: list | None = None,
        controlnets: list | None = None,
    ):
        """``lora_sets``: adapter sets (lists of [path, scale]) used in turn, one per call: none is the base
        model, one set is "one LoRA", two or more switch sets on every call. ``controlnets``: ControlNet artifact
        directories, run on every call with the request's control image."""
        from sdrt.runtime import Pipeline

        self.backend = backend
        self.pipe = Pipeline.load(
            artifacts, backend=backend, precision=precision, threads=threads, scheduler=scheduler,
            controlnets=controlnets or None,
        )  # fmt: skip
        self.lora_sets = [[(str(p), float(s)) for p, s in one] for one in (lora_sets or [])]
        self.calls = 0
        self.first_use: dict[int, float] = {}  # set index -> seconds its first call took to merge and open

    def hello(self) -> dict:
        return {"load_timings": self.pipe.load_timings, "graph_precisions": self.pipe.graph_precisions()}

    def __call__(self, prompts, height, width, steps, guidance, latents, control_image=None) -> RunTimes:
        index = self.calls % len(self.lora_sets) if self.lora_sets else None
        control = {}
        if self.pipe.controlnets:
            n = len(self.pipe.controlnets)
            control = {"control_image": control_image if n == 1 else [control_image] * n}
        self.calls += 1
        loras = self.lora_sets[index] if index is not None else None
        t0 = time.perf_counter()
        r = self.pipe(
            prompts,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents,
            loras=loras,
            **control,
        )
        total = time.perf_counter() - t0
        t = r.timings
        if index is not None and t.get("lora_cached") is False:
            self.first_use.setdefault(index, t["lora"])
        return RunTimes(
            total,
            t["text_encoder"],
            t["vae_decoder"],
            t["unet_calls"],
            t["unet_steps"],
            t["scheduler_steps"],
            t.get("lora"),
            t.get("lora_cached"),
            t.get("controlnet_calls", []),
        )

    def extra(self) -> dict:
        """What a reply adds: the adapter sets' first-use seconds and the adapter cache's counts."""
        if not self.lora_sets:
            return {}
        stats = self.pipe.adapters.stats
        return {"lora_first_use_s": [self.first_use.get(i) for i in range(len(self.lora_sets))], "lora_stats": stats}

    def close(self) -> None:
        self.pipe.close()


class DiffusersRunner:
    """The diffusers pipeline the model folder names (StableDiffusionPipeline, StableDiffusionXLPipeline,
    LatentConsistencyModelPipeline, ...) in PyTorch, timed by hooks on its modules: fp32 or bf16 on the CPU
    (bf16: what a PyTorch user gets from ``torch_dtype=torch.bfloat16`` on a CPU with AMX or AVX-512 BF16,
    through oneDNN), or on ``device="cuda"`` in fp32 or fp16 (the GPU comparison's baseline; timings
    synchronize the device)."""

    name = "diffusers"

    DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
    ALLOWED = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16")}

    def __init__(
        self,
        source: Path,
        threads: int,
        scheduler: str | None,
        device: str = "cpu",
        dtype: str = "fp32",
        controlnets: list | None = None,
    ):
        """``controlnets``: ControlNetModel folders: the pipeline is then diffusers' ControlNet pipeline for the
        model (AutoPipelineForText2Image with ``controlnet=``), each ControlNet's calls timed per step."""
        import torch
        from diffusers import AutoPipelineForText2Image, ControlNetModel, DiffusionPipeline

        from sdrt.runtime.errors import InputError

        if dtype not in self.ALLOWED.get(device, ()):
            allowed = ", ".join(f"{d}/{'|'.join(t)}" for d, t in self.ALLOWED.items())
            raise InputError(f"diffusers baseline: expected one of {allowed}, got {device}/{dtype}")
        if device == "cuda" and not torch.cuda.is_available():
            raise InputError("diffusers baseline: expected a CUDA device for device='cuda', torch sees none")
        if threads:
            torch.set_num_threads(threads)
        self.torch, self.device, self.dtype = torch, device, dtype
        index = json.loads((Path(source) / "model_index.json").read_text())
        extra = {"safety_checker": None} if "safety_checker" in index else {}
        torch_dtype = getattr(torch, self.DTYPES[dtype])
        self.controlnets = [ControlNetModel.from_pretrained(f, torch_dtype=torch_dtype) for f in controlnets or ()]
        if self.controlnets:
            net = self.controlnets[0] if len(self.controlnets) == 1 else self.controlnets
            self.pipe = AutoPipelineForText2Image.from_pretrained(
                source, torch_dtype=torch_dtype, controlnet=net, **extra
            )
        else:
            self.pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=torch_dtype, **extra)
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        if scheduler:
            import diffusers

            from sdrt.runtime.schedulers import ALIASES

            class_name, options = ALIASES.get(scheduler, (scheduler, {}))
            self.pipe.scheduler = getattr(diffusers, class_name).from_config(self.pipe.scheduler.config, **options)
        self._calls: dict[str, list[float]] = {}
        encoders = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        denoiser = getattr(self.pipe, "transformer", None) or self.pipe.unet  # SD 3's transformer, or the UNet
        timed = [("text_encoder", m) for m in encoders if m is not None] + [("unet", denoiser)]
        timed += [("controlnet", m) for m in self.controlnets]
        for name, module in timed:
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        decode = self.pipe.vae.decode

        def timed_decode(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = decode(*args, **kwargs)
            self._sync()
            self._calls.setdefault("vae_decoder", []).append(time.perf_counter() - t0)
            return out

        self.pipe.vae.decode = timed_decode
        # With ControlNets, calls without a control image run the model's own pipeline on the same modules (the
        # plain steps a ControlNet step is compared with, in this process).
        self.base = AutoPipelineForText2Image.from_pipe(self.pipe, controlnet=None) if self.controlnets else self.pipe
        self.base.set_progress_bar_config(disable=True)

    def hello(self) -> dict:
        return {"pipeline": type(self.pipe).__name__, "base_pipeline": type(self.base).__name__, "device": self.device,
                "dtype": self.dtype}  # fmt: skip

    def _sync(self) -> None:
        """On a GPU, wait for the queued kernels, so a hook's time is the work's and not its launch."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _pre(self, name):
        def hook(module, args):
            self._sync()
            self._start = time.perf_counter()

        return hook

    def _post(self, name):
        def hook(module, args, output):
            self._sync()
            self._calls.setdefault(name, []).append(time.perf_counter() - self._start)

        return hook

    def __call__(self, prompts, height, width, steps, guidance, latents, control_image=None) -> RunTimes:
        self._calls = {}
        marks: list[float] = []
        control, pipe = {}, self.base
        if self.controlnets and control_image:
            from PIL import Image

            with Image.open(control_image) as opened:
                image = opened.convert("RGB")
            control = {"image": image if len(self.controlnets) == 1 else [image] * len(self.controlnets)}
            pipe = self.pipe

        def on_step_end(pipe, i, t, kwargs):
            self._sync()
            marks.append(time.perf_counter())
            return kwargs

        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(
                prompts,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                latents=torch.from_numpy(latents).to(self.device, getattr(torch, self.DTYPES[self.dtype])),
                output_type="np",
                callback_on_step_end=on_step_end,
                **control,
            )
        total = time.perf_counter() - t0
        unet = self._calls.get("unet", [])
        # A step runs from the end of the previous one (the first: from its UNet call's start, less
        # the call itself, so the set-up before the loop is not charged to it).
        first_start = marks[0] - (unet[0] if unet else 0) if marks else t0
        walls = np.diff([first_start, *marks]).tolist() if marks else []
        if walls and unet:
            walls[0] = max(walls[0], unet[0])
        n = len(self.controlnets) if control else 0  # each step calls every ControlNet once, before its UNet
        control = self._calls.get("controlnet", [])
        per_step = [sum(control[i : i + n]) for i in range(0, len(control), n)] if n else []
        if walls and per_step:  # the first step starts at its first ControlNet call
            walls[0] = max(walls[0], unet[0] + per_step[0])
        return RunTimes(
            total, sum(self._calls.get("text_encoder", [])), sum(self._calls.get("vae_decoder", [])), unet, walls,
            control_calls=per_step,
        )  # fmt: skip

    def close(self) -> None:
        self.pipe = None


def make_runner(spec: dict):
    """The runner SPEC names; InputError for a SPEC that names none."""
    from sdrt.runtime.errors import InputError

    kind = spec.get("implementation")
    if kind == "sdrt":
        return SdrtRunner(
            Path(spec["artifacts"]),
            spec["backend"],
            spec.get("precision", "fp32"),
            spec["threads"],
            spec["scheduler"],
            spec.get("lora_sets"),
            spec.get("controlnets"),
        )
    if kind == "diffusers":
        return DiffusersRunner(
            Path(spec["folder"]),
            spec["threads"],
            spec["scheduler"],
            spec.get("device", "cpu"),
            spec.get("dtype", "fp32"),
            spec.get("controlnets"),
        )
    raise InputError(f"bench worker: expected implementation 'sdrt' or 'diffusers' in the spec, got {kind!r}")


def _gpu_memory_used() -> int | None:
    """GPU memory in use (engines, buffers, activations stay allocated, so after the runs this is the
    high-water mark of a static-buffer backend), from cudaMemGetInfo; None when unreadable."""
    try:
        from sdrt.runtime.tensorrt_backend import cuda_runtime

        err, free, total = cuda_runtime().cudaMemGetInfo()
        return int(total - free) if int(err) == 0 else None
    except Exception:  # noqa: BLE001 - a figure we cannot read is reported as unknown
        return None


def _reply(out: TextIO, obj: dict) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def _stdout_for_replies() -> TextIO:
    """Libraries print to stdout (C++ backends through the file descriptor itself) while the parent
    reads stdout as JSON lines: replies get a copy of it, and fd 1 becomes stderr for everyone else."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return replies


def _error(e: BaseException) -> dict:
    traceback.print_exc(file=sys.stderr)
    return {"error": str(e) or repr(e), "type": type(e).__name__}


def serve(spec: dict, requests: Iterable[str], out: TextIO, on_gpu: bool = False) -> int:
    """Load SPEC's implementation, say hello on ``out``, answer ``requests`` (JSON lines) until they end."""
    t0 = time.perf_counter()
    try:
        runner = make_runner(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it as an sdrt error
        _reply(out, _error(e))
        return 1
    load_s = time.perf_counter() - t0
    _reply(out, {"ready": True, "load_s": load_s, "rss_after_load_bytes": proc_status_bytes("VmRSS"), **runner.hello()})
    try:
        for line in requests:
            try:
                r = json.loads(line)
                args = (r["prompts"], r["height"], r["width"], r["steps"], r["guidance"], np.load(r["latents"]))
                times = runner(*args, **({"control_image": r["control_image"]} if r.get("control_image") else {}))
                reply = {**asdict(times), "peak_rss_bytes": peak_rss()}
                reply |= runner.extra() if hasattr(runner, "extra") else {}
                if on_gpu:
                    reply["device_memory_used_bytes"] = _gpu_memory_used()
            except Exception as e:  # noqa: BLE001 - as above; the worker stays up for the parent to close
                reply = _error(e)
            _reply(out, reply)
    finally:
        runner.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = _stdout_for_replies()
    try:
        spec = json.loads(argv[0])
    except (IndexError, ValueError) as e:
        _reply(
            out, {"error": f"bench worker: expected one JSON spec argument, got {argv!r} ({e})", "type": "InputError"}
        )
        return 2
    on_gpu = False
    if spec.get("implementation") == "sdrt":
        from sdrt.runtime import backends

        on_gpu = spec.get("backend") in backends.BACKENDS and backends.get(spec["backend"]).device == "gpu"
    return serve(spec, sys.stdin, out, on_gpu)


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-gpu`` (``tools/bench_gpu.sh``): the one-command GPU benchmark's plan and its pure parts.

On an NVIDIA machine with the ``[gpu]`` extra the script runs, in order: ``check`` (the GPU stack, by
the runtime's own availability checks, then the time budget; stops at once, with the reason, where
either fails), ``make test-gpu`` beside the next two (they are CPU-bound), ``make sd15-random`` (SD
1.5's architecture with random weights), ``export`` (its ONNX graphs), then, test-gpu finished,
``engines`` (TensorRT fp16 engines with a dynamic and a static profile at the benchmark's size) and
``bench`` (rows for onnxruntime-cuda, onnxruntime-tensorrt and sdrt's TensorRT with each profile,
beside diffusers/PyTorch on CUDA in fp16, at 512x512 with 25 and 50 steps, appended to
``benchmarks/results/<device key>.jsonl``). An engine folder holds one profile per component, so the
static engines live in a second artifact directory holding the same ONNX files (hard links).

The budget is arithmetic, done before anything runs: each stage's minutes are assumptions for an
H100/A100-class GPU and its host (``Assumptions``; near zero for a stage already done, which sdrt
then skips), and the benchmark's are its workers' load times plus, per case, (warm-up + timed)
rounds of every implementation's steps x seconds per step + per-run overhead. A plan whose total
exceeds the budget is refused, naming its stages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from sdrt.runtime.errors import BackendError, InputError, SdrtError

BUDGET_MIN = 10.0
MODEL = Path("models/sd15-random")
ARTIFACTS = Path("artifacts/sd15-random-gpu")  # dynamic-profile engines; "<this>-static" for the static ones
COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # text to image: no VAE encoder to export or build
ENGINE_PRECISION = "fp16"
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
BASELINE = "diffusers"  # on CUDA in fp16
BASELINE_DEVICE, BASELINE_DTYPE = "cuda", "fp16"
WORK = Path("build/bench-gpu")  # the shared timing cache and test-gpu's log


# -- the plan ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuPlan:
    height: int = 512
    width: int = 512
    steps: tuple[int, ...] = (25, 50)
    runs: int = 3
    warmups: int = 2
    budget_min: float = BUDGET_MIN
    model: Path = MODEL
    artifacts: Path = ARTIFACTS
    results_dir: Path | None = None  # None: benchmarks/results

    def __post_init__(self):
        if self.height % 8 or self.width % 8 or min(self.height, self.width) < 64:
            raise InputError(f"--size: expected multiples of 8 pixels, 64 or more, got {self.height}x{self.width}")
        if not self.steps or min(self.steps) < 1 or self.runs < 1 or self.warmups < 1 or self.budget_min <= 0:
            raise InputError(
                f"expected steps >= 1, runs >= 1, warmups >= 1 and a positive budget, got steps {list(self.steps)}, "
                f"runs {self.runs}, warmups {self.warmups}, budget {self.budget_min} min"
            )

    @property
    def static(self) -> Path:
        return self.artifacts.with_name(self.artifacts.name + "-static")

    def variants(self) -> tuple[tuple[Path, str, str], ...]:
        """(artifacts, backend, compute precision) of each sdrt implementation: onnxruntime's providers on
        the fp32 graphs (their one precision), sdrt's TensorRT on its fp16 engines, dynamic and static."""
        return (
            (self.artifacts, "onnxruntime-cuda", "fp32"),
            (self.artifacts, "onnxruntime-tensorrt", "fp32"),
            (self.artifacts, "tensorrt", ENGINE_PRECISION),
            (self.static, "tensorrt", ENGINE_PRECISION),
        )

    def implementations(self) -> list[str]:
        """Every worker of the benchmark, by the name its assumptions are kept under."""
        return [backend for _, backend, _ in self.variants()] + [BASELINE]

    def export_command(self) -> list[str]:
        return [*SDRT, "export", "--model", str(self.model), "--out", str(self.artifacts), "--components", *COMPONENTS]

    def engine_commands(self, timing_cache: Path) -> list[list[str]]:
        """``sdrt engines`` for the dynamic profile (the Makefile's TRT_* defaults, widened to hold the
        benchmark's size) and for the static one (that size, one image); one timing cache for both."""

        def command(root: Path, batch: str, height: str, width: str) -> list[str]:
            return [
                *SDRT, "engines", "--artifacts", str(root), "--no-cpu", "--require", "--precision", ENGINE_PRECISION,
                "--batch", batch, "--height", height, "--width", width, "--timing-cache", str(timing_cache),
            ]  # fmt: skip

        def around(n: int) -> str:
            return f"{min(256, n)}:{n}:{max(1024, n)}"

        return [
            command(self.artifacts, "1:1:4", around(self.height), around(self.width)),
            command(self.static, "1", str(self.height), str(self.width)),
        ]

    def bench_config(self):
        from sdrt.benchmarks.bench import RESULTS_DIR, BenchConfig

        return BenchConfig(
            artifacts=(self.artifacts, self.static),
            variants=self.variants(),
            batches=(1,),
            sizes=((self.height, self.width),),
            steps=tuple(self.steps),
            runs=self.runs,
            warmups=self.warmups,
            baseline=True,
            baseline_device=BASELINE_DEVICE,
            baseline_dtype=BASELINE_DTYPE,
            results_dir=self.results_dir or RESULTS_DIR,
        )


SDRT = [sys.executable, "-m", "sdrt.runtime"]


# -- the budget ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assumptions:
    """What the budget is computed from: estimates for an H100/A100-class GPU and a data-centre host, not
    measurements (``--assume FILE``: a JSON object replacing any of these fields). Seconds per step are
    one guided 512x512 step (UNet batch 2) and scale with the pixels."""

    model_min: float = 0.5  # make sd15-random: random weights in SD 1.5's shapes, written as safetensors
    export_min: float = 2.0  # sdrt export: text encoder, UNet, VAE decoder in fp32, each checked against PyTorch
    engines_min: float = 2.0  # TensorRT fp16 engines, dynamic profile (the UNet most of it)
    static_engines_min: float = 0.75  # the same at a static profile, with the timing cache of the first
    test_gpu_min: float = 1.0  # make test-gpu (the tiny model), run beside making and exporting the model
    done_min: float = 0.2  # a stage already done: sdrt compares hashes and skips it
    matmul_min: float = 0.05  # the bench's one fp32 matmul measurement
    ort_trt_build_min: float = 2.0  # onnxruntime-tensorrt builds its own engines on its first load
    # Per worker (diffusers: PyTorch fp16 on CUDA; onnxruntime's providers: the fp32 graphs): load minutes,
    # seconds per step, and seconds per run besides the steps (text encoder, VAE decode, copies).
    load_min: dict[str, float] = field(
        default_factory=lambda: {
            "onnxruntime-cuda": 0.3,
            "onnxruntime-tensorrt": 0.3,
            "tensorrt": 0.1,
            "diffusers": 0.3,
        }
    )
    step_s: dict[str, float] = field(
        default_factory=lambda: {
            "onnxruntime-cuda": 0.06,
            "onnxruntime-tensorrt": 0.02,
            "tensorrt": 0.016,
            "diffusers": 0.03,
        }
    )
    run_s: dict[str, float] = field(
        default_factory=lambda: {
            "onnxruntime-cuda": 0.15,
            "onnxruntime-tensorrt": 0.06,
            "tensorrt": 0.05,
            "diffusers": 0.1,
        }
    )
    warmup_rounds: int = 2  # warm-up stops once two runs agree within 5%: on a GPU, after the second

    @classmethod
    def from_json(cls, text: str) -> Assumptions:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"--assume: expected fields from {', '.join(sorted(known))}, got {unknown}")
        base = cls()
        merged = {k: (getattr(base, k) | v if isinstance(v, dict) else v) for k, v in data.items()}
        return replace(base, **merged)


@dataclass(frozen=True)
class Stage:
    name: str
    minutes: float
    detail: str = ""
    beside: str = ""  # runs beside the main-line stages of this span ("" for a main-line stage)
    span: str = ""  # the stages that overlap share a span; "" for one on its own


def done_stages(plan: GpuPlan) -> set[str]:
    """Which stages an earlier run finished (cheap file checks; sdrt's own checks decide for real)."""
    from sdrt.export.random_model import is_current

    done = set()
    if is_current(plan.model, "sd15"):
        done.add("model")
    if (plan.artifacts / "manifest.json").is_file():
        done.add("export")
    for name, root in (("engines", plan.artifacts), ("static engines", plan.static)):
        if any((root / "engines").glob(f"*_{ENGINE_PRECISION}/engines.json")):
            done.add(name)
    if any((plan.artifacts / "engines" / "onnxruntime-tensorrt").glob("*")):
        done.add("onnxruntime-tensorrt engines")
    return done


def run_seconds(plan: GpuPlan, a: Assumptions, implementation: str, steps: int) -> float:
    """One run of one implementation: its steps and its per-run overhead, scaled by the pixels."""
    units = plan.height * plan.width / (512 * 512)
    return (steps * a.step_s[implementation] + a.run_s[implementation]) * units


def estimate(
    plan: GpuPlan, a: Assumptions = Assumptions(), done: set[str] | frozenset[str] = frozenset()
) -> list[Stage]:
    """Each stage's minutes, in the order the script runs them."""

    def build(name: str, minutes: float, detail: str, **kw) -> Stage:
        return Stage(name, a.done_min if name in done else minutes, "done before" if name in done else detail, **kw)

    impls = plan.implementations()
    missing = sorted({i for i in impls for d in (a.step_s, a.run_s, a.load_min) if i not in d})
    if missing:
        raise InputError(f"assumptions: expected step, run and load times for {', '.join(missing)}")
    stages = [
        Stage("test-gpu", a.test_gpu_min, "make test-gpu, beside the next two", beside="main", span="prepare"),
        build("model", a.model_min, "make sd15-random", span="prepare"),
        build("export", a.export_min, f"sdrt export: {', '.join(COMPONENTS)}", span="prepare"),
        build("engines", a.engines_min, f"TensorRT {ENGINE_PRECISION}, dynamic profile"),
        build("static engines", a.static_engines_min, f"TensorRT {ENGINE_PRECISION}, {plan.height}x{plan.width}"),
    ]
    load = sum(a.load_min[i] for i in impls)
    ort_trt = "onnxruntime-tensorrt engines" not in done
    load += a.ort_trt_build_min if ort_trt else 0.0
    detail = f"{len(impls)} workers" + (", onnxruntime-tensorrt building its engines" if ort_trt else "")
    stages += [Stage("bench: load", load, detail), Stage("bench: matmul", a.matmul_min)]
    rounds = max(plan.warmups, a.warmup_rounds) + plan.runs
    for steps in plan.steps:
        per_round = sum(run_seconds(plan, a, i, steps) for i in impls)
        stages.append(
            Stage(
                f"bench: {plan.height}x{plan.width}, {steps} steps",
                rounds * per_round / 60,
                f"{rounds} rounds (warm-up + {plan.runs} timed) x {per_round:.1f} s",
            )
        )
    return stages


def total_minutes(stages: list[Stage]) -> float:
    """Wall-clock minutes: stages in sequence, except that a span's side stages overlap its main ones."""
    spans: dict[str, list[float]] = {}
    total = 0.0
    for s in stages:
        if not s.span:
            total += s.minutes
            continue
        main, side = spans.setdefault(s.span, [0.0, 0.0])
        spans[s.span] = [main, side + s.minutes] if s.beside else [main + s.minutes, side]
    return total + sum(max(main, side) for main, side in spans.values())


def budget_table(stages: list[Stage], budget_min: float) -> str:
    lines = [f"  {s.name:34s} {s.minutes:5.1f} min  {s.detail}" for s in stages]
    lines.append(f"  {'total (overlaps counted once)':34s} {total_minutes(stages):5.1f} min  budget {budget_min:g} min")
    return "\n".join(lines)


def check_budget(plan: GpuPlan, stages: list[Stage]) -> None:
    total = total_minutes(stages)
    if total > plan.budget_min:
        biggest = sorted(stages, key=lambda s: -s.minutes)[:3]
        raise InputError(
            f"bench-gpu: refusing a plan estimated at {total:.1f} min, over the budget of {plan.budget_min:g} min "
            f"(largest: {', '.join(f'{s.name} {s.minutes:.1f} min' for s in biggest)}); ask for fewer steps or runs, "
            "or a larger --budget-min"
        )


# -- what this machine lacks ------------------------------------------------------------------------------
def gpu_unavailable_reasons() -> list[str]:
    """Why this machine cannot run the GPU backends, by the runtime's own availability checks (one line
    per backend that cannot run); empty where all of them can."""
    from sdrt.runtime import backends

    reasons = []
    for name in GPU_BACKENDS:
        try:
            reason = backends.get(name).unavailable_reason()
        except BackendError as e:  # a broken onnxruntime install says so, rather than that a GPU is missing
            reason = str(e)
        if reason:
            reasons.append(f"{name}: {reason}")
    return reasons


def baseline_unavailable_reason() -> str | None:
    """Why diffusers cannot be the baseline on CUDA here, or None."""
    try:
        import torch
    except ImportError as e:
        return f"torch is not installed ({e})"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (a CPU-only build? install the CUDA build: TORCH=...)"
    return None


# -- what the script runs -----------------------------------------------------------------------------
def link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ("engines",)) -> int:
    """Make ``dst`` hold ``src``'s files as hard links (copies across file systems), except the top-level
    entries in ``skip``, which ``dst`` keeps as its own; files ``dst`` has beyond ``src``'s are removed.
    Returns how many files were (re)linked."""
    src, dst = Path(src), Path(dst)
    wanted = {p.relative_to(src) for p in src.rglob("*") if p.is_file() and p.relative_to(src).parts[0] not in skip}
    changed = 0
    for rel in sorted(wanted):
        s, d = src / rel, dst / rel
        if d.exists() and os.path.samefile(s, d):
            continue
        d.parent.mkdir(parents=True, exist_ok=True)
        d.unlink(missing_ok=True)
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
        changed += 1
    if dst.is_dir():
        for p in sorted(dst.rglob("*"), reverse=True):
            rel = p.relative_to(dst)
            if rel.parts[0] in skip:
                continue
            if p.is_file() and rel not in wanted:
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    return changed


def _run(command: list[str]) -> None:
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def check(plan: GpuPlan, assumptions: Assumptions) -> int:
    reasons = gpu_unavailable_reasons()
    if reasons:
        print("bench-gpu: stopped: this machine cannot run the GPU benchmark:\n  " + "\n  ".join(reasons))
        return 2
    reason = baseline_unavailable_reason()
    if reason:
        print(f"bench-gpu: stopped: the diffusers baseline cannot run on CUDA: {reason}")
        return 2
    stages = estimate(plan, assumptions, done_stages(plan))
    print("bench-gpu: the plan (estimated minutes)\n" + budget_table(stages, plan.budget_min))
    check_budget(plan, stages)
    return 0


def export(plan: GpuPlan) -> int:
    _run(plan.export_command())
    print(f"linking {plan.artifacts}'s ONNX into {plan.static}: {link_tree(plan.artifacts, plan.static)} files")
    return 0


def engines(plan: GpuPlan) -> int:
    from sdrt.runtime.engine_cache import device_key
    from sdrt.runtime.tensorrt_backend import current_device

    WORK.mkdir(parents=True, exist_ok=True)
    cache = WORK / f"{device_key(current_device(), ENGINE_PRECISION)}.timing.cache"  # TensorRT-version specific
    for command in plan.engine_commands(cache):
        _run(command)
    return 0


def bench(plan: GpuPlan) -> int:
    from sdrt.benchmarks.bench import results_file, run_benchmark, summary_table
    from sdrt.benchmarks.devices import missing_gpu_fields

    config = plan.bench_config()
    rows = run_benchmark(config)
    print(summary_table(rows))
    lacking = {k for r in rows for k in missing_gpu_fields(r["device"])}
    if lacking:
        print(f"bench-gpu: rows lack GPU device fields {sorted(lacking)}", file=sys.stderr)
        return 1
    print(f"bench-gpu: {len(rows)} rows in {results_file(config.results_dir, rows[0]['device'])}")
    return 0


STEPS = {"check": check, "export": export, "engines": engines, "bench": bench}


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels such as 512x512, got {text!r}")
    return int(h), int(w)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sdrt.benchmarks.gpu_plan",
        description="The steps of `make bench-gpu` (tools/bench_gpu.sh); each takes the same plan options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "step", choices=tuple(STEPS), help="check the machine and the budget; export; build engines; measure"
    )
    p.add_argument("--size", type=_size, default=(512, 512), help="image size, HEIGHTxWIDTH")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50], help="denoising steps, one case each")
    p.add_argument("--runs", type=int, default=3, help="timed runs per case")
    p.add_argument("--warmups", type=int, default=2, help="least warm-up runs per case")
    p.add_argument("--budget-min", type=float, default=BUDGET_MIN, help="refuse a plan estimated to take longer")
    p.add_argument("--model", type=Path, default=MODEL, help="the SD 1.5-shaped random-weight model folder")
    p.add_argument("--artifacts", type=Path, default=ARTIFACTS, help="export folder (static engines: <it>-static)")
    p.add_argument("--results-dir", type=Path, default=None, help="where rows go (default: benchmarks/results)")
    p.add_argument("--assume", type=Path, default=None, help="JSON file replacing estimates of Assumptions")
    return p


def plan_from_args(argv: list[str]) -> tuple[str, GpuPlan, Assumptions]:
    args = parser().parse_args(argv)
    plan = GpuPlan(
        height=args.size[0],
        width=args.size[1],
        steps=tuple(args.steps),
        runs=args.runs,
        warmups=args.warmups,
        budget_min=args.budget_min,
        model=args.model,
        artifacts=args.artifacts,
        results_dir=args.results_dir,
    )
    assumptions = Assumptions.from_json(args.assume.read_text()) if args.assume else Assumptions()
    return args.step, plan, assumptions


def main(argv: list[str] | None = None) -> int:
    try:
        step, plan, assumptions = plan_from_args(sys.argv[1:] if argv is None else argv)
        return check(plan, assumptions) if step == "check" else STEPS[step](plan)
    except SdrtError as e:
        print(f"bench-gpu: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"bench-gpu: error: {' '.join(map(str, e.cmd))} exited with {e.returncode}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Time per scheduler step, excluding the UNet: guidance-free ``step`` (and its noise draws) on
SD 512x512 latents. ``python -m sdrt.benchmarks.schedulers [--steps 50] [--batch 2] [--size 64]``.

The model output is a fixed random array, so what is measured is the scheduler alone: the
per-step arithmetic, multistep history, and for stochastic samplers the torch-compatible noise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sdrt.runtime import schedulers
from sdrt.runtime.rng import PrefetchingNoise, TorchCompatibleGenerator

SD15 = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def time_scheduler(alias: str, steps: int, shape: tuple[int, ...], repeats: int, unet_ms: float) -> list[float]:
    """Seconds per step for each step of ``repeats`` full loops (the first loop is a warm-up).

    With ``unet_ms`` > 0 a stand-in for the UNet call (a GIL-free sleep) runs between steps and the
    noise is prefetched as the pipeline does, so the figure is the scheduler's share of the critical path.
    """
    scheduler = schedulers.from_config(SD15, alias)
    model_output = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    per_step: list[float] = []
    for r in range(repeats + 1):
        generator = TorchCompatibleGenerator(r)
        run = scheduler.start(steps)
        sample = generator.randn(shape) * np.float32(run.init_noise_sigma)
        noise = PrefetchingNoise(generator) if unet_ms > 0 else generator.randn
        for i in range(len(run.timesteps)):
            t0 = time.perf_counter()
            sample = run.scale_model_input(sample, i)
            t1 = time.perf_counter()
            time.sleep(unet_ms / 1e3)
            t2 = time.perf_counter()
            sample = run.step(model_output, i, sample, noise=noise)
            if r:
                per_step.append(time.perf_counter() - t2 + t1 - t0)
        if unet_ms > 0:
            noise.close()
    return per_step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sdrt.benchmarks.schedulers", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50, help="denoising steps per loop")
    p.add_argument("--batch", type=int, default=2, help="images per call (latents batch)")
    p.add_argument("--size", type=int, default=64, help="latent height and width (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=5, help="timed loops after one warm-up loop")
    p.add_argument(
        "--unet-ms",
        type=float,
        default=0.0,
        help="simulate a UNet call of this many ms between steps (noise then prefetched, as in the pipeline)",
    )
    p.add_argument("--only", nargs="*", default=None, help="scheduler names to time (default: all)")
    args = p.parse_args(argv)
    shape = (args.batch, 4, args.size, args.size)
    overlap = f", noise prefetched during a {args.unet_ms:g} ms UNet stand-in" if args.unet_ms else ""
    print(f"scheduler step time, latents {shape}, {args.steps} steps, {args.repeats} loops (UNet excluded{overlap})")
    print(f"{'scheduler':22s} {'median ms':>10s} {'p90 ms':>8s} {'max ms':>8s}")
    for alias in args.only or sorted(schedulers.ALIASES):
        t = np.array(time_scheduler(alias, args.steps, shape, args.repeats, args.unet_ms)) * 1e3
        print(f"{alias:22s} {np.median(t):10.3f} {np.percentile(t, 90):8.3f} {t.max():8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

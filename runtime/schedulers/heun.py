"""Heun's second-order method (Karras et al. 2022, Algorithm 1 without churn), step for step as diffusers'
``HeunDiscreteScheduler``.

diffusers spreads each Heun step over two model calls: the timesteps after the first are listed twice,
and the run alternates an Euler predictor (which remembers its derivative, step and sample) with a
corrector that averages the two derivatives and restarts from the remembered sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers.common import BETA_SCHEDULES, check_option
from sdrt.runtime.schedulers.sigmas import SigmaRun, SigmaScheduler, predict_x0

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


@dataclass
class HeunRun(SigmaRun):
    prev_derivative: np.ndarray | None = None
    dt: np.float32 | None = None
    prev_sample: np.ndarray | None = None

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        k = self.begin + index
        first_order = self.dt is None
        sigma, sigma_next = (self.sigmas[k], self.sigmas[k + 1]) if first_order else self.sigmas[k - 1 : k + 1]
        cfg = self.scheduler.config
        # the corrector evaluates the model at sigma_next, so that is the level its output refers to
        x0 = predict_x0(self.scheduler.prediction_type, model_output, sample, sigma if first_order else sigma_next)
        if cfg["clip_sample"]:
            x0 = np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])
        if first_order:
            derivative = (sample - x0) / sigma
            self.prev_derivative, self.dt, self.prev_sample = derivative, sigma_next - sigma, sample
            return (sample + derivative * self.dt).astype(np.float32, copy=False)
        derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
        prev = self.prev_sample + derivative * self.dt
        self.prev_derivative = self.dt = self.prev_sample = None
        return prev.astype(np.float32, copy=False)


class HeunDiscreteScheduler(SigmaScheduler):
    name = "HeunDiscreteScheduler"
    defaults = DEFAULTS
    order = 2
    run_class = HeunRun

    def betas(self) -> np.ndarray:
        cfg = self.config
        if cfg["trained_betas"] is None:  # trained betas make beta_schedule moot, in diffusers too
            check_option(self.name, cfg, "beta_schedule", (*BETA_SCHEDULES, "exp"))
            if cfg["beta_schedule"] == "exp":
                return _exp_betas(cfg["num_train_timesteps"])
        return super().betas()

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps, sigmas = super().schedule(num_inference_steps)
        sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
        timesteps = np.concatenate([timesteps[:1], np.repeat(timesteps[1:], 2)])
        return timesteps, sigmas


def _exp_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar(alpha_transform_type="exp")``: alpha_bar(t) = exp(-12 t)."""

    def alpha_bar(t: float) -> float:
        return math.exp(t * -12.0)

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)

"""DDPM (Ho et al. 2020) ancestral sampling, step for step as diffusers' ``DDPMScheduler``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    DiscreteRun,
    check_option,
    clip_original_sample,
    cumprod_like_torch,
    discrete_timesteps,
    img2img_begin,
    linspace_like_torch,
    make_betas,
    predict_original_sample,
)

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# "fixed_large_log" is left out: diffusers' step takes the square root of log(beta), which is NaN for every t > 0.
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
LEARNED = ("learned", "learned_range")
DDPM_BETA_SCHEDULES = (*BETA_SCHEDULES, "sigmoid", "laplace")


class DDPMScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`DDPMRun`."""

    name = "DDPMScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        self.config = cfg = {**DEFAULTS, **config}
        if cfg["variance_type"] == "fixed_large_log":
            raise InputError(
                f"{self.name} variance_type: expected one of {', '.join(VARIANCE_TYPES)} "
                "('fixed_large_log' makes diffusers' DDPM step return NaN), got 'fixed_large_log'"
            )
        self.variance_type = check_option(self.name, cfg, "variance_type", VARIANCE_TYPES)
        self.prediction_type = check_option(self.name, cfg, "prediction_type", PREDICTION_TYPES)
        check_option(self.name, cfg, "timestep_spacing", TIMESTEP_SPACINGS)
        self.alphas_cumprod = cumprod_like_torch(1.0 - _betas(cfg, self.name))

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> DDPMRun:
        timesteps = discrete_timesteps(self.config, num_inference_steps)
        # diffusers looks the previous timestep up in the full schedule, so img2img slicing keeps it.
        previous = np.append(timesteps[1:], -1)
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        return DDPMRun(self, timesteps[begin:], previous[begin:])


def _betas(cfg: dict, name: str) -> np.ndarray:
    if cfg["trained_betas"] is not None:
        return make_betas(cfg)
    schedule = check_option(name, cfg, "beta_schedule", DDPM_BETA_SCHEDULES)
    if schedule not in ("sigmoid", "laplace"):
        return make_betas(cfg)
    n = int(cfg["num_train_timesteps"])
    if schedule == "sigmoid":  # GeoDiff
        x = linspace_like_torch(-6, 6, n)
        betas = (1 / (1 + np.exp(-x))) * (cfg["beta_end"] - cfg["beta_start"]) + cfg["beta_start"]
    else:
        betas = _laplace_betas(n)
    # As given betas, so the zero-SNR rescale (if asked) is the shared one.
    return make_betas({**cfg, "trained_betas": betas})


def _laplace_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    return np.asarray([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


@dataclass
class DDPMRun(DiscreteRun):
    scheduler: DDPMScheduler
    timesteps: np.ndarray
    previous: np.ndarray  # the timestep each step lands on; -1 past the end

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        s = self.scheduler
        t, prev_t = int(self.timesteps[index]), int(self.previous[index])
        model_output, predicted_variance = self._split(model_output, sample)
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else np.float32(1.0)
        b_t, b_prev = 1 - a_t, 1 - a_prev
        alpha_t = a_t / a_prev
        beta_t = 1 - alpha_t
        x0 = clip_original_sample(predict_original_sample(s.prediction_type, model_output, sample, a_t), s.config)
        # Formula (7) of the DDPM paper: the posterior mean of x_prev given x0 and x_t.
        prev = (a_prev**0.5 * beta_t) / b_t * x0 + alpha_t**0.5 * b_prev / b_t * sample
        if t > 0:
            z = noise(model_output.shape)
            prev = prev + self._noise_scale(b_prev / b_t * beta_t, beta_t, predicted_variance) * z
        return prev.astype(np.float32, copy=False)

    def _split(self, model_output: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """A learned-variance UNet returns the variance as extra channels after the prediction."""
        channels = sample.shape[1]
        if self.scheduler.variance_type not in LEARNED:
            return model_output, None
        if model_output.shape[1] != 2 * channels:
            raise InputError(
                f"DDPMScheduler variance_type {self.scheduler.variance_type!r}: expected a model output with "
                f"{2 * channels} channels (prediction and variance), got {model_output.shape[1]}"
            )
        return model_output[:, :channels], model_output[:, channels:]

    def _noise_scale(self, variance, beta_t, predicted_variance):
        """Standard deviation of the added noise, per ``variance_type`` (diffusers' ``_get_variance``)."""
        kind = self.scheduler.variance_type
        variance = np.maximum(variance, np.float32(1e-20))  # diffusers takes logs of it
        if kind == "fixed_small":
            return variance**0.5
        if kind == "fixed_small_log":
            return np.exp(0.5 * np.log(variance))
        if kind == "fixed_large":
            return beta_t**0.5
        if kind == "learned":
            return predicted_variance**0.5
        frac = (predicted_variance + 1) / 2
        return np.exp(0.5 * (frac * np.log(beta_t) + (1 - frac) * np.log(variance)))

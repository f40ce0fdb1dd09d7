"""DDIM (Song et al. 2020), step for step as diffusers' ``DDIMScheduler``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.schedulers.common import (
    DiscreteRun,
    alphas_cumprod,
    check_prediction_type,
    clip_original_sample,
    discrete_timesteps,
    img2img_begin,
    predict_original_sample,
)

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class DDIMScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`DDIMRun`."""

    name = "DDIMScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        self.config = {**DEFAULTS, **config}
        self.prediction_type = check_prediction_type(self.config)
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.final_alpha_cumprod = np.float32(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> DDIMRun:
        timesteps = discrete_timesteps(self.config, num_inference_steps)
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        return DDIMRun(self, timesteps[begin:], num_inference_steps, eta)


@dataclass
class DDIMRun(DiscreteRun):
    scheduler: DDIMScheduler
    timesteps: np.ndarray
    num_inference_steps: int
    eta: float = 0.0

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        s, cfg = self.scheduler, self.scheduler.config
        t = int(self.timesteps[index])
        prev_t = t - cfg["num_train_timesteps"] // self.num_inference_steps
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        b_t = np.float32(1) - a_t
        x0 = predict_original_sample(s.prediction_type, model_output, sample, a_t)
        if s.prediction_type == "epsilon":
            eps = model_output
        elif s.prediction_type == "sample":
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        x0 = clip_original_sample(x0, cfg)
        variance = (np.float32(1) - a_prev) / b_t * (np.float32(1) - a_t / a_prev)
        std = np.float32(self.eta) * variance**0.5
        prev = a_prev**0.5 * x0 + (np.float32(1) - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * noise(sample.shape)
        return prev.astype(np.float32, copy=False)

"""Euler and Euler ancestral (Karras et al. 2022, k-diffusion), step for step as diffusers'
``EulerDiscreteScheduler`` and ``EulerAncestralDiscreteScheduler``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.sigmas import SigmaRun, SigmaScheduler, predict_x0

EULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}

ANCESTRAL_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}


@dataclass
class EulerRun(SigmaRun):
    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        # diffusers' churn (s_churn > 0) is a step argument the pipelines never pass, so sigma_hat == sigma
        k = self.begin + index
        sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
        x0 = predict_x0(self.scheduler.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (sigma_next - sigma)).astype(np.float32, copy=False)


class EulerDiscreteScheduler(SigmaScheduler):
    name = "EulerDiscreteScheduler"
    defaults = EULER_DEFAULTS
    order = 1
    run_class = EulerRun
    choices = {
        **SigmaScheduler.choices,
        "interpolation_type": ("linear", "log_linear"),
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        timesteps, sigmas = super().schedule(num_inference_steps)
        if self.config["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            # the EDM conditioning c_noise = log(sigma) / 4, which diffusers only applies to v-prediction
            timesteps = (0.25 * np.log(sigmas[:-1])).astype(np.float32)
        return timesteps, sigmas


@dataclass
class EulerAncestralRun(SigmaRun):
    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        if noise is None:
            raise InputError(f"{self.scheduler.name} step: expected a noise callable, got None")
        k = self.begin + index
        sigma, sigma_to = self.sigmas[k], self.sigmas[k + 1]
        x0 = predict_x0(self.scheduler.prediction_type, model_output, sample, sigma)
        # split the move to sigma_to into a deterministic step down and fresh noise of variance sigma_up^2
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_down - sigma)
        prev = prev + noise(model_output.shape) * sigma_up
        return prev.astype(np.float32, copy=False)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    name = "EulerAncestralDiscreteScheduler"
    defaults = ANCESTRAL_DEFAULTS
    order = 1
    run_class = EulerAncestralRun
    # diffusers accepts 'sample' at construction but raises NotImplementedError on the first step
    choices = {**SigmaScheduler.choices, "prediction_type": ("epsilon", "v_prediction")}

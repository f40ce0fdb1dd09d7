"""Latent Consistency Model multistep sampling (Luo et al. 2023), step for step as diffusers' ``LCMScheduler``.

Unlike the other schedulers, img2img strength is applied by diffusers' LCM ``set_timesteps`` itself (as
``LatentConsistencyModelImg2ImgPipeline`` calls it): the run keeps ``num_inference_steps`` steps, spread
over the lower ``strength`` part of the distillation schedule, instead of dropping the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiscreteRun,
    check_option,
    clip_original_sample,
    cumprod_like_torch,
    img2img_begin,
    make_betas,
    predict_original_sample,
)

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "original_inference_steps": 50,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,  # unused: every LCM timestep is >= 0, so diffusers never reaches the final alpha
    "steps_offset": 0,  # unused by diffusers' LCM, kept so configs round-trip
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",  # unused by diffusers' LCM, kept so configs round-trip
    "timestep_scaling": 10.0,
    "rescale_betas_zero_snr": False,
}
SIGMA_DATA = 0.5


class LCMScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`LCMRun`."""

    name = "LCMScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        self.config = cfg = {**DEFAULTS, **config}
        if cfg["trained_betas"] is None:
            check_option(self.name, cfg, "beta_schedule", BETA_SCHEDULES)
        self.prediction_type = check_option(self.name, cfg, "prediction_type", PREDICTION_TYPES)
        n_train, original = int(cfg["num_train_timesteps"]), int(cfg["original_inference_steps"])
        if not 1 <= original <= n_train:
            raise InputError(f"{self.name} original_inference_steps: expected 1..{n_train}, got {original}")
        self.alphas_cumprod = cumprod_like_torch(1.0 - make_betas(cfg))

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> LCMRun:
        """With ``begin``, the run starts at that index of the strength-1 schedule (diffusers' ``set_begin_index``,
        as SDXL img2img uses it) and ``strength`` is ignored; the last step still returns the denoised sample."""
        if begin is None:
            return LCMRun(self, self.timesteps(num_inference_steps, strength))
        timesteps = self.timesteps(num_inference_steps)
        begin = img2img_begin(num_inference_steps, 1.0, begin=begin, length=len(timesteps), name=self.name)
        return LCMRun(self, timesteps[begin:])

    def timesteps(self, num_inference_steps: int, strength: float = 1.0) -> np.ndarray:
        """diffusers' ``set_timesteps(num_inference_steps, strength=strength)``: evenly spaced picks, highest
        first, from the distillation schedule cut to its lowest ``original_inference_steps * strength`` steps."""
        if not 0.0 < strength <= 1.0:
            raise InputError(f"{self.name} strength: expected a value in (0, 1], got {strength}")
        original = int(self.config["original_inference_steps"])
        k = int(self.config["num_train_timesteps"]) // original
        available = int(original * strength)
        if not 1 <= num_inference_steps <= available:
            raise InputError(
                f"{self.name} num_inference_steps: expected 1..{available} (original_inference_steps {original} "
                f"x strength {strength}), got {num_inference_steps}"
            )
        origin = (np.arange(1, available + 1, dtype=np.int64) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, available, num=num_inference_steps, endpoint=False)).astype(np.int64)
        return origin[picks]

    def boundary_scalings(self, t: int) -> tuple[np.float32, np.float32]:
        """Consistency-model boundary condition: c_skip -> 1 and c_out -> 0 as t -> 0."""
        scaled = np.float32(t * self.config["timestep_scaling"])
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out


@dataclass
class LCMRun(DiscreteRun):
    scheduler: LCMScheduler
    timesteps: np.ndarray

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        s = self.scheduler
        t = int(self.timesteps[index])
        x0 = clip_original_sample(
            predict_original_sample(s.prediction_type, model_output, sample, s.alphas_cumprod[t]), s.config
        )
        c_skip, c_out = s.boundary_scalings(t)
        denoised = c_out * x0 + c_skip * sample
        if index == len(self.timesteps) - 1:
            return denoised.astype(np.float32, copy=False)
        # Multistep consistency sampling: re-noise the denoised estimate to the next timestep.
        a_prev = s.alphas_cumprod[int(self.timesteps[index + 1])]
        z = noise(model_output.shape)
        return (a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * z).astype(np.float32, copy=False)

"""Flow matching (rectified flow) Euler, step for step as diffusers' ``FlowMatchEulerDiscreteScheduler``: the
scheduler of Stable Diffusion 3 / 3.5 (and FLUX).

The model predicts a velocity v = noise - x0 along the straight path x_sigma = (1 - sigma) x0 + sigma noise,
and a step moves by (sigma_next - sigma) v. sigma runs from 1 toward 0, shifted toward noise by ``shift``
(sigma' = shift sigma / (1 + (shift - 1) sigma)), or, with ``use_dynamic_shifting``, by ``mu``, which the
pipeline derives from the image's token count (``calculate_shift``). The model's timestep is 1000 sigma.

Values are computed with diffusers' dtypes: the training sigmas in float32, the inference schedule in
float64 (NumPy), float32 once built. diffusers shifts the training schedule's ends in ``__init__`` and the
inference sigmas again in ``set_timesteps``; this does the same, so the schedules agree to the bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import check_begin, check_option, karras_sigmas, named_errors
from sdrt.runtime.schedulers.sigmas import check_sigma_spacing

FLOW_MATCH_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def calculate_shift(
    image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:  # fmt: skip
    """diffusers' SD3/FLUX ``calculate_shift``: mu grows linearly with the number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass
class FlowMatchRun:
    """Per-generation state. Index ``i`` of ``timesteps`` is diffusers' step_index ``begin + i``."""

    scheduler: FlowMatchEulerDiscreteScheduler
    timesteps: np.ndarray
    sigmas: np.ndarray  # the whole run's, the terminal one appended: diffusers indexes them by step_index
    begin: int
    init_noise_sigma: float = 1.0  # the initial latents are plain N(0, 1) noise

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        """diffusers' ``scale_noise``: the point at this step's sigma on the path from ``original`` to ``noise``."""
        sigma = np.float32(self.sigmas[self.begin + index])
        return (sigma * noise + (np.float32(1.0) - sigma) * original).astype(np.float32, copy=False)

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample  # flow matching feeds the latents as they are

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        k = self.begin + index
        sigma, sigma_next = self.sigmas[k], self.sigmas[k + 1]
        sample = sample.astype(np.float32, copy=False)
        if self.scheduler.config["stochastic_sampling"]:
            if noise is None:
                raise InputError(
                    f"{self.scheduler.name} step: expected a noise callable (stochastic_sampling), got None"
                )
            x0 = sample - sigma * model_output
            prev = (np.float32(1.0) - sigma_next) * x0 + sigma_next * noise(sample.shape)
        else:
            prev = sample + (sigma_next - sigma) * model_output
        return prev.astype(np.float32, copy=False)


class FlowMatchEulerDiscreteScheduler:
    """Immutable: built once from a config; each generation gets its own run. ``start(..., mu=)`` is required
    with ``use_dynamic_shifting`` (SD 3.5 configs): the pipeline computes it from the image size."""

    name = "FlowMatchEulerDiscreteScheduler"
    defaults = FLOW_MATCH_DEFAULTS
    order = 1
    flow_matching = True  # the pipeline noises, scales and conditions with sigma, not with alphas_cumprod

    def __init__(self, config: dict):
        self.config = {**self.defaults, **config}
        with named_errors(self.name):
            check_option(self.name, self.config, "time_shift_type", ("exponential", "linear"))
            check_sigma_spacing(self.config)
            n = int(self.config["num_train_timesteps"])
            shift = float(self.config["shift"])
            if n < 1 or not shift > 0:
                raise InputError(f"num_train_timesteps and shift: expected n >= 1 and shift > 0, got {n} and {shift}")
        train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
        if not self.config["use_dynamic_shifting"]:
            train = np.float32(shift) * train / (np.float32(1) + np.float32(shift - 1) * train)
        self.sigma_max, self.sigma_min = float(train[0]), float(train[-1])

    def mu(self, image_seq_len: int) -> float:
        """The dynamic shift for an image of ``image_seq_len`` tokens, from the config's bounds."""
        c = self.config
        return calculate_shift(image_seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"],
                               c["max_shift"])  # fmt: skip

    def schedule(self, num_inference_steps: int, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of the whole run, the terminal sigma appended, both float32."""
        c = self.config
        n = int(c["num_train_timesteps"])
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise InputError(f"num_inference_steps: expected an integer >= 1, got {num_inference_steps!r}")
        if c["use_dynamic_shifting"] and mu is None:
            raise InputError(f"{self.name}: expected mu with use_dynamic_shifting (the image's shift), got None")
        sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        if c["use_dynamic_shifting"]:
            base = math.exp(mu) if c["time_shift_type"] == "exponential" else mu
            sigmas = base / (base + (1 / sigmas - 1) ** 1.0)
        else:
            shift = float(c["shift"])
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        if c["shift_terminal"]:
            if num_inference_steps < 2:  # diffusers divides 0 by 0 here and runs on NaN
                raise InputError(
                    f"num_inference_steps: expected 2 or more with shift_terminal, got {num_inference_steps}"
                )
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - c["shift_terminal"]))
        if c["use_karras_sigmas"]:
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_inference_steps)
        elif c["use_exponential_sigmas"]:
            sigmas = np.exp(np.linspace(math.log(sigmas[0]), math.log(sigmas[-1]), num_inference_steps))
        sigmas = sigmas.astype(np.float32)
        if c["invert_sigmas"]:
            sigmas = (np.float32(1.0) - sigmas).astype(np.float32)
            final = np.float32(1.0)
        else:
            final = np.float32(0.0)
        timesteps = (sigmas * np.float32(n)).astype(np.float32)
        return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)

    def start(
        self,
        num_inference_steps: int,
        strength: float = 1.0,
        eta: float = 0.0,
        *,
        begin: int | None = None,
        mu: float | None = None,
    ) -> FlowMatchRun:
        """A run of ``num_inference_steps``; img2img starts where diffusers' SD3 ``get_timesteps`` does (which,
        unlike SD's, truncates after subtracting: 10 steps at strength 0.75 start at index 2, not 3)."""
        with named_errors(self.name):
            timesteps, sigmas = self.schedule(num_inference_steps, mu)
            if begin is not None:
                begin = check_begin(begin, len(timesteps), f"{self.name} ")
            else:
                if not 0.0 < strength <= 1.0:
                    raise InputError(f"{self.name} strength: expected a value in (0, 1], got {strength}")
                init = min(num_inference_steps * strength, num_inference_steps)
                begin = int(max(num_inference_steps - init, 0)) * self.order
        return FlowMatchRun(self, timesteps[begin:], sigmas, begin)

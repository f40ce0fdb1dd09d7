"""What the sigma-parameterised (k-diffusion style) schedulers share: Euler, Euler ancestral, Heun, LMS.

They all integrate an ODE in sigma = sqrt((1 - abar) / abar) rather than in timesteps: the schedule is
a descending array of noise levels ending in a final one (usually 0), the model input is scaled by
1 / sqrt(sigma^2 + 1), and img2img noises by ``x + sigma * noise``. Every value is computed with
diffusers' dtypes: float32 training sigmas, float64 interpolation, float32 once the schedule is built.
The betas are torch's bit for bit (``make_betas``): ``sigma_to_t`` turns an ulp of drift in
alphas_cumprod into ~1e-4 of a Karras timestep, and the harness compares every model input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import (
    TIMESTEP_SPACINGS,
    check_option,
    check_prediction_type,
    cumprod_like_torch,
    discrete_timesteps,
    img2img_begin,
    karras_sigmas,
    make_betas,
    named_errors,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)

# The sigma spacings diffusers offers besides the default; beta sigmas need scipy.stats.beta.ppf.
SPACING_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def check_sigma_spacing(config: dict) -> None:
    if config.get("use_beta_sigmas"):
        raise InputError(
            "use_beta_sigmas: expected False (beta sigmas need scipy's beta quantile function, which the NumPy "
            "runtime does not carry; use use_karras_sigmas or use_exponential_sigmas), got True"
        )
    chosen = [flag for flag in SPACING_FLAGS if config.get(flag)]
    if len(chosen) > 1:
        raise InputError(
            f"{chosen[1]}: expected False when {chosen[0]} is True (one sigma spacing at a time), got True"
        )


def sigma_timesteps(config: dict, num_inference_steps: int) -> np.ndarray:
    """float32 timesteps as the sigma schedulers space them: unlike DDIM, 'linspace' is not rounded."""
    steps = discrete_timesteps(config, num_inference_steps)  # also validates the count and the spacing
    if config["timestep_spacing"] == "linspace":
        n = config["num_train_timesteps"]
        return np.linspace(0, n - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    return steps.astype(np.float32)


def inference_sigmas(config: dict, alphas_cumprod: np.ndarray, num_inference_steps: int, bounds=(None, None)):
    """(timesteps, sigmas) of a run: sigmas has the final noise level appended, both float32.

    ``bounds`` are the configured (sigma_min, sigma_max) of the Karras/exponential spacing, None for the
    schedule's own ends.
    """
    timesteps = sigma_timesteps(config, num_inference_steps)
    train = sigmas_from_alphas_cumprod(alphas_cumprod)
    log_sigmas = np.log(train)
    if config.get("interpolation_type", "linear") == "log_linear":
        # diffusers makes n + 1 levels here, so the run ends on sigma_min before the final level
        ramp = np.linspace(np.log(train[-1]), np.log(train[0]), num_inference_steps + 1, dtype=np.float32)
        sigmas = np.exp(ramp)
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if config.get("use_karras_sigmas") or config.get("use_exponential_sigmas"):
        sigmas = _respaced(config, sigmas, num_inference_steps, bounds)
        timesteps = sigma_to_t(sigmas, log_sigmas).astype(np.float32)
    final = train[0] if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


def _respaced(config: dict, sigmas: np.ndarray, num_inference_steps: int, bounds) -> np.ndarray:
    """Karras or exponential levels between the configured bounds, else the interpolated schedule's ends."""
    sigma_min = float(sigmas[-1]) if bounds[0] is None else bounds[0]
    sigma_max = float(sigmas[0]) if bounds[1] is None else bounds[1]
    if config.get("use_karras_sigmas"):
        return karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def init_noise_sigma(config: dict, sigmas: np.ndarray) -> float:
    top = sigmas.max()
    if config["timestep_spacing"] in ("linspace", "trailing"):
        return float(top)
    return float((top**2 + 1) ** 0.5)  # diffusers' legacy value for 'leading', kept for parity


def predict_x0(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma) -> np.ndarray:
    """The denoised sample the model's output implies at noise level ``sigma``."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


class SigmaScheduler:
    """Immutable: built once from a config; each generation gets its own run (``run_class``)."""

    name = ""
    defaults: dict = {}
    order = 1
    run_class: type = None
    choices: dict[str, tuple] = {"timestep_spacing": TIMESTEP_SPACINGS}  # fields restricted to these values

    def __init__(self, config: dict):
        self.config = {**self.defaults, **config}
        with named_errors(self.name):
            self.prediction_type = check_prediction_type(self.config)
            for field, allowed in self.choices.items():
                check_option(self.name, self.config, field, allowed)
            check_sigma_spacing(self.config)
            self.alphas_cumprod = cumprod_like_torch(1.0 - self.betas())
        if self.config.get("rescale_betas_zero_snr"):
            # as diffusers: 2**-24 (fp16's smallest subnormal) instead of 0 keeps the first sigma finite
            self.alphas_cumprod[-1] = 2.0**-24

    def betas(self) -> np.ndarray:
        return make_betas(self.config)

    def schedule(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps, sigmas) of the whole run, before any img2img slicing."""
        bounds = tuple(self.config.get(k) if k in self.defaults else None for k in ("sigma_min", "sigma_max"))
        return inference_sigmas(self.config, self.alphas_cumprod, num_inference_steps, bounds)

    def start(self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None):
        with named_errors(self.name):
            timesteps, sigmas = self.schedule(num_inference_steps)
            begin = img2img_begin(
                num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
            )
        return self.run_class(self, timesteps[begin:], sigmas, begin, init_noise_sigma(self.config, sigmas))


@dataclass
class SigmaRun:
    """Per-generation state. Index ``i`` of ``timesteps`` is diffusers' step_index ``begin + i``."""

    scheduler: SigmaScheduler
    timesteps: np.ndarray
    sigmas: np.ndarray  # the whole run's, not sliced: diffusers indexes them by step_index
    begin: int
    init_noise_sigma: float

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        return (original + noise * self.sigmas[self.begin + index]).astype(np.float32, copy=False)

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = self.sigmas[self.begin + index]
        return (sample / (sigma**2 + 1) ** 0.5).astype(np.float32, copy=False)

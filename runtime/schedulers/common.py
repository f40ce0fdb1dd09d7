"""Noise schedules shared by the discrete-time schedulers, computed as diffusers computes them (float32)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

from sdrt.runtime.errors import InputError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def _alpha_bar_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.asarray(betas, dtype=np.float32)


def _schedule_betas(config: dict) -> np.ndarray:
    n = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], dtype=np.float32)
    if schedule in ("linear", "scaled_linear"):
        power = 2 if schedule == "scaled_linear" else 1
        return linspace_like_torch(config["beta_start"] ** (1 / power), config["beta_end"] ** (1 / power), n) ** power
    if schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(n)
    raise InputError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv:2305.08891, Algorithm 1), with torch's cumprod."""
    alphas_bar_sqrt = np.sqrt(cumprod_like_torch(1.0 - betas))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar = ((alphas_bar_sqrt - last) * (first / (first - last))) ** 2
    return (1 - np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])).astype(np.float32)


def make_betas(config: dict) -> np.ndarray:
    """The training betas bit for bit as diffusers' torch code computes them."""
    betas = _schedule_betas(config)
    return rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr") else betas


def alphas_cumprod(config: dict) -> np.ndarray:
    return cumprod_like_torch(1.0 - make_betas(config))


def discrete_timesteps(config: dict, num_inference_steps: int) -> np.ndarray:
    """Integer timesteps, highest first, following ``timestep_spacing`` as diffusers does."""
    n = int(config["num_train_timesteps"])
    if not 1 <= num_inference_steps <= n:
        raise InputError(f"num_inference_steps: expected 1..{n}, got {num_inference_steps}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing == "linspace":
        return np.linspace(0, n - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n // num_inference_steps
        steps = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return steps + int(config.get("steps_offset", 0))
    if spacing == "trailing":
        ratio = n / num_inference_steps
        return np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    raise InputError(f"timestep_spacing: expected one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")


def check_prediction_type(config: dict) -> str:
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise InputError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {kind!r}")
    return kind


def img2img_begin(
    num_inference_steps: int,
    strength: float,
    order: int = 1,
    *,
    begin: int | None = None,
    length: int | None = None,
    name: str = "",
) -> int:
    """Index of the first timestep of the full schedule a run executes.

    Without ``begin``: the img2img start for ``strength``, as diffusers' ``get_timesteps`` computes it. With it:
    ``begin`` itself, an index into the full schedule's ``length`` timesteps (diffusers' ``set_begin_index``, as
    SDXL's ``denoising_start`` uses it); ``strength`` is then ignored, as diffusers ignores it there. ``name``
    prefixes the error messages with the scheduler's name.
    """
    prefix = f"{name} " if name else ""
    if begin is not None:
        return check_begin(begin, length, prefix)
    if not 0.0 < strength <= 1.0:
        raise InputError(f"{prefix}strength: expected a value in (0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0) * order


def check_begin(begin, length: int, prefix: str = "") -> int:
    if isinstance(begin, (bool, np.bool_)) or not isinstance(begin, (int, np.integer)):
        raise InputError(
            f"{prefix}begin: expected an integer index into the full schedule's {length} timesteps, got {begin!r}"
        )
    if not 0 <= begin < length:
        raise InputError(
            f"{prefix}begin: expected an index in 0..{length - 1} (the full schedule has {length} timesteps), "
            f"got {begin}"
        )
    return int(begin)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Noise levels sigma_t = sqrt((1 - abar_t) / abar_t) of the training timesteps (ascending t)."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating in log-sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, highest first (diffusers' ``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def check_option(name: str, config: dict, key: str, allowed: tuple, expected: str | None = None):
    """Reject a config value up front, naming the scheduler, rather than failing mid-generation."""
    value = config[key]
    if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):  # so that True != 1
        if expected is None:
            expected = repr(allowed[0]) if len(allowed) == 1 else "one of " + ", ".join(map(str, allowed))
        raise InputError(f"{name} {key}: expected {expected}, got {value!r}")
    return value


@contextmanager
def named_errors(name: str):
    """Prefix the scheduler's name to the config errors raised by the field-level helpers here."""
    try:
        yield
    except InputError as e:
        if str(e).startswith(name):
            raise
        raise InputError(f"{name} {e}") from None


def dynamic_threshold(x0: np.ndarray, cfg: dict) -> np.ndarray:
    """Imagen's dynamic thresholding, per sample, as diffusers implements it."""
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    q = np.quantile(flat, cfg["dynamic_thresholding_ratio"], axis=1)
    q = np.clip(q, 1, cfg["sample_max_value"]).reshape(-1, *([1] * (x0.ndim - 1)))
    return np.clip(x0, -q, q) / q


def predict_original_sample(prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t):
    """x0 from the model output at a discrete timestep (DDPM formula 15 and its sample/v variants)."""
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_prod_t) ** 0.5 * model_output) / alpha_prod_t**0.5
    if prediction_type == "sample":
        return model_output
    return alpha_prod_t**0.5 * sample - (1 - alpha_prod_t) ** 0.5 * model_output


def clip_original_sample(x0: np.ndarray, cfg: dict) -> np.ndarray:
    """Thresholding wins over clip_sample when both are set, as in diffusers."""
    if cfg["thresholding"]:
        return dynamic_threshold(x0, cfg)
    if cfg["clip_sample"]:
        return np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])
    return x0


def add_noise_discrete(alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, t: int) -> np.ndarray:
    """Forward diffusion to integer timestep ``t`` (diffusers' DDPM-style ``add_noise``)."""
    a = alphas_cumprod[int(t)]
    return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32)


class DiscreteRun:
    """What the runs of timestep-space samplers (DDIM, DDPM, PNDM, LCM) share: the model input is not
    scaled, the initial noise has unit scale, and img2img noises a sample by ``alphas_cumprod``."""

    init_noise_sigma = 1.0

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        return add_noise_discrete(self.scheduler.alphas_cumprod, original, noise, self.timesteps[index])

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample


def cumprod_like_torch(values: np.ndarray) -> np.ndarray:
    """float32 cumulative product as torch computes it on CPU: accumulated in float64, each entry rounded to float32.

    ``np.cumprod(..., dtype=np.float32)`` accumulates in float32 and drifts ~1e-6 from diffusers' alphas_cumprod,
    enough to move a rounded Karras timestep.
    """
    return np.cumprod(np.asarray(values, dtype=np.float64)).astype(np.float32)


def linspace_like_torch(start: float, end: float, steps: int) -> np.ndarray:
    """float32 ``torch.linspace`` bit for bit as torch's CPU kernel computes it (steps >= 2): the first half counts up
    from ``start``, the rest down from ``end``, each value one fused multiply-add (one rounding).

    ``np.linspace(..., dtype=np.float32)`` rounds differently by an ulp here and there; through the cumulative product
    that moves alphas_cumprod by ~4e-7, which the sigma-space schedulers' ``sigma_to_t`` magnifies ~100x.
    """
    first, last = np.float32(start), np.float32(end)
    step = np.float64((last - first) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    return np.concatenate([first + step * i[:half], last - step * (steps - 1 - i[half:])]).astype(np.float32)

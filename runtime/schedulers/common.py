"""Noise schedules shared by the discrete-time schedulers, computed as diffusers computes them (float32)."""

from __future__ import annotations

import math

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


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (arXiv:2305.08891, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def make_betas(config: dict) -> np.ndarray:
    n = int(config["num_train_timesteps"])
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = np.linspace(config["beta_start"], config["beta_end"], n, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, n, dtype=np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _alpha_bar_betas(n)
    else:
        raise InputError(f"beta_schedule: expected one of {', '.join(BETA_SCHEDULES)}, got {schedule!r}")
    if config.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


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


def img2img_begin(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """Index of the first timestep an img2img run executes, as diffusers' ``get_timesteps`` computes it."""
    if not 0.0 < strength <= 1.0:
        raise InputError(f"strength: expected a value in (0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0) * order


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

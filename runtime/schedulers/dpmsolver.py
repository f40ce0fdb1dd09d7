"""DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), step for step as diffusers' ``DPMSolverMultistepScheduler``.

This module also holds the math the DPM-Solver family shares (noise-level schedules, the alpha/sigma/lambda view of
a VP schedule, model-output conversion, exponential-integrator weights); ``dpmsolver_single`` and ``unipc`` import it.
Scalars are np.float32 throughout because diffusers computes them as float32 tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import (
    TIMESTEP_SPACINGS,
    check_option,
    check_prediction_type,
    cumprod_like_torch,
    dynamic_threshold,
    img2img_begin,
    karras_sigmas,
    make_betas,
    named_errors,
    sigma_to_t,
    sigmas_from_alphas_cumprod,
)

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}

DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")
STOCHASTIC = ("sde-dpmsolver", "sde-dpmsolver++")
# Flow-matching and beta-distribution schedules are for other model families (and beta sigmas need scipy).
FLOW_AND_BETA = {
    "use_beta_sigmas": (False, "False (beta sigmas need scipy, which the NumPy runtime does not use)"),
    "use_flow_sigmas": (False, "False (flow-matching sigmas are not supported)"),
    "use_dynamic_shifting": (False, "False (dynamic shifting is for flow-matching models)"),
    "time_shift_type": ("exponential", "'exponential'"),
}


# ---- configuration checks shared by the DPM-Solver family ----


def check_common_options(name: str, config: dict) -> None:
    """Checks every DPM-family scheduler needs: the sigma-spacing switches and the options this runtime leaves out."""
    for key, (allowed, expected) in FLOW_AND_BETA.items():
        check_option(name, config, key, (allowed,), expected)
    spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if len(spacings) > 1:
        raise InputError(f"{name} {spacings[1]}: expected at most one of {', '.join(spacings)} to be True, got True")
    check_option(name, config, "final_sigmas_type", ("zero", "sigma_min"))
    if "timestep_spacing" in config:
        check_option(name, config, "timestep_spacing", TIMESTEP_SPACINGS, "one of " + ", ".join(TIMESTEP_SPACINGS))


def remap_legacy_names(config: dict) -> None:
    """diffusers silently maps DEIS/UniPC names to DPM-Solver's when one scheduler is built from another's config."""
    if config.get("algorithm_type") == "deis":
        config["algorithm_type"] = "dpmsolver++"
    if config.get("solver_type") in ("logrho", "bh1", "bh2"):
        config["solver_type"] = "midpoint"


def check_dpm_options(name: str, config: dict, algorithms: tuple) -> None:
    check_common_options(name, config)
    check_option(name, config, "algorithm_type", (*algorithms, "deis"))
    if config["algorithm_type"] not in DATA_PREDICTION:  # checked before the renaming, as diffusers does for 'deis'
        check_option(name, config, "final_sigmas_type", ("sigma_min",), f"'sigma_min' for {config['algorithm_type']!r}")
    remap_legacy_names(config)
    check_option(name, config, "solver_type", ("midpoint", "heun"))
    check_option(name, config, "solver_order", (1, 2, 3))
    check_option(name, config, "variance_type", (None,), "None (learned variance outputs are not supported)")


# ---- the VP schedule seen as noise levels ----


def training_noise_levels(name: str, config: dict) -> tuple[str, np.ndarray, np.ndarray]:
    """The prediction type, training alphas_cumprod and training sigmas of a config (errors name the scheduler)."""
    with named_errors(name):
        kind = check_prediction_type(config)
        alphas_cumprod = cumprod_like_torch(1.0 - make_betas(config))
    if config.get("rescale_betas_zero_snr"):
        alphas_cumprod[-1] = 2.0**-24  # as diffusers: near zero so the first sigma stays finite
    return kind, alphas_cumprod, sigmas_from_alphas_cumprod(alphas_cumprod)


def alpha_sigma(sigma) -> tuple[np.float32, np.float32]:
    """The (alpha_t, sigma_t) of a VP process whose noise-to-signal ratio is ``sigma``."""
    sigma = np.float32(sigma)
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def log_snr(sigma) -> np.float32:
    """lambda_t = log(alpha_t / sigma_t); +inf at the final sigma 0, as in diffusers."""
    alpha_t, sigma_t = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha_t) - np.log(sigma_t)


def last_timestep(alphas_cumprod: np.ndarray, lambda_min_clipped: float) -> int:
    """One past the last training timestep whose log-SNR is at least ``lambda_min_clipped``."""
    lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1 - alphas_cumprod))
    clipped = np.searchsorted(lambdas[::-1], np.float32(lambda_min_clipped), side="left")
    return len(alphas_cumprod) - int(clipped)


def check_steps(name: str, num_inference_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise InputError(f"{name} num_inference_steps: expected 1..{num_train_timesteps}, got {num_inference_steps}")


def spaced_timesteps(config: dict, num_inference_steps: int, last: int) -> np.ndarray:
    """Timesteps for ``num_inference_steps + 1`` points, dropping the last (the family's variant of the spacings)."""
    n = num_inference_steps
    spacing = config.get("timestep_spacing", "linspace")
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        steps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return steps + int(config.get("steps_offset", 0))
    ratio = config["num_train_timesteps"] / n  # trailing
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


def resample_sigmas(
    config: dict,
    train_sigmas: np.ndarray,
    timesteps: np.ndarray,
    n: int,
    *,
    round_timesteps: bool = True,
    sigma_range: tuple = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` inference noise levels (float64, highest first) and their int64 timesteps, as the config picks them.

    Timesteps read back from Karras or Lu sigmas are rounded if ``round_timesteps``, else truncated like the
    exponential ones. ``sigma_range`` is (sigma_min, sigma_max) where the class has them; None: the training range.
    """
    log_sigmas = np.log(train_sigmas)
    lo = float(train_sigmas[0]) if sigma_range[0] is None else sigma_range[0]
    hi = float(train_sigmas[-1]) if sigma_range[1] is None else sigma_range[1]
    if config.get("use_karras_sigmas"):
        sigmas, rounded = karras_sigmas(lo, hi, n), round_timesteps
    elif config.get("use_lu_lambdas"):  # uniform in log-SNR: the Karras ramp with rho = 1 over log sigma
        sigmas, rounded = (
            np.exp(karras_sigmas(float(log_sigmas[0]), float(log_sigmas[-1]), n, rho=1.0)),
            round_timesteps,
        )
    elif config.get("use_exponential_sigmas"):
        sigmas, rounded = np.exp(np.linspace(math.log(hi), math.log(lo), n)), False
    else:
        return timesteps, np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
    t = sigma_to_t(sigmas, log_sigmas)
    return (t.round() if rounded else t).astype(np.int64), sigmas


# ---- model outputs ----


def to_data(kind: str, model_output: np.ndarray, sample: np.ndarray, sigma) -> np.ndarray:
    """The model's estimate of the clean sample x0."""
    if kind == "sample":
        return model_output
    alpha_t, sigma_t = alpha_sigma(sigma)
    if kind == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    return alpha_t * sample - sigma_t * model_output  # v_prediction


def to_noise(kind: str, model_output: np.ndarray, sample: np.ndarray, sigma) -> np.ndarray:
    """The model's estimate of the noise epsilon."""
    if kind == "epsilon":
        return model_output
    alpha_t, sigma_t = alpha_sigma(sigma)
    if kind == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    return alpha_t * model_output + sigma_t * sample  # v_prediction


def convert_model_output(config: dict, kind: str, model_output: np.ndarray, sample: np.ndarray, sigma) -> np.ndarray:
    """What DPM-Solver integrates: x0 for the ++ variants, epsilon otherwise (thresholded through x0 if asked)."""
    if config["algorithm_type"] in DATA_PREDICTION:
        x0 = to_data(kind, model_output, sample, sigma)
        return dynamic_threshold(x0, config) if config["thresholding"] else x0
    eps = to_noise(kind, model_output, sample, sigma)
    if not config["thresholding"]:
        return eps
    alpha_t, sigma_t = alpha_sigma(sigma)
    x0 = dynamic_threshold((sample - sigma_t * eps) / alpha_t, config)
    return (sample - alpha_t * x0) / sigma_t


def draw_noise(name: str, config: dict, noise: Callable | None, shape: tuple) -> np.ndarray | None:
    if config["algorithm_type"] not in STOCHASTIC:
        return None
    if noise is None:
        raise InputError(f"{name} noise: expected a callable noise(shape) for {config['algorithm_type']!r}, got None")
    return np.asarray(noise(tuple(shape)), dtype=np.float32)


# ---- the exponential-integrator step ----


class Weights(NamedTuple):
    """x_t = keep * x_b + phi1 * D0 + (order-2 weight) * D1 + phi3 * D2 + noise * z, for a step from sigma_b."""

    h: np.float32
    keep: np.float32
    phi1: np.float32
    phi2: np.float32
    phi3: np.float32 | None
    noise: np.float32 | None

    def d1(self, solver_type: str) -> np.float32:
        return 0.5 * self.phi1 if solver_type == "midpoint" else self.phi2


def weights(algorithm: str, sigma_b, sigma_t) -> Weights:
    """Weights of the step from noise level ``sigma_b`` to ``sigma_t``, in diffusers' float32 arithmetic.

    The higher-order weights are indeterminate (inf/inf) on the last step to sigma 0, where they go unused.
    """
    alpha_t, s_t = alpha_sigma(sigma_t)
    alpha_b, s_b = alpha_sigma(sigma_b)
    h = log_snr(sigma_t) - log_snr(sigma_b)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if algorithm == "dpmsolver++":
            e = np.exp(-h) - 1.0
            return Weights(
                h, s_t / s_b, -(alpha_t * e), alpha_t * (e / h + 1.0), -(alpha_t * ((e + h) / h**2 - 0.5)), None
            )
        if algorithm == "dpmsolver":
            e = np.exp(h) - 1.0
            return Weights(
                h, alpha_t / alpha_b, -(s_t * e), -(s_t * (e / h - 1.0)), -(s_t * ((e - h) / h**2 - 0.5)), None
            )
        if algorithm == "sde-dpmsolver++":
            e = 1 - np.exp(-2.0 * h)
            phi3 = alpha_t * ((e - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            return Weights(
                h, s_t / s_b * np.exp(-h), alpha_t * e, alpha_t * (e / (-2.0 * h) + 1.0), phi3, s_t * np.sqrt(e)
            )
        e = np.exp(h) - 1.0  # sde-dpmsolver, which diffusers gives no third-order step
        noise = s_t * np.sqrt(np.exp(2 * h) - 1.0)
        return Weights(h, alpha_t / alpha_b, -(2.0 * (s_t * e)), -(2.0 * (s_t * (e / h - 1.0))), None, noise)


def zero_length(sigmas: np.ndarray, i: int) -> bool:
    """Whether step ``i`` goes nowhere, as the last step of a resampled schedule ending on 'sigma_min' does.

    diffusers then takes heun and third-order steps anyway, computing 0/0 = NaN; the first-order step is the
    identity (the limit), and equals what diffusers returns in the cases it keeps finite.
    """
    return bool(log_snr(sigmas[i + 1]) == log_snr(sigmas[i]))


def integrate(w: Weights, sample: np.ndarray, terms: list, z: np.ndarray | None) -> np.ndarray:
    x = w.keep * sample
    for weight, d in terms:
        x = x + weight * d
    return x if z is None else x + w.noise * z


def first_order_update(algorithm: str, m0: np.ndarray, sample: np.ndarray, sigma_s, sigma_t, z) -> np.ndarray:
    """DPM-Solver-1 (DDIM in the ODE case) from ``sigma_s`` to ``sigma_t``."""
    w = weights(algorithm, sigma_s, sigma_t)
    return integrate(w, sample, [(w.phi1, m0)], z)


# ---- runs ----


@dataclass
class DPMFamilyRun:
    """Per-generation state common to the family; ``sigmas`` covers the full schedule, ``begin`` is the img2img start."""

    scheduler: object
    timesteps: np.ndarray
    sigmas: np.ndarray
    begin: int
    init_noise_sigma: float = 1.0

    def add_noise(self, original: np.ndarray, noise: np.ndarray, index: int) -> np.ndarray:
        alpha_t, sigma_t = alpha_sigma(self.sigmas[self.begin + index])
        return (alpha_t * original + sigma_t * noise).astype(np.float32, copy=False)

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample


def dpm_schedule(scheduler, num_inference_steps: int, round_timesteps: bool) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps (int64) and the float32 sigmas, final one appended, of a DPM-Solver schedule."""
    cfg = scheduler.config
    check_steps(scheduler.name, num_inference_steps, cfg["num_train_timesteps"])
    timesteps = spaced_timesteps(cfg, num_inference_steps, scheduler.last_timestep)
    timesteps, sigmas = resample_sigmas(
        cfg, scheduler.train_sigmas, timesteps, num_inference_steps, round_timesteps=round_timesteps
    )
    final = scheduler.train_sigmas[0] if cfg["final_sigmas_type"] == "sigma_min" else 0
    return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


class DPMSolverMultistepScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`DPMSolverMultistepRun`."""

    name = "DPMSolverMultistepScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        cfg = {**DEFAULTS, **config}
        check_dpm_options(self.name, cfg, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"))
        if cfg["algorithm_type"] == "sde-dpmsolver":  # diffusers has no third-order sde-dpmsolver step and crashes
            check_option(self.name, cfg, "solver_order", (1, 2), "1 or 2 for 'sde-dpmsolver'")
        self.prediction_type, alphas_cumprod, self.train_sigmas = training_noise_levels(self.name, cfg)
        self.config = cfg
        self.last_timestep = last_timestep(alphas_cumprod, cfg["lambda_min_clipped"])

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> DPMSolverMultistepRun:
        round_timesteps = self.config["beta_schedule"] != "squaredcos_cap_v2"  # as diffusers, for Karras and Lu
        timesteps, sigmas = dpm_schedule(self, num_inference_steps, round_timesteps)
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        return DPMSolverMultistepRun(self, timesteps[begin:], sigmas, begin)


@dataclass
class DPMSolverMultistepRun(DPMFamilyRun):
    outputs: list = field(default_factory=list)  # converted model outputs, newest last
    lower_order_nums: int = 0

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        s, cfg = self.scheduler, self.scheduler.config
        i = self.begin + index
        m = convert_model_output(cfg, s.prediction_type, model_output, sample, self.sigmas[i])
        self.outputs = [*self.outputs, m][-cfg["solver_order"] :]
        sample = sample.astype(np.float32, copy=False)
        z = draw_noise(s.name, cfg, noise, m.shape)
        order = self._order(i)
        if order == 1:
            prev = first_order_update(cfg["algorithm_type"], m, sample, self.sigmas[i], self.sigmas[i + 1], z)
        elif order == 2:
            prev = self._second_order(i, sample, z)
        else:
            prev = self._third_order(i, sample, z)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        return prev.astype(np.float32, copy=False)

    def _order(self, i: int) -> int:
        """Solver order at step ``i``: warm up from order 1, and drop order near the end as diffusers does."""
        cfg = self.scheduler.config
        n = len(self.sigmas) - 1
        short = cfg["lower_order_final"] and n < 15
        final = i == n - 1 and (cfg["euler_at_final"] or short or cfg["final_sigmas_type"] == "zero")
        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or final or zero_length(self.sigmas, i):
            return 1
        if cfg["solver_order"] == 2 or self.lower_order_nums < 2 or (i == n - 2 and short):
            return 2
        return 3

    def _second_order(self, i: int, sample: np.ndarray, z) -> np.ndarray:
        cfg, sig = self.scheduler.config, self.sigmas
        w = weights(cfg["algorithm_type"], sig[i], sig[i + 1])
        m0, m1 = self.outputs[-1], self.outputs[-2]
        r0 = (log_snr(sig[i]) - log_snr(sig[i - 1])) / w.h
        d1 = (1.0 / r0) * (m0 - m1)
        return integrate(w, sample, [(w.phi1, m0), (w.d1(cfg["solver_type"]), d1)], z)

    def _third_order(self, i: int, sample: np.ndarray, z) -> np.ndarray:
        cfg, sig = self.scheduler.config, self.sigmas
        w = weights(cfg["algorithm_type"], sig[i], sig[i + 1])
        m0, m1, m2 = self.outputs[-1], self.outputs[-2], self.outputs[-3]
        lam0, lam1, lam2 = log_snr(sig[i]), log_snr(sig[i - 1]), log_snr(sig[i - 2])
        r0, r1 = (lam0 - lam1) / w.h, (lam1 - lam2) / w.h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return integrate(w, sample, [(w.phi1, m0), (w.phi2, d1), (w.phi3, d2)], z)

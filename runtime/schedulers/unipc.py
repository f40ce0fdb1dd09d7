"""UniPC (Zhao et al. 2023), step for step as diffusers' ``UniPCMultistepScheduler``.

Each step first corrects the sample the previous step predicted (UniC, using the model output just computed at it),
then predicts the next sample (UniP). Both solve a small linear system for their coefficients; diffusers uses
``torch.linalg.solve``, here ``numpy.linalg.solve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import check_option, dynamic_threshold, img2img_begin
from sdrt.runtime.schedulers.dpmsolver import (
    DPMFamilyRun,
    alpha_sigma,
    check_common_options,
    check_steps,
    log_snr,
    resample_sigmas,
    spaced_timesteps,
    to_data,
    to_noise,
    training_noise_levels,
    zero_length,
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
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}


class UniPCMultistepScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`UniPCMultistepRun`."""

    name = "UniPCMultistepScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        cfg = {**DEFAULTS, **config}
        if cfg["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers' silent mapping of DPM-Solver names
            cfg["solver_type"] = "bh2"
        _check_options(self.name, cfg)
        self.prediction_type, _, self.train_sigmas = training_noise_levels(self.name, cfg)
        self.config = cfg
        self.disable_corrector = frozenset(cfg["disable_corrector"])

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> UniPCMultistepRun:
        timesteps, sigmas = self._schedule(num_inference_steps)
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        return UniPCMultistepRun(self, timesteps[begin:], sigmas, begin)

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        check_steps(self.name, n, cfg["num_train_timesteps"])
        timesteps = spaced_timesteps(cfg, n, cfg["num_train_timesteps"])
        sigma_range = (cfg["sigma_min"], cfg["sigma_max"])
        timesteps, sigmas = resample_sigmas(cfg, self.train_sigmas, timesteps, n, sigma_range=sigma_range)
        resampled = cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]
        if cfg["final_sigmas_type"] == "zero":
            final = 0
        else:  # a resampled schedule ends on its own smallest sigma, the plain one on the first training sigma
            final = sigmas[-1] if resampled else self.train_sigmas[0]
        return timesteps, np.concatenate([sigmas, [final]]).astype(np.float32)


def _check_options(name: str, cfg: dict) -> None:
    check_common_options(name, cfg)
    check_option(name, cfg, "solver_type", ("bh1", "bh2"))
    check_option(name, cfg, "solver_p", (None,), "None (an external predictor scheduler is not supported)")
    check_option(name, cfg, "shift_terminal", (None,), "None (only meaningful with flow sigmas)")
    order = cfg["solver_order"]
    if not (isinstance(order, int) and not isinstance(order, bool) and order >= 1):
        raise InputError(f"{name} solver_order: expected a positive integer, got {order!r}")
    if cfg["final_sigmas_type"] == "zero":
        # On the last step to sigma 0 these variants divide by an infinite step in diffusers and return NaN or inf.
        why = "final_sigmas_type 'zero' (diffusers returns NaN/inf on its last step otherwise)"
        check_option(name, cfg, "solver_type", ("bh2",), f"'bh2' with {why}")
        check_option(name, cfg, "predict_x0", (True,), f"True with {why}")
        if order > 1:
            check_option(name, cfg, "lower_order_final", (True,), f"True with solver_order > 1 and {why}")


class _BhStep:
    """The B(h) update from ``sigmas[base]`` to ``sigmas[base + 1]`` shared by UniP and UniC.

    ``outputs`` ends with the converted model output at ``base``, earlier outputs before it.
    """

    def __init__(self, run: UniPCMultistepRun, base: int, outputs: list, order: int):
        cfg, sig = run.scheduler.config, run.sigmas
        alpha_t, sigma_t = alpha_sigma(sig[base + 1])
        alpha_s0, sigma_s0 = alpha_sigma(sig[base])
        lam_s0 = log_snr(sig[base])
        h = log_snr(sig[base + 1]) - lam_s0
        self.m0 = outputs[-1]
        rks = [(log_snr(sig[base - k]) - lam_s0) / h for k in range(1, order)]
        self.d1s = [(outputs[-(k + 1)] - self.m0) / rk for k, rk in enumerate(rks, start=1)]
        self.hh = -h if cfg["predict_x0"] else h
        self.h_phi_1 = np.expm1(self.hh)  # h * phi_1(h) = e^h - 1
        self.b_h = self.hh if cfg["solver_type"] == "bh1" else np.expm1(self.hh)
        self.rks = np.array([*rks, 1.0], dtype=np.float32)
        if cfg["predict_x0"]:
            self.keep, self.scale = sigma_t / sigma_s0, alpha_t
        else:
            self.keep, self.scale = alpha_t / alpha_s0, sigma_t

    def base_update(self, x: np.ndarray) -> np.ndarray:
        return self.keep * x - self.scale * self.h_phi_1 * self.m0

    def rhos(self, square: int) -> np.ndarray:
        """Solve the leading ``square`` rows and columns of the order conditions R rho = b (a Vandermonde system)."""
        h_phi_k = self.h_phi_1 / self.hh - 1
        factorial_i = 1
        rows, b = [], []
        for i in range(1, len(self.rks) + 1):
            rows.append(self.rks ** (i - 1))
            b.append(h_phi_k * factorial_i / self.b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / self.hh - 1 / factorial_i
        r, b = np.stack(rows)[:square, :square], np.array(b[:square], dtype=np.float32)
        return np.linalg.solve(r, b).astype(np.float32)


def _weighted_sum(weights, terms: list):
    total = 0
    for w, d in zip(weights, terms):
        total = total + w * d
    return total


@dataclass
class UniPCMultistepRun(DPMFamilyRun):
    outputs: list = field(default_factory=list)  # converted model outputs, newest last
    lower_order_nums: int = 0
    last_sample: np.ndarray | None = None  # the sample the last prediction started from
    this_order: int = 0  # order of the last prediction; its correction uses the same

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        cfg = self.scheduler.config
        i = self.begin + index
        m = self._convert(model_output, sample, self.sigmas[i])
        if i > 0 and i - 1 not in self.scheduler.disable_corrector and self.last_sample is not None:
            sample = self._correct(i, m)
        self.outputs = [*self.outputs, m][-cfg["solver_order"] :]
        order = min(cfg["solver_order"], len(self.sigmas) - 1 - i) if cfg["lower_order_final"] else cfg["solver_order"]
        self.this_order = min(order, self.lower_order_nums + 1)  # warm up from order 1
        self.last_sample = sample
        prev = self._predict(i, sample)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg["solver_order"])
        return prev.astype(np.float32, copy=False)

    def _convert(self, model_output: np.ndarray, sample: np.ndarray, sigma) -> np.ndarray:
        s, cfg = self.scheduler, self.scheduler.config
        if not cfg["predict_x0"]:  # diffusers ignores thresholding here
            return to_noise(s.prediction_type, model_output, sample, sigma)
        x0 = to_data(s.prediction_type, model_output, sample, sigma)
        return dynamic_threshold(x0, cfg) if cfg["thresholding"] else x0

    def _predict(self, i: int, sample: np.ndarray) -> np.ndarray:
        """UniP: from ``sample`` at sigmas[i] to sigmas[i + 1]."""
        order = 1 if zero_length(self.sigmas, i) else self.this_order
        step = _BhStep(self, i, self.outputs, order)
        x_t = step.base_update(sample)
        if order == 1:
            return x_t
        rhos = np.array([0.5], dtype=np.float32) if order == 2 else step.rhos(order - 1)
        return x_t - step.scale * step.b_h * _weighted_sum(rhos, step.d1s)

    def _correct(self, i: int, model_t: np.ndarray) -> np.ndarray:
        """UniC: redo the last prediction, into sigmas[i], now that the model output ``model_t`` there is known."""
        order = self.this_order
        step = _BhStep(self, i - 1, self.outputs, order)
        x_t = step.base_update(self.last_sample)
        rhos = np.array([0.5], dtype=np.float32) if order == 1 else step.rhos(order)
        correction = _weighted_sum(rhos[:-1], step.d1s) + rhos[-1] * (model_t - step.m0)
        return x_t - step.scale * step.b_h * correction

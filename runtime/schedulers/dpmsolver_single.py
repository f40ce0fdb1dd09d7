"""DPM-Solver / DPM-Solver++ single-step (Lu et al. 2022), step for step as diffusers' ``DPMSolverSinglestepScheduler``.

A k-th order step here spends k model calls: the group's first call takes a first-order step from the group's
starting sample, and the last call jumps from that same starting sample using every output of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.schedulers.common import check_option, img2img_begin
from sdrt.runtime.schedulers.dpmsolver import (
    DPMFamilyRun,
    check_dpm_options,
    convert_model_output,
    dpm_schedule,
    draw_noise,
    first_order_update,
    integrate,
    last_timestep,
    log_snr,
    training_noise_levels,
    weights,
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
    "lower_order_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}


class DPMSolverSinglestepScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`DPMSolverSinglestepRun`."""

    name = "DPMSolverSinglestepScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        cfg = {**DEFAULTS, **config}
        check_dpm_options(self.name, cfg, ("dpmsolver++", "sde-dpmsolver++", "dpmsolver"))
        if cfg["algorithm_type"] == "dpmsolver":  # diffusers' thresholding path for it indexes by a None timestep
            check_option(self.name, cfg, "thresholding", (False,), "False for 'dpmsolver'")
        self.prediction_type, alphas_cumprod, self.train_sigmas = training_noise_levels(self.name, cfg)
        self.config = cfg
        self.last_timestep = last_timestep(alphas_cumprod, cfg["lambda_min_clipped"])

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> DPMSolverSinglestepRun:
        timesteps, sigmas = dpm_schedule(self, num_inference_steps, round_timesteps=True)
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        orders = order_list(self.config, num_inference_steps)
        return DPMSolverSinglestepRun(self, timesteps[begin:], sigmas, begin, orders=orders)


def order_list(cfg: dict, steps: int) -> list[int]:
    """The solver order of each step, as diffusers' ``get_order_list``.

    diffusers switches ``lower_order_final`` on (for good, in its mutable config) when the step count is not a
    multiple of the order or the last sigma is zero; here that is decided per run, the config staying as given.
    """
    order = cfg["solver_order"]
    lower_final = cfg["lower_order_final"] or steps % order != 0 or cfg["final_sigmas_type"] == "zero"
    if not lower_final:
        orders = list(range(1, order + 1)) * (steps // order)
    elif order == 3:
        tail = {0: [1, 2, 1], 1: [1], 2: [1, 2]}[steps % 3]
        orders = [1, 2, 3] * (steps // 3 - (steps % 3 == 0)) + tail
    elif order == 2:
        orders = [1, 2] * (steps // 2 - (steps % 2 == 0)) + ([1, 1] if steps % 2 == 0 else [1])
    else:
        orders = [1] * steps
    if cfg["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


@dataclass
class DPMSolverSinglestepRun(DPMFamilyRun):
    orders: list = field(default_factory=list)  # solver order per step of the full schedule
    outputs: list = field(default_factory=list)  # converted model outputs, newest last
    group_sample: np.ndarray | None = None  # the sample the current order group started from

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        s, cfg = self.scheduler, self.scheduler.config
        i = self.begin + index
        m = convert_model_output(cfg, s.prediction_type, model_output, sample, self.sigmas[i])
        self.outputs = [*self.outputs, m][-cfg["solver_order"] :]
        z = draw_noise(s.name, cfg, noise, m.shape)
        # An img2img run can begin mid-group, before the group's earlier outputs exist.
        order = min(self.orders[i], len(self.outputs))
        if order == 1:
            self.group_sample = sample
            prev = first_order_update(cfg["algorithm_type"], m, sample, self.sigmas[i], self.sigmas[i + 1], z)
        elif order == 2:
            prev = self._second_order(i, z)
        else:
            prev = self._third_order(i, z)
        return prev.astype(np.float32, copy=False)

    def _second_order(self, i: int, z) -> np.ndarray:
        cfg, sig = self.scheduler.config, self.sigmas
        w = weights(cfg["algorithm_type"], sig[i - 1], sig[i + 1])
        m0, m1 = self.outputs[-1], self.outputs[-2]
        r0 = (log_snr(sig[i]) - log_snr(sig[i - 1])) / w.h
        d1 = (1.0 / r0) * (m0 - m1)
        return integrate(w, self.group_sample, [(w.phi1, m1), (w.d1(cfg["solver_type"]), d1)], z)

    def _third_order(self, i: int, z) -> np.ndarray:
        cfg, sig = self.scheduler.config, self.sigmas
        w = weights(cfg["algorithm_type"], sig[i - 2], sig[i + 1])
        m0, m1, m2 = self.outputs[-1], self.outputs[-2], self.outputs[-3]
        lam2 = log_snr(sig[i - 2])
        r0, r1 = (log_snr(sig[i]) - lam2) / w.h, (log_snr(sig[i - 1]) - lam2) / w.h
        d1_0, d1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
        if cfg["solver_type"] == "midpoint":
            return integrate(w, self.group_sample, [(w.phi1, m2), (w.phi2, d1_1)], z)
        d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
        d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
        return integrate(w, self.group_sample, [(w.phi1, m2), (w.phi2, d1), (w.phi3, d2)], z)

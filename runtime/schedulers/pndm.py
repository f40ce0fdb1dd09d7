"""PNDM (Liu et al. 2022), step for step as diffusers' ``PNDMScheduler``.

PLMS (linear multistep) by default in Stable Diffusion configs (``skip_prk_steps``); otherwise four
pseudo Runge-Kutta steps of four model calls each warm up the multistep history first. diffusers keys
its behaviour on a call counter, not on the timestep: the run keeps that counter and the rest of
diffusers' mutable state explicitly, so steps must be taken in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import (
    BETA_SCHEDULES,
    TIMESTEP_SPACINGS,
    DiscreteRun,
    check_option,
    cumprod_like_torch,
    discrete_timesteps,
    img2img_begin,
    make_betas,
)

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "skip_prk_steps": False,
    "set_alpha_to_one": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 0,
}
# diffusers' PNDM has no "sample" prediction: its step raises on it, so reject it at load time instead.
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRK_STEPS = 4  # Runge-Kutta warm-up steps (diffusers' ``pndm_order``), each taking four model calls


class PNDMScheduler:
    """Immutable: built once from a config; each generation gets its own :class:`PNDMRun`."""

    name = "PNDMScheduler"
    defaults = DEFAULTS
    order = 1

    def __init__(self, config: dict):
        self.config = cfg = {**DEFAULTS, **config}
        if cfg["trained_betas"] is None:
            check_option(self.name, cfg, "beta_schedule", BETA_SCHEDULES)
        self.prediction_type = check_option(self.name, cfg, "prediction_type", PREDICTION_TYPES)
        check_option(self.name, cfg, "timestep_spacing", TIMESTEP_SPACINGS)
        self.alphas_cumprod = cumprod_like_torch(1.0 - make_betas(cfg))
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]

    def start(
        self, num_inference_steps: int, strength: float = 1.0, eta: float = 0.0, *, begin: int | None = None
    ) -> PNDMRun:
        warm_up = not self.config["skip_prk_steps"]
        if begin is None and strength < 1.0 and warm_up:
            # diffusers' warm-up reads its timesteps from the unsliced list by call count, so after img2img
            # slicing it treats the noised image as being at the schedule's top timestep: noise, not an image.
            raise InputError(
                f"{self.name} strength: expected 1.0 when skip_prk_steps is false (diffusers' Runge-Kutta warm-up "
                f"ignores the img2img start; set skip_prk_steps true for img2img), got {strength}"
            )
        prk, plms = self._schedule(num_inference_steps)
        timesteps = np.concatenate([prk, plms]).astype(np.int64)
        # Sliced as diffusers' img2img pipeline slices it (PNDM has no set_begin_index: a pipeline only slices, and
        # the step counter starts afresh). Past begin 1 this drops the repeated timestep, so after the correction
        # call every model call sees the timestep one below its sample's noise level; diffusers does the same, and
        # parity is the contract.
        begin = img2img_begin(
            num_inference_steps, strength, self.order, begin=begin, length=len(timesteps), name=self.name
        )
        if begin and warm_up:
            raise InputError(
                f"{self.name} begin: expected 0 when skip_prk_steps is false (diffusers' Runge-Kutta warm-up reads "
                f"its timesteps by call count from the top of the schedule, so it cannot start mid-schedule; set "
                f"skip_prk_steps true), got {begin}"
            )
        ratio = self.config["num_train_timesteps"] // num_inference_steps
        return PNDMRun(self, timesteps[begin:], prk, ratio)

    def _schedule(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(Runge-Kutta, multistep) timesteps, with the repeats diffusers puts in both."""
        ascending = discrete_timesteps(self.config, n)[::-1]
        if self.config["skip_prk_steps"]:
            # The second PLMS call repeats the first's target: it is the Heun-like correction of step one.
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
            return np.array([], dtype=np.int64), plms
        if n < PRK_STEPS:
            raise InputError(
                f"{self.name} num_inference_steps: expected >= {PRK_STEPS} when skip_prk_steps is false "
                f"(the Runge-Kutta warm-up needs {PRK_STEPS} steps), got {n}"
            )
        half = self.config["num_train_timesteps"] // n // 2
        # Each Runge-Kutta step calls the model at t, twice at t - half, and at the next t.
        prk = ascending[-PRK_STEPS:].repeat(2) + np.tile([0, half], PRK_STEPS)
        return prk[:-1].repeat(2)[1:-1][::-1], ascending[:-3][::-1]


@dataclass
class PNDMRun(DiscreteRun):
    scheduler: PNDMScheduler
    timesteps: np.ndarray
    prk_timesteps: np.ndarray  # indexed by call count: each group of four starts from its first entry
    step_ratio: int
    counter: int = 0
    ets: list = field(default_factory=list)
    cur_sample: np.ndarray | None = None
    cur_model_output: np.ndarray | float = 0.0

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        if index != self.counter:
            raise InputError(
                f"PNDMScheduler step: expected index {self.counter} (PNDM keeps history, so steps run in order, "
                f"once each), got {index}"
            )
        t = int(self.timesteps[index])
        if self.counter < len(self.prk_timesteps):
            prev = self._step_prk(model_output, t, sample)
        else:
            prev = self._step_plms(model_output, t, sample)
        self.counter += 1
        return prev.astype(np.float32, copy=False)

    def _step_prk(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        prev_t = t - (0 if self.counter % 2 else self.step_ratio // 2)
        # Every call of a Runge-Kutta step moves from the step's starting sample and timestep.
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        phase = self.counter % 4
        if phase == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif phase in (1, 2):
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0.0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._prev_sample(cur_sample, t, prev_t, model_output)

    def _step_plms(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        prev_t = t - self.step_ratio
        if self.counter != 1:
            self.ets = [*self.ets[-3:], model_output]
        else:  # the correction call: redo step one from its start with the averaged slope
            prev_t, t = t, t + self.step_ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._prev_sample(sample, t, prev_t, model_output)

    def _prev_sample(self, sample: np.ndarray, t: int, prev_t: int, model_output: np.ndarray) -> np.ndarray:
        """Formula (9) of the PNDM paper: the transfer from x_t to x_prev_t along the predicted noise."""
        s = self.scheduler
        a_t = s.alphas_cumprod[t]
        a_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if s.prediction_type == "v_prediction":
            model_output = a_t**0.5 * model_output + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * model_output / denom

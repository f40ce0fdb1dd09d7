"""Linear multistep (k-diffusion's ``sample_lms``), step for step as diffusers' ``LMSDiscreteScheduler``.

Each step combines the last (up to four) derivatives with weights that integrate the Lagrange basis
polynomials through their sigmas from sigma_t to sigma_next. diffusers integrates them with
``scipy.integrate.quad``; they are polynomials of degree < 4, so integrating them exactly agrees with
quad to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.polynomial import polynomial as P

from sdrt.runtime.schedulers.sigmas import SigmaRun, SigmaScheduler, predict_x0

DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
MAX_ORDER = 4  # the default of diffusers' ``step(order=4)``, which pipelines never change


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, current: int) -> float:
    """Integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial that is 1 at sigma_(t-current)
    and 0 at the other sigma_(t-k), k < order."""
    nodes = np.asarray(sigmas[t - order + 1 : t + 1][::-1], dtype=np.float64)  # sigma_t, sigma_t-1, ...
    others = np.delete(nodes, current)
    basis = P.polyfromroots(others) / np.prod(nodes[current] - others)
    antiderivative = P.polyint(basis)
    return float(P.polyval(float(sigmas[t + 1]), antiderivative) - P.polyval(float(sigmas[t]), antiderivative))


@dataclass
class LMSRun(SigmaRun):
    derivatives: list = field(default_factory=list)  # most recent last, at most MAX_ORDER

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, noise=None) -> np.ndarray:
        k = self.begin + index
        sigma = self.sigmas[k]
        x0 = predict_x0(self.scheduler.prediction_type, model_output, sample, sigma)
        self.derivatives = [*self.derivatives, (sample - x0) / sigma][-MAX_ORDER:]
        # diffusers takes the order from the global step index, so an img2img run asks for a high order
        # before it has the derivatives; zip then drops the missing terms, as it does there
        order = min(k + 1, MAX_ORDER)
        coeffs = [np.float32(lms_coefficient(self.sigmas, order, k, j)) for j in range(order)]
        update = sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        return (sample + update).astype(np.float32, copy=False)


class LMSDiscreteScheduler(SigmaScheduler):
    name = "LMSDiscreteScheduler"
    defaults = DEFAULTS
    order = 1
    run_class = LMSRun

"""Reference-side helpers for the sigma-space scheduler tests (Euler, Euler ancestral, Heun, LMS).

``correctly_rounded_sqrt``: torch's float32 square root is not correctly rounded on MKL builds (on the
development machine it is an ulp off for ~19% of inputs, scalars included); NumPy's is. The sigma
schedulers amplify that ulp where a step cancels two large terms: sigma = 4096 under zero terminal SNR,
or a two-step Heun jumping from sigma 400 to 0.1. The harness compares the model inputs elementwise
at 1e-5, so there the reference's own rounding noise, not the port, decides the outcome, and whether
it does depends on the machine's MKL. Inside this context manager the reference takes its float32 square
roots in float64 and rounds once, i.e. correctly; everything else it computes is untouched.

"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext

import torch


def reference_precision(config: dict):
    """The sqrt fix where it is needed, and only there: under zero terminal SNR the first sigma is 4096
    and one ulp of the reference's sqrt moves a 2-step result by ~1.4e-4 of its scale. Everywhere else
    the reference runs as shipped."""
    return correctly_rounded_sqrt() if config.get("rescale_betas_zero_snr") else nullcontext()


@contextmanager
def correctly_rounded_sqrt():
    pow_, sqrt_ = torch.Tensor.__pow__, torch.Tensor.sqrt

    def exact_pow(self, exponent):
        if isinstance(exponent, float) and exponent == 0.5 and self.dtype == torch.float32:
            return sqrt_(self.double()).float()
        return pow_(self, exponent)

    def exact_sqrt(self):
        return sqrt_(self.double()).float() if self.dtype == torch.float32 else sqrt_(self)

    torch.Tensor.__pow__, torch.Tensor.sqrt = exact_pow, exact_sqrt
    try:
        yield
    finally:
        torch.Tensor.__pow__, torch.Tensor.sqrt = pow_, sqrt_


def init_defaults(reference_class) -> dict:
    """The ``__init__`` parameters of a diffusers class with their default values."""
    params = inspect.signature(reference_class.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}

"""DDPM in NumPy against diffusers' DDPMScheduler, step by step, noise draws included."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as Reference
from scheduler_harness import compare_loops
from scheduler_models import denoiser

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.ddpm import DDPMScheduler

SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
)


def with_variance(variance):
    """A learned-variance UNet: the prediction, then as many channels of variance (or range fraction)."""

    def model(x, t):
        eps = denoiser(x, t)
        return np.concatenate([eps, variance(eps).astype(np.float32)], axis=1)

    return model


CONFIGS = {
    "sd15": (SD15, denoiser),
    "small-log": ({**SD15, "variance_type": "fixed_small_log"}, denoiser),
    "large-trailing-zsnr-v": (
        {
            **SD15,
            "variance_type": "fixed_large",
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
        },
        denoiser,
    ),
    "learned": ({**SD15, "variance_type": "learned"}, with_variance(lambda e: 0.01 * (1.5 + np.tanh(e)))),
    "learned-range": ({**SD15, "variance_type": "learned_range"}, with_variance(lambda e: 0.8 * np.tanh(e))),
    "sample-clip-linspace": (
        dict(prediction_type="sample", timestep_spacing="linspace", clip_sample_range=0.8),
        denoiser,
    ),
    "thresholding": ({**SD15, "thresholding": True, "sample_max_value": 2.0}, denoiser),
    "cosine": (dict(beta_schedule="squaredcos_cap_v2"), denoiser),
    "sigmoid-zsnr": ({**SD15, "beta_schedule": "sigmoid", "rescale_betas_zero_snr": True}, denoiser),
    "laplace": ({**SD15, "beta_schedule": "laplace", "beta_start": 0.0001, "beta_end": 0.02}, denoiser),
    "trained-betas": ({**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, denoiser),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_ddpm_matches_diffusers_step_by_step(name, steps):
    config, model = CONFIGS[name]
    ref = Reference(**config)
    compare_loops(DDPMScheduler({**ref.config}).start(steps), ref, steps, model=model)


@pytest.mark.parametrize("name", ["sd15", "large-trailing-zsnr-v", "learned-range"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_ddpm_img2img_strength_matches_diffusers(name, strength):
    config, model = CONFIGS[name]
    ref = Reference(**config)
    compare_loops(DDPMScheduler({**ref.config}).start(20, strength=strength), ref, 20, strength=strength, model=model)


@pytest.mark.parametrize(("spacing", "draws"), [("leading", 10), ("linspace", 9)])
def test_noise_is_drawn_on_every_step_but_t0(spacing, draws):
    """diffusers draws no noise at t == 0; linspace ends there, SD's leading + steps_offset=1 ends at t=1."""
    run = DDPMScheduler({**SD15, "timestep_spacing": spacing}).start(10)
    shapes = []

    def noise(shape):
        shapes.append(tuple(shape))
        return np.zeros(shape, np.float32)

    x = np.ones((1, 4, 4, 4), np.float32)
    for i, t in enumerate(run.timesteps):
        x = run.step(denoiser(x, t), i, x, noise=noise)
    assert shapes == [(1, 4, 4, 4)] * draws


def test_fixed_large_log_is_rejected_because_diffusers_returns_nan():
    ref = Reference(variance_type="fixed_large_log")
    ref.set_timesteps(5)
    x = torch.ones(1, 4, 4, 4)
    assert torch.isnan(ref.step(x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    with pytest.raises(InputError, match="DDPMScheduler variance_type: expected one of fixed_small.*NaN"):
        DDPMScheduler({"variance_type": "fixed_large_log"})


def test_learned_variance_needs_the_variance_channels():
    run = DDPMScheduler({**SD15, "variance_type": "learned_range"}).start(5)
    x = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(InputError, match="DDPMScheduler variance_type 'learned_range': expected a model output with 8"):
        run.step(x, 0, x, noise=lambda s: np.zeros(s, np.float32))


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("variance_type", "fixed_medium", "DDPMScheduler variance_type: expected one of fixed_small"),
        ("prediction_type", "x0", "DDPMScheduler prediction_type: expected one of epsilon"),
        ("beta_schedule", "cubic", "DDPMScheduler beta_schedule: expected one of linear.*sigmoid, laplace"),
        ("timestep_spacing", "even", "DDPMScheduler timestep_spacing: expected one of leading"),
    ],
)
def test_unsupported_options_are_named(field, value, expected):
    with pytest.raises(InputError, match=expected):
        DDPMScheduler({**SD15, field: value})


def test_defaults_are_diffusers_init_defaults():
    params = inspect.signature(Reference.__init__).parameters
    assert DDPMScheduler.defaults == {k: p.default for k, p in params.items() if k != "self"}
    assert DDPMScheduler.order == Reference.order

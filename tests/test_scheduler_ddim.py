"""DDIM in NumPy against diffusers' DDIMScheduler, step by step, for the config fields it honours."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler as Reference

from sdrt.runtime import schedulers

SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
CONFIGS = [
    SD15,
    {**SD15, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {**SD15, "timestep_spacing": "linspace", "set_alpha_to_one": True},
    dict(beta_schedule="linear", clip_sample=True, prediction_type="sample"),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5),
    {**SD15, "thresholding": True, "sample_max_value": 2.0},
]


def model_output(x: np.ndarray, t: float) -> np.ndarray:
    """A closed-form stand-in for the UNet: smooth in x and t, of the scale a UNet gives."""
    return (np.sin(x * 0.7 + t / 300.0) * 0.9 + 0.05 * x).astype(np.float32)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_ddim_matches_diffusers_step_by_step(config, steps):
    ref = Reference(**config)
    ref.set_timesteps(steps)
    ours = schedulers.from_config({"_class_name": "DDIMScheduler", **ref.config}).start(steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(torch.from_numpy(model_output(x_ref.numpy(), float(t))), t, x_ref).prev_sample
        x = ours.step(model_output(x, float(ours.timesteps[i])), i, x)
        scale = max(1.0, float(np.abs(x_ref.numpy()).max()))
        assert np.abs(x - x_ref.numpy()).max() / scale < 1e-5, f"step {i}"
        assert x.dtype == np.float32


def test_ddim_eta_uses_the_injected_noise():
    ref = Reference(**SD15)
    ref.set_timesteps(5)
    ours = schedulers.from_config({"_class_name": "DDIMScheduler", **ref.config}).start(5, eta=1.0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        noise = rng.standard_normal(x.shape).astype(np.float32)
        x_ref = ref.step(
            torch.from_numpy(model_output(x_ref.numpy(), float(t))),
            t,
            x_ref,
            eta=1.0,
            variance_noise=torch.from_numpy(noise),
        ).prev_sample
        x = ours.step(model_output(x, float(t)), i, x, noise=lambda shape, n=noise: n)
    np.testing.assert_allclose(x, x_ref.numpy(), atol=1e-5)


def test_unknown_scheduler_class_is_named():
    with pytest.raises(Exception, match="'FancyScheduler' is not supported; supported: DDIMScheduler"):
        schedulers.from_config({"_class_name": "FancyScheduler"})


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_ddim_img2img_strength_matches_diffusers(strength):
    from scheduler_harness import compare_loops

    ref = Reference(**SD15)
    ours = schedulers.from_config({"_class_name": "DDIMScheduler", **ref.config}).start(20, strength=strength)
    compare_loops(ours, ref, 20, strength=strength)

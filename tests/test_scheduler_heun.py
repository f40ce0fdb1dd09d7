"""Heun in NumPy against diffusers' HeunDiscreteScheduler, step by step (two model calls per Heun step)."""

import numpy as np
import pytest
from diffusers import HeunDiscreteScheduler as Reference
from scheduler_harness import closed_form_model, compare_loops
from sigma_reference import init_defaults, reference_precision

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.heun import HeunDiscreteScheduler

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
)
CONFIGS = {
    "sd15-leading": SD15,
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing-v": {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "karras": {**SD15, "use_karras_sigmas": True},
    "exponential": {**SD15, "use_exponential_sigmas": True},
    "sample-clipped": {**SD15, "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.5},
    "exp-schedule": {**SD15, "beta_schedule": "exp"},
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def run_pair(config, steps, strength=1.0, **kwargs):
    ref = Reference(**config)
    ours = HeunDiscreteScheduler({**ref.config})
    with reference_precision(config):
        return compare_loops(ours.start(steps, strength=strength), ref, steps, strength=strength, **kwargs)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_heun_matches_diffusers_step_by_step(config, steps):
    run_pair(config, steps)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("config", [SD15, CONFIGS["karras"]], ids=["sd15", "karras"])
def test_heun_img2img_strength_matches_diffusers(config, strength):
    run_pair(config, 20, strength=strength, seed=5)


def test_heun_sd15_matches_diffusers_without_the_sqrt_fix():
    ref = Reference(**SD15)
    compare_loops(HeunDiscreteScheduler({**ref.config}).start(20), ref, 20)


def test_heun_timesteps_repeat_for_the_corrector():
    run = HeunDiscreteScheduler(SD15).start(4)
    assert run.timesteps.tolist() == [751, 501, 501, 251, 251, 1, 1]
    assert run.timesteps.dtype == np.float32


def test_concurrent_runs_do_not_share_state():
    scheduler = HeunDiscreteScheduler(SD15)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    alone = scheduler.start(5)
    y = x * np.float32(alone.init_noise_sigma)
    for i, t in enumerate(alone.timesteps):
        y = alone.step(closed_form_model(alone.scale_model_input(y, i), t), i, y)
    a, b = scheduler.start(5), scheduler.start(5)
    ya = yb = x * np.float32(a.init_noise_sigma)
    for i, t in enumerate(a.timesteps):  # interleaved, so shared predictor state would corrupt both
        ya = a.step(closed_form_model(a.scale_model_input(ya, i), t), i, ya)
        yb = b.step(closed_form_model(b.scale_model_input(yb, i), t), i, yb)
    np.testing.assert_array_equal(ya, y)
    np.testing.assert_array_equal(yb, y)


def test_defaults_and_order_mirror_diffusers():
    assert HeunDiscreteScheduler.defaults == init_defaults(Reference)
    assert HeunDiscreteScheduler.order == Reference.order == 2


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_beta_sigmas": True}, "HeunDiscreteScheduler use_beta_sigmas: expected False"),
        (
            {"use_exponential_sigmas": True, "use_karras_sigmas": True},
            "HeunDiscreteScheduler use_exponential_sigmas: expected False when use_karras_sigmas is True",
        ),
        ({"beta_schedule": "laplace"}, "HeunDiscreteScheduler beta_schedule: expected one of linear, .*, exp, got"),
        ({"timestep_spacing": "sometimes"}, "HeunDiscreteScheduler timestep_spacing: expected one of leading"),
        ({"prediction_type": "x0"}, "HeunDiscreteScheduler prediction_type: expected one of epsilon"),
    ],
)
def test_heun_rejects_what_it_does_not_support(config, message):
    with pytest.raises(InputError, match=f"^{message}"):
        HeunDiscreteScheduler(config)

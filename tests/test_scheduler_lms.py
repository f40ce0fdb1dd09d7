"""LMS in NumPy against diffusers' LMSDiscreteScheduler, step by step, for the config fields it honours."""

import numpy as np
import pytest
from diffusers import LMSDiscreteScheduler as Reference
from scheduler_harness import closed_form_model, compare_loops
from sigma_reference import init_defaults, reference_precision

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.lms import LMSDiscreteScheduler, lms_coefficient

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
)
CONFIGS = {
    "sd15-leading": SD15,
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing-v": {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "karras": {**SD15, "use_karras_sigmas": True},
    "exponential": {**SD15, "use_exponential_sigmas": True},
    "linear-sample": dict(beta_schedule="linear", prediction_type="sample"),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def run_pair(config, steps, strength=1.0, **kwargs):
    ref = Reference(**config)
    ours = LMSDiscreteScheduler({**ref.config})
    with reference_precision(config):
        return compare_loops(ours.start(steps, strength=strength), ref, steps, strength=strength, **kwargs)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_lms_matches_diffusers_step_by_step(config, steps):
    run_pair(config, steps)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("config", [SD15, CONFIGS["karras"]], ids=["sd15", "karras"])
def test_lms_img2img_strength_matches_diffusers(config, strength):
    """diffusers takes the order from the global step index, so img2img asks for order 4 on its first step."""
    run_pair(config, 20, strength=strength, seed=7)


def test_lms_sd15_matches_diffusers_without_the_sqrt_fix():
    ref = Reference(**SD15)
    compare_loops(LMSDiscreteScheduler({**ref.config}).start(20), ref, 20)


def test_exact_coefficients_match_the_references_quadrature():
    ref = Reference(**SD15)
    ref.set_timesteps(12)
    sigmas = ref.sigmas.numpy()
    for t in range(12):
        for order in range(1, min(t + 1, 4) + 1):
            for current in range(order):
                expected = ref.get_lms_coefficient(order, t, current)
                assert lms_coefficient(sigmas, order, t, current) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_concurrent_runs_do_not_share_derivatives():
    scheduler = LMSDiscreteScheduler(SD15)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    alone = scheduler.start(6)
    y = x * np.float32(alone.init_noise_sigma)
    for i, t in enumerate(alone.timesteps):
        y = alone.step(closed_form_model(alone.scale_model_input(y, i), t), i, y)
    a, b = scheduler.start(6), scheduler.start(6)
    ya = yb = x * np.float32(a.init_noise_sigma)
    for i, t in enumerate(a.timesteps):
        ya = a.step(closed_form_model(a.scale_model_input(ya, i), t), i, ya)
        yb = b.step(closed_form_model(b.scale_model_input(yb, i), t), i, yb)
    np.testing.assert_array_equal(ya, y)
    np.testing.assert_array_equal(yb, y)


def test_defaults_and_order_mirror_diffusers():
    assert LMSDiscreteScheduler.defaults == init_defaults(Reference)
    assert LMSDiscreteScheduler.order == Reference.order


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_beta_sigmas": True}, "LMSDiscreteScheduler use_beta_sigmas: expected False"),
        (
            {"use_karras_sigmas": True, "use_exponential_sigmas": True},
            "LMSDiscreteScheduler use_exponential_sigmas: expected False when use_karras_sigmas is True",
        ),
        ({"beta_schedule": "exp"}, "LMSDiscreteScheduler beta_schedule: expected one of linear"),
        ({"timestep_spacing": "sometimes"}, "LMSDiscreteScheduler timestep_spacing: expected one of leading"),
        ({"prediction_type": "x0"}, "LMSDiscreteScheduler prediction_type: expected one of epsilon"),
    ],
)
def test_lms_rejects_what_it_does_not_support(config, message):
    with pytest.raises(InputError, match=f"^{message}"):
        LMSDiscreteScheduler(config)

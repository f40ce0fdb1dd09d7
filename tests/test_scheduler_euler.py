"""Euler and Euler ancestral in NumPy against diffusers, step by step, for the config fields they honour."""

import numpy as np
import pytest
from diffusers import EulerAncestralDiscreteScheduler as AncestralReference
from diffusers import EulerDiscreteScheduler as EulerReference
from scheduler_harness import compare_loops
from sigma_reference import init_defaults, reference_precision

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

SD15 = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
)
ZERO_SNR_V = {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
EULER_CONFIGS = {
    "sd15-leading": SD15,
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing-v-zero-snr": ZERO_SNR_V,
    "karras": {**SD15, "use_karras_sigmas": True},
    "karras-bounds-final-sigma-min": {
        **SD15,
        "use_karras_sigmas": True,
        "sigma_min": 0.1,
        "sigma_max": 10.0,
        "final_sigmas_type": "sigma_min",
    },
    "exponential-trailing": {**SD15, "use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    "log-linear": {**SD15, "timestep_spacing": "linspace", "interpolation_type": "log_linear"},
    "continuous-v-karras": {
        **SD15,
        "timestep_type": "continuous",
        "prediction_type": "v_prediction",
        "use_karras_sigmas": True,
    },
    "linear-sample": dict(beta_schedule="linear", prediction_type="sample"),
    "cosine-final-sigma-min": dict(beta_schedule="squaredcos_cap_v2", final_sigmas_type="sigma_min"),
    "trained-betas": dict(trained_betas=np.linspace(1e-4, 0.02, 1000).tolist()),
}
ANCESTRAL_CONFIGS = {
    "sd15-leading": SD15,
    "linspace": {**SD15, "timestep_spacing": "linspace"},
    "trailing-v-zero-snr": ZERO_SNR_V,
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
STEPS = [1, 2, 10, 50]
PAIRS = {
    "euler": (EulerDiscreteScheduler, EulerReference),
    "ancestral": (EulerAncestralDiscreteScheduler, AncestralReference),
}


def run_pair(ours_class, ref_class, config, steps, strength=1.0, **kwargs):
    ref = ref_class(**config)
    ours = ours_class({**ref.config})
    with reference_precision(config):
        return compare_loops(ours.start(steps, strength=strength), ref, steps, strength=strength, **kwargs)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", EULER_CONFIGS.values(), ids=EULER_CONFIGS.keys())
def test_euler_matches_diffusers_step_by_step(config, steps):
    run_pair(EulerDiscreteScheduler, EulerReference, config, steps)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("config", ANCESTRAL_CONFIGS.values(), ids=ANCESTRAL_CONFIGS.keys())
def test_euler_ancestral_matches_diffusers_with_the_same_noise(config, steps):
    run_pair(EulerAncestralDiscreteScheduler, AncestralReference, config, steps)


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("config", [SD15, {**SD15, "use_karras_sigmas": True}], ids=["sd15", "karras"])
def test_img2img_strength_matches_diffusers(kind, config, strength):
    ours_class, ref_class = PAIRS[kind]
    config = {k: v for k, v in config.items() if k in ours_class.defaults}
    run_pair(ours_class, ref_class, config, 20, strength=strength, seed=3)


@pytest.mark.parametrize("kind", PAIRS)
def test_sd15_matches_diffusers_without_the_sqrt_fix(kind):
    """The everyday case holds against diffusers as it runs here, MKL square roots and all."""
    ours_class, ref_class = PAIRS[kind]
    ref = ref_class(**SD15)
    compare_loops(ours_class({**ref.config}).start(20), ref, 20)


@pytest.mark.parametrize("kind", PAIRS)
def test_defaults_and_order_mirror_diffusers(kind):
    ours_class, ref_class = PAIRS[kind]
    assert ours_class.defaults == init_defaults(ref_class)
    assert ours_class.order == ref_class.order
    assert ours_class.name == ref_class.__name__


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_beta_sigmas": True}, "EulerDiscreteScheduler use_beta_sigmas: expected False"),
        (
            {"use_karras_sigmas": True, "use_exponential_sigmas": True},
            "EulerDiscreteScheduler use_exponential_sigmas: expected False when use_karras_sigmas is True",
        ),
        ({"interpolation_type": "cubic"}, "EulerDiscreteScheduler interpolation_type: expected one of linear, "),
        ({"timestep_type": "edm"}, "EulerDiscreteScheduler timestep_type: expected one of discrete, continuous"),
        ({"final_sigmas_type": "one"}, "EulerDiscreteScheduler final_sigmas_type: expected one of zero, sigma_min"),
        ({"timestep_spacing": "sometimes"}, "EulerDiscreteScheduler timestep_spacing: expected one of leading, "),
        ({"beta_schedule": "exp"}, "EulerDiscreteScheduler beta_schedule: expected one of linear, "),
        ({"prediction_type": "x0"}, "EulerDiscreteScheduler prediction_type: expected one of epsilon, "),
    ],
)
def test_euler_rejects_what_it_does_not_support(config, message):
    with pytest.raises(InputError, match=f"^{message}"):
        EulerDiscreteScheduler(config)


def test_ancestral_rejects_sample_prediction_which_diffusers_cannot_step():
    with pytest.raises(NotImplementedError):  # diffusers builds it, then fails on the first step
        ref = AncestralReference(prediction_type="sample")
        ref.set_timesteps(2)
        ref.step(ref.sigmas[:1], ref.timesteps[0], ref.sigmas[:1])
    with pytest.raises(InputError, match="^EulerAncestralDiscreteScheduler prediction_type: expected one of epsilon"):
        EulerAncestralDiscreteScheduler({"prediction_type": "sample"})


def test_bad_step_counts_and_strengths_are_named():
    scheduler = EulerDiscreteScheduler(SD15)
    with pytest.raises(InputError, match=r"^EulerDiscreteScheduler num_inference_steps: expected 1\.\.1000, got 0"):
        scheduler.start(0)
    with pytest.raises(InputError, match=r"^EulerDiscreteScheduler strength: expected a value in \(0, 1\]"):
        scheduler.start(10, strength=0.0)


def test_ancestral_step_needs_noise():
    run = EulerAncestralDiscreteScheduler(SD15).start(2)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(InputError, match="^EulerAncestralDiscreteScheduler step: expected a noise callable"):
        run.step(x, 0, x)

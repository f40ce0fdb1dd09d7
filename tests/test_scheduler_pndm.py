"""PNDM in NumPy against diffusers' PNDMScheduler, step by step: PLMS (SD's default) and the Runge-Kutta warm-up."""

import inspect

import numpy as np
import pytest
from diffusers import PNDMScheduler as Reference
from scheduler_harness import compare_loops
from scheduler_models import denoiser

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.pndm import PNDMScheduler

SD15 = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)
PRK = {**SD15, "skip_prk_steps": False}
CONFIGS = {
    "sd15": SD15,
    "linspace-v": {**SD15, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    "trailing-alpha1": {**SD15, "timestep_spacing": "trailing", "set_alpha_to_one": True},
    "prk": PRK,
    "prk-trailing-v": {**PRK, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "prk-diffusers-defaults": {},
    "cosine": {**SD15, "beta_schedule": "squaredcos_cap_v2", "steps_offset": 0},
}


def ours_for(ref: Reference) -> PNDMScheduler:
    return PNDMScheduler({**ref.config})


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
def test_pndm_matches_diffusers_step_by_step(name, steps):
    config = CONFIGS[name]
    ref = Reference(**config)
    if not ref.config.skip_prk_steps and steps < 4:
        pytest.skip("diffusers' Runge-Kutta warm-up needs >= 4 steps (set_timesteps fails to broadcast)")
    run = ours_for(ref).start(steps)
    compare_loops(run, ref, steps, model=denoiser)


@pytest.mark.parametrize("name", ["sd15", "linspace-v", "trailing-alpha1"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_pndm_img2img_strength_matches_diffusers(name, strength):
    ref = Reference(**CONFIGS[name])
    run = ours_for(ref).start(20, strength=strength)
    compare_loops(run, ref, 20, strength=strength, model=denoiser)


def test_plms_schedule_repeats_the_second_timestep_like_diffusers():
    ref = Reference(**SD15)
    ref.set_timesteps(10)
    run = ours_for(ref).start(10)
    assert run.timesteps.dtype == np.int64
    np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy())
    assert list(run.timesteps[:4]) == [901, 801, 801, 701]


def test_prk_schedule_has_twelve_warm_up_calls_like_diffusers():
    ref = Reference(**PRK)
    ref.set_timesteps(10)
    run = ours_for(ref).start(10)
    np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy())
    assert len(run.timesteps) == 10 + 9


def test_prk_needs_four_steps_as_in_diffusers():
    with pytest.raises(ValueError):
        Reference(**PRK).set_timesteps(3)
    with pytest.raises(InputError, match="PNDMScheduler num_inference_steps: expected >= 4 when skip_prk_steps"):
        PNDMScheduler(PRK).start(3)


def test_prk_img2img_is_rejected():
    with pytest.raises(InputError, match="PNDMScheduler strength: expected 1.0 when skip_prk_steps is false"):
        PNDMScheduler(PRK).start(20, strength=0.5)


def test_runs_keep_their_own_history():
    """Two interleaved runs of one scheduler match two runs made one after the other."""
    scheduler = PNDMScheduler(SD15)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)

    def solo():
        run, y = scheduler.start(5), x
        for i, t in enumerate(run.timesteps):
            y = run.step(denoiser(y, t), i, y)
        return y

    a, b = scheduler.start(5), scheduler.start(5)
    ya, yb = x, x + 0
    for i, t in enumerate(a.timesteps):
        ya = a.step(denoiser(ya, t), i, ya)
        yb = b.step(denoiser(yb, t), i, yb)
    np.testing.assert_array_equal(ya, solo())
    np.testing.assert_array_equal(yb, ya)


def test_steps_must_run_in_order():
    run = PNDMScheduler(SD15).start(5)
    x = np.zeros((1, 4, 4, 4), np.float32)
    with pytest.raises(InputError, match="PNDMScheduler step: expected index 0"):
        run.step(x, 1, x)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("prediction_type", "sample", "PNDMScheduler prediction_type: expected one of epsilon, v_prediction"),
        ("beta_schedule", "sigmoid", "PNDMScheduler beta_schedule: expected one of linear"),
        ("timestep_spacing", "even", "PNDMScheduler timestep_spacing: expected one of leading"),
    ],
)
def test_unsupported_options_are_named(field, value, expected):
    with pytest.raises(InputError, match=expected):
        PNDMScheduler({**SD15, field: value})


def test_defaults_are_diffusers_init_defaults():
    params = inspect.signature(Reference.__init__).parameters
    assert PNDMScheduler.defaults == {k: p.default for k, p in params.items() if k != "self"}
    assert PNDMScheduler.order == Reference.order

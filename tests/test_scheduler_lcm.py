"""LCM in NumPy against diffusers' LCMScheduler, step by step, noise draws included.

img2img: diffusers' ``LatentConsistencyModelImg2ImgPipeline`` passes ``strength`` to ``set_timesteps`` (and never
slices the schedule), so the reference here is set up that way and our run must match its timesteps.
"""

import inspect

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler as Reference
from scheduler_harness import compare_loops
from scheduler_models import denoiser

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.lcm import LCMScheduler

# An SD 1.5 LCM distillation's config: SD betas, and steps_offset=1, which diffusers' LCM ignores.
DREAMSHAPER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    original_inference_steps=50,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_scaling=10.0,
)
CONFIGS = {
    "diffusers-defaults": {},
    "dreamshaper": DREAMSHAPER,
    "v-zsnr": {**DREAMSHAPER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    "sample-clip-20": dict(
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=0.8,
        timestep_scaling=3.5,
        original_inference_steps=20,
        set_alpha_to_one=False,
    ),
    "thresholding": {**DREAMSHAPER, "thresholding": True, "sample_max_value": 1.5},
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


def with_strength(ref: Reference, strength: float) -> Reference:
    """The reference as the LCM img2img pipeline drives it: strength given to set_timesteps."""
    set_timesteps = ref.set_timesteps
    ref.set_timesteps = lambda n: set_timesteps(n, strength=strength)
    return ref


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 50])
def test_lcm_matches_diffusers_step_by_step(name, steps):
    ref = Reference(**CONFIGS[name])
    if steps > ref.config.original_inference_steps:
        with pytest.raises(ValueError):
            ref.set_timesteps(steps)
        pytest.skip("diffusers rejects more steps than original_inference_steps")
    compare_loops(LCMScheduler({**ref.config}).start(steps), ref, steps, model=denoiser)


@pytest.mark.parametrize("name", ["dreamshaper", "v-zsnr", "sample-clip-20"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_img2img_strength_matches_diffusers(name, strength, steps):
    ref = with_strength(Reference(**CONFIGS[name]), strength)
    run = LCMScheduler({**ref.config}).start(steps, strength=strength)
    compare_loops(run, ref, steps, model=denoiser)


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_lcm_img2img_noises_the_image_to_the_first_timestep(strength):
    ref = Reference(**DREAMSHAPER)
    ref.set_timesteps(4, strength=strength)
    run = LCMScheduler({**ref.config}).start(4, strength=strength)
    rng = np.random.default_rng(0)
    image, noise = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    expected = ref.add_noise(torch.from_numpy(image), torch.from_numpy(noise), ref.timesteps[:1]).numpy()
    np.testing.assert_allclose(run.add_noise(image, noise, 0), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("original", [50, 20])
@pytest.mark.parametrize("strength", [0.1, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 30])
def test_lcm_schedule_is_diffusers_set_timesteps_with_strength(original, strength, steps):
    ref = Reference(original_inference_steps=original)
    ours = LCMScheduler({**ref.config})
    try:
        ref.set_timesteps(steps, strength=strength)
    except ValueError:
        with pytest.raises(InputError, match="LCMScheduler num_inference_steps: expected 1.."):
            ours.start(steps, strength=strength)
        return
    run = ours.start(steps, strength=strength)
    assert run.timesteps.dtype == np.int64
    np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy())


def test_noise_is_drawn_on_every_step_but_the_last():
    run = LCMScheduler(DREAMSHAPER).start(4)
    shapes = []

    def noise(shape):
        shapes.append(tuple(shape))
        return np.zeros(shape, np.float32)

    x = np.ones((1, 4, 4, 4), np.float32)
    for i, t in enumerate(run.timesteps):
        x = run.step(denoiser(x, t), i, x, noise=noise)
    assert shapes == [(1, 4, 4, 4)] * 3


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"prediction_type": "x0"}, "LCMScheduler prediction_type: expected one of epsilon"),
        ({"beta_schedule": "sigmoid"}, "LCMScheduler beta_schedule: expected one of linear"),
        ({"original_inference_steps": 2000}, "LCMScheduler original_inference_steps: expected 1..1000, got 2000"),
    ],
)
def test_unsupported_options_are_named(config, expected):
    with pytest.raises(InputError, match=expected):
        LCMScheduler({**DREAMSHAPER, **config})


@pytest.mark.parametrize("strength", [0.0, 1.5])
def test_strength_out_of_range_is_rejected(strength):
    with pytest.raises(InputError, match="LCMScheduler strength: expected a value in"):
        LCMScheduler(DREAMSHAPER).start(4, strength=strength)


def test_defaults_are_diffusers_init_defaults():
    params = inspect.signature(Reference.__init__).parameters
    assert LCMScheduler.defaults == {k: p.default for k, p in params.items() if k != "self"}
    assert LCMScheduler.order == Reference.order

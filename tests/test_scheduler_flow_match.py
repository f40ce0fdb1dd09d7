"""Flow-matching Euler (SD 3 / 3.5) in NumPy against diffusers' FlowMatchEulerDiscreteScheduler: the schedule for
every shifting mode, every step of a loop (text-to-image, image-to-image from SD3's get_timesteps, the inpainting
re-noising of the known region, stochastic sampling with the same noise), and the config errors."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as Reference
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as reference_shift
from scheduler_harness import closed_form_model, relative_error

from sdrt.runtime import schedulers
from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.flow_match import FlowMatchEulerDiscreteScheduler, calculate_shift

SD3 = {"shift": 3.0}  # SD 3 Medium and SD 3.5 Large / Medium ship this config
DYNAMIC = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
CONFIGS = {
    "sd3": SD3,
    "no-shift": {},
    "dynamic-exponential": DYNAMIC,
    "dynamic-linear": {**DYNAMIC, "time_shift_type": "linear"},
    "shift-terminal": {**SD3, "shift_terminal": 0.1},
    "karras": {**SD3, "use_karras_sigmas": True},
    "exponential": {**SD3, "use_exponential_sigmas": True},
    "inverted": {**SD3, "invert_sigmas": True},
}
MU = calculate_shift(64 * 64)  # a 1024x1024 image in SD3: 128x128 latents, patch 2 -> 4096 tokens


def pair(config: dict):
    ref = Reference(**config)
    return FlowMatchEulerDiscreteScheduler({**ref.config}), ref


def test_calculate_shift_is_diffusers():
    for tokens in (256, 1024, 4096, 9216):
        assert calculate_shift(tokens) == pytest.approx(reference_shift(tokens), abs=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_schedule_equals_diffusers(name, steps):
    ours, ref = pair(CONFIGS[name])
    mu = MU if ref.config.use_dynamic_shifting else None
    if name == "shift-terminal" and steps == 1:  # diffusers divides 0 by 0 and returns NaN sigmas
        with pytest.raises(InputError, match="expected 2 or more with shift_terminal"):
            ours.schedule(steps, mu)
        return
    ref.set_timesteps(steps, mu=mu)
    timesteps, sigmas = ours.schedule(steps, mu)
    assert timesteps.dtype == sigmas.dtype == np.float32
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


@pytest.mark.parametrize("name", ["sd3", "dynamic-exponential", "shift-terminal"])
@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
def test_loop_equals_diffusers_step_by_step(name, strength):
    """The SD3 pipelines' loop: img2img begins at SD3's get_timesteps index and noises the image with scale_noise;
    inpainting re-noises the known region to the next timestep after every step."""
    steps, shape = 10, (2, 16, 8, 8)
    ours, ref = pair(CONFIGS[name])
    mu = MU if ref.config.use_dynamic_shifting else None
    ref.set_timesteps(steps, mu=mu)
    init_timestep = min(steps * strength, steps)  # diffusers' SD3 get_timesteps, verbatim
    t_start = int(max(steps - init_timestep, 0))
    ref_timesteps = ref.timesteps[t_start:]
    ref.set_begin_index(t_start)
    run = ours.start(steps, strength=strength, mu=mu)
    assert run.begin == t_start and (steps, strength, t_start) != (10, 0.75, 3)  # SD's formula would start at 3
    np.testing.assert_array_equal(run.timesteps, ref_timesteps.numpy())
    rng = np.random.default_rng(0)
    image, noise = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    if strength < 1.0:
        x_ref = ref.scale_noise(torch.from_numpy(image), ref_timesteps[:1].repeat(shape[0]), torch.from_numpy(noise))
        x = run.add_noise(image, noise, 0)
        np.testing.assert_array_equal(x, x_ref.numpy())
    else:
        x, x_ref = noise.copy(), torch.from_numpy(noise.copy())
    for i, t in enumerate(ref_timesteps):
        assert run.scale_model_input(x, i) is x
        x_ref = ref.step(torch.from_numpy(closed_form_model(x_ref.numpy(), float(t))), t, x_ref).prev_sample
        x = run.step(closed_form_model(x, float(run.timesteps[i])), i, x)
        assert relative_error(x, x_ref.numpy()) < 1e-6, f"step {i}"
        if i + 1 < len(ref_timesteps):  # inpainting: the known region at the next timestep's noise level
            known_ref = ref.scale_noise(torch.from_numpy(image), ref_timesteps[i + 1 : i + 2], torch.from_numpy(noise))
            np.testing.assert_array_equal(run.add_noise(image, noise, i + 1), known_ref.numpy())


def test_stochastic_sampling_draws_the_same_noise():
    ours, ref = pair({**SD3, "stochastic_sampling": True})
    ref.set_timesteps(6)
    run = ours.start(6)
    g_ref, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = np.random.default_rng(1).standard_normal((1, 16, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(
            torch.from_numpy(closed_form_model(x_ref.numpy(), float(t))), t, x_ref, generator=g_ref
        ).prev_sample
        x = run.step(closed_form_model(x, float(run.timesteps[i])), i, x,
                     noise=lambda s: torch.randn(tuple(s), generator=g_ours).numpy())  # fmt: skip
        assert relative_error(x, x_ref.numpy()) < 1e-6
    with pytest.raises(InputError, match="expected a noise callable"):
        ours.start(2).step(x, 0, x)


def test_registered_and_refusing_bad_configs():
    assert schedulers.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3}).config["shift"] == 3.0
    with pytest.raises(InputError, match="expected mu with use_dynamic_shifting"):
        FlowMatchEulerDiscreteScheduler(DYNAMIC).start(4)
    with pytest.raises(InputError, match="time_shift_type"):
        FlowMatchEulerDiscreteScheduler({"time_shift_type": "cubic"})
    with pytest.raises(InputError, match="use_beta_sigmas"):
        FlowMatchEulerDiscreteScheduler({"use_beta_sigmas": True})
    with pytest.raises(InputError, match=r"strength: expected a value in \(0, 1\]"):
        FlowMatchEulerDiscreteScheduler(SD3).start(4, strength=0.0)
    with pytest.raises(InputError, match="num_inference_steps"):
        FlowMatchEulerDiscreteScheduler(SD3).start(0)


def test_an_override_across_kinds_is_refused():
    """A diffusion sampler on a flow-matching model (or the reverse) would compute nonsense: refused, naming the fit."""
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3}
    with pytest.raises(InputError, match="EulerDiscreteScheduler does not fit a flow-matching model"):
        schedulers.from_config(sd3, "euler")
    sd15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}
    with pytest.raises(InputError, match="FlowMatchEulerDiscreteScheduler does not fit a diffusion"):
        schedulers.from_config(sd15, "FlowMatchEulerDiscreteScheduler")

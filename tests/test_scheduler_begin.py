"""Runs started at an index of the full schedule (``start(steps, begin=i)``) against diffusers schedulers after
``set_timesteps(steps)`` and ``set_begin_index(i)``, as SDXL's refiner (``denoising_start``) drives them.

Schedulers without ``set_begin_index`` in diffusers (DDIM, DDPM, PNDM) are driven as the SDXL img2img pipeline drives
them then: the timesteps sliced, nothing else.
"""

import inspect
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from scheduler_harness import closed_form_model, relative_error
from scheduler_models import denoiser

from sdrt.runtime import schedulers
from sdrt.runtime.conditioning import denoising_end_count, denoising_start_begin
from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.common import img2img_begin

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# SDXL base 1.0's published scheduler config (EulerDiscreteScheduler), minus fields irrelevant to sampling.
SDXL = {**SD15, "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"}
STEPS = 20

# name -> (class name, config, model); closed_form_model where the existing tests use it, the unit-scale denoiser
# for the samplers whose latents it would otherwise drive to tens.
CASES = {
    "euler": ("EulerDiscreteScheduler", SDXL, closed_form_model),
    "euler-karras": ("EulerDiscreteScheduler", {**SD15, "use_karras_sigmas": True}, closed_form_model),
    "euler-a": ("EulerAncestralDiscreteScheduler", {**SD15, "timestep_spacing": "trailing"}, closed_form_model),
    "heun": ("HeunDiscreteScheduler", SD15, closed_form_model),
    "heun-karras-leading": (
        "HeunDiscreteScheduler",
        {**SD15, "use_karras_sigmas": True, "timestep_spacing": "leading", "steps_offset": 1},
        closed_form_model,
    ),
    "lms": ("LMSDiscreteScheduler", SD15, closed_form_model),
    "dpm++2m": ("DPMSolverMultistepScheduler", {**SD15, "steps_offset": 1}, denoiser),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {**SD15, "use_karras_sigmas": True}, denoiser),
    "dpm++2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {**SD15, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        denoiser,
    ),
    "dpm++3m": ("DPMSolverMultistepScheduler", {**SD15, "solver_order": 3}, denoiser),
    "dpm-single-3": ("DPMSolverSinglestepScheduler", {**SD15, "solver_order": 3}, denoiser),
    "ddim": ("DDIMScheduler", {**SD15, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}, denoiser),
    "ddim-trailing-v": (
        "DDIMScheduler",
        {**SD15, "timestep_spacing": "trailing", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
        denoiser,
    ),
    "ddpm": ("DDPMScheduler", {**SD15, "steps_offset": 1, "clip_sample": False}, denoiser),
    "unipc": ("UniPCMultistepScheduler", SD15, denoiser),
    "unipc-3-karras": ("UniPCMultistepScheduler", {**SD15, "solver_order": 3, "use_karras_sigmas": True}, denoiser),
    "plms": ("PNDMScheduler", {**SD15, "skip_prk_steps": True, "steps_offset": 1}, denoiser),
    "lcm": ("LCMScheduler", {**SD15, "original_inference_steps": 50}, denoiser),
}


def pair(name: str):
    cls_name, config, model = CASES[name]
    ref = getattr(diffusers, cls_name)(**config)
    return schedulers.SCHEDULERS[cls_name]({**ref.config}), ref, model


def compare_from(ours, ref, steps: int, begin: int, model, *, seed: int = 0, shape=(1, 4, 8, 8), tol: float = 1e-4):
    """Noise a clean sample to the timestep at ``begin`` and step both from there; assert every step agrees."""
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    ref_timesteps = ref.timesteps[begin:]
    run = ours.start(steps, begin=begin)
    np.testing.assert_allclose(
        np.asarray(run.timesteps, np.float64), ref_timesteps.numpy().astype(np.float64), rtol=1e-6, atol=1e-4
    )
    rng = np.random.default_rng(seed)
    clean, noise = rng.standard_normal((2, *shape)).astype(np.float32)
    x_ref = ref.add_noise(torch.from_numpy(clean), torch.from_numpy(noise), ref_timesteps[:1])
    x = run.add_noise(clean, noise, 0)
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)
    g_ref, g_ours = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    for i, t in enumerate(ref_timesteps):
        inp_ref = ref.scale_model_input(x_ref, t)
        inp = run.scale_model_input(x, i)
        assert relative_error(inp, inp_ref.numpy()) < tol, f"scale_model_input, step {i}"
        kwargs = {"generator": g_ref} if takes_generator else {}
        x_ref = ref.step(torch.from_numpy(model(inp_ref.numpy(), float(t))), t, x_ref, **kwargs).prev_sample
        x = run.step(
            model(inp, float(run.timesteps[i])), i, x, noise=lambda s: torch.randn(tuple(s), generator=g_ours).numpy()
        )
        err = relative_error(x, x_ref.numpy())
        assert err < tol, f"begin {begin}, step {i} (t={float(t)}): relative error {err:.3g}"
    return x


@pytest.mark.parametrize("name", CASES)
def test_run_from_begin_matches_diffusers_set_begin_index(name):
    ours, ref, model = pair(name)
    length = len(ours.start(STEPS).timesteps)
    # The first index, one each side of a Heun/PLMS pair or a solver-order group, the middle, and the last step.
    for begin in sorted({0, 1, 2, 3, length // 2, length - 2, length - 1}):
        compare_from(ours, pair(name)[1], STEPS, begin, model, seed=begin)


@pytest.mark.parametrize("name", CASES)
def test_begin_equal_to_the_strength_start_gives_the_same_run(name):
    ours = pair(name)[0]
    if name == "lcm":  # LCM applies strength in set_timesteps (a different schedule), not by slicing
        pytest.skip("LCM's strength picks another schedule")
    by_strength = ours.start(STEPS, strength=0.55)
    begin = img2img_begin(STEPS, 0.55, ours.order)
    by_begin = ours.start(STEPS, begin=begin)
    np.testing.assert_array_equal(by_begin.timesteps, by_strength.timesteps)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    ya, yb = by_strength.add_noise(x, x, 0), by_begin.add_noise(x, x, 0)
    for i, t in enumerate(by_begin.timesteps[:4]):
        zeros = lambda s: np.zeros(s, np.float32)  # noqa: E731
        ya = by_strength.step(denoiser(by_strength.scale_model_input(ya, i), t), i, ya, noise=zeros)
        yb = by_begin.step(denoiser(by_begin.scale_model_input(yb, i), t), i, yb, noise=zeros)
    np.testing.assert_array_equal(ya, yb)


@pytest.mark.parametrize("cls", schedulers.SCHEDULERS.values(), ids=schedulers.SCHEDULERS.keys())
def test_begin_is_validated_and_ignores_strength(cls):
    config = {"skip_prk_steps": True} if cls.name == "PNDMScheduler" else {}
    scheduler = cls(config)
    length = len(scheduler.start(10).timesteps)
    for bad in (-1, length, 2.0, True, "3"):
        with pytest.raises(InputError, match=rf"^{cls.name} begin: expected (an index in 0\.\.|an integer index)"):
            scheduler.start(10, begin=bad)
    np.testing.assert_array_equal(
        scheduler.start(10, strength=0.3, begin=2).timesteps, scheduler.start(10).timesteps[2:]
    )
    assert len(scheduler.start(10, begin=np.int64(length - 1)).timesteps) == 1


def test_pndm_runge_kutta_warm_up_cannot_begin_mid_schedule():
    scheduler = schedulers.SCHEDULERS["PNDMScheduler"]({"skip_prk_steps": False})
    with pytest.raises(InputError, match="^PNDMScheduler begin: expected 0 when skip_prk_steps is false"):
        scheduler.start(10, begin=1)
    np.testing.assert_array_equal(scheduler.start(10, begin=0).timesteps, scheduler.start(10).timesteps)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm++2m", "ddim", "unipc"])
@pytest.mark.parametrize("split", [0.8, 0.65])
def test_sdxl_base_then_refiner_matches_diffusers(name, split):
    """The ensemble-of-experts split: base with denoising_end, refiner with denoising_start, on one schedule."""
    ours, ref, model = pair(name)
    steps, train = 15, ref.config.num_train_timesteps
    x0 = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)

    # diffusers: the base pipeline's loop (set_begin_index(0) where the scheduler has it), cut by denoising_end
    ref.set_timesteps(steps)
    cutoff = int(round(train - (split * train)))
    count = len(list(filter(lambda ts: ts >= cutoff, ref.timesteps)))
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)
    x_ref = torch.from_numpy(x0) * ref.init_noise_sigma
    for t in ref.timesteps[:count]:
        out = model(ref.scale_model_input(x_ref, t).numpy(), float(t))
        x_ref = ref.step(torch.from_numpy(out), t, x_ref).prev_sample
    # ... then the refiner's, on a fresh scheduler, from get_timesteps(denoising_start)
    ref2 = pair(name)[1]
    ref2.set_timesteps(steps)
    timesteps, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=ref2), steps, 0.3, "cpu", denoising_start=split
    )
    for t in timesteps:
        out = model(ref2.scale_model_input(x_ref, t).numpy(), float(t))
        x_ref = ref2.step(torch.from_numpy(out), t, x_ref).prev_sample

    base = ours.start(steps)
    assert denoising_end_count(base.timesteps, train, split) == count
    x = x0 * np.float32(base.init_noise_sigma)
    for i in range(count):
        x = base.step(model(base.scale_model_input(x, i), float(base.timesteps[i])), i, x)
    refiner = ours.start(steps, begin=denoising_start_begin(base.timesteps, ours.order, train, split))
    np.testing.assert_array_equal(np.asarray(refiner.timesteps, np.float32), timesteps.numpy().astype(np.float32))
    for i, t in enumerate(refiner.timesteps):
        x = refiner.step(model(refiner.scale_model_input(x, i), float(t)), i, x)
    assert relative_error(x, x_ref.numpy()) < 1e-4

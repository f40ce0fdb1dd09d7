"""Drive a NumPy scheduler run and a diffusers scheduler through the same loop and compare every step.

Both sides see the same model function and the same noise: diffusers draws from a seeded
``torch.Generator`` inside ``step``; ours asks the ``noise`` callable, which draws from a twin
generator with the same seed, so the streams line up exactly when the calls happen in the same
order with the same shapes.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch


def closed_form_model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth stand-in for the UNet, of the scale a UNet gives."""
    return (np.sin(x * 0.7 + float(t) / 300.0) * 0.9 + 0.05 * x).astype(np.float32)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """Max abs difference relative to the reference's scale (its max magnitude, at least 1).

    Element-wise tolerances are the wrong measure here: torch's float32 sqrt is not correctly rounded on
    some CPUs (NumPy's is), and samplers that cancel large terms turn that ulp into a visible absolute
    difference on large latents while the result is as accurate as diffusers' own.
    """
    return float(np.abs(ours - reference).max()) / max(1.0, float(np.abs(reference).max()))


def compare_loops(
    ours_run,
    reference,
    num_inference_steps: int,
    *,
    model=closed_form_model,
    shape=(2, 4, 8, 8),
    seed: int = 0,
    strength: float = 1.0,
    tolerance: float = 1e-4,
) -> float:
    """Run both loops from the same initial sample; assert every step agrees. Returns the worst relative error.

    ``reference`` is a diffusers scheduler built from the same config, not yet set up.
    """
    reference.set_timesteps(num_inference_steps)
    ref_timesteps = reference.timesteps
    if strength < 1.0:
        init = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = max(num_inference_steps - init, 0) * reference.order
        ref_timesteps = reference.timesteps[t_start:]
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(t_start)
    np.testing.assert_allclose(
        np.asarray(ours_run.timesteps, dtype=np.float64), ref_timesteps.numpy().astype(np.float64), rtol=1e-6, atol=1e-4
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if strength < 1.0:  # img2img: noise a clean sample to the first timestep
        noise = rng.standard_normal(shape).astype(np.float32)
        x_ref = reference.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref_timesteps[:1])
        x = ours_run.add_noise(x, noise, 0)
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)
    else:
        x = x * np.float32(ours_run.init_noise_sigma)
        x_ref = torch.from_numpy(x.copy())
        np.testing.assert_allclose(ours_run.init_noise_sigma, float(reference.init_noise_sigma), rtol=1e-6)
    g_ref = torch.Generator().manual_seed(seed + 1)
    g_ours = torch.Generator().manual_seed(seed + 1)

    def noise(s):
        return torch.randn(tuple(s), generator=g_ours, dtype=torch.float32).numpy()

    takes_generator = "generator" in inspect.signature(reference.step).parameters
    worst = 0.0
    for i, t in enumerate(ref_timesteps):
        inp_ref = reference.scale_model_input(x_ref, t)
        inp = ours_run.scale_model_input(x, i)
        assert relative_error(inp, inp_ref.numpy()) < tolerance, f"scale_model_input, step {i}"
        out_ref = torch.from_numpy(model(inp_ref.numpy(), float(t)))
        kwargs = {"generator": g_ref} if takes_generator else {}
        x_ref = reference.step(out_ref, t, x_ref, **kwargs).prev_sample
        x = ours_run.step(model(inp, float(ours_run.timesteps[i])), i, x, noise=noise)
        assert x.dtype == np.float32 and x.shape == tuple(x_ref.shape)
        err = relative_error(x, x_ref.numpy())
        worst = max(worst, err)
        assert err < tolerance, f"step {i} (t={float(t)}): relative error {err:.3g}"
    return worst

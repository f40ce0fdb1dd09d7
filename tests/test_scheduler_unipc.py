"""UniPC in NumPy against diffusers' UniPCMultistepScheduler, step by step, for the config fields it honours."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler as Reference
from scheduler_harness import compare_loops
from test_scheduler_dpmsolver import denoiser

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.unipc import UniPCMultistepScheduler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)

CONFIGS = {
    "bh2": {},
    "karras": {"use_karras_sigmas": True},
    "order-3": {"solver_order": 3},
    "order-3-karras-sigma-min": {"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    "order-4": {"solver_order": 4},  # solves 3x3 and 4x4 systems
    "order-1": {"solver_order": 1, "timestep_spacing": "leading"},
    "bh1": {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    "noise-prediction": {"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "corrector-off-early": {"disable_corrector": [0, 1, 5]},
    "no-lower-order-final": {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"},
    "exponential": {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    "karras-own-range": {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    "v-zero-snr-trailing": {
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "sample-threshold": {"prediction_type": "sample", "thresholding": True, "sample_max_value": 2.0},
    "cosine-dpm-names": {"beta_schedule": "squaredcos_cap_v2", "solver_type": "midpoint"},  # mapped to bh2
}


def build(name: str):
    ref = Reference(**{**SD15, **CONFIGS[name]})
    return ref, UniPCMultistepScheduler({**ref.config})


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("name", CONFIGS)
def test_unipc_matches_diffusers_step_by_step(name, steps):
    ref, ours = build(name)
    compare_loops(ours.start(steps), ref, steps, model=denoiser(ref))


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", ["bh2", "karras", "order-3", "v-zero-snr-trailing"])
def test_unipc_img2img_strength_matches_diffusers(name, strength):
    ref, ours = build(name)  # the first step of an img2img run has nothing to correct
    compare_loops(ours.start(20, strength=strength), ref, 20, strength=strength, model=denoiser(ref))


def test_repeated_final_sigma_is_an_identity_step_not_nan():
    """Karras sigmas with final_sigmas_type 'sigma_min' end on a zero-length step; at third order without
    lower_order_final diffusers' predictor solves a system with infinite ratios there and returns NaN. We predict
    at order 1, the identity, so the run ends on the corrected sample; everything else matches diffusers."""
    ref = Reference(
        **SD15, solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False
    )
    run = UniPCMultistepScheduler({**ref.config}).start(10)
    ref.set_timesteps(10)
    model = denoiser(ref)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        prev = run.step(model(x, float(t)), i, x)
        x_ref = ref.step(torch.from_numpy(model(x_ref.numpy(), float(t))), t, x_ref).prev_sample
        if i < 9:
            np.testing.assert_allclose(prev, x_ref.numpy(), atol=1e-5, rtol=1e-5)
        x = prev
    assert torch.isnan(x_ref).any()
    np.testing.assert_allclose(x, ref.last_sample.numpy(), atol=1e-5, rtol=1e-5)  # diffusers' corrected sample


def test_unipc_with_the_harness_model():
    ref, ours = build("karras")
    compare_loops(ours.start(25), ref, 25)


def test_defaults_order_and_config_round_trip():
    signature = inspect.signature(Reference.__init__).parameters
    assert UniPCMultistepScheduler.defaults == {k: p.default for k, p in signature.items() if k != "self"}
    assert UniPCMultistepScheduler.name == "UniPCMultistepScheduler"
    assert UniPCMultistepScheduler.order == Reference.order
    ref = Reference(**SD15, solver_type="heun")
    ours = UniPCMultistepScheduler({**ref.config})
    assert {k: ours.config[k] for k in ours.defaults} == {k: ref.config[k] for k in ours.defaults}


def test_runs_are_independent():
    scheduler = UniPCMultistepScheduler({**SD15, "solver_order": 3})
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
    a, b, alone = scheduler.start(8), scheduler.start(8), scheduler.start(8)
    xa, xb, xc = x, -x, x
    for i in range(8):
        xa, xb = a.step(np.sin(xa), i, xa), b.step(np.cos(xb), i, xb)
    for i in range(8):
        xc = alone.step(np.sin(xc), i, xc)
    np.testing.assert_array_equal(xa, xc)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"solver_type": "bh3"}, "UniPCMultistepScheduler solver_type: expected one of bh1, bh2, got 'bh3'"),
        ({"solver_p": object()}, "UniPCMultistepScheduler solver_p: expected None"),
        ({"solver_order": 0}, "UniPCMultistepScheduler solver_order: expected a positive integer, got 0"),
        ({"solver_type": "bh1"}, "UniPCMultistepScheduler solver_type: expected 'bh2' with final_sigmas_type 'zero'"),
        ({"predict_x0": False}, "UniPCMultistepScheduler predict_x0: expected True with final_sigmas_type 'zero'"),
        (
            {"lower_order_final": False},
            "UniPCMultistepScheduler lower_order_final: expected True with solver_order > 1 and final_sigmas_type",
        ),
        ({"use_beta_sigmas": True}, "UniPCMultistepScheduler use_beta_sigmas: expected False"),
        ({"use_flow_sigmas": True}, "UniPCMultistepScheduler use_flow_sigmas: expected False"),
        ({"use_dynamic_shifting": True}, "UniPCMultistepScheduler use_dynamic_shifting: expected False"),
        ({"shift_terminal": 0.5}, "UniPCMultistepScheduler shift_terminal: expected None"),
        (
            {"use_karras_sigmas": True, "use_exponential_sigmas": True},
            "UniPCMultistepScheduler use_exponential_sigmas: expected at most one of",
        ),
        ({"prediction_type": "flow_prediction"}, "UniPCMultistepScheduler prediction_type: expected one of"),
        ({"timestep_spacing": "uniform"}, "UniPCMultistepScheduler timestep_spacing: expected one of"),
        ({"final_sigmas_type": "max"}, "UniPCMultistepScheduler final_sigmas_type: expected one of"),
    ],
)
def test_unipc_rejects_unsupported_options(config, message):
    with pytest.raises(InputError, match=message):
        UniPCMultistepScheduler({**SD15, **config})


def test_step_count_is_checked():
    with pytest.raises(InputError, match=r"UniPCMultistepScheduler num_inference_steps: expected 1..1000, got 1001"):
        UniPCMultistepScheduler(SD15).start(1001)

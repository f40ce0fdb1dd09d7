"""DPM-Solver multistep and single-step in NumPy against diffusers, step by step, for the config fields they honour."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler as MultiReference
from diffusers import DPMSolverSinglestepScheduler as SingleReference
from scheduler_harness import compare_loops

from sdrt.runtime.errors import InputError
from sdrt.runtime.schedulers.dpmsolver import DPMSolverMultistepScheduler
from sdrt.runtime.schedulers.dpmsolver_single import DPMSolverSinglestepScheduler

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SD15_SINGLE = {k: v for k, v in SD15.items() if k != "steps_offset"}  # the single-step class has no steps_offset
STEPS = [1, 2, 10, 50]


def denoiser(reference):
    """A stand-in UNet: the ideal denoiser for N(0, 1) data plus a smooth nonlinear wobble.

    Unlike the harness's default model, its predictions stay at the scale a trained UNet gives at every noise
    level, so stochastic runs keep latents at unit scale instead of drifting to tens (where float32 round-off in
    the reference alone exceeds the harness's elementwise check on the model input).
    """
    alphas_cumprod = reference.alphas_cumprod.numpy().astype(np.float64)
    kind = reference.config.prediction_type

    def model(x: np.ndarray, t: float) -> np.ndarray:
        a = alphas_cumprod[int(round(t))]
        alpha, sigma = a**0.5, (1 - a) ** 0.5
        wobble = 0.3 * np.sin(2 * x + t / 300)
        x0, eps = alpha * x + sigma * wobble, sigma * x - alpha * wobble
        out = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[kind]
        return out.astype(np.float32)

    return model


def compare_resynced(ours_run, reference, steps: int, model, seed: int = 0, tolerance: float = 1e-4) -> None:
    """Each step from the reference's own incoming sample, so round-off cannot compound across steps.

    For third-order SDE steps: their D2 term amplifies ulp-level differences between torch's and NumPy's float32
    sqrt/exp (torch's float32 sqrt is not correctly rounded on AVX-512) past the harness's 1e-5 elementwise check
    on the model input over long runs, though every single step agrees to ~1e-6.
    """
    reference.set_timesteps(steps)
    x = np.random.default_rng(seed).standard_normal((2, 4, 8, 8)).astype(np.float32)
    g_ref = torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(reference.timesteps):
        out = model(x, float(t))
        g_ours = torch.Generator()
        g_ours.set_state(g_ref.get_state())
        x_ref = reference.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=g_ref).prev_sample.numpy()
        x_ours = ours_run.step(out, i, x, noise=lambda s, g=g_ours: torch.randn(s, generator=g).numpy())
        err = float(np.abs(x_ours - x_ref).max()) / max(1.0, float(np.abs(x_ref).max()))
        assert err < tolerance, f"step {i}: relative error {err:.3g}"
        x = x_ref


# ---- multistep ----

MULTI = {
    "dpm++2m": {},
    "dpm++2m-karras": {"use_karras_sigmas": True},
    "dpm++2m-sde-karras": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    "dpm++2m-sde-heun": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
    "dpm++3m": {"solver_order": 3},
    "dpm++1": {"solver_order": 1, "timestep_spacing": "leading"},
    "heun-euler-final-leading": {
        "solver_type": "heun",
        "lower_order_final": False,
        "euler_at_final": True,
        "timestep_spacing": "leading",
    },
    "sigma-min-3m-no-lower-final": {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    "dpmsolver-3-threshold": {
        "algorithm_type": "dpmsolver",
        "solver_order": 3,
        "final_sigmas_type": "sigma_min",
        "thresholding": True,
        "sample_max_value": 2.0,
    },
    "sde-dpmsolver-heun": {"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    "v-zero-snr-trailing": {
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "sample-threshold": {"prediction_type": "sample", "thresholding": True, "sample_max_value": 2.0},
    "lu-lambdas": {"use_lu_lambdas": True},
    "exponential-sigmas": {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    # diffusers maps these names silently (after rejecting 'deis' with a zero final sigma)
    "deis-and-unipc-names": {"algorithm_type": "deis", "solver_type": "bh2", "final_sigmas_type": "sigma_min"},
}


def multi(name: str):
    ref = MultiReference(**{**SD15, **MULTI[name]})
    return ref, DPMSolverMultistepScheduler({**ref.config})


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", MULTI)
def test_multistep_matches_diffusers_step_by_step(name, steps):
    ref, ours = multi(name)
    compare_loops(ours.start(steps), ref, steps, model=denoiser(ref))


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", ["dpm++2m", "dpm++2m-karras", "dpm++2m-sde-karras", "dpm++3m", "v-zero-snr-trailing"])
def test_multistep_img2img_strength_matches_diffusers(name, strength):
    ref, ours = multi(name)
    compare_loops(ours.start(20, strength=strength), ref, 20, strength=strength, model=denoiser(ref))


def test_multistep_third_order_sde_matches_diffusers():
    """DPM++ 3M SDE Karras: whole loops while round-off stays small, then every step of a 50-step run."""
    cfg = {**SD15, "algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True}
    for steps in (1, 2, 10):
        ref = MultiReference(**cfg)
        compare_loops(DPMSolverMultistepScheduler({**ref.config}).start(steps), ref, steps, model=denoiser(ref))
    ref = MultiReference(**cfg)
    compare_resynced(DPMSolverMultistepScheduler({**ref.config}).start(50), ref, 50, denoiser(ref))


def test_cosine_karras_schedule_matches_diffusers():
    """Cosine + Karras repeats its first timesteps, so diffusers' loop (no begin index) starts one sigma late and
    overruns its sigmas; only the schedule is compared. Our run indexes by position and so starts at sigma 0."""
    cfg = {**SD15, "beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "lambda_min_clipped": -5.1}
    ref = MultiReference(**cfg)
    for steps in (1, 10, 50):
        ref.set_timesteps(steps)
        run = DPMSolverMultistepScheduler({**ref.config}).start(steps)
        np.testing.assert_array_equal(run.timesteps, ref.timesteps.numpy())
        np.testing.assert_array_equal(run.sigmas, ref.sigmas.numpy())


@pytest.mark.parametrize("extra", [{"solver_type": "heun"}, {"solver_order": 3}])
def test_repeated_final_sigma_is_an_identity_step_not_nan(extra):
    """Karras sigmas end on sigma_min, and final_sigmas_type 'sigma_min' repeats it: the last step has length 0.

    diffusers takes it at order 2 (heun) or 3 anyway and returns NaN; we take it at order 1, the identity, which is
    also what diffusers returns for the midpoint solver. Every earlier step matches diffusers.
    """
    cfg = {**SD15, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", **extra}
    ref = MultiReference(**cfg)
    run = DPMSolverMultistepScheduler({**ref.config}).start(20)
    ref.set_timesteps(20)
    model = denoiser(ref)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        prev = run.step(model(x, float(t)), i, x)
        x_ref = ref.step(torch.from_numpy(model(x_ref.numpy(), float(t))), t, x_ref).prev_sample
        if i < 19:
            np.testing.assert_allclose(prev, x_ref.numpy(), atol=1e-5, rtol=1e-5)
        x_last, x = x, prev
    assert torch.isnan(x_ref).any()
    np.testing.assert_allclose(x, x_last, rtol=1e-6)


# ---- single-step ----

SINGLE = {
    "dpm++2s": {},
    "dpm++2s-karras": {"use_karras_sigmas": True},
    "dpm++3s": {"solver_order": 3},
    "dpm++3s-heun": {"solver_order": 3, "solver_type": "heun"},
    "dpm++1s": {"solver_order": 1},
    "sde-karras": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    "sde-3s-midpoint": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    "dpmsolver-3s-heun": {
        "algorithm_type": "dpmsolver",
        "solver_order": 3,
        "solver_type": "heun",
        "final_sigmas_type": "sigma_min",
    },
    "sigma-min-3s-no-lower-final": {"solver_order": 3, "final_sigmas_type": "sigma_min"},
    "exponential-sigma-min": {"use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"},
    "v-prediction": {"prediction_type": "v_prediction"},
    "sample-threshold": {"prediction_type": "sample", "thresholding": True, "sample_max_value": 2.0},
    "cosine-clipped": {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
}


def single(name: str):
    ref = SingleReference(**{**SD15_SINGLE, **SINGLE[name]})
    return ref, DPMSolverSinglestepScheduler({**ref.config})


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", SINGLE)
def test_singlestep_matches_diffusers_step_by_step(name, steps):
    ref, ours = single(name)  # ours before set_timesteps, which rewrites diffusers' lower_order_final in place
    compare_loops(ours.start(steps), ref, steps, model=denoiser(ref))


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("name", ["dpm++2s", "dpm++3s", "sde-karras"])
def test_singlestep_img2img_strength_matches_diffusers(name, strength):
    ref, ours = single(name)  # begins mid-group: the first steps fall back to lower orders
    compare_loops(ours.start(20, strength=strength), ref, 20, strength=strength, model=denoiser(ref))


@pytest.mark.parametrize("steps", [2, 10, 50])
def test_singlestep_third_order_sde_heun_matches_diffusers(steps):
    ref = SingleReference(**SD15_SINGLE, algorithm_type="sde-dpmsolver++", solver_order=3, solver_type="heun")
    compare_resynced(DPMSolverSinglestepScheduler({**ref.config}).start(steps), ref, steps, denoiser(ref))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"solver_order": 3},
        {"solver_order": 1},
        {"final_sigmas_type": "sigma_min"},
        {"solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": True},
    ],
)
def test_singlestep_order_list_matches_diffusers(extra):
    for steps in range(1, 31):
        ref = SingleReference(**SD15_SINGLE, **extra)
        run = DPMSolverSinglestepScheduler({**ref.config}).start(steps)
        ref.set_timesteps(steps)
        assert run.orders == ref.order_list, f"{steps} steps"


# ---- contract ----


@pytest.mark.parametrize(
    "ours, reference", [(DPMSolverMultistepScheduler, MultiReference), (DPMSolverSinglestepScheduler, SingleReference)]
)
def test_defaults_order_and_config_round_trip(ours, reference):
    signature = inspect.signature(reference.__init__).parameters
    assert ours.defaults == {k: p.default for k, p in signature.items() if k != "self"}
    assert ours.name == reference.__name__ and ours.order == reference.order
    ref = reference(algorithm_type="deis", solver_type="logrho", final_sigmas_type="sigma_min")
    assert {k: ours({**ref.config}).config[k] for k in ours.defaults} == {k: ref.config[k] for k in ours.defaults}


def test_runs_are_independent():
    """One scheduler serves interleaved generations: each run keeps its own solver history."""
    ref = MultiReference(**SD15, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    scheduler = DPMSolverMultistepScheduler({**ref.config})
    a, b = scheduler.start(8), scheduler.start(8)
    x = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
    xa, xb = x, x * 0.5
    fixed = np.random.default_rng(4).standard_normal((8, 1, 4, 4, 4)).astype(np.float32)
    for i in range(8):
        xa = a.step(np.sin(xa), i, xa, noise=lambda s, i=i: fixed[i])
        xb = b.step(np.sin(xb), i, xb, noise=lambda s, i=i: fixed[i])
    alone = scheduler.start(8)
    xc = x
    for i in range(8):
        xc = alone.step(np.sin(xc), i, xc, noise=lambda s, i=i: fixed[i])
    np.testing.assert_array_equal(xa, xc)


def test_sde_step_needs_the_noise_callable():
    run = DPMSolverMultistepScheduler({**SD15, "algorithm_type": "sde-dpmsolver++"}).start(4)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(InputError, match=r"DPMSolverMultistepScheduler noise: expected a callable"):
        run.step(x, 0, x)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_beta_sigmas": True}, "DPMSolverMultistepScheduler use_beta_sigmas: expected False"),
        ({"use_flow_sigmas": True}, "DPMSolverMultistepScheduler use_flow_sigmas: expected False"),
        ({"use_dynamic_shifting": True}, "DPMSolverMultistepScheduler use_dynamic_shifting: expected False"),
        ({"variance_type": "learned_range"}, "DPMSolverMultistepScheduler variance_type: expected None"),
        ({"algorithm_type": "ddim"}, "DPMSolverMultistepScheduler algorithm_type: expected one of dpmsolver"),
        ({"solver_type": "rk4"}, "DPMSolverMultistepScheduler solver_type: expected one of midpoint, heun"),
        ({"solver_order": 4}, r"DPMSolverMultistepScheduler solver_order: expected one of 1, 2, 3, got 4"),
        (
            {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3},
            "DPMSolverMultistepScheduler solver_order: expected 1 or 2 for 'sde-dpmsolver', got 3",
        ),
        (
            {"algorithm_type": "dpmsolver"},
            "DPMSolverMultistepScheduler final_sigmas_type: expected 'sigma_min' for 'dpmsolver', got 'zero'",
        ),
        (
            {"algorithm_type": "deis"},
            "DPMSolverMultistepScheduler final_sigmas_type: expected 'sigma_min' for 'deis', got 'zero'",
        ),
        ({"final_sigmas_type": "max"}, "DPMSolverMultistepScheduler final_sigmas_type: expected one of"),
        (
            {"use_karras_sigmas": True, "use_exponential_sigmas": True},
            "DPMSolverMultistepScheduler use_exponential_sigmas: expected at most one of",
        ),
        (
            {"prediction_type": "flow_prediction"},
            "DPMSolverMultistepScheduler prediction_type: expected one of epsilon, v_prediction, sample",
        ),
        ({"timestep_spacing": "uniform"}, "DPMSolverMultistepScheduler timestep_spacing: expected one of"),
        ({"beta_schedule": "sigmoid"}, "DPMSolverMultistepScheduler beta_schedule: expected one of"),
        ({"time_shift_type": "linear"}, "DPMSolverMultistepScheduler time_shift_type: expected 'exponential'"),
    ],
)
def test_multistep_rejects_unsupported_options(config, message):
    with pytest.raises(InputError, match=message):
        DPMSolverMultistepScheduler({**SD15, **config})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"algorithm_type": "sde-dpmsolver"}, "DPMSolverSinglestepScheduler algorithm_type: expected one of"),
        (
            {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "thresholding": True},
            "DPMSolverSinglestepScheduler thresholding: expected False for 'dpmsolver', got True",
        ),
        ({"solver_order": 4}, "DPMSolverSinglestepScheduler solver_order: expected one of 1, 2, 3, got 4"),
        ({"use_beta_sigmas": True}, "DPMSolverSinglestepScheduler use_beta_sigmas: expected False"),
    ],
)
def test_singlestep_rejects_unsupported_options(config, message):
    with pytest.raises(InputError, match=message):
        DPMSolverSinglestepScheduler({**SD15_SINGLE, **config})


def test_step_count_is_checked():
    with pytest.raises(InputError, match=r"DPMSolverMultistepScheduler num_inference_steps: expected 1..1000, got 0"):
        DPMSolverMultistepScheduler(SD15).start(0)

"""Every scheduler name users can pick, against diffusers' class with the same overrides, on SD 1.5's
real scheduler config; and each driven by the tiny UNet instead of a closed-form model."""

import diffusers
import numpy as np
import pytest
import torch
from scheduler_harness import compare_loops

from sdrt.runtime import InputError, schedulers

# SD 1.5's scheduler_config.json as published (PNDM, with DDIM's clip_sample among its fields).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def reference(config: dict, alias: str):
    cls_name, extra = schedulers.ALIASES[alias]
    return getattr(diffusers, cls_name).from_config(config, **extra)


@pytest.mark.parametrize("alias", sorted(schedulers.ALIASES))
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_every_alias_matches_diffusers(alias, steps):
    ref = reference(SD15, alias)
    try:
        ref.set_timesteps(steps)
    except ValueError as e:
        pytest.skip(f"diffusers rejects {steps} steps for {alias}: {e}")
    ref = reference(SD15, alias)  # a fresh one: set_timesteps above changed its state
    ours = schedulers.from_config(SD15, alias).start(steps)
    compare_loops(ours, ref, steps)


@pytest.fixture(scope="module")
def unet_model(tiny_model):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    context = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 77, 32)).astype(np.float32))

    def model(x: np.ndarray, t: float) -> np.ndarray:
        with torch.no_grad():
            return unet(torch.from_numpy(x), torch.tensor(t), context).sample.numpy()

    return model


@pytest.mark.parametrize("alias", sorted(schedulers.ALIASES))
# 50 steps driven by the UNet cost 2.5 minutes for all aliases; the closed-form model covers 50 steps
# in the default suite, so the UNet-driven long runs are in `make test-slow`.
@pytest.mark.parametrize("steps", [1, 2, pytest.param(50, marks=pytest.mark.slow)])
def test_every_alias_driven_by_the_tiny_unet(alias, steps, unet_model):
    ref = reference(SD15, alias)
    ours = schedulers.from_config(SD15, alias).start(steps)
    compare_loops(ours, ref, steps, model=unet_model, shape=(1, 4, 8, 8))


def test_model_config_is_used_without_override():
    assert type(schedulers.from_config(SD15)).__name__ == "PNDMScheduler"


def test_unknown_names_and_fields_are_refused():
    with pytest.raises(InputError, match="scheduler: expected one of .*euler-a.*got 'warp'"):
        schedulers.from_config(SD15, "warp")
    with pytest.raises(InputError, match="_class_name 'FancyScheduler' is not supported; supported: DDIMScheduler"):
        schedulers.from_config({**SD15, "_class_name": "FancyScheduler"})
    with pytest.raises(InputError, match=r"unknown fields \['beta_shedule'\]; PNDMScheduler supports: "):
        schedulers.from_config({**SD15, "beta_shedule": "linear"})
    with pytest.raises(InputError, match="beta_schedule: expected one of linear, scaled_linear"):
        schedulers.from_config({**SD15, "beta_schedule": "cubic"}, "euler")

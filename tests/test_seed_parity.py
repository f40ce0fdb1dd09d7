"""With seed=N and no latents, the runtime's image equals diffusers' image generated with
generator=torch.Generator("cpu").manual_seed(N): latents and every scheduler noise draw line up."""

import diffusers
import numpy as np
import pytest
import torch

from sdrt.runtime import schedulers


@pytest.mark.parametrize(
    ("alias", "seed"), [("euler-a", 0), ("dpm++2m-karras", 1), ("ddim", 2), ("dpm++2m-sde-karras", 3), ("lcm", 4)]
)
def test_seeded_image_matches_diffusers(runtime_pipeline, diffusers_pipeline, alias, seed):
    cls_name, extra = schedulers.ALIASES[alias]
    scheduler = getattr(diffusers, cls_name).from_config(diffusers_pipeline.scheduler.config, **extra)
    pipe = diffusers.StableDiffusionPipeline(**{**diffusers_pipeline.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    args = dict(
        prompt=["a lighthouse at dusk", "a bowl of fruit"],
        height=64,
        width=96,
        num_inference_steps=6,
        guidance_scale=6.0,
    )
    ref = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **args).images
    ref = (ref * 255).round().astype(np.uint8)
    ours = runtime_pipeline(seed=seed, scheduler=alias, **args)
    assert ours.seed == seed
    diff = np.abs(ours.images.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"{alias}: max abs difference {diff.max()}/255"

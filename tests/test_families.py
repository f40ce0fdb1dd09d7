"""Every family and task from export to image: the runtime's images equal the matching diffusers
pipeline's (same inputs, fp32, CPU) within 1/255 per pixel. Models are tiny random-weight pipelines
built here; each is exported once per session (see conftest's ``family_artifacts``).

An export of a tiny model costs ~30 s (torch.onnx's tracing), so the default suite exports only
SDXL's base and refiner beside the tiny SD model; the cases that need an export of their own (a
9-channel inpainting UNet, LCM, the tiny autoencoder) are marked slow (`make test-slow`)."""

from __future__ import annotations

import json
import os
import shutil

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime import Pipeline
from sdrt.runtime.errors import InputError

torch.set_num_threads(2)


def reference(pipeline_class: str, folder, **overrides):
    cls = getattr(diffusers, pipeline_class)
    extra = (
        {"safety_checker": None} if "safety_checker" in json.loads((folder / "model_index.json").read_text()) else {}
    )
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32, **extra, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_uint8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding


def assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1, f"max abs difference {diff.max()}/255 ({(diff > 1).mean():.1%} of values past 1/255)"
    assert ours.std() > 1  # not a blank image


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_image(height=64, width=64, seed=0) -> Image.Image:
    """A deterministic picture with structure (gradients and a disc), as an RGB PIL image."""
    y, x = np.mgrid[0:height, 0:width]
    disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2) < (min(height, width) / 4) ** 2
    rgb = np.stack([x / width * 255, y / height * 255, disc * 200 + 30], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 20, size=rgb.shape)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


def test_mask(height=64, width=64) -> Image.Image:
    """White (repaint) over the right half's middle, black elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 2 :] = 255
    return Image.fromarray(mask, mode="L")


test_image.__test__ = False  # helpers, not tests
test_mask.__test__ = False


# -- SDXL ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sdxl(family_artifacts):
    with Pipeline.load(family_artifacts("tiny-sdxl")) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def sdxl_reference(family_models):
    return reference("StableDiffusionXLPipeline", family_models("tiny-sdxl"))


SECOND = {"prompt_2": ["a green tree", "a blue sphere"], "negative_prompt_2": "dark"}  # text_encoder_2's own


@pytest.mark.parametrize(
    ("negative", "height", "width", "extra"), [(None, 64, 64, {}), ("blurry", 96, 64, {}), ("blurry", 64, 64, SECOND)]
)
def test_sdxl_text_to_image(sdxl, sdxl_reference, rng, negative, height, width, extra):
    assert sdxl.manifest.family == "sdxl" and set(sdxl.sessions) >= {"text_encoder", "text_encoder_2"}
    latents = rng.standard_normal((2, 4, height // 8, width // 8), dtype=np.float32)
    args = dict(prompt=["an astronaut on a horse", "a red cube"], negative_prompt=negative, height=height, width=width,
                num_inference_steps=3, guidance_scale=5.0, **extra)  # fmt: skip
    ours = sdxl(latents=latents, **args).images
    ref = sdxl_reference(latents=torch.from_numpy(latents), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))
    if extra:  # the second encoder's own prompts moved the image
        same = {k: v for k, v in args.items() if k not in extra}
        assert np.abs(sdxl(latents=latents, **same).images.astype(int) - ours).mean() > 1


def test_sdxl_micro_conditioning_and_no_guidance(sdxl, sdxl_reference, rng):
    latents = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    args = dict(prompt="a castle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
                original_size=(1024, 768), crops_coords_top_left=(16, 32), target_size=(512, 512))  # fmt: skip
    ours = sdxl(latents=latents, **args).images
    ref = sdxl_reference(latents=torch.from_numpy(latents), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))
    plain = sdxl(latents=latents, prompt="a castle", height=64, width=64, num_inference_steps=2, guidance_scale=1.0)
    assert not np.array_equal(plain.images, ours)  # the time ids reach the UNet


@pytest.mark.slow  # the refiner's export (~70 s) is kept out of the default suite's time budget
def test_sdxl_base_then_refiner(sdxl, family_artifacts, family_models, sdxl_reference):
    """diffusers' ensemble of experts: the base denoises the first 80 %, the refiner the rest, on its latents."""
    prompt, steps, split = "a lion in the savanna", 6, 0.7
    base = sdxl(prompt, num_inference_steps=steps, denoising_end=split, output_type="latent", seed=3,
                height=64, width=64)  # fmt: skip
    assert base.images is None and base.latents.shape == (1, 4, 8, 8)
    with Pipeline.load(family_artifacts("tiny-sdxl-refiner"), components=("vae_decoder",)) as refiner:
        assert refiner.manifest.family == "sdxl-refiner" and set(refiner.sessions) == {
            "text_encoder_2",
            "unet",
            "vae_decoder",
        }
        ours = refiner(prompt, image=base.latents, num_inference_steps=steps, denoising_start=split, seed=4).images
        with pytest.raises(InputError, match="refines images"):
            refiner(prompt)
        with pytest.raises(InputError, match="needs the VAE encoder, which this pipeline was loaded without"):
            refiner(prompt, image=test_image())
    ref_latents = sdxl_reference(prompt, num_inference_steps=steps, denoising_end=split, output_type="latent",
                                 generator=generator(3), height=64, width=64).images  # fmt: skip
    np.testing.assert_allclose(base.latents, ref_latents.numpy(), atol=1e-4)
    ref_refiner = reference("StableDiffusionXLImg2ImgPipeline", family_models("tiny-sdxl-refiner"))
    ref = ref_refiner(prompt, image=ref_latents, num_inference_steps=steps, denoising_start=split,
                      generator=generator(4), output_type="np").images  # fmt: skip
    assert_close(ours, as_uint8(ref))


# -- image-to-image --------------------------------------------------------------------------------
def test_sd_image_to_image_with_a_seed(runtime_pipeline, tiny_model):
    ref_pipe = reference("StableDiffusionImg2ImgPipeline", tiny_model)
    args = dict(prompt=["a watercolor fox", "a red barn"], strength=0.6, num_inference_steps=5, guidance_scale=6.0)
    ours = runtime_pipeline(image=test_image(), seed=11, **args).images
    ref = ref_pipe(image=test_image(), generator=generator(11), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


def test_sdxl_image_to_image_with_a_seed(sdxl, family_models, tmp_path):
    ref_pipe = reference("StableDiffusionXLImg2ImgPipeline", family_models("tiny-sdxl"))
    path = tmp_path / "input.png"
    test_image(64, 96).save(path)  # given as a path, read as diffusers reads the PIL image
    args = dict(prompt="a harbour at dawn", num_inference_steps=6, guidance_scale=5.0, num_images_per_prompt=2)
    ours = sdxl(image=path, seed=5, **args).images  # SDXL's default strength (0.3)
    ref = ref_pipe(image=Image.open(path), generator=generator(5), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


# -- inpainting ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_unet_with_a_seed(family_artifacts, family_models, strength):
    ref_pipe = reference("StableDiffusionInpaintPipeline", family_models("tiny-sd-inpaint"))
    args = dict(prompt="a cat on a bench", strength=strength, num_inference_steps=4, guidance_scale=7.0,
                height=64, width=64)  # fmt: skip
    with Pipeline.load(family_artifacts("tiny-sd-inpaint")) as pipe:
        assert pipe.dims.unet_in_channels == 9 and pipe.dims.latent_channels == 4
        ours = pipe(image=test_image(), mask_image=test_mask(), seed=8, **args).images
        with pytest.raises(InputError, match="inpainting UNet"):
            pipe("a cat", height=64, width=64)
    ref = ref_pipe(image=test_image(), mask_image=test_mask(), generator=generator(8), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


def test_inpainting_with_an_ordinary_unet_blends_the_known_region(runtime_pipeline, tiny_model):
    ref_pipe = reference("StableDiffusionInpaintPipeline", tiny_model)
    args = dict(prompt=["a cat on a bench", "a dog"], strength=0.8, num_inference_steps=5, guidance_scale=7.0,
                height=64, width=64)  # fmt: skip
    ours = runtime_pipeline(image=test_image(), mask_image=test_mask(), seed=9, **args).images
    ref = ref_pipe(image=test_image(), mask_image=test_mask(), generator=generator(9), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


def test_sdxl_inpainting_with_the_base_unet(sdxl, sdxl_reference):
    """SDXL's inpainting pipeline on a 4-channel base UNet (blend mode), at its default strength 0.9999."""
    ref_pipe = diffusers.StableDiffusionXLInpaintPipeline(**sdxl_reference.components)
    ref_pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat on a bench", num_inference_steps=5, height=64, width=64)
    ours = sdxl(image=test_image(), mask_image=test_mask(), seed=12, **args).images
    ref = ref_pipe(image=test_image(), mask_image=test_mask(), generator=generator(12), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


# -- few-step models -------------------------------------------------------------------------------
def with_scheduler(artifacts, tmp_path, config: dict):
    """The artifacts with another scheduler config, as a Turbo model ships its own: files hard-linked."""
    out = tmp_path / f"{artifacts.name}-{config['_class_name']}"
    shutil.copytree(artifacts, out, copy_function=os.link, ignore=shutil.ignore_patterns("engines"))
    target = out / "scheduler" / "scheduler_config.json"
    base = json.loads(target.read_text())
    target.unlink()
    target.write_text(json.dumps({**base, **config}))
    return out


TURBO = {"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_style_few_steps_without_guidance(tiny_artifacts, tiny_model, tmp_path, steps):
    """SD-Turbo's recipe: Euler ancestral on trailing timesteps, guidance off, 1-4 steps."""
    ref_pipe = reference("StableDiffusionPipeline", tiny_model)
    ref_pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref_pipe.scheduler.config, **TURBO)
    args = dict(prompt="a bowl of fruit", num_inference_steps=steps, guidance_scale=0.0, height=64, width=64)
    with Pipeline.load(with_scheduler(tiny_artifacts, tmp_path, TURBO)) as pipe:
        ours = pipe(seed=steps, **args).images
    ref = ref_pipe(generator=generator(steps), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


def test_sdxl_turbo_style_one_step(family_artifacts, sdxl_reference, tmp_path):
    ref_pipe = diffusers.StableDiffusionXLPipeline(**sdxl_reference.components)
    ref_pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref_pipe.scheduler.config, **TURBO)
    ref_pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a bowl of fruit", num_inference_steps=1, guidance_scale=0.0, height=64, width=64)
    with Pipeline.load(with_scheduler(family_artifacts("tiny-sdxl"), tmp_path, TURBO)) as pipe:
        ours = pipe(seed=2, **args).images
    ref = ref_pipe(generator=generator(2), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))


@pytest.mark.slow
def test_lcm_guidance_embedding(family_artifacts, family_models):
    ref_pipe = reference("LatentConsistencyModelPipeline", family_models("tiny-lcm"))
    args = dict(prompt=["a lighthouse", "a forest"], num_inference_steps=4, guidance_scale=8.5, height=64, width=64)
    with Pipeline.load(family_artifacts("tiny-lcm")) as pipe:
        assert pipe.dims.time_cond_dim > 0 and "timestep_cond" in [
            t.name for t in pipe.manifest.components["unet"].inputs
        ]
        ours = pipe(seed=6, **args).images
        other = pipe(seed=6, **{**args, "guidance_scale": 2.0}).images
    ref = ref_pipe(generator=generator(6), output_type="np", **args).images
    assert_close(ours, as_uint8(ref))
    assert not np.array_equal(ours, other)  # the guidance scale reaches the UNet as an embedding


# -- the tiny autoencoder --------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_autoencoder_in_place_of_the_vae(family_artifacts, family_models, tiny_model):
    artifacts = family_artifacts("tiny-sd+taesd")
    with Pipeline.load(artifacts) as pipe:
        assert pipe.manifest.vae["class"] == "AutoencoderTiny" and pipe.manifest.vae["source"]["path"]
        assert [t.name for t in pipe.manifest.components["vae_encoder"].outputs] == ["latent"]
        text = pipe("a red cube", num_inference_steps=3, height=64, width=64, seed=1).images
        img2img = pipe("a red cube", image=test_image(), strength=0.7, num_inference_steps=4, seed=1).images
    taesd = diffusers.AutoencoderTiny.from_pretrained(family_models("tiny-taesd"), torch_dtype=torch.float32)
    ref_pipe = reference("StableDiffusionPipeline", tiny_model, vae=taesd)
    ref = ref_pipe("a red cube", num_inference_steps=3, height=64, width=64, generator=generator(1), output_type="np")
    assert_close(text, as_uint8(ref.images))
    ref_i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    ref_i2i.set_progress_bar_config(disable=True)
    ref = ref_i2i("a red cube", image=test_image(), strength=0.7, num_inference_steps=4, generator=generator(1),
                  output_type="np")  # fmt: skip
    assert_close(img2img, as_uint8(ref.images))

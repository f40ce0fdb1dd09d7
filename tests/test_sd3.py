"""SD 3 in the NumPy runtime against diffusers' SD 3 pipelines on the tiny SD 3 model, at fp32 with the same
latents or seed: text-to-image guided and unguided, each text encoder's own prompt and negative prompt, another
max_sequence_length, T5 left out (zeros in its place, as diffusers with text_encoder_3=None), dynamic shifting;
image-to-image; inpainting (its latents, and the image decoded with the VAE's shift).
Each case also checks its argument moved the image, so a wrong prompt path or scheduler cannot pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_families import as_uint8, assert_close

from sdrt.runtime import InputError, Pipeline
from sdrt.runtime.lora import LoraError

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = dict(height=64, width=64, num_inference_steps=3)


@pytest.fixture(scope="module")
def sd3(family_models, family_artifacts):
    from diffusers import StableDiffusion3Pipeline

    folder, artifacts = family_models("tiny-sd3"), family_artifacts("tiny-sd3")
    torch.set_num_threads(2)
    reference = StableDiffusion3Pipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    with Pipeline.load(artifacts, backend="onnxruntime") as pipe:
        yield reference, pipe, artifacts


def _latents(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 16, 8, 8)).astype(np.float32)


def _pair(sd3, pipe=None, reference=None, **kwargs):
    ref, ours, _ = sd3
    latents = _latents()
    want = as_uint8(
        (reference or ref)(PROMPT, latents=torch.from_numpy(latents), output_type="np", **SIZE, **kwargs).images
    )
    got = (pipe or ours)(PROMPT, latents=latents, **SIZE, **kwargs).images
    assert_close(got, want)
    return got


def test_text_to_image_with_guidance_equals_diffusers(sd3):
    guided = _pair(sd3)
    unguided = _pair(sd3, guidance_scale=1.0)
    assert np.abs(guided.astype(int) - unguided).mean() > 3  # guidance changed the image


def test_each_encoders_own_prompt_equals_diffusers(sd3):
    base = _pair(sd3)
    own = _pair(sd3, prompt_2="a red sports car", prompt_3="a blue sailing boat", negative_prompt="blurry",
                negative_prompt_2="dark", negative_prompt_3="ugly")  # fmt: skip
    assert np.abs(own.astype(int) - base).mean() > 3


def test_another_max_sequence_length_equals_diffusers(sd3):
    base = _pair(sd3)
    short = _pair(sd3, max_sequence_length=32)
    assert np.abs(short.astype(int) - base).mean() > 0.5


def test_without_t5_equals_diffusers_without_its_encoder(sd3):
    ref, _, artifacts = sd3
    base = _pair(sd3)
    parts = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    with Pipeline.load(artifacts, backend="onnxruntime", components=parts) as no_t5:
        assert "text_encoder_3" not in no_t5.sessions
        encoder, tokenizer = ref.text_encoder_3, ref.tokenizer_3
        ref.text_encoder_3 = ref.tokenizer_3 = None
        try:
            got = _pair(sd3, pipe=no_t5)
        finally:
            ref.text_encoder_3, ref.tokenizer_3 = encoder, tokenizer
    assert np.abs(got.astype(int) - base).mean() > 0.5


def test_dynamic_shifting_and_a_seed_equal_diffusers(sd3):
    """SD 3.5's scheduler options: mu from the image's patch count (calculate_shift), and the seed's noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdrt.runtime import schedulers

    ref, pipe, _ = sd3
    config = {**ref.scheduler.config, "use_dynamic_shifting": True}
    own = pipe.scheduler
    try:
        ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        pipe.scheduler = schedulers.from_config({**config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
        want = as_uint8(ref(PROMPT, output_type="np", generator=torch.Generator().manual_seed(7), **SIZE).images)
        got = pipe(PROMPT, seed=7, **SIZE).images
        assert_close(got, want)
    finally:
        ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**config, "use_dynamic_shifting": False})
        pipe.scheduler = own


def test_sd3_arguments_and_sizes_are_checked(sd3, tiny_artifacts):
    _, pipe, _ = sd3
    with pytest.raises(InputError, match=r"max_sequence_length: expected an integer in \[1, 512\]"):
        pipe(PROMPT, max_sequence_length=600, **SIZE)
    with pytest.raises(InputError, match="height: expected at most 1024 pixels"):
        pipe(PROMPT, height=1040, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match=r"prompt_2: expected 1 string \(one prompt was given\), got 2"):
        pipe(PROMPT, prompt_2=["a", "b"], **SIZE)
    with pytest.raises(LoraError, match="LoRA adapters are for UNet models so far, not sd3"):
        pipe(PROMPT, loras=[("x.safetensors", 1.0)], **SIZE)
    with Pipeline.load(tiny_artifacts) as sd1:
        with pytest.raises(InputError, match="max_sequence_length: applies to models with a T5 text encoder"):
            sd1(PROMPT, max_sequence_length=77, num_inference_steps=1, height=64, width=64)
        with pytest.raises(InputError, match="prompt_3: applies to models with 3 text encoders or more"):
            sd1(PROMPT, prompt_3="x", num_inference_steps=1, height=64, width=64)


def _image(seed: int = 1):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize(("strength", "size"), [(0.75, None), (0.6, 64)])
def test_image_to_image_equals_diffusers(family_models, sd3, strength, size):
    """SD 3's img2img: resized to the model's default size, noised at SD 3's get_timesteps index (10 steps at 0.75
    begin at index 2, where SD's formula would begin at 3)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    _, pipe, _ = sd3
    ref = StableDiffusion3Img2ImgPipeline.from_pretrained(family_models("tiny-sd3"))
    ref.set_progress_bar_config(disable=True)
    args = dict(image=_image(), strength=strength, num_inference_steps=10, height=size, width=size)
    want = as_uint8(ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **args).images)
    got = pipe(PROMPT, seed=3, **args).images
    side = size or 256  # without a size: the model's default, as diffusers' SD 3 img2img resizes
    assert got.shape == (1, side, side, 3)
    assert_close(got, want)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpainting_equals_diffusers_latents_and_decodes_with_the_vae_shift(family_models, sd3, strength):
    """SD 3's inpainting (a 16-channel transformer: the known region re-noised and blended after every step): the
    final latents equal diffusers'. diffusers' StableDiffusion3InpaintPipeline decodes them without adding the VAE's
    shift_factor back (its text-to-image and image-to-image pipelines add it), which tints every image; sdrt decodes
    as the VAE defines, so the image is compared with diffusers' latents decoded that way."""
    from diffusers import StableDiffusion3InpaintPipeline
    from PIL import Image

    _, pipe, _ = sd3
    ref = StableDiffusion3InpaintPipeline.from_pretrained(family_models("tiny-sd3"))
    ref.set_progress_bar_config(disable=True)
    mask = Image.fromarray(((np.arange(64)[None, :] > 24) * 255).astype(np.uint8).repeat(64, 0))
    args = dict(image=_image(), mask_image=mask, strength=strength, num_inference_steps=6, height=64, width=64)
    latents = ref(PROMPT, generator=torch.Generator().manual_seed(3), output_type="latent", **args).images
    ours = pipe(PROMPT, seed=3, output_type="latent", **args).latents
    assert np.abs(ours - latents.numpy()).max() < 1e-4 * max(1.0, float(latents.abs().max()))
    vae = ref.vae.config
    with torch.no_grad():
        decoded = ref.vae.decode(latents / vae.scaling_factor + vae.shift_factor, return_dict=False)[0]
    want = as_uint8(ref.image_processor.postprocess(decoded, output_type="np"))
    got = pipe(PROMPT, seed=3, **args).images
    assert_close(got, want)
    # the known region (the mask's black left part: latent columns 0-2) ends as the encoded image, the rest does not
    from sdrt.runtime import conditioning
    from sdrt.runtime.rng import make_generator

    encoded = pipe.encode_image(conditioning.preprocess_image(_image(), 64, 64, multiple=8), make_generator(3, "torch"))
    np.testing.assert_allclose(ours[..., :3], encoded[..., :3], atol=1e-5)
    assert np.abs(ours[..., 4:] - encoded[..., 4:]).mean() > 0.1


def test_sdrt_serve_takes_sd3_arguments(sd3, runtime_pipeline):
    """Over HTTP: SD 3's per-encoder prompts and T5 length reach the runtime (the image equals the direct call's);
    on an SD 1.x service they are a 400 naming the argument."""
    import base64
    import io

    from PIL import Image
    from test_serve import post, serving

    _, pipe, _ = sd3
    body = {"prompt": PROMPT, "prompt_3": "a blue sailing boat", "max_sequence_length": 32, "height": 64, "width": 64,
            "num_inference_steps": 2, "seed": 5}  # fmt: skip
    with serving(pipe) as (client, _, _):
        response = post(client, body)
    assert response.status_code == 200, response.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))))
    direct = pipe(PROMPT, prompt_3="a blue sailing boat", max_sequence_length=32, height=64, width=64,
                  num_inference_steps=2, seed=5).images[0]  # fmt: skip
    assert np.array_equal(image, direct)
    with serving(runtime_pipeline) as (client, _, _):
        response = post(client, {"prompt": "x", "prompt_3": "y"})
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("prompt_3: applies to")


def test_run_batch_groups_sd3_calls_by_text_length_and_each_equals_its_call_alone(sd3):
    """Calls with T5's default length share transformer steps; another max_sequence_length (other text rows) runs
    in its own group instead of failing the batch; a bad one comes back in its slot."""
    _, pipe, _ = sd3
    size = dict(height=64, width=64, num_inference_steps=2)
    calls = [
        dict(prompt="a cat", seed=1, **size),
        dict(prompt="a dog", prompt_3="a red dog", max_sequence_length=32, seed=2, **size),
        dict(prompt="a cow", seed=3, guidance_scale=1.0, **size),
        dict(prompt="a cow", max_sequence_length=513, **size),
    ]
    results = pipe.run_batch(calls)
    assert isinstance(results[3], InputError) and "max_sequence_length" in str(results[3])
    assert results[0].timings["batch_size"] == results[2].timings["batch_size"] == 2
    for call, result in zip(calls[:3], results):
        np.testing.assert_array_equal(result.images, pipe(**call).images)


def test_skip_layer_guidance_equals_diffusers(sd3):
    """SD 3.5 Medium's skip-layer guidance on the tiny model (2 blocks): the last block skipped at every step but the
    first (start 0, stop 1 at 3 steps), and the first block with diffusers' defaults at 10 steps (step 1 only)."""
    plain = _pair(sd3)
    slg = _pair(sd3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
                skip_layer_guidance_scale=4.0)  # fmt: skip
    assert np.abs(slg.astype(int) - plain).mean() > 1
    ref, pipe, _ = sd3
    latents = _latents()
    call = dict(height=64, width=64, num_inference_steps=10, skip_guidance_layers=[0])
    want = as_uint8(ref(PROMPT, latents=torch.from_numpy(latents), output_type="np", **call).images)
    assert_close(pipe(PROMPT, latents=latents, **call).images, want)


def test_skip_layer_guidance_is_checked(sd3):
    _, pipe, _ = sd3
    size = dict(height=64, width=64, num_inference_steps=2)
    with pytest.raises(InputError, match=r"skip_guidance_layers: expected a non-empty list of distinct block indices "
                                         r"in \[0, 1\] \(SD 3.5 Medium is run with \[7, 8, 9\]\), got \[2\]"):  # fmt: skip
        pipe(PROMPT, skip_guidance_layers=[2], **size)
    with pytest.raises(InputError, match="skip_layer_guidance_scale: applies with skip_guidance_layers"):
        pipe(PROMPT, skip_layer_guidance_scale=3.0, **size)
    image = np.full((64, 64, 3), 0.5, np.float32)
    with pytest.raises(InputError, match="skip_guidance_layers: applies to text-to-image"):
        pipe(PROMPT, image=image, skip_guidance_layers=[0], **size)
    result = pipe(PROMPT, skip_guidance_layers=[0], guidance_scale=1.0, seed=1, **size)
    assert result.warnings == ["skip_guidance_layers: no effect without guidance (guidance_scale > 1), as in diffusers"]

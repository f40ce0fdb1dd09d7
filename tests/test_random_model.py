"""The embedded random-weight model: deterministic, and in the classic SD folder layout that every tool reads;
its tiny variants (SDXL base and refiner, inpainting, LCM, SD-Turbo, TAESD) load with their diffusers classes."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from sdrt.export.random_model import MARKER, PRESETS, build_pipeline, is_current


def test_text_encoder_has_the_classic_key_layout_and_loads_without_missing_keys(tiny_model):
    from transformers import CLIPTextModel

    with safe_open(tiny_model / "text_encoder" / "model.safetensors", "np") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    model, info = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # The weights on disk are the ones the seeded recipe draws.
    reference = build_pipeline("tiny")["text_encoder"]
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        got = model(ids).last_hidden_state.numpy()
        want = reference(ids).last_hidden_state.numpy()
    np.testing.assert_array_equal(got, want)


def test_marker_records_the_recipe(tiny_model):
    marker = json.loads((tiny_model / MARKER).read_text())
    assert marker["preset"] == "tiny" and is_current(tiny_model, "tiny", marker["seed"])
    assert not is_current(tiny_model, "sd15", marker["seed"])
    assert not is_current(tiny_model, "tiny", marker["seed"] + 1)


# The tiny variants: each folder loads offline with its diffusers class and denoises at 64x64.

VARIANTS = {
    "tiny-sdxl": "StableDiffusionXLPipeline",
    "tiny-sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
    "tiny-sd-inpaint": "StableDiffusionInpaintPipeline",
    "tiny-lcm": "LatentConsistencyModelPipeline",
    "tiny-sd-turbo": "StableDiffusionPipeline",
}


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """Build a preset once per module: ``variant(name) -> folder``."""
    from sdrt.export.random_model import write_random_model

    root = tmp_path_factory.mktemp("variants")
    built = {}

    def get(name):
        if name not in built:
            built[name] = write_random_model(root / name, preset=name)
        return built[name]

    return get


def _load(name, folder, **kwargs):
    import diffusers

    torch.set_num_threads(2)
    pipe = getattr(diffusers, VARIANTS.get(name, "StableDiffusionPipeline")).from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_loads_with_its_pipeline_class_and_denoises(variant, name):
    folder = variant(name)
    assert PRESETS[name].pipeline == VARIANTS[name]
    assert is_current(folder, name) and not is_current(folder, "tiny")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == VARIANTS[name]
    pipe = _load(name, folder)
    assert type(pipe).__name__ == VARIANTS[name] and pipe.vae_scale_factor == 8
    kwargs = dict(prompt="a red fox", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0))
    if name == "tiny-sdxl-refiner":
        kwargs["image"] = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(1))  # latents, as from the base
        kwargs["strength"] = 0.5  # the default 0.3 leaves none of 2 steps
    else:
        kwargs.update(height=64, width=64)
    if name == "tiny-sd-inpaint":
        kwargs["image"] = np.random.default_rng(0).random((1, 64, 64, 3), dtype=np.float32)
        kwargs["mask_image"] = np.ones((1, 64, 64, 1), np.float32)
    images = pipe(**kwargs).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_variant_configs_match_the_architectures_they_stand_for(variant):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from sdrt.export.random_model import SDXL_PAD

    base, refiner = variant("tiny-sdxl"), variant("tiny-sdxl-refiner")
    unet = json.loads((base / "unet" / "config.json").read_text())
    te1 = json.loads((base / "text_encoder" / "config.json").read_text())
    te2 = json.loads((base / "text_encoder_2" / "config.json").read_text())
    assert te1["vocab_size"] == te2["vocab_size"] == 49408
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert unet["addition_embed_type"] == "text_time"
    assert json.loads((base / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>.
    assert CLIPTokenizer.from_pretrained(base / "tokenizer").pad_token_id == 49407
    tok2 = CLIPTokenizer.from_pretrained(base / "tokenizer_2")
    assert tok2.pad_token == SDXL_PAD and tok2.pad_token_id == 0
    # The projection model keeps its classic keys: text_model.* and a top-level text_projection.
    with safe_open(base / "text_encoder_2" / "model.safetensors", "np") as f:
        keys = set(f.keys())
    assert "text_projection.weight" in keys and all(
        k.startswith("text_model.") for k in keys - {"text_projection.weight"}
    )
    _, info = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # The refiner: text_encoder_2 only, 5 time ids, and the base's VAE and text_encoder_2 weights.
    index = json.loads((refiner / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    runet = json.loads((refiner / "unet" / "config.json").read_text())
    assert runet["cross_attention_dim"] == te2["hidden_size"]
    assert (
        runet["projection_class_embeddings_input_dim"] == 5 * runet["addition_time_embed_dim"] + te2["projection_dim"]
    )
    for shared in ("vae/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (base / shared).read_bytes() == (refiner / shared).read_bytes(), shared

    for name, key, value in [
        ("tiny-sd-inpaint", "in_channels", 9),
        ("tiny-lcm", "time_cond_proj_dim", 32),
    ]:
        assert json.loads((variant(name) / "unet" / "config.json").read_text())[key] == value
    scheduler = json.loads((variant("tiny-sd-turbo") / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "EulerAncestralDiscreteScheduler" and scheduler["timestep_spacing"] == "trailing"


def test_base_latents_hand_over_to_the_refiner(variant):
    base = _load("tiny-sdxl", variant("tiny-sdxl"))
    refiner = _load("tiny-sdxl-refiner", variant("tiny-sdxl-refiner"))
    latents = base("a red fox", height=64, width=64, num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    images = refiner("a red fox", image=latents, num_inference_steps=2, strength=0.5, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_presets_are_deterministic(variant, tmp_path):
    from sdrt.export.random_model import write_random_model

    first = variant("tiny-sdxl")
    second = write_random_model(tmp_path / "again", preset="tiny-sdxl")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for f in files:
        assert (first / f).read_bytes() == (second / f).read_bytes(), f


def test_tiny_taesd_encodes_to_the_tiny_latent_grid_and_stands_in_for_both_vaes(variant, tiny_model):
    import diffusers

    folder = variant("tiny-taesd")
    assert PRESETS["tiny-taesd"].pipeline is None and is_current(folder, "tiny-taesd")
    taesd = diffusers.AutoencoderTiny.from_pretrained(folder)
    assert 2 ** (len(taesd.config.block_out_channels) - 1) == 8
    image = torch.rand(1, 3, 64, 64, generator=torch.manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = taesd.encode(image).latents
        decoded = taesd.decode(latents).sample
    assert latents.shape == (1, 4, 8, 8) and decoded.shape == (1, 3, 64, 64)
    assert torch.isfinite(decoded).all()
    for name, folder in [("tiny", tiny_model), ("tiny-sdxl", variant("tiny-sdxl"))]:
        pipe = _load(name, folder, vae=taesd)
        images = pipe("a red fox", height=64, width=64, num_inference_steps=1, output_type="np").images
        assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all(), name


def test_tiny_sd3_is_sd3s_layout_and_every_prompt_path_moves_the_image(variant, tmp_path):
    """diffusers' StableDiffusion3Pipeline loads the folder offline: T5's tokenizer is the local Unigram model
    saved as T5TokenizerFast (its ids, </s> appended), CLIP's hidden states are narrower than T5's (the pipeline
    pads them), the VAE has 16 channels and SD 3's shift factor. Each of the three prompt paths (CLIP-L, CLIP-G,
    T5) and T5's absence moves the image by several levels, so a parity test can see a wrong path; the folder is
    the same bytes when written again."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    from sdrt.export.random_model import write_random_model
    from sdrt.export.t5_vocab import SPECIAL, build_tokenizer

    folder = variant("tiny-sd3")
    torch.set_num_threads(2)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.tokenizer_3, T5TokenizerFast)
    prompt = "a photograph of an astronaut riding a horse"
    assert pipe.tokenizer_3(prompt).input_ids == build_tokenizer().encode(prompt).ids
    assert pipe.tokenizer_3(prompt).input_ids[-1] == SPECIAL.index("</s>")
    transformer, t5 = pipe.transformer.config, pipe.text_encoder_3.config
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert transformer.joint_attention_dim == t5.d_model > clip_width  # CLIP's states are zero-padded to T5's
    assert transformer.pooled_projection_dim == 2 * pipe.text_encoder.config.projection_dim
    assert (pipe.vae.config.latent_channels, pipe.vae.config.shift_factor) == (16, 0.0609)

    def image(**kwargs):
        call = dict(prompt=prompt, height=64, width=64, num_inference_steps=2, output_type="np")
        return pipe(**{**call, **kwargs}, generator=torch.manual_seed(0)).images[0] * 255

    base = image()
    assert image().tolist() == base.tolist()
    for changed in (
        {"prompt_2": "a red sports car"},
        {"prompt": "a red sports car", "prompt_2": prompt, "prompt_3": prompt},
    ):
        assert np.abs(image(**changed) - base).mean() > 3, changed
    # T5's prompt: at the default 256 tokens its few prompt tokens are diluted among padding (0.3 levels); at 32 they
    # are fewer (1.2 levels). The parity tests compare within 1/255, so either shows a wrong T5 path.
    short = image(max_sequence_length=32)
    assert np.abs(image(max_sequence_length=32, prompt_3="a red sports car") - short).mean() > 0.8
    assert 0 < np.abs(image(prompt_3="a red sports car") - base).max() > 2
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None  # SD 3 without T5: zeros in its place
    assert np.abs(image() - base).mean() > 3
    again = write_random_model(tmp_path / "again", preset="tiny-sd3")
    for f in sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()):
        assert (folder / f).read_bytes() == (again / f).read_bytes(), f

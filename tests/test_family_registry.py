"""The family registry on its own (no models): detection from model_index.json, and the tensor contract
each family's description derives from the model's dimensions."""

import pytest

from sdrt.runtime import families
from sdrt.runtime.errors import ExportError
from sdrt.runtime.families import DENOISERS, FAMILIES, ModelDims

SD_UNET = {"cross_attention_dim": 768, "in_channels": 4}


def dims(**overrides) -> ModelDims:
    base = dict(text_length=77, text_hidden=(768,), vocab_size=49408, latent_channels=4, unet_in_channels=4,
                vae_scale_factor=8, unet_levels=4, cross_attention_dim=768)  # fmt: skip
    return ModelDims(**{**base, **overrides})


@pytest.mark.parametrize(
    ("index", "unet", "family"),
    [
        ({"_class_name": "StableDiffusionPipeline"}, SD_UNET, "sd1"),
        ({"_class_name": "StableDiffusionInpaintPipeline"}, {**SD_UNET, "in_channels": 9}, "sd1"),
        ({"_class_name": "LatentConsistencyModelPipeline"}, SD_UNET, "sd1"),
        ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024}, "sd2"),
        ({"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}, {}, "sdxl"),
        ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None]}, {}, "sdxl-refiner"),
    ],
)
def test_detection(index, unet, family):
    assert families.detect(index, unet).name == family


def test_an_unsupported_pipeline_names_the_supported_ones():
    with pytest.raises(
        ExportError, match="expected a pipeline of .*StableDiffusionXLPipeline.*got 'KandinskyPipeline'"
    ):
        families.detect({"_class_name": "KandinskyPipeline"}, SD_UNET)


def test_unet_and_latent_channels_are_separate():
    inpaint = FAMILIES["sd1"].specs(dims(unet_in_channels=9))["unet"]
    assert inpaint.inputs[0].shape == ["batch", 9, "latent_height", "latent_width"]
    assert inpaint.outputs[0].shape == ["batch", 4, "latent_height", "latent_width"]
    with pytest.raises(ExportError, match="expected 4 .* or 9 .*got 5"):
        dims(unet_in_channels=5)


def test_sdxl_unet_takes_pooled_text_and_time_ids_and_lcm_a_guidance_embedding():
    d = dims(text_hidden=(768, 1280), cross_attention_dim=2048, pooled_dim=1280, time_ids=6, time_cond_dim=256)
    specs = FAMILIES["sdxl"].specs(d)
    unet = {t.name: t.shape for t in specs["unet"].inputs}
    assert list(unet) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond"]
    assert unet["text_embeds"] == ["batch", 1280] and unet["time_ids"] == ["batch", 6]
    assert unet["timestep_cond"] == ["batch", 256] and unet["encoder_hidden_states"] == ["batch", 77, 2048]
    assert [t.name for t in specs["text_encoder"].outputs] == ["penultimate_hidden_state"]
    assert [(t.name, t.shape) for t in specs["text_encoder_2"].outputs] == [
        ("penultimate_hidden_state", ["batch", 77, 1280]),
        ("text_embeds", ["batch", 1280]),
    ]
    assert {name: s.batch for name, s in specs.items()} == {
        "text_encoder": "prompts", "text_encoder_2": "prompts", "unet": "guidance",
        "vae_decoder": "images", "vae_encoder": "images",
    }  # fmt: skip


def test_every_family_describes_every_component_it_lists():
    for family in FAMILIES.values():
        d = dims(
            text_hidden=(32,) * len(family.text_encoders), pooled_dim=32, time_ids=6 if family.micro_conditioning else 0
        )
        assert set(family.specs(d)) == set(family.components()), family.name
        assert family.denoiser in DENOISERS  # one description for a UNet or a transformer denoiser
        assert family.components()[-3:] == (family.denoiser, "vae_decoder", "vae_encoder")
        assert family.specs(d)[family.denoiser].batch == "guidance"


def test_the_tiny_autoencoder_encodes_to_latents():
    kl, tiny = (FAMILIES["sd1"].specs(dims(vae_kind=k))["vae_encoder"].outputs[0] for k in ("kl", "tiny"))
    assert (kl.name, kl.shape[1]) == ("latent_parameters", 8) and (tiny.name, tiny.shape[1]) == ("latent", 4)


def test_defaults_follow_diffusers_per_family_and_task():
    assert FAMILIES["sd1"].defaults(dims()) == {"num_inference_steps": 50, "guidance_scale": 7.5}
    assert FAMILIES["sdxl"].defaults(dims())["guidance_scale"] == 5.0
    assert FAMILIES["sdxl"].defaults(dims(), "inpainting")["guidance_scale"] == 7.5
    assert FAMILIES["sd1"].defaults(dims(time_cond_dim=256)) == {"num_inference_steps": 4, "guidance_scale": 8.5}
    assert (FAMILIES["sd1"].default_strength, FAMILIES["sdxl"].default_strength) == (0.8, 0.3)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_control_residuals_are_what_diffusers_controlnet_gives_and_its_unet_takes(preset, family_models):
    """The residual tensors the registry describes for a ControlNet (names, channels, inner resolutions) against
    diffusers: ControlNetModel.from_unet's outputs at a non-square latent size, fed back into the UNet."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel

    from sdrt.export.modules import load_pipeline

    pipe = load_pipeline(family_models(preset))
    dims, unet = pipe.dims, pipe.parts["unet"]
    values = families.sizes(
        dims, batch=1, latent_height=2 * dims.latent_multiple, latent_width=3 * dims.latent_multiple
    )
    specs = families.control_residual_specs(dims)
    want = [tuple(values[d] if isinstance(d, str) else d for d in s.shape) for s in specs]
    controlnet = ControlNetModel.from_unet(unet)
    sample = torch.randn(1, dims.latent_channels, values["latent_height"], values["latent_width"])
    text = torch.randn(1, dims.text_length, dims.cross_attention_dim)
    extra = {}
    if dims.time_ids:
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, dims.pooled_dim),
            "time_ids": torch.rand(1, dims.time_ids) * 1024,
        }
    cond = torch.rand(1, 3, values["image_height"], values["image_width"])
    with torch.no_grad():
        down, mid = controlnet(sample, 500, text, controlnet_cond=cond, return_dict=False, **extra)
        got = [tuple(t.shape) for t in (*down, mid)]
        assert got == want, (got, want)
        assert [s.name for s in specs][-1] == "mid_block_residual" and len(specs) == len(down) + 1
        residuals = [torch.randn(shape) for shape in want]
        out = unet(sample, 500, text, down_block_additional_residuals=residuals[:-1],
                   mid_block_additional_residual=residuals[-1], return_dict=False, **extra)[0]  # fmt: skip
    assert np.isfinite(out.numpy()).all()


def test_control_residuals_need_the_recorded_block_layout():
    from sdrt.runtime.errors import ArtifactError

    dims = ModelDims(77, (32,), 1000, 4, 4, 8, 2, 32)  # a manifest written before the layout was recorded
    with pytest.raises(ArtifactError, match="re-export"):
        families.control_residual_specs(dims)


def test_the_controlnet_unet_is_exported_only_when_asked_for_and_never_opened_by_default():
    from sdrt.export.build import ExportOptions

    sd1 = FAMILIES["sd1"]
    assert ExportOptions().components_of(sd1) == sd1.components()
    assert ExportOptions(components=("unet_control",)).components_of(sd1) == (*sd1.components(), "unet_control")
    subset = ("text_encoder", "unet", "vae_decoder", "unet_control")
    assert ExportOptions(components=subset).components_of(sd1) == subset
    assert "unet_control" not in sd1.components()  # what Pipeline.load opens
    layout = dims(unet_block_channels=(320, 640, 1280, 1280), unet_layers_per_block=2)
    assert "unet_control" in sd1.specs(layout) and "unet_control" not in sd1.specs(dims())
    residuals = [t for t in sd1.specs(layout)["unet_control"].inputs if "residual" in t.name]
    assert len(residuals) == 13  # SD 1.5: conv_in, 4 blocks x 2 resnets, 3 downsamplers, and the mid block

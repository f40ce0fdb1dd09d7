"""Random-weight Stable Diffusion pipelines built locally, deterministically, from known configs.

No weights can be downloaded, so tests, the default artifacts and the benchmarks use pipelines of
real architectures with random weights. Each preset is written by the diffusers class that loads it
(``from_pretrained``, offline), with weights drawn from ``torch.manual_seed(seed + offset)`` per part:

``tiny``  the embedded default model. Sizes follow diffusers' own pipeline tests (UNet 32/64
          channels, CLIP text encoder of width 32), with two changes so that shapes map exactly as
          in a real SD 1.x model: the VAE has four blocks (scale factor 8), and the text encoder
          uses CLIP's real 49,408-token vocabulary, so the real BPE tokenizer drives it. DDIM with
          SD 1.5's betas, as diffusers' tests use.
``sd15``  SD 1.5's published configs: the 860 M-parameter UNet, CLIP ViT-L/14 text encoder, the
          standard VAE and PNDM scheduler (3.4 GB of fp32 UNet weights).
``tiny-sdxl``  ``StableDiffusionXLPipeline`` at the sizes of diffusers' SDXL tests: two CLIP text
          encoders of width 32 (``text_encoder`` like ``tiny``'s; ``text_encoder_2`` with a 32-wide
          pooled projection, GELU as OpenCLIP bigG, seed + 1), a UNet with SDXL's "text_time"
          micro-conditioning (cross-attention 64 = 32 + 32, time-id embedding 8, add-embedding
          input 80 = 6 * 8 + 32, linear projections, transformer layers (1, 2)), ``tiny``'s VAE with
          SDXL's latent scaling factor 0.13025, and SDXL's Euler scheduler ("leading" spacing).
          ``tokenizer_2`` pads with "!" (id 0) as SDXL's does; ``force_zeros_for_empty_prompt``.
``tiny-sdxl-refiner``  ``StableDiffusionXLImg2ImgPipeline`` as the SDXL refiner ships: only
          ``text_encoder_2``/``tokenizer_2`` (the same weights as ``tiny-sdxl``'s), a UNet (seed + 1)
          with cross-attention 32 and add-embedding input 72 = 5 * 8 + 32 (original size, crop,
          aesthetic score), ``requires_aesthetics_score``, and ``tiny-sdxl``'s VAE (the same weights,
          so latents hand over from the base).
``tiny-sd-inpaint``  ``StableDiffusionInpaintPipeline``: ``tiny`` with a 9-channel UNet input
          (latents, mask, masked-image latents).
``tiny-lcm``  ``LatentConsistencyModelPipeline``: ``tiny`` with the UNet's guidance embedding
          (``time_cond_proj_dim`` 32) and the LCM scheduler as LCM-Dreamshaper ships it.
``tiny-sd-turbo``  ``StableDiffusionPipeline``: ``tiny``'s weights with SD-Turbo's scheduler (Euler
          ancestral, "trailing" spacing).
``tiny-taesd``  not a pipeline: an ``AutoencoderTiny`` folder (four 32-channel blocks, scale factor 8,
          4 latent channels) that stands in for the VAE of ``tiny`` and of ``tiny-sdxl`` alike, as
          TAESD and TAESDXL do.

``tiny-sd3``  ``StableDiffusion3Pipeline``: an MMDiT (``SD3Transformer2DModel``, patch 2, 16 latent channels,
          2 joint blocks of 4 heads x 8, position embeddings for 64 x 64 patches), CLIP-L- and CLIP-G-shaped
          encoders with projections (hidden 32 + 32, padded to T5's 80 by the pipeline; pooled 32 + 32), a
          T5 v1.1 encoder (d_model 80, gated GELU) with a local Unigram tokenizer saved as ``T5TokenizerFast``
          (``sdrt.export.t5_vocab``; no download), a 16-channel VAE with SD 3's scaling 1.5305 and shift 0.0609,
          and SD 3's flow-matching Euler scheduler (shift 3.0).

``sd35-medium``  ``StableDiffusion3Pipeline`` with SD 3.5 Medium's published transformer (MMDiT-X: 24 blocks 1536
          wide, dual attention in the first 13, RMS q/k norms, position embeddings for 384 x 384 patches; ~2.5 B
          parameters), SD 3's 16-channel VAE, and text encoders of the real widths (CLIP-L 768, CLIP-G 1280, T5-XXL
          4096) but two layers deep, so the pipeline fits 24 GiB: for ``sdrt bench`` beside diffusers'
          ``StableDiffusion3Pipeline`` (the transformer step and the VAE are full size; the text encoders are not).

``tiny-controlnet``, ``tiny-sdxl-controlnet``, ``sd15-controlnet``  not pipelines: a ``ControlNetModel`` folder
          for ``tiny``, ``tiny-sdxl`` and ``sd15``, made as real ControlNets start (``ControlNetModel.from_unet`` of
          a UNet of that config, seed + 2) except that the convolutions diffusers starts at zero (the residual
          outputs and the conditioning embedding's last layer) get random weights (std 2 / sqrt(fan-in)): with
          zeros the residuals would be zero and the control image would change nothing.

``taesd``  TAESD's published ``AutoencoderTiny`` architecture (64-channel stages), for full-size
          measurements beside ``sd15``: ``sdrt export --model models/sd15-random --vae models/taesd``.

All CLIP tokenizers are CLIP's real BPE tokenizer in the classic ``vocab.json`` + ``merges.txt``
layout, and all CLIP text encoders have the classic ``text_model.`` key layout.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.export.atomic import atomic_directory
from sdrt.export.clip_vocab import EOS, write_clip_tokenizer_files
from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

SEED = 0
RECIPE = 2  # bump when a preset below changes, so existing folders are rebuilt
MARKER = "sdrt-random-model.json"

SD_BETAS = {  # the betas of SD 1.x/2.x and SDXL, with the steps offset they ship
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
SD15_BETAS = {**SD_BETAS, "set_alpha_to_one": False}

CLIP_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")  # from transformers; others from diffusers
SD_OPTIONS = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
# add_watermarker is not saved: the folders load with or without invisible-watermark installed.
SDXL_OPTIONS = {"image_encoder": None, "feature_extractor": None, "add_watermarker": False}
SDXL_PAD = "!"  # SDXL's tokenizer_2 pads with "!" (id 0), its tokenizer with <|endoftext|>


@dataclass(frozen=True)
class Part:
    """One model of a preset: its class name, constructor config and the offset of its seed."""

    cls: str
    config: dict
    seed_offset: int = 0


@dataclass(frozen=True)
class Preset:
    """What a preset writes, and which class writes it."""

    pipeline: str | None  # the diffusers pipeline class; None: a lone model folder (the one part)
    parts: dict[str, Part]
    scheduler: tuple[str, dict] | None = None
    tokenizers: dict[str, str] = field(default_factory=dict)  # tokenizer folder -> its pad token
    options: dict = field(default_factory=dict)  # other constructor arguments (absent parts are None)
    t5_tokenizers: tuple[str, ...] = ()  # T5 tokenizer folders (sdrt.export.t5_vocab's local Unigram model)


TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
)
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    sample_size=256,
)
TINY_TEXT_ENCODER = dict(
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=5,
    vocab_size=49408,
    max_position_embeddings=77,
)
TINY_DDIM = ("DDIMScheduler", {**SD15_BETAS, "clip_sample": False, "prediction_type": "epsilon"})

# SDXL at the sizes of diffusers' SDXL pipeline tests (with CLIP's real vocabulary and a 4-block VAE).
TINY_SDXL_UNET = dict(
    TINY_UNET,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids * 8 + text_encoder_2's pooled projection
    cross_attention_dim=32 + 32,  # both encoders' hidden states, concatenated
)
TINY_SDXL_REFINER_UNET = dict(
    TINY_SDXL_UNET,
    projection_class_embeddings_input_dim=5 * 8 + 32,  # original size, crop, aesthetic score
    cross_attention_dim=32,  # text_encoder_2's hidden states only
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)  # SDXL's VAE latent scale
TINY_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_act="gelu", projection_dim=32)  # OpenCLIP bigG's shape
SDXL_EULER = ("EulerDiscreteScheduler", {**SD_BETAS, "prediction_type": "epsilon", "timestep_spacing": "leading"})

TINY_PARTS = {
    "unet": Part("UNet2DConditionModel", TINY_UNET),
    "vae": Part("AutoencoderKL", TINY_VAE),
    "text_encoder": Part("CLIPTextModel", TINY_TEXT_ENCODER),
}


SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)


SD_VAE = dict(  # SD 1.x/2.x's published AutoencoderKL (SD 3's differs in latent channels, scale and shift)
    block_out_channels=(128, 256, 512, 512),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
)


# Stable Diffusion 3's layout at toy size: an MMDiT (SD3Transformer2DModel, patch 2, 16 latent channels, joint
# attention over text and image tokens), two CLIP encoders with projections (hidden 32 + 32 = 64, padded to T5's
# 80 as the pipeline pads CLIP's 2048 to T5's 4096; pooled 32 + 32 = 64), a T5 v1.1 encoder (gated GELU, relative
# attention buckets) and a 16-channel VAE with SD 3's scaling and shift factors and no quant convolutions.
TINY_SD3_TRANSFORMER = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=80,
    caption_projection_dim=32,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=64,  # position embeddings for 64 x 64 patches: images up to 1024 x 1024
)
TINY_SD3_VAE = dict(
    TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)  # fmt: skip
TINY_T5 = dict(
    vocab_size=296,  # sdrt.export.t5_vocab's pieces
    d_model=80,
    d_ff=96,
    d_kv=16,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
SD3_FLOW = ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0})

# stabilityai/stable-diffusion-3.5-medium's published transformer config: the MMDiT-X (24 blocks of 24 heads x 64 =
# 1536 wide, dual attention in the first 13, RMS q/k norms; ~2.5 B parameters, 9.9 GB in float32), its 16-channel
# VAE, and text encoders of the real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096, so the transformer sees real
# shapes) but two layers deep, so that the whole pipeline fits a 24 GiB machine.
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
SD3_VAE = dict(
    SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)  # fmt: skip
CLIP_L_SHALLOW = dict(  # openai/clip-vit-large-patch14's text tower with a projection, two layers deep
    bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
    num_hidden_layers=2, max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip
CLIP_G_SHALLOW = dict(  # OpenCLIP bigG's text tower (as SDXL's and SD 3's text_encoder_2), two layers deep
    CLIP_L_SHALLOW, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280,
    hidden_act="gelu",
)  # fmt: skip
T5_XXL_SHALLOW = dict(  # google/t5-v1_1-xxl's encoder widths, two layers deep, over the local Unigram vocabulary
    TINY_T5, d_model=4096, d_ff=10240, d_kv=64, num_layers=2, num_heads=64, relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
)  # fmt: skip


def _autoencoder_tiny(channels: int, encoder_blocks: tuple, decoder_blocks: tuple) -> Preset:
    """A lone AutoencoderTiny folder (no pipeline): four stages of ``channels``, scale factor 8, 4 latent channels."""
    config = dict(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(channels,) * 4,
        decoder_block_out_channels=(channels,) * 4,
        num_encoder_blocks=encoder_blocks,
        num_decoder_blocks=decoder_blocks,
        latent_channels=4,
    )
    return Preset(None, {"vae": Part("AutoencoderTiny", config)})


PRESETS: dict[str, Preset] = {
    "tiny": Preset("StableDiffusionPipeline", TINY_PARTS, TINY_DDIM, {"tokenizer": EOS}, SD_OPTIONS),
    "sd15": Preset(
        "StableDiffusionPipeline",
        {
            "unet": Part("UNet2DConditionModel", SD15_UNET),
            "vae": Part("AutoencoderKL", SD_VAE),
            "text_encoder": Part(
                "CLIPTextModel",
                dict(  # openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it
                    bos_token_id=0,
                    eos_token_id=2,
                    pad_token_id=1,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_attention_heads=12,
                    num_hidden_layers=12,
                    max_position_embeddings=77,
                    vocab_size=49408,
                    projection_dim=768,
                    hidden_act="quick_gelu",
                ),
            ),
        },
        ("PNDMScheduler", {**SD15_BETAS, "skip_prk_steps": True}),
        {"tokenizer": EOS},
        SD_OPTIONS,
    ),
    "tiny-sdxl": Preset(
        "StableDiffusionXLPipeline",
        {
            "unet": Part("UNet2DConditionModel", TINY_SDXL_UNET),
            "vae": Part("AutoencoderKL", TINY_SDXL_VAE),
            "text_encoder": Part("CLIPTextModel", TINY_TEXT_ENCODER),
            "text_encoder_2": Part("CLIPTextModelWithProjection", TINY_TEXT_ENCODER_2, seed_offset=1),
        },
        SDXL_EULER,
        {"tokenizer": EOS, "tokenizer_2": SDXL_PAD},
        {**SDXL_OPTIONS, "force_zeros_for_empty_prompt": True},
    ),
    "tiny-sdxl-refiner": Preset(
        "StableDiffusionXLImg2ImgPipeline",
        {
            "unet": Part("UNet2DConditionModel", TINY_SDXL_REFINER_UNET, seed_offset=1),
            "vae": Part("AutoencoderKL", TINY_SDXL_VAE),
            "text_encoder_2": Part("CLIPTextModelWithProjection", TINY_TEXT_ENCODER_2, seed_offset=1),
        },
        SDXL_EULER,
        {"tokenizer_2": SDXL_PAD},
        {
            **SDXL_OPTIONS,
            "text_encoder": None,
            "tokenizer": None,
            "requires_aesthetics_score": True,
            "force_zeros_for_empty_prompt": False,
        },
    ),
    "tiny-sd-inpaint": Preset(
        "StableDiffusionInpaintPipeline",
        {**TINY_PARTS, "unet": Part("UNet2DConditionModel", dict(TINY_UNET, in_channels=9))},
        TINY_DDIM,
        {"tokenizer": EOS},
        SD_OPTIONS,
    ),
    "tiny-lcm": Preset(
        "LatentConsistencyModelPipeline",
        {**TINY_PARTS, "unet": Part("UNet2DConditionModel", dict(TINY_UNET, time_cond_proj_dim=32))},
        (
            "LCMScheduler",  # as SimianLuo/LCM_Dreamshaper_v7 ships it
            {
                **SD_BETAS,
                "set_alpha_to_one": True,
                "clip_sample": False,
                "prediction_type": "epsilon",
                "original_inference_steps": 50,
                "timestep_scaling": 10.0,
                "timestep_spacing": "leading",
            },
        ),
        {"tokenizer": EOS},
        SD_OPTIONS,
    ),
    "tiny-sd-turbo": Preset(
        "StableDiffusionPipeline",
        TINY_PARTS,
        (
            "EulerAncestralDiscreteScheduler",  # as stabilityai/sd-turbo ships it
            {**SD_BETAS, "prediction_type": "epsilon", "timestep_spacing": "trailing"},
        ),
        {"tokenizer": EOS},
        SD_OPTIONS,
    ),
    "tiny-sd3": Preset(
        "StableDiffusion3Pipeline",
        {
            "transformer": Part("SD3Transformer2DModel", TINY_SD3_TRANSFORMER),
            "vae": Part("AutoencoderKL", TINY_SD3_VAE),
            "text_encoder": Part("CLIPTextModelWithProjection", dict(TINY_TEXT_ENCODER, projection_dim=32)),
            "text_encoder_2": Part("CLIPTextModelWithProjection", TINY_TEXT_ENCODER_2, seed_offset=1),
            "text_encoder_3": Part("T5EncoderModel", TINY_T5, seed_offset=2),
        },
        SD3_FLOW,
        {"tokenizer": EOS, "tokenizer_2": SDXL_PAD},
        t5_tokenizers=("tokenizer_3",),
    ),
    "sd35-medium": Preset(
        "StableDiffusion3Pipeline",
        {
            "transformer": Part("SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER),
            "vae": Part("AutoencoderKL", SD3_VAE),
            "text_encoder": Part("CLIPTextModelWithProjection", CLIP_L_SHALLOW),
            "text_encoder_2": Part("CLIPTextModelWithProjection", CLIP_G_SHALLOW, seed_offset=1),
            "text_encoder_3": Part("T5EncoderModel", T5_XXL_SHALLOW, seed_offset=2),
        },
        SD3_FLOW,
        {"tokenizer": EOS, "tokenizer_2": SDXL_PAD},
        t5_tokenizers=("tokenizer_3",),
    ),
    "tiny-controlnet": Preset(None, {"controlnet": Part("ControlNetModel", TINY_UNET, seed_offset=2)}),
    "tiny-sdxl-controlnet": Preset(None, {"controlnet": Part("ControlNetModel", TINY_SDXL_UNET, seed_offset=2)}),
    "tiny-taesd": _autoencoder_tiny(channels=32, encoder_blocks=(1, 1, 1, 1), decoder_blocks=(1, 1, 1, 1)),
    "sd15-controlnet": Preset(None, {"controlnet": Part("ControlNetModel", SD15_UNET, seed_offset=2)}),
    # TAESD's published architecture (diffusers' AutoencoderTiny defaults, as madebyollin/taesd ships it):
    # four 64-channel stages, 1/3/3/3 encoder and 3/3/3/1 decoder blocks, ~2.4 M parameters.
    "taesd": _autoencoder_tiny(channels=64, encoder_blocks=(1, 3, 3, 3), decoder_blocks=(3, 3, 3, 1)),
}


def _preset(preset: str) -> Preset:
    if preset not in PRESETS:
        raise ExportError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    return PRESETS[preset]


def build_part(part: Part, seed: int = SEED):
    """One model with weights drawn from ``torch.manual_seed(seed + part.seed_offset)``."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed + part.seed_offset)
    if part.cls in CLIP_TEXT_CLASSES:
        return getattr(transformers, part.cls)(transformers.CLIPTextConfig(**part.config))
    if part.cls == "T5EncoderModel":
        return transformers.T5EncoderModel(transformers.T5Config(**part.config)).eval()
    if part.cls == "ControlNetModel":  # config: the UNet's
        return _controlnet(diffusers.UNet2DConditionModel(**part.config))
    return getattr(diffusers, part.cls)(**part.config)


def _controlnet(unet):
    """``ControlNetModel.from_unet(unet)`` with its zero-initialized convolutions given random normal weights of
    standard deviation 2 / sqrt(fan-in) (from the global torch generator; biases stay zero), so that its residuals
    depend on the control image and move the image by several levels."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    zeros = (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
             controlnet.controlnet_cond_embedding.conv_out)  # fmt: skip
    with torch.no_grad():
        for conv in zeros:
            torch.nn.init.normal_(conv.weight, std=2 / conv.weight[0].numel() ** 0.5)
    return controlnet.eval()


def build_pipeline(preset: str = "tiny", seed: int = SEED) -> dict:
    """The preset's constructor arguments, tokenizers aside: its parts as diffusers/transformers objects
    (weights drawn from ``torch.manual_seed(seed + offset)`` per part), its scheduler and its options.
    For a lone model preset (``tiny-taesd``, ``tiny-controlnet``), its one part: ``{"vae": model}``."""
    import diffusers

    spec = _preset(preset)
    parts = {name: build_part(part, seed) for name, part in spec.parts.items()}
    if spec.scheduler is not None:
        scheduler_class, scheduler_config = spec.scheduler
        parts["scheduler"] = getattr(diffusers, scheduler_class)(**scheduler_config)
    return {**parts, **spec.options}


def write_random_model(out_dir: Path, preset: str = "tiny", seed: int = SEED, bpe_path: Path | None = None) -> Path:
    """Write the preset as a diffusers folder (vocab.json + merges.txt tokenizer layout)."""
    import diffusers
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    spec = _preset(preset)
    parts = build_pipeline(preset, seed)
    with atomic_directory(out_dir) as tmp:
        if spec.pipeline is None:
            (model,) = parts.values()
            model.save_pretrained(tmp)
        else:
            tokenizers = {
                name: CLIPTokenizer.from_pretrained(_write_tokenizer(tmp / name, pad, bpe_path))
                for name, pad in spec.tokenizers.items()
            }
            for name in spec.t5_tokenizers:
                from transformers import T5TokenizerFast

                from sdrt.export.t5_vocab import write_t5_tokenizer

                tokenizers[name] = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp / name)))
            getattr(diffusers, spec.pipeline)(**tokenizers, **parts).save_pretrained(tmp)
            # transformers 5 rewrites a tokenizer as tokenizer.json only (and drops model_max_length);
            # real SD folders ship vocab.json + merges.txt, so rewrite that classic layout.
            for name, pad in spec.tokenizers.items():
                (tmp / name / "tokenizer.json").unlink(missing_ok=True)
                _write_tokenizer(tmp / name, pad, bpe_path)
            for name, part in spec.parts.items():
                if part.cls in CLIP_TEXT_CLASSES:
                    classic_text_encoder_keys(tmp / name / "model.safetensors")
        (tmp / MARKER).write_text(json.dumps(_recipe(preset, seed)) + "\n")
    log.info("wrote random-weight %s %s to %s", preset, spec.pipeline or "model", out_dir)
    return out_dir


def _write_tokenizer(out_dir: Path, pad_token: str, bpe_path: Path | None) -> Path:
    """CLIP's tokenizer files, padding with ``pad_token`` (SD's tokenizers pad with <|endoftext|>)."""
    write_clip_tokenizer_files(out_dir, bpe_path)
    if pad_token != EOS:
        config_path = out_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["pad_token"] = pad_token
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out_dir


def classic_text_encoder_keys(path: Path) -> None:
    """Rewrite a CLIP text encoder's weights with the ``text_model.`` key prefix.

    transformers 5 saves ``CLIPTextModel`` without it; every real SD folder (and transformers 4,
    which optimum still pins) has it, and transformers 5 loads both. Writing the classic layout
    keeps the random models readable by every tool a user may point at them.
    ``CLIPTextModelWithProjection`` already has it, and its ``text_projection`` stays top-level.
    """
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    renamed = {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in tensors.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _recipe(preset: str, seed: int) -> dict:
    return {"recipe": RECIPE, "preset": preset, "seed": seed}


def is_current(out_dir: Path, preset: str = "tiny", seed: int = SEED) -> bool:
    """True when ``out_dir`` holds this preset, recipe and seed."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text()) == _recipe(preset, seed)
    except (OSError, ValueError):
        return False

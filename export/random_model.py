"""Random-weight Stable Diffusion pipelines built locally, deterministically, from known configs.

No weights can be downloaded, so tests, the default artifacts and the benchmarks use pipelines of
real architectures with random weights:

``tiny``  the embedded default model. Sizes follow diffusers' own pipeline tests (UNet 32/64
          channels, CLIP text encoder of width 32), with two changes so that shapes map exactly as
          in a real SD 1.x model: the VAE has four blocks (scale factor 8), and the text encoder
          uses CLIP's real 49,408-token vocabulary, so the real BPE tokenizer drives it. DDIM with
          SD 1.5's betas, as diffusers' tests use.
``sd15``  SD 1.5's published configs: the 860 M-parameter UNet, CLIP ViT-L/14 text encoder, the
          standard VAE and PNDM scheduler (3.4 GB of fp32 UNet weights).

Both ship CLIP's real BPE tokenizer in the classic ``vocab.json`` + ``merges.txt`` layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdrt.export.atomic import atomic_directory
from sdrt.export.clip_vocab import write_clip_tokenizer_files
from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

SEED = 0
RECIPE = 2  # bump when a preset below changes, so existing folders are rebuilt
MARKER = "sdrt-random-model.json"

SD15_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

PRESETS: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
        ),
        "vae": dict(
            block_out_channels=(32, 32, 64, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            sample_size=256,
        ),
        "text_encoder": dict(
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
        ),
        "scheduler": ("DDIMScheduler", {**SD15_BETAS, "clip_sample": False, "prediction_type": "epsilon"}),
    },
    "sd15": {
        "unet": dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        ),
        "text_encoder": dict(  # openai/clip-vit-large-patch14's text tower, as SD 1.5 ships it
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
        "scheduler": ("PNDMScheduler", {**SD15_BETAS, "skip_prk_steps": True}),
    },
}


def build_pipeline(preset: str = "tiny", seed: int = SEED):
    """The preset's parts as diffusers/transformers objects, weights drawn from ``torch.manual_seed(seed)``."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    if preset not in PRESETS:
        raise ExportError(f"preset: expected one of {', '.join(PRESETS)}, got {preset!r}")
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**spec["vae"])
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    scheduler_class, scheduler_config = spec["scheduler"]
    scheduler = getattr(diffusers, scheduler_class)(**scheduler_config)
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_random_model(out_dir: Path, preset: str = "tiny", seed: int = SEED, bpe_path: Path | None = None) -> Path:
    """Write the preset as a diffusers folder (vocab.json + merges.txt tokenizer layout)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    parts = build_pipeline(preset, seed)
    with atomic_directory(out_dir) as tmp:
        tok_dir = write_clip_tokenizer_files(tmp / "tokenizer", bpe_path)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        StableDiffusionPipeline(tokenizer=tokenizer, **parts).save_pretrained(tmp)
        # transformers 5 rewrites the tokenizer as tokenizer.json only (and drops model_max_length);
        # real SD folders ship vocab.json + merges.txt, so rewrite that classic layout.
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
        write_clip_tokenizer_files(tok_dir, bpe_path)
        classic_text_encoder_keys(tmp / "text_encoder" / "model.safetensors")
        (tmp / MARKER).write_text(json.dumps(_recipe(preset, seed)) + "\n")
    log.info("wrote random-weight %s pipeline to %s", preset, out_dir)
    return out_dir


def classic_text_encoder_keys(path: Path) -> None:
    """Rewrite a CLIP text encoder's weights with the ``text_model.`` key prefix.

    transformers 5 saves ``CLIPTextModel`` without it; every real SD folder (and transformers 4,
    which optimum still pins) has it, and transformers 5 loads both. Writing the classic layout
    keeps the random models readable by every tool a user may point at them.
    """
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    renamed = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
    save_file(renamed, path, metadata={"format": "pt"})


def _recipe(preset: str, seed: int) -> dict:
    return {"recipe": RECIPE, "preset": preset, "seed": seed}


def is_current(out_dir: Path, preset: str = "tiny", seed: int = SEED) -> bool:
    """True when ``out_dir`` holds this preset, recipe and seed."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text()) == _recipe(preset, seed)
    except (OSError, ValueError):
        return False

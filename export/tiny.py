"""The embedded default model: a tiny random-weight SD 1.x pipeline built locally, deterministically.

Sizes follow diffusers' own pipeline tests (UNet 32/64 channels, CLIP text encoder of width 32),
with two changes so that shapes map exactly as in a real SD 1.x model: the VAE has four blocks
(scale factor 8) and the text encoder uses CLIP's real 49,408-token vocabulary, so the real BPE
tokenizer drives it. The scheduler config is SD 1.5's own (PNDM's betas with DDIM as the sampler
diffusers' tests use).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sdrt.export.atomic import atomic_directory
from sdrt.export.clip_vocab import write_clip_tokenizer_files

log = logging.getLogger(__name__)

SEED = 0
RECIPE = 1  # bump when the recipe below changes, so existing folders are rebuilt
MARKER = "sdrt-tiny.json"
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def build_tiny_pipeline(seed: int = SEED):
    """The tiny pipeline as diffusers objects (weights drawn from ``torch.manual_seed(seed)``)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=256,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
    )
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionPipeline, dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_model(out_dir: Path, seed: int = SEED, bpe_path: Path | None = None) -> Path:
    """Write the tiny pipeline as a diffusers folder (vocab.json + merges.txt tokenizer layout)."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        tok_dir = write_clip_tokenizer_files(tmp / "tokenizer", bpe_path)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        pipeline_cls, parts = build_tiny_pipeline(seed)
        pipeline_cls(tokenizer=tokenizer, **parts).save_pretrained(tmp)
        # transformers 5 rewrites the tokenizer as tokenizer.json only (and drops model_max_length);
        # real SD folders ship vocab.json + merges.txt, so rewrite that classic layout.
        (tok_dir / "tokenizer.json").unlink(missing_ok=True)
        write_clip_tokenizer_files(tok_dir, bpe_path)
        (tmp / MARKER).write_text(json.dumps({"recipe": RECIPE, "seed": seed}) + "\n")
    log.info("wrote tiny SD 1.x pipeline to %s", out_dir)
    return out_dir


def is_current(out_dir: Path, seed: int = SEED) -> bool:
    """True when ``out_dir`` holds the tiny model of this recipe and seed."""
    try:
        return json.loads((Path(out_dir) / MARKER).read_text()) == {"recipe": RECIPE, "seed": seed}
    except (OSError, ValueError):
        return False

"""Loading a diffusers pipeline's parts and wrapping each as a module with plain tensor in/out."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from sdrt.export.specs import ModelDims
from sdrt.runtime.errors import ExportError

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
SOURCE_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/*.json",
    "text_encoder/model.safetensors",
    "unet/*.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/*.json",
    "vae/diffusion_pytorch_model.safetensors",
]


class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids=input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Image in [-1, 1] -> the Gaussian's parameters (mean and log-variance stacked on channels),
    so that the runtime samples with its own generator, as diffusers' ``latent_dist`` does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        moments = self.vae.encoder(image)
        return self.vae.quant_conv(moments) if self.vae.quant_conv is not None else moments


@dataclass
class LoadedPipeline:
    source: Path
    family: str
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    dims: ModelDims

    def module(self, name: str) -> torch.nn.Module:
        wrappers = {
            "text_encoder": lambda: TextEncoder(self.text_encoder),
            "unet": lambda: UNet(self.unet),
            "vae_decoder": lambda: VaeDecoder(self.vae),
            "vae_encoder": lambda: VaeEncoder(self.vae),
        }
        return wrappers[name]().eval()


def resolve_source(model: str, revision: str | None = None) -> Path:
    """A local diffusers folder as is; otherwise a hub id, fetched (only the files we export) to the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ExportError(f"model: expected a diffusers folder or a hub id like 'org/name', got {model!r}")
    from huggingface_hub import snapshot_download

    log.info("fetching %s (revision %s) from the hub", model, revision or "main")
    return Path(snapshot_download(model, revision=revision, allow_patterns=SOURCE_PATTERNS))


def source_files(source: Path) -> list[Path]:
    """Every file of the source folder that export reads, in a stable order (for the input fingerprint)."""
    files = {p for pattern in SOURCE_PATTERNS for p in source.glob(pattern) if p.is_file()}
    return sorted(files)


def load_pipeline(source: Path) -> LoadedPipeline:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    index_path = source / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{source}: expected a diffusers pipeline folder with model_index.json, found none")
    index = json.loads(index_path.read_text())
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise ExportError(f"{index_path}: expected a pipeline of {', '.join(SUPPORTED_PIPELINES)}, got {kind!r}")
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not (source / part).is_dir():
            raise ExportError(f"{source}: expected a '{part}' folder in the pipeline, found none")

    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=torch.float32).eval()
    scheduler_config = json.loads((source / "scheduler" / "scheduler_config.json").read_text())

    text_cfg = text_encoder.config
    dims = ModelDims(
        text_length=min(int(tokenizer.model_max_length), int(text_cfg.max_position_embeddings)),
        text_hidden=int(text_cfg.hidden_size),
        vocab_size=int(text_cfg.vocab_size),
        latent_channels=int(unet.config.in_channels),
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        unet_levels=len(unet.config.block_out_channels),
        cross_attention_dim=int(unet.config.cross_attention_dim),
    )
    family = "sd2" if dims.cross_attention_dim == 1024 else "sd1"
    return LoadedPipeline(source, family, text_encoder, unet, vae, tokenizer, scheduler_config, dims)

"""LoRA files for the tests, built locally with peft on the tiny models (no downloads).

peft's default init leaves B at zero (a no-op that proves nothing), so every factor is drawn from a
seeded generator, large enough that a wrong path moves pixels by many levels.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_CONVS = ["conv1", "conv2", "proj_in"]  # 3x3 resnet convolutions (LoCon) and a 1x1 projection
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _lora_state(module: torch.nn.Module, targets: list[str], rank: int, alpha: float | None, seed: int, std: float):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets)
    model = inject_adapter_in_model(config, copy.deepcopy(module))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    state = get_peft_model_state_dict(model)
    return state, {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": targets}


def make_lora(
    pipe, out: Path, seed: int, rank: int = 4, alpha: float | None = None, convs: bool = True, std: float = 0.2
) -> Path:
    """A diffusers-format LoRA for ``pipe``'s UNet and text encoder(s), saved by the pipeline class's own
    ``save_lora_weights`` (alpha in its adapter metadata when given)."""
    targets = UNET_ATTENTION + (UNET_CONVS if convs else [])
    unet, unet_meta = _lora_state(pipe.unet, targets, rank, alpha, seed, std)
    layers = {"unet_lora_layers": unet, "unet_lora_adapter_metadata": unet_meta}
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            state, meta = _lora_state(encoder, TEXT_ATTENTION, rank, alpha, seed + 100 + i, std)
            layers[f"{name}_lora_layers"], layers[f"{name}_lora_adapter_metadata"] = state, meta
    out = Path(out)
    type(pipe).save_lora_weights(out.parent, weight_name=out.name, **layers)
    return out


# diffusers' UNet names -> the SGM (original SDXL) UNet's, which kohya's SDXL LoRAs use (sd-scripts trains SDXL on
# that UNet). Written here from the SGM layout, independently of sdrt's reader; diffusers' own loader reading the
# result is what says it is right.
SGM_LEAF = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def to_sgm(module: str, layers_per_block: int = 2, attention_up_blocks: tuple[int, ...] = (0,)) -> str:
    import re

    per = layers_per_block + 1

    def leaf(rest: str) -> str:
        return SGM_LEAF.get(rest, rest)

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{1 + b * per + layer}.{0 if kind == 'resnets' else 1}.{leaf(rest)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", module):
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{index}.{leaf(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{b * per + layer}.{0 if kind == 'resnets' else 1}.{leaf(rest)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        b = int(m[1])
        return f"output_blocks.{b * per + layers_per_block}.{2 if b in attention_up_blocks else 1}.conv"
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    return fixed[module]


def to_kohya(src: Path, out: Path, sdxl: bool = False, sgm: bool = False) -> Path:
    """The same adapter in kohya's format: ``lora_unet_<module_with_underscores>.lora_down/lora_up/alpha``,
    ``lora_te_`` (SDXL: ``lora_te1_``/``lora_te2_``), alpha as a tensor per module; ``sgm``: the UNet's modules
    in the SGM numbering kohya's SDXL files have (``lora_unet_input_blocks_4_1_...``)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_" if sdxl else "lora_te_",
        "text_encoder_2": "lora_te2_",
    }
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    converted = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        if sgm and component == "unet":
            module = to_sgm(module)
        name = prefixes[component] + module.replace(".", "_")
        if component.startswith("text_encoder") and not module.startswith("text_model."):
            name = prefixes[component] + "text_model_" + module.replace(".", "_")  # kohya names text_model.*
        kind = "lora_down" if part.startswith("A") else "lora_up"
        converted[f"{name}.{kind}.weight"] = value.contiguous()
        if kind == "lora_down":
            alpha = meta.get(f"{component}.lora_alpha", value.shape[0])
            converted[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(converted, str(out))
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil rounding


@contextlib.contextmanager
def adapters_loaded(pipe, loras: list[tuple[Path, float]]):
    """``pipe`` with ``loras`` loaded (load_lora_weights + set_adapters), left clean afterwards."""
    names = []
    try:
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name, adapter_name=f"a{i}")
            names.append(f"a{i}")
        if names:
            pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        yield pipe
    finally:
        if names:
            pipe.unload_lora_weights()


def diffusers_images(pipe, loras: list[tuple[Path, float]], latents: np.ndarray, **call) -> np.ndarray:
    """diffusers' image with ``loras`` loaded, the pipeline left clean."""
    with adapters_loaded(pipe, loras):
        out = pipe(latents=torch.from_numpy(latents), output_type="np", **call).images
    return to_uint8(out)

"""Loading a diffusers pipeline's parts and wrapping each as a module with plain tensors in and out.

Which parts a folder has, and what each graph takes and returns, comes from its family
(``sdrt.runtime.families``); each component spec names its wrapper class here.

A model folder is data, never code: only safetensors weights are read unless the caller allows
pickle checkpoints (``.bin``, ``.ckpt``: unpickling can run arbitrary code), every loader is told
``trust_remote_code=False``, and a ``model_index.json`` naming a library other than diffusers or
transformers (custom code shipped in the folder) is refused rather than ignored.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdrt.export import lora_map, memory
from sdrt.runtime import families
from sdrt.runtime.errors import ExportError
from sdrt.runtime.families import Family, ModelDims

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model"  # diffusers' weights file name (transformers': "model")

SOURCE_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/*.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/*.json",
    "text_encoder_2/model.safetensors",
    "unet/*.json",
    "unet/diffusion_pytorch_model.safetensors",
    "transformer/*.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "tokenizer_3/*",
    "text_encoder_3/*.json",
    "text_encoder_3/model.safetensors",
    "text_encoder_3/model.safetensors.index.json",
    "text_encoder_3/model-*.safetensors",
    "vae/*.json",
    "vae/diffusion_pytorch_model.safetensors",
]
VAE_PATTERNS = ["config.json", "diffusion_pytorch_model.safetensors"]
# Read only with allow_pickle (sdrt export --allow-pickle), where a part has no safetensors weights.
PICKLE_PATTERNS = [
    "text_encoder/pytorch_model.bin",
    "text_encoder_2/pytorch_model.bin",
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.bin",
]
VAE_PICKLE_PATTERNS = ["diffusion_pytorch_model.bin"]
# Weight files that are loaded by unpickling.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
# model_index.json entries name [library, class]; diffusers also accepts its own pipeline modules
# (SD 1.5's safety_checker is ["stable_diffusion", "StableDiffusionSafetyChecker"]).
TRUSTED_LIBRARIES = ("diffusers", "transformers")
PICKLE_FLAG = "--allow-pickle"


class TextEncoder(torch.nn.Module):
    """input_ids -> the outputs the spec names: last_hidden_state, pooler_output,
    penultimate_hidden_state (SDXL conditions on the layer before the last) or text_embeds (the projection)."""

    def __init__(self, text_encoder, outputs: tuple[str, ...]):
        super().__init__()
        self.text_encoder, self.outputs = text_encoder, outputs

    def forward(self, input_ids):
        hidden = "penultimate_hidden_state" in self.outputs
        out = self.text_encoder(input_ids=input_ids, output_hidden_states=hidden, return_dict=True)
        values = {
            "last_hidden_state": lambda: out.last_hidden_state,
            "pooler_output": lambda: out.pooler_output,
            "penultimate_hidden_state": lambda: out.hidden_states[-2],
            "text_embeds": lambda: out.text_embeds,
        }
        return tuple(values[name]() for name in self.outputs)


def _crop_pos_embed(self, height, width):
    """diffusers' PatchEmbed.cropped_pos_embed (SD 3): the centre height x width patches of the position grid."""
    height, width = height // self.patch_size, width // self.patch_size
    top, left = (self.pos_embed_max_size - height) // 2, (self.pos_embed_max_size - width) // 2
    grid = self.pos_embed.reshape(1, self.pos_embed_max_size, self.pos_embed_max_size, -1)
    return grid[:, top : top + height, left : left + width, :].reshape(1, -1, grid.shape[-1])


class Transformer(torch.nn.Module):
    """SD 3's MMDiT: hidden_states, encoder_hidden_states, pooled_projections, timestep -> the velocity."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        embed = transformer.pos_embed
        if getattr(embed, "pos_embed_max_size", None):
            # diffusers' crop raises on sizes beyond the grid; those Python comparisons on the traced height and
            # width make the exporter fix them to the traced sizes. The same crop without them stays dynamic; the
            # runtime refuses sizes beyond the grid before any call (ModelDims.max_latent_size).
            embed.cropped_pos_embed = types.MethodType(_crop_pos_embed, embed)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, skip_layers):
        """diffusers' SD3Transformer2DModel.forward (no ControlNet, IP-Adapter or attention kwargs), with the block
        loop taking ``skip_layers``, a 0/1 mask per block: a skipped block passes its inputs on, as diffusers'
        ``skip_layers=[...]`` (skip-layer guidance) does, in one graph for every mask."""
        t = self.transformer
        height, width = hidden_states.shape[-2:]
        hidden = t.pos_embed(hidden_states)
        temb = t.time_text_embed(timestep, pooled_projections)
        context = t.context_embedder(encoder_hidden_states)
        for index, block in enumerate(t.transformer_blocks):
            new_context, new_hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            skip = skip_layers[index] > 0.5
            hidden = torch.where(skip, hidden, new_hidden)
            if new_context is not None:  # the last block returns no context (context_pre_only)
                context = torch.where(skip, context, new_context)
        hidden = t.proj_out(t.norm_out(hidden, temb))
        p = t.config.patch_size
        hidden = hidden.reshape(hidden.shape[0], height // p, width // p, p, p, t.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(hidden.shape[0], t.out_channels, height, width)


class UNet(torch.nn.Module):
    """sample, timestep, encoder_hidden_states -> noise prediction (the exporter needs each input as a
    named parameter, hence one subclass per input set below)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def predict(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.predict(sample, timestep, encoder_hidden_states)


class UNetLCM(UNet):
    """+ LCM's guidance embedding."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.predict(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond)


class UNetXL(UNet):
    """+ SDXL's pooled text embedding and micro-conditioning."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.predict(sample, timestep, encoder_hidden_states, text_embeds, time_ids)


class UNetXLLCM(UNet):
    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond):
        return self.predict(sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond)


UNET_WRAPPERS = {
    ("sample", "timestep", "encoder_hidden_states"): UNet,
    ("sample", "timestep", "encoder_hidden_states", "timestep_cond"): UNetLCM,
    ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"): UNetXL,
    ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond"): UNetXLLCM,
}


def _named_inputs(cls: type, names: list[str]) -> type:
    """A subclass of ``cls`` whose ``forward(*inputs)`` shows ``names`` as its parameters: the exporter maps
    dynamic axes to inputs by parameter name, and ControlNet's residual count depends on the UNet's layout."""
    P = inspect.Parameter
    params = [P("self", P.POSITIONAL_OR_KEYWORD), *(P(n, P.POSITIONAL_OR_KEYWORD) for n in names)]

    def forward(self, *inputs):
        return cls.forward(self, *inputs)

    forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return type(cls.__name__, (cls,), {"forward": forward, "input_names": tuple(names)})


def _added_conditions(given: dict) -> dict | None:
    """SDXL's pooled text and time ids, as diffusers' ``added_cond_kwargs`` (None for SD 1.x/2.x inputs)."""
    return {"text_embeds": given["text_embeds"], "time_ids": given["time_ids"]} if "text_embeds" in given else None


class UNetControl(UNet):
    """The UNet's inputs, then ControlNet's residuals (the down blocks' in order, the mid block's last) -> noise
    prediction, as diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``."""

    input_names: tuple[str, ...] = ()

    def forward(self, *inputs):
        given = dict(zip(self.input_names, inputs))
        residuals = [given[n] for n in self.input_names if n.endswith("_residual") or "_residual_" in n]
        return self.unet(
            given["sample"],
            given["timestep"],
            given["encoder_hidden_states"],
            timestep_cond=given.get("timestep_cond"),
            added_cond_kwargs=_added_conditions(given),
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlNet(torch.nn.Module):
    """Latents, timestep, text (and SDXL's pooled text and time ids), the control image's features (the
    ``ControlNetEmbedding`` graph's output) -> the residuals at conditioning scale 1 (the runtime scales them, as
    diffusers' ``conditioning_scale`` and guess mode do). The model runs as diffusers' ``forward`` with its
    conditioning embedding taken out (the features go where the embedding's output went); its weights are shared,
    not copied."""

    input_names: tuple[str, ...] = ()

    def __init__(self, controlnet):
        super().__init__()
        body = copy.copy(controlnet)
        body._modules = dict(controlnet._modules)  # its own module table: the original keeps its embedding
        body.controlnet_cond_embedding = torch.nn.Identity()
        self.controlnet = body

    def forward(self, *inputs):
        given = dict(zip(self.input_names, inputs))
        features = given["controlnet_features"]
        if _bgr(self.controlnet):  # diffusers' forward flips its control input's channels: here the features' (a
            features = torch.flip(features, dims=[1])  # flip undone; ControlNetEmbedding flips the image's)
        down, mid = self.controlnet(
            given["sample"],
            given["timestep"],
            given["encoder_hidden_states"],
            controlnet_cond=features,
            conditioning_scale=1.0,
            added_cond_kwargs=_added_conditions(given),
            return_dict=False,
        )
        return (*down, mid)


class ControlNetEmbedding(torch.nn.Module):
    """The control image in [0, 1] -> its features at the latents' size (ControlNet's conditioning embedding)."""

    input_names: tuple[str, ...] = ()

    def __init__(self, controlnet):
        super().__init__()
        self.embedding = controlnet.controlnet_cond_embedding

        self.bgr = _bgr(controlnet)

    def forward(self, *inputs):
        return self.embedding(torch.flip(inputs[0], dims=[1]) if self.bgr else inputs[0])


def _bgr(controlnet) -> bool:
    return getattr(controlnet.config, "controlnet_conditioning_channel_order", "rgb") == "bgr"


def control_module(spec, model: torch.nn.Module) -> torch.nn.Module:
    """The export wrapper of a ControlNet component spec (``controlnet_embedding``, ``controlnet`` or
    ``unet_control``) around ``model``."""
    cls = {"ControlNet": ControlNet, "ControlNetEmbedding": ControlNetEmbedding, "UNetControl": UNetControl}
    return _named_inputs(cls[spec.wrapper], [t.name for t in spec.inputs])(model).eval()


class VaeDecoder(torch.nn.Module):
    """Scaled latents -> image in [-1, 1] (AutoencoderKL and AutoencoderTiny alike)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(torch.nn.Module):
    """Image in [-1, 1] -> for AutoencoderKL the Gaussian's parameters (mean and log-variance stacked
    on channels), so that the runtime samples with its own generator as diffusers' ``latent_dist``
    does; for AutoencoderTiny its latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        if not hasattr(self.vae, "quant_conv"):  # AutoencoderTiny
            return self.vae.encode(image, return_dict=False)[0]
        moments = self.vae.encoder(image)
        return self.vae.quant_conv(moments) if self.vae.quant_conv is not None else moments


@dataclass
class LoadedPipeline:
    source: Path
    family: Family
    parts: dict[str, torch.nn.Module]  # text_encoder(s), unet, vae
    tokenizers: dict[str, object]  # folder name -> transformers CLIPTokenizer
    scheduler_config: dict
    model_index: dict
    dims: ModelDims
    vae_source: dict = field(default_factory=dict)  # {"path", "class"} when --vae replaced the model's own

    @property
    def unet(self) -> torch.nn.Module:
        return self.parts["unet"]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.parts[self.family.denoiser]

    @property
    def vae(self) -> torch.nn.Module:
        return self.parts["vae"]

    def part_of(self, name: str) -> str:
        """The part (pipeline folder) component ``name`` is made from: vae_decoder/vae_encoder of vae,
        unet_control of unet, the others of their own."""
        return {"vae_decoder": "vae", "vae_encoder": "vae", "unet_control": "unet"}.get(name, name)

    def module(self, name: str) -> torch.nn.Module:
        spec = self.family.specs(self.dims)[name]
        if spec.wrapper == "TextEncoder":
            module = TextEncoder(self.parts[name], tuple(t.name for t in spec.outputs))
        elif spec.wrapper == "UNet":
            module = UNET_WRAPPERS[tuple(t.name for t in spec.inputs)](self.unet)
        elif spec.wrapper == "UNetControl":
            module = control_module(spec, self.unet)
        elif spec.wrapper == "Transformer":
            module = Transformer(self.parts["transformer"])
        else:
            module = {"VaeDecoder": VaeDecoder, "VaeEncoder": VaeEncoder}[spec.wrapper](self.vae)
        return module.eval()


def resolve_source(model: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local diffusers folder as is; otherwise a hub id, fetched (only the files we export, pickle
    checkpoints only with ``allow_pickle``) to the HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ExportError(f"model: expected a diffusers folder or a hub id like 'org/name', got {model!r}")
    from huggingface_hub import snapshot_download

    log.info("fetching %s (revision %s) from the hub", model, revision or "main")
    patterns = SOURCE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))


def source_files(source: Path, vae: Path | None = None, allow_pickle: bool = False) -> list[Path]:
    """Every file export reads, in a stable order (for the input fingerprint)."""
    patterns = SOURCE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    files = {p for pattern in patterns for p in source.glob(pattern) if p.is_file()}
    if vae is not None:
        vae_patterns = VAE_PATTERNS + (VAE_PICKLE_PATTERNS if allow_pickle else [])
        files |= {p for pattern in vae_patterns for p in vae.glob(pattern) if p.is_file()}
    return sorted(files)


def _is_diffusers_pipeline_module(name: str) -> bool:
    """``stable_diffusion`` and the like: a module of diffusers itself (found, not imported)."""
    if not name.isidentifier() or name.startswith("_"):
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{name}") is not None
    except (ImportError, ValueError):
        return False


def check_libraries(source: Path, index: dict) -> None:
    """Refuse a model_index.json whose components (or pipeline class) come from a library other than
    diffusers or transformers: such a folder carries code of its own, which export never runs."""
    for key, value in index.items():
        if key.startswith("_") and key != "_class_name":
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            continue  # options (force_zeros_for_empty_prompt, ...) and the plain "_class_name" string
        library, class_name = value
        if library is None or library in TRUSTED_LIBRARIES:
            continue
        if isinstance(library, str) and _is_diffusers_pipeline_module(library):
            continue
        raise ExportError(
            f"{source / 'model_index.json'}: component {key!r}: expected a class from diffusers or transformers, "
            f"got [{library!r}, {class_name!r}] from library {library!r} (a model folder's own code is never run: "
            "use a model whose components are diffusers/transformers classes)"
        )


def check_weights(folder: Path, weights_name: str, what: str, allow_pickle: bool = False) -> None:
    """Refuse ``folder`` (one part of a pipeline) when loading it would unpickle a checkpoint, unless
    ``allow_pickle``: its weights must be ``<weights_name>.safetensors`` (or a sharded safetensors index
    whose shards are all safetensors), and its config must not point transformers at another file."""
    if allow_pickle:
        return
    fix = f"convert them to safetensors, or pass {PICKLE_FLAG} if you trust their source: unpickling can run code"
    config = folder / "config.json"
    if config.is_file():
        explicit = _json(config, f"{what}'s config.json").get("transformers_weights")
        if explicit is not None and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
            raise ExportError(
                f"{config}: {what}: expected safetensors weights, got transformers_weights={explicit!r} ({fix})"
            )
    single, index = folder / f"{weights_name}.safetensors", folder / f"{weights_name}.safetensors.index.json"
    if index.is_file():  # diffusers reads a sharded index before (and instead of) the single file
        shards = sorted({str(s) for s in _json(index, f"{what}'s safetensors index").get("weight_map", {}).values()})
        unsafe = [s for s in shards if not s.endswith(".safetensors") or "/" in s or "\\" in s]
        if unsafe:
            raise ExportError(
                f"{index}: {what}: expected safetensors shards beside the index, got {', '.join(unsafe)} ({fix})"
            )
        return
    if single.is_file():
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        raise ExportError(
            f"{folder}: {what}: expected safetensors weights ({single.name}), got only pickle checkpoints "
            f"{', '.join(pickles)} ({fix})"
        )
    raise ExportError(f"{folder}: {what}: expected weights in {single.name}, found none")


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: expected the {what} (JSON), got {e}") from e


def _use_safetensors(allow_pickle: bool) -> bool | None:
    """diffusers' and transformers' ``use_safetensors``: True reads safetensors only; None (theirs by
    default) prefers safetensors and falls back to a pickle checkpoint."""
    return None if allow_pickle else True


def load_vae(folder: Path, allow_pickle: bool = False) -> torch.nn.Module:
    """An AutoencoderKL or AutoencoderTiny folder, by its config's class."""
    import diffusers

    config = _json(folder / "config.json", "VAE's config.json")
    kind = config.get("_class_name")
    if kind not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ExportError(f"{folder}: expected an AutoencoderKL or AutoencoderTiny folder, got {kind!r}")
    check_weights(folder, "diffusion_pytorch_model", "vae", allow_pickle)
    model = getattr(diffusers, kind).from_pretrained(
        folder, torch_dtype=torch.float32, use_safetensors=_use_safetensors(allow_pickle)
    )
    return model.eval()


def _layers_per_block(value) -> int:
    """UNet2DConditionModel's layers_per_block: one number, or one per block (0 when they differ: the ControlNet
    residual layout assumes one number)."""
    if isinstance(value, int):
        return value
    values = {int(v) for v in value}
    return values.pop() if len(values) == 1 else 0


def _transformer_dims(source: Path, family: Family, parts: dict, tcfg, common: dict) -> ModelDims:
    """SD 3's dims, each cross-checked where the pipeline joins two parts: CLIP's pooled projections
    concatenate into the transformer's pooled input, and its text tokens are T5's width."""
    clip = [r for r in family.text_encoders if r.kind == "clip"]
    t5 = next(r for r in family.text_encoders if r.kind == "t5")
    pooled = tuple(int(parts[r.component].config.projection_dim) for r in clip)
    t5_config = (
        parts[t5.component].config
        if t5.component in parts
        else types.SimpleNamespace(**_json(source / t5.component / "config.json", f"{t5.component}'s config.json"))
    )  # a dropped T5 (--drop-t5): its config still sets the width of the zeros the runtime passes in its place
    t5_hidden = int(t5_config.d_model)
    checks = (
        ("pooled_projection_dim", int(tcfg.pooled_projection_dim), sum(pooled), "CLIP projections concatenated"),
        ("joint_attention_dim", int(tcfg.joint_attention_dim), t5_hidden, "T5's hidden size"),
        ("in_channels", int(tcfg.in_channels), common["latent_channels"], "the VAE's latent channels"),
    )
    for key, got, want, what in checks:
        if got != want:
            raise ExportError(f"{source}/transformer/config.json: {key} expected {want} ({what}), got {got}")
    if sum(common["text_hidden"]) > t5_hidden:
        raise ExportError(
            f"{source}: expected CLIP's hidden sizes {common['text_hidden']} to fit T5's width {t5_hidden} (the "
            "pipeline pads them to it), they do not"
        )
    return ModelDims(
        **common,
        unet_in_channels=common["latent_channels"],
        unet_levels=1,
        cross_attention_dim=int(tcfg.joint_attention_dim),
        pooled_dim=sum(pooled),
        sample_size=int(tcfg.sample_size),
        patch_size=int(tcfg.patch_size),
        pos_embed_max_size=int(tcfg.pos_embed_max_size or 0),
        transformer_layers=int(tcfg.num_layers),
        t5_hidden=t5_hidden,
        t5_vocab_size=int(t5_config.vocab_size),
        text_pooled=pooled,
    )


def _unet_dims(source: Path, family: Family, parts: dict, ucfg, common: dict) -> ModelDims:
    last = family.text_encoders[-1]
    time_ids = 0
    if ucfg.get("addition_embed_type") == "text_time":
        time_ids = 5 if family.micro_conditioning == "refiner" else 6
    dims = ModelDims(
        **common,
        unet_in_channels=int(ucfg.in_channels),
        unet_levels=len(ucfg.block_out_channels),
        cross_attention_dim=int(ucfg.cross_attention_dim),
        pooled_dim=int(parts[last.component].config.projection_dim) if last.pooled_output else 0,
        time_ids=time_ids,
        time_cond_dim=int(ucfg.get("time_cond_proj_dim") or 0),
        sample_size=int(ucfg.sample_size),
        unet_block_channels=tuple(int(c) for c in ucfg.block_out_channels),
        unet_layers_per_block=_layers_per_block(ucfg.layers_per_block),
    )
    if time_ids and family.micro_conditioning:
        expected = int(ucfg.addition_time_embed_dim) * time_ids + dims.pooled_dim
        got = int(ucfg.projection_class_embeddings_input_dim)
        if expected != got:
            raise ExportError(
                f"{source}/unet/config.json: projection_class_embeddings_input_dim expected {expected} for a "
                f"{family.name} UNet ({time_ids} time ids x {ucfg.addition_time_embed_dim} + pooled {dims.pooled_dim}), "
                f"got {got}"
            )
    return dims


def family_of(source: Path) -> tuple[Family, dict]:
    """The family of a diffusers pipeline folder and its model_index.json, read from the index and the
    denoiser's config (nothing is loaded)."""
    index_path = source / "model_index.json"
    if not index_path.is_file():
        raise ExportError(f"{source}: expected a diffusers pipeline folder with model_index.json, found none")
    index = _json(index_path, "pipeline index")
    check_libraries(source, index)
    folder = families.denoiser_folder(index)
    if not (source / folder).is_dir():
        raise ExportError(
            f"{source}: expected a '{folder}' folder (the pipeline's denoiser: {' or '.join(families.DENOISERS)}), "
            "found none"
        )
    denoiser_config = _json(source / folder / "config.json", f"{folder}'s config.json")
    family = families.detect(index, denoiser_config)
    if family.denoiser != folder:
        raise ExportError(
            f"{source}: expected the {family.name} family's denoiser in '{family.denoiser}', model_index.json names "
            f"'{folder}'"
        )
    return family, index


def load_pipeline(
    source: Path,
    vae: Path | None = None,
    allow_pickle: bool = False,
    skip: tuple[str, ...] = (),
    memory_check: bool = True,
) -> LoadedPipeline:
    """Load a diffusers pipeline folder's parts in float32; ``vae`` replaces its VAE by another folder's.
    Weights are read from safetensors only, unless ``allow_pickle`` (then a part without safetensors
    weights is read from its pickle checkpoint). ``skip``: optional text encoders not to load (SD 3's T5; its
    tokenizer and config are still read). ``memory_check``: refuse, before loading anything, an export that
    would not fit in this machine's memory (``sdrt.export.memory``)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    family, index = family_of(source)
    droppable = family.optional_text_encoders()
    unknown = [c for c in skip if c not in droppable]
    if unknown:
        raise ExportError(
            f"{source}: the {family.name} family runs without {', '.join(droppable) or 'none of its text encoders'}, "
            f"not without {', '.join(unknown)}"
        )
    loaded = [r for r in family.text_encoders if r.component not in skip]
    needed = [r.tokenizer for r in family.text_encoders] + [r.component for r in loaded]
    for part in (*needed, family.denoiser, "scheduler", *(() if vae else ("vae",))):
        if not (source / part).is_dir():
            hint = " (leave it out with --drop-t5)" if part in droppable else ""
            raise ExportError(f"{source}: expected a '{part}' folder in the {family.name} pipeline, found none{hint}")

    vae_folder = Path(vae) if vae else source / "vae"
    # Every part's weights are checked before any is loaded, and so is the memory they will take.
    for role in loaded:
        check_weights(source / role.component, "model", role.component, allow_pickle)
    check_weights(source / family.denoiser, "diffusion_pytorch_model", family.denoiser, allow_pickle)
    check_weights(vae_folder, "diffusion_pytorch_model", "vae", allow_pickle)
    if memory_check:
        # released after its export as build._releaser does: unless its LoRA map needs it afterwards
        kept = lora_map.ADAPTABLE
        sizes = [
            memory.PartSize(r.component, memory.part_parameters(source / r.component, "model"), r.component not in kept)
            for r in loaded
        ]
        denoiser_size = memory.part_parameters(source / family.denoiser, WEIGHTS)
        sizes.append(memory.PartSize(family.denoiser, denoiser_size, family.denoiser not in kept))
        sizes.append(memory.PartSize("vae", memory.part_parameters(vae_folder, WEIGHTS)))
        need = memory.check(sizes, tuple(c for c in droppable if c not in skip))
        log.info("export needs about %.1f GB of memory (%.1f GB available)", need / 1e9, memory.available_bytes() / 1e9)

    safe = {"use_safetensors": _use_safetensors(allow_pickle)}
    parts: dict[str, torch.nn.Module] = {}
    tokenizers = {}
    for role in family.text_encoders:
        if role.component in skip:  # its tokenizer is still written: a runtime may be given T5 later
            tokenizers[role.tokenizer] = T5TokenizerFast.from_pretrained(
                source / role.tokenizer, trust_remote_code=False
            )
            continue
        if role.kind == "t5":
            tokenizers[role.tokenizer] = T5TokenizerFast.from_pretrained(
                source / role.tokenizer, trust_remote_code=False
            )
            cls = T5EncoderModel
        else:
            tokenizers[role.tokenizer] = CLIPTokenizer.from_pretrained(source / role.tokenizer, trust_remote_code=False)
            cls = CLIPTextModelWithProjection if role.pooled_output else CLIPTextModel
        parts[role.component] = cls.from_pretrained(
            source / role.component, torch_dtype=torch.float32, trust_remote_code=False, **safe
        ).eval()
    # diffusers' model classes take no trust_remote_code: they never load code from the folder.
    denoiser_class = SD3Transformer2DModel if family.denoiser == "transformer" else UNet2DConditionModel
    denoiser = denoiser_class.from_pretrained(source / family.denoiser, torch_dtype=torch.float32, **safe).eval()
    parts[family.denoiser] = denoiser
    parts["vae"] = vae_model = load_vae(vae_folder, allow_pickle)
    scheduler_config = _json(source / "scheduler" / "scheduler_config.json", "scheduler config")
    clip_roles = [r for r in family.text_encoders if r.kind == "clip"]
    tokenizer = tokenizers[clip_roles[0].tokenizer]
    encoders = [parts[r.component].config for r in clip_roles]
    vae_kind = "tiny" if type(vae_model).__name__ == "AutoencoderTiny" else "kl"
    common = dict(
        text_length=min(int(tokenizer.model_max_length), *(int(c.max_position_embeddings) for c in encoders)),
        text_hidden=tuple(int(c.hidden_size) for c in encoders),
        vocab_size=min(int(c.vocab_size) for c in encoders),
        latent_channels=int(vae_model.config.latent_channels),
        vae_scale_factor=2 ** (len(vae_model.config.block_out_channels) - 1),
        vae_kind=vae_kind,
    )
    if family.denoiser == "transformer":
        dims = _transformer_dims(source, family, parts, denoiser.config, common)
    else:
        dims = _unet_dims(source, family, parts, denoiser.config, common)
    vae_source = {"path": str(vae_folder), "class": type(vae_model).__name__} if vae else {}
    return LoadedPipeline(source, family, parts, tokenizers, scheduler_config, index, dims, vae_source)

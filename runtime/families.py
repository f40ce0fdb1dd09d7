"""Model families: one declarative description per family, read by everything that needs one.

Export (which components, which torch wrapper, tensor names and symbolic shapes, fp16 policy),
verification (sample inputs), TensorRT profiles (which batches double under guidance), the engine
builders, the benchmark (FLOPs, the diffusers baseline class), the optimum-folder reader and the
runtime pipeline (how to encode a prompt, which micro-conditioning the UNet takes) all read the
:class:`Family` and :class:`ModelDims` recorded in the manifest. Adding a family is adding one entry
to :data:`FAMILIES`.

What varies *within* a family is read from the model's dimensions rather than multiplied into
families: a 9-channel inpainting UNet (``unet_in_channels`` != ``latent_channels``), an LCM UNet
with a guidance embedding (``time_cond_dim``), a tiny autoencoder (``vae_kind``). So SDXL
inpainting or an LCM-distilled SD 2 need no new entry.

Symbolic dimensions, named once here:

    batch                         images in a call (the UNet sees the doubled guidance batch)
    latent_height, latent_width   latent cells = pixels / vae_scale_factor
    image_height, image_width     pixels

Pure Python and NumPy: the runtime imports it; export adds the torch side (``sdrt.export.modules``
maps each spec's ``wrapper`` name to a module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from sdrt.runtime.errors import ArtifactError, ExportError
from sdrt.runtime.manifest import TensorSpec

VAE_KINDS = ("kl", "tiny")  # AutoencoderKL (encoder gives a Gaussian's parameters), AutoencoderTiny (latents)
TASKS = ("text-to-image", "image-to-image", "inpainting")
ALL_COMPONENTS = (
    "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae_decoder", "vae_encoder",
    "unet_control",
)  # fmt: skip
# The denoiser of a family: a UNet (SD 1.x/2.x, SDXL) or a diffusion transformer (SD 3's MMDiT). Everything
# that needs "the model the loop calls every step" reads Family.denoiser, never a literal component name.
DENOISERS = ("unet", "transformer")
# Exported only when asked for (sdrt export --controlnet-unet), opened only when a ControlNet is loaded.
OPTIONAL_COMPONENTS = ("unet_control",)


@dataclass(frozen=True)
class ModelDims:
    """The numbers of a model that decide every tensor shape; recorded in the manifest."""

    text_length: int
    text_hidden: tuple[int, ...]  # hidden size of each text encoder, in the family's order
    vocab_size: int
    latent_channels: int  # the VAE's latent channels
    unet_in_channels: int  # = latent_channels, or 2 * latent_channels + 1 for an inpainting UNet
    vae_scale_factor: int  # pixels per latent cell
    unet_levels: int  # number of UNet down blocks; latents must divide by 2**(levels - 1)
    cross_attention_dim: int
    pooled_dim: int = 0  # SDXL: the pooled text projection the UNet takes as text_embeds
    time_ids: int = 0  # SDXL: micro-conditioning values per image (6 base, 5 refiner)
    time_cond_dim: int = 0  # LCM: the UNet's guidance-embedding width (time_cond_proj_dim)
    vae_kind: str = "kl"
    sample_size: int = 64  # the UNet's default latent size
    # The UNet's block layout (ControlNet residuals have one tensor per down-block layer): channels of each
    # down block and resnets per block. Empty in manifests written before sdrt recorded them.
    unet_block_channels: tuple[int, ...] = ()
    unet_layers_per_block: int = 0
    # A transformer denoiser (SD 3): latents are cut into patch_size x patch_size patches, and its learned
    # position embeddings cover pos_embed_max_size patches per side (the largest image it takes). 0 for a UNet.
    patch_size: int = 0
    pos_embed_max_size: int = 0
    # SD 3's third text encoder (T5): its hidden size; its token count is chosen per call (max_sequence_length).
    t5_hidden: int = 0
    t5_default_length: int = 256  # diffusers' default max_sequence_length
    t5_vocab_size: int = 0
    # Each text encoder's pooled projection width, where more than the last one is pooled (SD 3: CLIP-L's and
    # CLIP-G's, concatenated into pooled_dim). Empty: only the last encoder is pooled, at pooled_dim (SDXL).
    text_pooled: tuple[int, ...] = ()
    # A transformer denoiser's blocks: its graph takes a 0/1 mask of them to skip (SD 3.5's skip-layer guidance).
    # 0: a graph without that input (exported before sdrt had it).
    transformer_layers: int = 0

    def __post_init__(self):
        if self.vae_kind not in VAE_KINDS:
            raise ExportError(f"vae kind: expected one of {', '.join(VAE_KINDS)}, got {self.vae_kind!r}")
        if self.unet_in_channels not in (self.latent_channels, 2 * self.latent_channels + 1):
            raise ExportError(
                f"UNet in_channels: expected {self.latent_channels} (the VAE's latent channels) or "
                f"{2 * self.latent_channels + 1} (inpainting: latents + mask + masked-image latents), "
                f"got {self.unet_in_channels}"
            )

    @property
    def latent_multiple(self) -> int:
        """Latent sizes divide by this: a UNet halves them unet_levels - 1 times, a transformer cuts patches."""
        return self.patch_size if self.patch_size else 2 ** (self.unet_levels - 1)

    @property
    def max_latent_size(self) -> int:
        """The largest latent height or width the denoiser takes (0: no bound): a transformer's position grid."""
        return self.pos_embed_max_size * self.patch_size

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_multiple

    @property
    def inpainting(self) -> bool:
        """A 9-channel UNet: latents, the mask and the masked image's latents, concatenated."""
        return self.unet_in_channels != self.latent_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_hidden"] = list(self.text_hidden)
        d["unet_block_channels"] = list(self.unet_block_channels)
        d["text_pooled"] = list(self.text_pooled)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelDims:
        return cls(
            **{
                **d,
                "text_hidden": tuple(d["text_hidden"]),
                "unet_block_channels": tuple(d.get("unet_block_channels", ())),
                "text_pooled": tuple(d.get("text_pooled", ())),
            }
        )


@dataclass(frozen=True)
class ComponentSpec:
    """One graph: its tensors (symbolic shapes), how its batch relates to the image batch, and how
    export builds it (``wrapper``: a module class in ``sdrt.export.modules``)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    wrapper: str
    ort_model_type: str  # onnxruntime's fusion model type (clip, unet, vae)
    # How the batch of a call relates to the images asked for: "guidance" (UNet: unconditional and
    # conditional rows when guided), "prompts" (text encoders: prompts and negative prompts in one
    # call), "images" (VAE).
    batch: str = "images"
    sample_overrides: Callable[[dict, np.random.Generator], dict] | None = None

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }

    def input_shapes(self, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """Each input's concrete shape at the given symbolic sizes."""
        return {t.name: tuple(values[d] if isinstance(d, str) else d for d in t.shape) for t in self.inputs}

    def sample(self, values: dict[str, int], rng: np.random.Generator, vocab_size: int = 0) -> dict[str, np.ndarray]:
        """Random inputs at the given symbolic sizes (for tracing and verification)."""
        feed = random_inputs(self.inputs, values, rng, high=vocab_size)
        if self.sample_overrides is not None:
            feed.update(self.sample_overrides(feed, rng))
        return feed


@dataclass(frozen=True)
class TextEncoderRole:
    component: str  # text_encoder, text_encoder_2, text_encoder_3
    tokenizer: str  # its tokenizer folder
    hidden_output: str  # the output the UNet's conditioning takes: last_hidden_state or penultimate_hidden_state
    pooled_output: str = ""  # the pooled output the UNet takes as text_embeds (SDXL's second encoder)
    kind: str = "clip"  # "clip" (77 tokens, CLIPTextModel[WithProjection]) or "t5" (T5EncoderModel, tokens per call)
    # The pipeline runs without it (zeros in its place, as diffusers with SD 3's text_encoder_3=None): export may
    # leave it out (--drop-t5) and Pipeline.load may leave it closed.
    optional: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    pipelines: tuple[str, ...]  # diffusers pipeline classes (model_index.json _class_name) of this family
    text_encoders: tuple[TextEncoderRole, ...]
    # Micro-conditioning the UNet takes besides the prompt: "" (none), "sdxl" (original size, crop
    # corner, target size) or "refiner" (original size, crop corner, aesthetic score).
    micro_conditioning: str = ""
    fp16_exceptions: dict[str, str] = field(default_factory=dict)  # component -> precision kept in fp16 exports
    default_strength: float = 0.8  # image-to-image strength when none is given (diffusers' default)
    default_guidance: float = 7.5  # guidance scale when none is given (diffusers' default)
    inpainting_strength: float = 1.0  # inpainting's strength when none is given (diffusers' default)
    inpainting_guidance: float = 7.5  # (SDXL's inpainting pipeline defaults to 7.5, its others to 5.0)
    # The diffusers pipeline class per task (the benchmark's baseline, the tests' reference).
    diffusers_classes: dict[str, str] = field(default_factory=dict)
    denoiser: str = "unet"  # the component the loop calls every step: "unet" or "transformer" (DENOISERS)
    default_steps: int = 50  # denoising steps when none are given (diffusers' default for the family)
    text_to_image_steps: int = 0  # another default for text-to-image alone (SD 3: 28, its other tasks 50)
    # Image-to-image output size when none is given: the image's own (SD, SDXL) or the model's default (SD 3's
    # pipelines resize the image to it, as their inpainting pipelines do).
    img2img_default_size: bool = False

    def components(self) -> tuple[str, ...]:
        return (*(r.component for r in self.text_encoders), self.denoiser, "vae_decoder", "vae_encoder")

    def optional_text_encoders(self) -> tuple[str, ...]:
        """Text encoders text-to-image runs without (SD 3's T5: zeros in its place)."""
        return tuple(r.component for r in self.text_encoders if r.optional)

    def specs(self, dims: ModelDims) -> dict[str, ComponentSpec]:
        specs = {role.component: _text_encoder_spec(role, dims, i) for i, role in enumerate(self.text_encoders)}
        specs[self.denoiser] = _DENOISER_SPECS[self.denoiser](dims)
        specs.update(_vae_specs(dims))
        if self.denoiser == "unet" and dims.unet_block_channels and dims.unet_layers_per_block:
            specs["unet_control"] = control_specs(dims)["unet_control"]  # manifests that record the UNet's layout
        return specs

    def defaults(self, dims: ModelDims, task: str = "text-to-image") -> dict:
        """diffusers' defaults for this family's pipeline of ``task``: steps and guidance scale (LCM: 4 steps at 8.5)."""
        if dims.time_cond_dim:
            return {"num_inference_steps": 4, "guidance_scale": 8.5}
        guidance = self.inpainting_guidance if task == "inpainting" else self.default_guidance
        steps = self.text_to_image_steps if task == "text-to-image" and self.text_to_image_steps else self.default_steps
        return {"num_inference_steps": steps, "guidance_scale": guidance}


SD_CLASSES = {
    "text-to-image": "StableDiffusionPipeline",
    "image-to-image": "StableDiffusionImg2ImgPipeline",
    "inpainting": "StableDiffusionInpaintPipeline",
}
SDXL_CLASSES = {
    "text-to-image": "StableDiffusionXLPipeline",
    "image-to-image": "StableDiffusionXLImg2ImgPipeline",
    "inpainting": "StableDiffusionXLInpaintPipeline",
}
SD3_CLASSES = {
    "text-to-image": "StableDiffusion3Pipeline",
    "image-to-image": "StableDiffusion3Img2ImgPipeline",
    "inpainting": "StableDiffusion3InpaintPipeline",
}
_SD_PIPELINES = (*SD_CLASSES.values(), "LatentConsistencyModelPipeline")
_CLIP = (TextEncoderRole("text_encoder", "tokenizer", "last_hidden_state"),)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sd1",
            "Stable Diffusion 1.x (CLIP ViT-L/14 text encoder)",
            _SD_PIPELINES,
            _CLIP,
            diffusers_classes=SD_CLASSES,
        ),
        Family(
            "sd2",
            "Stable Diffusion 2.x (OpenCLIP ViT-H text encoder)",
            _SD_PIPELINES,
            _CLIP,
            # SD 2.x was trained with attention upcast to fp32 (diffusers' upcast_attention): fp16 scores overflow.
            fp16_exceptions={"unet": "fp16+fp32-attention"},
            diffusers_classes=SD_CLASSES,
        ),
        Family(
            "sdxl",
            "Stable Diffusion XL base (two text encoders, size and crop conditioning)",
            tuple(SDXL_CLASSES.values()),
            (
                TextEncoderRole("text_encoder", "tokenizer", "penultimate_hidden_state"),
                TextEncoderRole("text_encoder_2", "tokenizer_2", "penultimate_hidden_state", "text_embeds"),
            ),
            micro_conditioning="sdxl",
            default_guidance=5.0,
            inpainting_strength=0.9999,
            # SDXL's VAE overflows in fp16 (hence madebyollin's fp16-fix VAE): fp32 unless told otherwise.
            fp16_exceptions={"vae_decoder": "fp32", "vae_encoder": "fp32"},
            default_strength=0.3,
            diffusers_classes=SDXL_CLASSES,
        ),
        Family(
            "sd3",
            "Stable Diffusion 3 / 3.5 (MMDiT transformer; CLIP-L, CLIP-G and T5 text encoders; flow matching)",
            tuple(SD3_CLASSES.values()),
            (
                TextEncoderRole("text_encoder", "tokenizer", "penultimate_hidden_state", "text_embeds"),
                TextEncoderRole("text_encoder_2", "tokenizer_2", "penultimate_hidden_state", "text_embeds"),
                TextEncoderRole("text_encoder_3", "tokenizer_3", "last_hidden_state", kind="t5", optional=True),
            ),
            default_guidance=7.0,
            default_strength=0.6,
            inpainting_strength=0.6,
            inpainting_guidance=7.0,
            # T5's feed-forward activations exceed fp16's range (diffusers keeps T5 in fp32/bf16 for fp16 SD 3);
            # the MMDiT's own are within it, as NVIDIA's and diffusers' fp16 SD 3 pipelines run it.
            fp16_exceptions={"text_encoder_3": "fp32"},
            diffusers_classes=SD3_CLASSES,
            denoiser="transformer",
            text_to_image_steps=28,
            img2img_default_size=True,
        ),
        Family(
            "sdxl-refiner",
            "Stable Diffusion XL refiner (second text encoder only, aesthetic-score conditioning)",
            ("StableDiffusionXLImg2ImgPipeline",),
            (TextEncoderRole("text_encoder_2", "tokenizer_2", "penultimate_hidden_state", "text_embeds"),),
            micro_conditioning="refiner",
            default_guidance=5.0,
            fp16_exceptions={"vae_decoder": "fp32", "vae_encoder": "fp32"},
            default_strength=0.3,
            diffusers_classes={"image-to-image": "StableDiffusionXLImg2ImgPipeline"},
        ),
    )
}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ArtifactError(f"model family: expected one of {', '.join(FAMILIES)}, got {name!r}") from None


def inpainting_families() -> list[str]:
    return [f.name for f in FAMILIES.values() if "inpainting" in f.diffusers_classes]


def supported_pipelines() -> list[str]:
    return sorted({p for f in FAMILIES.values() for p in f.pipelines})


def denoiser_folder(model_index: dict) -> str:
    """The folder of a diffusers pipeline's denoiser: "transformer" when model_index.json names one, else "unet"."""
    return "transformer" if (model_index.get("transformer") or [None])[0] is not None else "unet"


def detect(model_index: dict, unet_config: dict) -> Family:
    """The family of a diffusers folder, from ``model_index.json`` and its denoiser's config."""
    kind = model_index.get("_class_name")
    if kind not in supported_pipelines():
        raise ExportError(f"model_index.json: expected a pipeline of {', '.join(supported_pipelines())}, got {kind!r}")
    if kind.startswith("StableDiffusion3"):
        return FAMILIES["sd3"]
    if kind.startswith("StableDiffusionXL"):
        has_first_encoder = (model_index.get("text_encoder") or [None])[0] is not None
        return FAMILIES["sdxl" if has_first_encoder else "sdxl-refiner"]
    if unet_config.get("addition_embed_type") == "text_time":
        raise ExportError(
            f"model_index.json: {kind} with an SDXL UNet (addition_embed_type text_time) is not supported"
        )
    return FAMILIES["sd2" if int(unet_config["cross_attention_dim"]) == 1024 else "sd1"]


# -- tensor specs ---------------------------------------------------------------------------------
def sizes(dims: ModelDims, batch: int, latent_height: int, latent_width: int, t5_tokens: int = 0) -> dict[str, int]:
    """Values for every symbolic dimension, from a batch and a latent size (and SD 3's T5 token count: default
    the model's default max_sequence_length)."""
    t5_tokens = t5_tokens or dims.t5_default_length
    f = dims.vae_scale_factor
    values = {
        "batch": batch,
        "latent_height": latent_height,
        "latent_width": latent_width,
        "image_height": latent_height * f,
        "image_width": latent_width * f,
    }
    for level in range(1, dims.unet_levels):  # the UNet's inner resolutions (latent sizes divide by 2**(levels-1))
        values[reduced("latent_height", level)] = latent_height // 2**level
        values[reduced("latent_width", level)] = latent_width // 2**level
    if dims.t5_hidden:  # SD 3: T5's tokens per call, and the transformer's text tokens (77 CLIP + T5's)
        values["t5_tokens"] = t5_tokens
        values["text_tokens"] = dims.text_length + t5_tokens
    return values


def reduced(name: str, level: int) -> str:
    """The symbolic dimension ``name`` halved ``level`` times: ``latent_height_4`` is latent_height / 4."""
    return name if level == 0 else f"{name}_{2**level}"


def control_residual_specs(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """The residuals a ControlNet hands the UNet, in the order diffusers' UNet2DConditionModel takes them
    (``down_block_additional_residuals``, then ``mid_block_additional_residual``): conv_in's output, each resnet
    of each down block and each downsampler, at that point's channels and resolution; then the mid block's."""
    if not dims.unet_block_channels or not dims.unet_layers_per_block:
        raise ArtifactError(
            "ControlNet: expected the UNet's block layout in the manifest (unet_block_channels, "
            "unet_layers_per_block), got none: re-export the model with this sdrt"
        )

    def at(name: str, channels: int, level: int) -> TensorSpec:
        shape = ["batch", channels, reduced("latent_height", level), reduced("latent_width", level)]
        return TensorSpec(name, "float32", shape)

    chans, per = dims.unet_block_channels, dims.unet_layers_per_block
    points = [(chans[0], 0)]
    for level, c in enumerate(chans):
        points += [(c, level)] * per
        if level < len(chans) - 1:  # every block but the last ends with a downsampler
            points.append((c, level + 1))
    down = [at(f"down_block_residual_{i}", c, level) for i, (c, level) in enumerate(points)]
    return (*down, at("mid_block_residual", chans[-1], len(chans) - 1))


def random_inputs(specs, values: dict[str, int], rng: np.random.Generator, high: int = 0) -> dict[str, np.ndarray]:
    feed = {}
    for t in specs:
        shape = tuple(values[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype.startswith("int"):
            feed[t.name] = rng.integers(0, high, size=shape, dtype=t.dtype)
        else:
            feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feed


def _text_encoder_spec(role: TextEncoderRole, dims: ModelDims, index: int) -> ComponentSpec:
    if role.kind == "t5":  # T5's token count is the call's max_sequence_length: a symbolic dimension
        return ComponentSpec(
            role.component,
            (TensorSpec("input_ids", "int64", ["batch", "t5_tokens"]),),
            (TensorSpec("last_hidden_state", "float32", ["batch", "t5_tokens", dims.t5_hidden]),),
            wrapper="TextEncoder",
            ort_model_type="t5",
            batch="prompts",
        )
    n, h = dims.text_length, dims.text_hidden[index]
    if role.hidden_output == "last_hidden_state":  # SD 1.x/2.x: the classic (and optimum's) pair of outputs
        outputs = [
            TensorSpec("last_hidden_state", "float32", ["batch", n, h]),
            TensorSpec("pooler_output", "float32", ["batch", h]),
        ]
    else:
        outputs = [TensorSpec(role.hidden_output, "float32", ["batch", n, h])]
        if role.pooled_output:
            width = dims.text_pooled[index] if dims.text_pooled else dims.pooled_dim
            outputs.append(TensorSpec(role.pooled_output, "float32", ["batch", width]))
    return ComponentSpec(
        role.component,
        (TensorSpec("input_ids", "int64", ["batch", n]),),
        tuple(outputs),
        wrapper="TextEncoder",
        ort_model_type="clip",
        batch="prompts",
    )


def _unet_spec(dims: ModelDims) -> ComponentSpec:
    latent_in = ["batch", dims.unet_in_channels, "latent_height", "latent_width"]
    latent_out = ["batch", dims.latent_channels, "latent_height", "latent_width"]
    inputs = [
        TensorSpec("sample", "float32", latent_in),
        TensorSpec("timestep", "float32", ["batch"]),
        TensorSpec("encoder_hidden_states", "float32", ["batch", dims.text_length, dims.cross_attention_dim]),
    ]
    if dims.time_ids:
        inputs += [
            TensorSpec("text_embeds", "float32", ["batch", dims.pooled_dim]),
            TensorSpec("time_ids", "float32", ["batch", dims.time_ids]),
        ]
    if dims.time_cond_dim:
        inputs.append(TensorSpec("timestep_cond", "float32", ["batch", dims.time_cond_dim]))

    def plausible(feed, rng):
        out = {"timestep": rng.uniform(0, 999, size=feed["timestep"].shape).astype(np.float32)}
        if "time_ids" in feed:  # sizes in pixels, crop corners, aesthetic scores
            out["time_ids"] = rng.uniform(0, 1024, size=feed["time_ids"].shape).round().astype(np.float32)
        return out

    return ComponentSpec(
        "unet",
        tuple(inputs),
        (TensorSpec("out_sample", "float32", latent_out),),
        wrapper="UNet",
        ort_model_type="unet",
        batch="guidance",
        sample_overrides=plausible,
    )


def _transformer_spec(dims: ModelDims) -> ComponentSpec:
    """SD 3's MMDiT, with diffusers' argument names: latents, the joint text tokens (CLIP-L and CLIP-G hidden
    states concatenated and zero-padded to T5's width, then T5's tokens), the pooled CLIP projections and the
    timestep (1000 sigma) -> the velocity."""
    latent = ["batch", dims.latent_channels, "latent_height", "latent_width"]

    def plausible(feed, rng):
        values = {"timestep": rng.uniform(0, 1000, size=feed["timestep"].shape).astype(np.float32)}
        if "skip_layers" in feed:  # every other block skipped, from a random first: both paths of each are traced
            first = int(rng.integers(0, 2))
            values["skip_layers"] = (np.arange(dims.transformer_layers) % 2 == first).astype(np.float32)
        return values

    # skip_layers: 1 where a block is skipped (its inputs passed on), as diffusers' skip_layers=[...]; all zeros
    # for every ordinary step, so one graph serves both.
    skip = (TensorSpec("skip_layers", "float32", [dims.transformer_layers]),) if dims.transformer_layers else ()
    return ComponentSpec(
        "transformer",
        (
            TensorSpec("hidden_states", "float32", latent),
            TensorSpec("encoder_hidden_states", "float32", ["batch", "text_tokens", dims.cross_attention_dim]),
            TensorSpec("pooled_projections", "float32", ["batch", dims.pooled_dim]),
            TensorSpec("timestep", "float32", ["batch"]),
            *skip,
        ),
        (TensorSpec("out_sample", "float32", latent),),
        wrapper="Transformer",
        ort_model_type="mmdit",
        batch="guidance",
        sample_overrides=plausible,
    )


_DENOISER_SPECS: dict[str, Callable[[ModelDims], ComponentSpec]] = {
    "unet": lambda dims: _unet_spec(dims),
    "transformer": lambda dims: _transformer_spec(dims),
}


def control_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    """ControlNet's graphs. ``controlnet_embedding``: the control image in pixels -> its features at the latents'
    size (ControlNet's conditioning embedding; the same at every step, so the runtime runs it once per call, on one
    row per image). ``controlnet``: the UNet's inputs (but its own input channels: the VAE's latents) and those
    features -> the residuals, unscaled (the runtime applies conditioning scales and guess mode's per-residual
    scales). ``unet_control``: the UNet's inputs plus those residuals -> the noise prediction; exported beside the
    plain UNet, which keeps running alone when no ControlNet is loaded."""
    unet = _unet_spec(dims)
    residuals = control_residual_specs(dims)
    latents = TensorSpec("sample", "float32", ["batch", dims.latent_channels, "latent_height", "latent_width"])
    image = TensorSpec("controlnet_cond", "float32", ["batch", 3, "image_height", "image_width"])
    features = TensorSpec(
        "controlnet_features", "float32", ["batch", dims.unet_block_channels[0], "latent_height", "latent_width"]
    )
    inputs = (latents, *(t for t in unet.inputs if t.name not in ("sample", "timestep_cond")), features)
    return {
        "controlnet_embedding": ComponentSpec(
            "controlnet_embedding", (image,), (features,), wrapper="ControlNetEmbedding", ort_model_type="vae",
        ),
        "controlnet": ComponentSpec(
            "controlnet", inputs, residuals, wrapper="ControlNet", ort_model_type="unet", batch="guidance",
            sample_overrides=unet.sample_overrides,
        ),
        "unet_control": ComponentSpec(
            "unet_control", (*unet.inputs, *residuals), unet.outputs, wrapper="UNetControl", ort_model_type="unet",
            batch="guidance", sample_overrides=unet.sample_overrides,
        ),
    }  # fmt: skip


def _vae_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    c = dims.latent_channels
    latent = ["batch", c, "latent_height", "latent_width"]
    image = ["batch", 3, "image_height", "image_width"]
    if dims.vae_kind == "kl":  # the Gaussian's mean and log-variance: the runtime samples with its own generator
        encoded = TensorSpec("latent_parameters", "float32", ["batch", 2 * c, "latent_height", "latent_width"])
    else:  # AutoencoderTiny encodes to latents directly
        encoded = TensorSpec("latent", "float32", latent)
    return {
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", "float32", latent),),
            (TensorSpec("image", "float32", image),),
            wrapper="VaeDecoder",
            ort_model_type="vae",
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", "float32", image),),
            (encoded,),
            wrapper="VaeEncoder",
            ort_model_type="vae",
        ),
    }

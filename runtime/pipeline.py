"""Text-to-image, image-to-image and inpainting on exported graphs, for every model family.

Mirrors diffusers' pipelines (StableDiffusion[XL][Img2Img|Inpaint]Pipeline, LatentConsistencyModelPipeline):
same arguments, same arithmetic, same batch layout (unconditional rows first) and the same order of
random draws, with NumPy arrays between components. A call runs four stages, each one method:

    encode_prompt    prompts -> text conditioning (per family: one CLIP encoder, or SDXL's two)
    prepare_latents  initial latents for the task (noise; a noised encoded image; + inpainting's mask)
    denoise          the loop, from ``denoising_start`` to ``denoising_end``
    decode           latents -> images (or the latents themselves, ``output_type="latent"``)
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.runtime import backends, choice, conditioning, control, families, lora, schedulers, validation
from sdrt.runtime.controlnet import ControlNetManifest
from sdrt.runtime.errors import ArtifactError, BackendError, InputError, InternalError, NumericalError, SdrtError
from sdrt.runtime.families import Family, ModelDims
from sdrt.runtime.images import to_uint8
from sdrt.runtime.manifest import Component, Manifest
from sdrt.runtime.profiles import T5_MAX_TOKENS, ShapeRanges, check_shapes
from sdrt.runtime.rng import GENERATORS, PrefetchingNoise, make_generator
from sdrt.runtime.session import Session
from sdrt.runtime.tokenizer import ClipTokenizer
from sdrt.runtime.validation import Limits

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


def _internal_error(what: str) -> InternalError:
    """The error for the exception being handled: logged with its traceback under a new request id."""
    error = InternalError(what)
    log.exception("request %s: %s failed unexpectedly", error.request_id, what)
    return error


def describe_text(text: str, most: int = 60) -> str:
    return repr(text) if len(text) <= most else f"{text[:most]!r}... ({len(text):,} characters)"


@dataclass(frozen=True)
class SkipLayerGuidance:
    """diffusers' SD 3 skip-layer guidance for one call: blocks to skip, scale, and the fraction of steps it spans."""

    layers: tuple[int, ...]
    scale: float
    start: float
    stop: float

    def active(self, i: int, steps: int) -> bool:
        return steps * self.start < i < steps * self.stop  # diffusers' test, on the step index

    def mask(self, blocks: int) -> np.ndarray:
        mask = np.zeros(blocks, np.float32)
        mask[list(self.layers)] = 1.0
        return mask


@dataclass
class GenerationResult:
    images: np.ndarray | None  # (batch, height, width, 3) uint8; None with output_type="latent"
    seed: int  # the seed of the generator used (drawn at random when none was given)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; "unet_steps" per step
    latents: np.ndarray | None = None  # the final latents with output_type="latent" (for a refiner's image=)
    loras: list[dict] = field(default_factory=list)  # the adapters applied: name, sha256, scale
    # What the call did that the caller may not expect, e.g. a prompt truncated to the text encoder's tokens.
    warnings: list[str] = field(default_factory=list)

    def to_pil(self) -> list:
        from PIL import Image

        if self.images is None:
            raise InputError("to_pil: expected images, got latents (the call asked for output_type='latent')")
        return [Image.fromarray(image) for image in self.images]

    def save(self, path: Path) -> list[Path]:
        """Save as PNG: ``path`` itself for one image, ``stem-0.png``, ``stem-1.png``, ... for several."""
        path = Path(path)
        if len(self.images) == 1:
            paths = [path]
        else:
            paths = [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(len(self.images))]
        path.parent.mkdir(parents=True, exist_ok=True)
        for image, p in zip(self.to_pil(), paths):
            image.save(p)
        return paths


OUTPUT_TYPES = ("uint8", "latent")
MICRO_ARGUMENTS = (  # SDXL's micro-conditioning arguments of __call__
    "original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score",
)  # fmt: skip


@dataclass
class Request:
    """One call's arguments, checked and completed with the model's defaults."""

    prompts: list[str]
    negatives: list[str] | None  # None: the family's zeroed negative conditioning (SDXL force_zeros_for_empty_prompt)
    images_per_prompt: int
    height: int
    width: int
    task: str  # text-to-image, image-to-image, inpainting
    guided: bool  # classifier-free guidance (two UNet rows per image)
    guidance_scale: float
    image: np.ndarray | None = None  # NCHW in [-1, 1], or latents (image-to-image from a base model's latents)
    mask: np.ndarray | None = None  # N1HW in {0, 1}: 1 = repaint
    strength: float = 1.0
    denoising_start: float | None = None
    denoising_end: float | None = None
    micro: dict = field(default_factory=dict)  # SDXL: original_size, crops_coords_top_left, target_size, scores
    # Per text encoder, in the family's order: its prompts and negative prompts (prompt_2, prompt_3 ...);
    # empty: every encoder takes ``prompts`` / ``negatives``.
    prompt_sets: tuple = ()
    negative_sets: tuple = ()
    t5_length: int = 0  # SD 3: T5's tokens per prompt (max_sequence_length)

    def texts(self, index: int, negatives: list[str] | None) -> list[str]:
        """The prompts, then the negative prompts (``negatives``: those of the first encoder, or none), of text
        encoder ``index``."""
        prompts = self.prompt_sets[index] if self.prompt_sets else self.prompts
        if not negatives:
            return list(prompts)
        own = self.negative_sets[index] if self.negative_sets else None
        return list(prompts) + list(own if own is not None else negatives)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.images_per_prompt


@dataclass
class Conditioning:
    """Everything the UNet takes besides the latents and the timestep, rows in the UNet's batch layout."""

    feed: dict[str, np.ndarray]  # encoder_hidden_states, and text_embeds/time_ids/timestep_cond where taken


@dataclass
class Latents:
    """The denoising loop's start: latents, and for inpainting what each step mixes in."""

    latents: np.ndarray
    mask: np.ndarray | None = None  # latent-size mask (unguided rows)
    masked_image_latents: np.ndarray | None = None  # 9-channel UNets
    image_latents: np.ndarray | None = None  # 4-channel UNets: the known region, re-noised each step
    noise: np.ndarray | None = None


@dataclass(eq=False)
class _Job:
    """One checked call on its way through the stages (``Pipeline._prepare`` -> ``_execute``)."""

    request: Request
    run: Any  # the scheduler's per-call state
    steps: int
    seed: int
    generator: Any
    latents: np.ndarray | None  # given initial latents
    shape: tuple[int, int, int, int]
    output_type: str
    callback: StepCallback | None
    t_start: float
    adapters: lora.AdapterSet = lora.BASE
    control: control.Control | None = None  # ControlNet images, scales and windows
    timings: dict = field(default_factory=dict)
    sessions: dict | None = None  # the base's sessions, with the adapter set's for the components it changes
    cond: Conditioning | None = None
    start: Latents | None = None
    noise: Any = None
    x: np.ndarray | None = None  # the latents during the loop
    extra: np.ndarray | None = None  # a 9-channel UNet's mask and masked-image latents, in its rows
    pred: np.ndarray | None = None
    text_pred: np.ndarray | None = None  # the prompt's half of a guided prediction (skip-layer guidance)
    out: np.ndarray | None = None
    images: np.ndarray | None = None
    error: SdrtError | None = None
    warnings: list[str] = field(default_factory=list)
    slg: SkipLayerGuidance | None = None  # SD 3's skip-layer guidance, when asked for and guided

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share UNet calls: same latent size, steps, timesteps, adapter set, UNet (the
        one taking ControlNet residuals, or the plain one), and text length (SD 3's T5 tokens, max_sequence_length:
        the transformer's text rows are one tensor)."""
        timesteps = np.asarray(self.run.timesteps[: self.steps]).tobytes()
        slg = None if self.slg is None else (self.slg.layers, self.slg.start, self.slg.stop)
        return (
            self.shape[2:], self.steps, timesteps, self.adapters.key, self.control is not None, self.request.t5_length,
            slg,
        )  # fmt: skip


class ZeroResiduals:
    """The plain UNet's session, run by the UNet that takes ControlNet residuals with every residual zero (x + 0 is
    x): a pipeline with ControlNets keeps one UNet in memory, not two (SD 1.5: 3.4 GB less). The zero arrays are
    kept per shape."""

    def __init__(self, inner: Session, plain: Component, specs: tuple, manifest: Manifest, zeros: dict | None = None):
        self.name, self.inputs, self.outputs = plain.name, plain.inputs, plain.outputs
        self.engine = getattr(inner, "engine", None)
        self._inner, self._specs, self._manifest = inner, specs, manifest
        self._zeros: dict[tuple, dict[str, np.ndarray]] = {} if zeros is None else zeros

    def over(self, inner: Session) -> ZeroResiduals:
        """The same, run by ``inner`` (an adapter set's unet_control), sharing the zero arrays."""
        plain = self._manifest.components["unet"]
        return ZeroResiduals(inner, plain, self._specs, self._manifest, self._zeros)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["sample"]
        zeros = self._zeros.get(x.shape)
        if zeros is None:
            zeros = control.zero_residuals(self._manifest.model_dims, self._specs, x.shape[0], *x.shape[2:])
            if len(self._zeros) >= 8:
                self._zeros.clear()
            self._zeros[x.shape] = zeros
        return self._inner.run({**feed, **zeros})

    def close(self) -> None:  # the session is unet_control's, closed as that
        self._zeros.clear()


class StepTimes:
    """Per-step wall times, kept out of the loop's way: ``mark(name)`` closes the current segment."""

    def __init__(self):
        self.segments: dict[str, list[float]] = {}
        self._t = time.perf_counter()

    def start(self) -> None:
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.segments.setdefault(name, []).append(now - self._t)
        self._t = now

    def into(self, timings: dict) -> None:
        prepare, unet, combine, step = (self.segments.get(k, []) for k in ("prepare", "unet", "guidance", "scheduler"))
        control = self.segments.get("controlnet", [])
        timings["unet_calls"] = unet  # the UNet engine call of each step
        timings["scheduler_steps"] = step  # the scheduler's step (and inpainting's blend)
        timings["step_overhead"] = [a + b + c for a, b, c in zip(prepare, combine, step)]  # all but the models
        if control:  # the ControlNets' calls of each step (and their residuals' scaling and sum)
            timings["controlnet_calls"] = control
        whole = [u + o + c for u, o, c in zip(unet, timings["step_overhead"], control or [0.0] * len(unet))]
        timings["unet_steps"] = whole  # each whole step
        timings["denoise"] = sum(timings["unet_steps"])
        timings["scheduler_and_guidance"] = sum(timings["step_overhead"])


class Pipeline:
    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        sessions: dict[str, Session],
        backend: str,
        scheduler: str | None,
        precision: str = "fp32",
        load_timings: dict[str, float] | None = None,
        limits: Limits | None = None,
        open_adapted: Callable[[str, Mapping[str, np.ndarray]], Session] | None = None,
        lora_limits: lora.LoraLimits | None = None,
    ):
        self.root, self.manifest, self.sessions, self.backend = root, manifest, sessions, backend
        self.limits = limits or Limits()  # what one call may ask for (sdrt.runtime.validation)
        self.precision = precision  # the compute precision the backend was asked for (fp32 unless told)
        self.choice = (
            f"{backend} {precision}"  # what runs and why (Pipeline.load: as asked, or backend="auto"'s choice)
        )
        self.load_timings = dict(load_timings or {})  # seconds: manifest check and each component's session
        self.family: Family = manifest.model_family
        self.dims: ModelDims = manifest.model_dims
        self.tokenizers = {}
        for role in self.family.text_encoders:
            info = manifest.tokenizers[role.tokenizer]
            self.tokenizers[role.tokenizer] = ClipTokenizer.from_tokenizer_dir(
                root / info.path, info.max_length, info.pad_token_id
            )
        self._sized_tokenizers: dict[tuple[str, int], ClipTokenizer] = {}  # SD 3's T5 at other token counts
        self.scheduler_config = schedulers.read_config(root / manifest.scheduler_config)
        self.scheduler = schedulers.from_config(self.scheduler_config, scheduler)
        # LoRA adapters: files by registered name (register_lora) or path, and sessions per adapter set.
        self.loras = lora.Registry(lora_limits or lora.LoraLimits())
        self.lora_paths = True  # a call may name adapter files by path (sdrt serve turns this off)
        own = {name for name, session in sessions.items() if not isinstance(session, ZeroResiduals)}
        self.adapters = lora.AdapterSessions(
            root, manifest, open_adapted or self._no_adapted, self.loras.limits, components=own
        )
        self._last_adapters: tuple = ()
        self.adapter_switches = 0
        self.controlnets: list[Session] = []  # ControlNet sessions (Pipeline.load(controlnets=...)), in order
        self.control_embeddings: list[Session] = []  # their conditioning embeddings' sessions, run once per call
        self.control_specs: tuple = ()  # the residuals they hand unet_control (families.control_residual_specs)

    def _no_adapted(self, component: str, weights) -> Session:
        raise InputError(
            "loras: this pipeline was built without a backend to open adapted sessions (use Pipeline.load)"
        )

    def register_lora(self, name: str, path: str | Path) -> lora.LoraFile:
        """Make the adapter file at ``path`` known as ``name`` (read and checked now, against these artifacts)."""
        found = self.loras.file(Path(path))
        self.adapters.check(lora.AdapterSet(((found, 1.0),)))
        return self.loras.register(name, path)

    @staticmethod
    def components_of(manifest: Manifest) -> tuple[str, ...]:
        """The components a pipeline opens: every one the artifacts have (the VAE encoder is optional)."""
        return tuple(c for c in manifest.model_family.components() if c in manifest.components)

    @classmethod
    def load(
        cls,
        artifacts: str | Path,
        backend: str = "onnxruntime",
        scheduler: str | None = None,
        verify_hashes: bool = True,
        threads: int = 0,
        cuda_graph: bool = False,
        trt_ranges: ShapeRanges | None = None,
        precision: str | None = None,
        cache: bool = True,
        components: tuple[str, ...] | list[str] | None = None,
        limits: Limits | None = None,
        lora_limits: lora.LoraLimits | None = None,
        controlnets: Sequence[str | Path] | None = None,
    ) -> Pipeline:
        """Open an artifact directory written by ``sdrt export`` (checks schema and file hashes first),
        or an optimum ONNX export, on ``backend`` (see ``sdrt.runtime.backends``).

        ``precision``: the compute precision (``fp32``, the default for a named backend, runs every graph in
        its exported types; ``bf16`` on CPUs that have it, backend ``openvino``); asking for one the backend or
        CPU lacks, or one that failed its check on this CPU when ``sdrt engines`` measured it, is an error,
        never a silent change. ``backend="auto"``: the backend and precision ``sdrt engines`` measured fastest
        among those that passed their check on this CPU (in ``precision`` when given; ``sdrt.runtime.choice``),
        or onnxruntime fp32 without such a record; ``pipe.choice`` says which and why. ``cache``: use and fill
        the per-machine compiled-graph caches
        under ``engines/``. ``trt_ranges``: the shape ranges onnxruntime's TensorRT provider builds its
        engines for (backend ``onnxruntime-tensorrt``; default 1-4 images, 256-1024 px). ``components``:
        open only these (the text encoders and the UNet always), e.g. no VAE decoder for an SDXL base that
        hands latents to its refiner; a call that needs one not opened is refused, naming it. ``limits``:
        the most one call may ask for (images, steps, pixels; see ``sdrt.runtime.validation.Limits``).
        ``lora_limits``: adapters per call, file size, rank, and how many adapter sets keep their sessions
        (``sdrt.runtime.lora.LoraLimits``). ``controlnets``: ControlNet artifact directories (``sdrt export
        --controlnet``), each checked to fit the model; the model's artifacts need ``unet_control`` (``sdrt export
        --controlnet-unet``), which then runs in place of the UNet (calls without a ``control_image``: zero residuals)."""
        t_start = t0 = time.perf_counter()
        root = Path(artifacts)
        if backend != choice.AUTO:
            precision = precision or "fp32"
            backends.check_usable(backends.get(backend), precision)
        manifest = Manifest.load(root, verify_hashes=verify_hashes)
        timings = {"manifest": time.perf_counter() - t0}
        if backend == choice.AUTO:  # picks only candidates that passed here: nothing for refusal() to refuse
            resolved = choice.resolve(root, manifest, precision)
            backend, precision, why = resolved.backend, resolved.precision, resolved.why
            backends.check_usable(backends.get(backend), precision)
        else:
            assert precision is not None
            why = f"{backend} {precision}, as asked"
            refused = choice.refusal(root, manifest, backend, precision)
            if refused:
                raise BackendError(refused)
        record = backends.get(backend)
        options = backends.LoadOptions(threads, precision, cuda_graph, trt_ranges, cache)
        names = cls.components_of(manifest)
        if components is not None:
            family = manifest.model_family.components()
            unknown = sorted(set(components) - set(family))
            if unknown:
                raise InputError(f"components: expected names from {', '.join(family)}, got {unknown}")
            optional = ("vae_decoder", "vae_encoder", *manifest.model_family.optional_text_encoders())
            names = tuple(c for c in names if c in components or c not in optional)
        # ControlNets are checked before anything is opened: each fits the model, which has unet_control
        nets = []
        for k, folder in enumerate(controlnets or ()):
            cn = ControlNetManifest.load(Path(folder), verify_hashes=verify_hashes)
            cn.check_fits(manifest, where=f"controlnets[{k}] ({folder})")
            nets.append((Path(folder), cn))
        if nets and "unet_control" not in manifest.components:
            raise ArtifactError(
                f"controlnets: expected the model's UNet that takes ControlNet residuals (unet_control) in "
                f"{root}, found none (re-export the model with `sdrt export --controlnet-unet`)"
            )
        if nets:  # one UNet in memory: calls without a control image run unet_control with zero residuals
            names = tuple("unet_control" if n == "unet" else n for n in names)
        sessions: dict[str, Session] = {}
        opened: list[Session] = []
        embeddings: list[Session] = []
        try:
            for name in names:
                t0 = time.perf_counter()
                sessions[name] = record.open(root, manifest, manifest.components[name], options)
                timings[name] = time.perf_counter() - t0
            for k, (folder, cn) in enumerate(nets):
                t0 = time.perf_counter()
                embeddings.append(record.open(folder, manifest, cn.embedding, options))
                opened.append(record.open(folder, manifest, cn.component, options))
                timings[f"controlnet_{k}"] = time.perf_counter() - t0
        except BaseException:
            for session in (*sessions.values(), *opened, *embeddings):
                session.close()
            raise
        specs = families.control_residual_specs(manifest.model_dims) if nets else ()
        if nets:
            sessions["unet"] = ZeroResiduals(sessions["unet_control"], manifest.components["unet"], specs, manifest)

        def open_adapted(name: str, weights: Mapping[str, np.ndarray]) -> Session:
            return record.open(root, manifest, manifest.components[name], dataclasses.replace(options, weights=weights))

        pipe = cls(root, manifest, sessions, backend, scheduler, precision, timings, limits, open_adapted, lora_limits)
        pipe.choice = why
        pipe.controlnets = opened
        pipe.control_embeddings = embeddings
        pipe.control_specs = specs
        pipe.load_timings["total"] = time.perf_counter() - t_start
        return pipe

    def graph_precisions(self) -> dict[str, str]:
        """Each component's graph precision as exported (fp32, fp16, fp16+fp32-attention, int8)."""
        return {name: self.manifest.components[name].precision for name in self.sessions}

    def close(self) -> None:
        for session in (*self.sessions.values(), *self.controlnets, *self.control_embeddings):
            session.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the call ----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        strength: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        scheduler: str | None = None,
        rng: str = "torch",
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output_type: str = "uint8",
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        callback: StepCallback | None = None,
        loras: Sequence[tuple[str | Path, float]] | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | Sequence[float] | None = None,
        control_guidance_start: float | Sequence[float] = 0.0,
        control_guidance_end: float | Sequence[float] = 1.0,
        guess_mode: bool = False,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        max_sequence_length: int | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float | None = None,
        skip_layer_guidance_start: float | None = None,
        skip_layer_guidance_stop: float | None = None,
    ) -> GenerationResult:
        """Generate images; arguments as diffusers' pipelines for the model's family and the task.

        ``prompt_2`` / ``prompt_3`` (and their negatives): the prompts of the second and third text encoder (SDXL's
        CLIP-G; SD 3's CLIP-G and T5), each defaulting to ``prompt`` (``negative_prompt``). ``max_sequence_length``
        (SD 3): T5's tokens per prompt, default 256, at most 512. ``skip_guidance_layers`` (SD 3 text-to-image, as
        diffusers' StableDiffusion3Pipeline; SD 3.5 Medium is run with [7, 8, 9]): at the steps i with start * n <
        i < stop * n (``skip_layer_guidance_start`` 0.01, ``..._stop`` 0.2), one more transformer call on the
        prompt's rows with those blocks skipped, and the prediction moved by ``skip_layer_guidance_scale`` (2.8)
        times (text - that call's), as diffusers does (guided calls only).

        The task follows from the inputs: ``image`` makes it image-to-image (a PIL image, a path, a NumPy
        array, or a list of them; or latents of shape (n, latent channels, h, w), e.g. an SDXL base's
        ``output_type="latent"`` result for its refiner), ``image`` and ``mask_image`` (white = repaint)
        make it inpainting. ``strength`` (0, 1]: how far the image is noised (default: diffusers' for the
        task and family). ``denoising_end`` / ``denoising_start`` (0, 1): stop or start at that fraction of
        the schedule, diffusers' ensemble-of-experts handoff from an SDXL base to its refiner.
        ``output_type="latent"`` returns latents instead of images. SDXL's micro-conditioning:
        ``original_size``, ``crops_coords_top_left``, ``target_size`` (default: the output size) and, for
        the refiner, ``aesthetic_score`` / ``negative_aesthetic_score``. ``num_inference_steps`` and
        ``guidance_scale`` default to diffusers' for the family and task (50 steps; guidance 7.5,
        SDXL 5.0 but 7.5 for inpainting; LCM 4 steps at 8.5); guidance applies above 1.0.

        ``seed`` drives every random draw. With ``rng="torch"`` (default) the stream equals
        ``torch.Generator("cpu").manual_seed(seed)``, so the same seed gives diffusers' image; ``rng="numpy"``
        uses NumPy's PCG64 instead. ``latents`` replaces the initial noise draw. ``scheduler`` overrides the
        model's sampler by name (see ``sdrt.runtime.schedulers``).

        ``loras``: LoRA adapters for this call, ``[(registered name or path to a .safetensors file, scale),
        ...]``; empty or None is the base model. The first call with a set merges its weights and opens
        sessions for the components it changes; later calls with that set reuse them (see ``LoraLimits``).

        ControlNet (a pipeline loaded with ``controlnets=``; a call without ``control_image`` runs the model alone:
        unet_control with zero residuals), as diffusers' ControlNet pipelines: ``control_image``
        (one image per ControlNet, or a list; PIL, path or NumPy as ``image``; in [0, 1], resized to the output
        size; without ``height``/``width`` the output takes the first control image's size, rounded down to the
        VAE's scale factor), ``controlnet_conditioning_scale`` (default as diffusers' pipeline for the task: 1.0, image-to-image
        0.8, inpainting 0.5), ``control_guidance_start`` / ``control_guidance_end`` (each a
        number or one per ControlNet) and ``guess_mode`` (the ControlNets see only the prompt's rows, their
        residuals scaled from 0.1 at the first to 1 at the mid block).

        Every argument is checked before anything the size of an image is allocated: a bad one raises
        ``InputError`` naming it, a request beyond ``self.limits`` raises ``BudgetError``, and a component
        whose output holds NaN or infinity raises ``NumericalError`` (never a black image). One pipeline
        may be called from many threads; each call's result equals what it would be alone.
        """
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        job = self._prepare(args, time.perf_counter())
        (result,) = self._execute([job])
        if isinstance(result, SdrtError):
            raise result
        return result

    def run_batch(self, calls: Sequence[Mapping[str, Any]]) -> list[GenerationResult | SdrtError]:
        """Run many calls (each a dict of ``__call__``'s keyword arguments) as few batched UNet and VAE calls.

        Calls whose denoising loops line up (same latent size, number of steps and timesteps) share one
        UNet call per step and one VAE decode; others run in groups of their own. Each call's result equals
        what ``self(**call)`` returns alone (its own seed, guidance, prompts); a call's own error (bad
        arguments, NaN in its rows) comes back in its slot instead of being raised. ``timings`` carry the
        shared stage times and ``batch_size``, the images in the call's group."""
        t_start = time.perf_counter()
        results: list[GenerationResult | SdrtError | None] = [None] * len(calls)
        groups: dict[tuple, list[tuple[int, _Job]]] = {}
        for i, call in enumerate(calls):
            try:
                job = self._prepare(_call_arguments(call), t_start)
            except SdrtError as e:
                results[i] = e
                continue
            except Exception:  # not a refusal sdrt names: logged with an id, answered without the library's text
                results[i] = _internal_error("checking a call's arguments")
                continue
            groups.setdefault(job.key, []).append((i, job))
        for members in groups.values():
            try:
                outcomes = self._execute([job for _, job in members])
            except SdrtError as e:  # a backend failure sdrt names: every call of the group gets it
                outcomes = [e] * len(members)
            except Exception:
                if len(members) == 1:
                    outcomes = [_internal_error("generation")]
                else:  # which call failed is unknown: each runs again alone (from its own seed), failing only itself
                    log.warning("a group of %d calls failed unexpectedly: running each alone", len(members))
                    outcomes = [self._alone(calls[i], t_start) for i, _ in members]
            for (i, _), outcome in zip(members, outcomes):
                results[i] = outcome
        return results  # type: ignore[return-value]

    def _alone(self, call: Mapping[str, Any], t_start: float) -> GenerationResult | SdrtError:
        try:
            (outcome,) = self._execute([self._prepare(_call_arguments(call), t_start)])
            return outcome
        except SdrtError as e:
            return e
        except Exception:
            return _internal_error("generation")

    def _prepare(self, a: dict, t_start: float) -> _Job:
        """Check one call's arguments and complete them with the model's defaults; nothing heavy runs."""
        task = _task(a["image"], a["mask_image"])
        defaults = self.family.defaults(self.dims, task)
        steps = defaults["num_inference_steps"] if a["num_inference_steps"] is None else a["num_inference_steps"]
        guidance = defaults["guidance_scale"] if a["guidance_scale"] is None else a["guidance_scale"]
        micro = {k: a[k] for k in MICRO_ARGUMENTS}
        self._check_scalars(
            steps, guidance, a["num_images_per_prompt"], a["seed"], a["eta"], a["scheduler"], a["rng"],
            a["output_type"], a["callback"], micro,
        )  # fmt: skip
        height, width = a["height"], a["width"]
        if self.controlnets and a["control_image"] is not None and (height is None or width is None):
            # as diffusers' ControlNet pipelines: the output (and an image to repaint) takes the control image's
            # size, rounded down to the VAE's scale factor
            own = _own_size(a["control_image"], self.dims.vae_scale_factor)
            if own is not None:
                f = self.dims.vae_scale_factor
                height, width = height or max(f, own[0] - own[0] % f), width or max(f, own[1] - own[1] % f)
        request = self._request(
            a["prompt"], a["negative_prompt"], a["image"], a["mask_image"], a["strength"], height, width,
            guidance, a["num_images_per_prompt"], a["denoising_start"], a["denoising_end"], micro,
        )  # fmt: skip
        request = self._text_arguments(request, a)
        name = a["scheduler"]
        sched = self.scheduler if name is None else schedulers.from_config(self.scheduler_config, name)
        run, n = self.schedule(sched, steps, request, a["eta"])
        shape = self.latent_shape(request.batch, request.height, request.width)
        latents = a["latents"]
        if latents is not None:
            if request.task == "image-to-image":
                raise InputError("latents: image-to-image noises the encoded image; give a seed instead of latents")
            latents = validation.finite_array("latents", latents, shape=shape)
        if a["loras"] and self.family.denoiser != "unet":
            raise lora.LoraError(f"loras: LoRA adapters are for UNet models so far, not {self.family.name}")
        adapters = self.loras.adapter_set(a["loras"], allow_paths=self.lora_paths)
        self.adapters.check(adapters)
        seed = int(np.random.SeedSequence().entropy % 2**63) if a["seed"] is None else int(a["seed"])
        generator = make_generator(seed, a["rng"])
        job = _Job(request, run, n, seed, generator, latents, shape, a["output_type"], a["callback"], t_start)
        job.warnings = self._truncation_warnings(request)
        job.slg = self._skip_layer_guidance(a, request, job.warnings)
        if request.task == "inpainting":
            own = _own_size(a["mask_image"], 1)
            if own is not None and tuple(own) != (request.height, request.width):
                job.warnings.append(
                    f"mask_image: resized from {own[1]}x{own[0]} to the output's {request.width}x{request.height} "
                    "(as diffusers does)"
                )
        job.adapters = adapters
        job.control = control.prepare(
            len(self.controlnets), a, request.batch, request.images_per_prompt, request.guided, request.height,
            request.width, self.dims.vae_scale_factor, request.task,
        )  # fmt: skip
        if adapters.items and "unet_control" in self.sessions and "unet_control" not in self.adapters.targets:
            if "unet" in self.manifest.components and self.manifest.components["unet"].lora_targets:
                raise lora.LoraError(
                    f"loras: the UNet taking ControlNet residuals (unet_control) in {self.root} has no LoRA map "
                    "(exported before sdrt recorded one): re-export the model with `sdrt export --controlnet-unet`"
                )
        return job

    def _execute(self, jobs: list[_Job]) -> list[GenerationResult | SdrtError]:
        """Run jobs whose loops line up: per-job prompts and starting latents, then one UNet call per step
        and one VAE decode for all. A job whose rows turn NaN fails alone, with its NumericalError."""
        adapted, info = self.adapters.sessions(jobs[0].adapters)  # jobs of one group share their adapter set
        sessions = {**self.sessions, **adapted}
        plain = self.sessions.get("unet")
        if isinstance(plain, ZeroResiduals) and "unet_control" in adapted:  # plain calls: the adapted unet_control
            sessions["unet"] = plain.over(adapted["unet_control"])
        if jobs[0].adapters.key != self._last_adapters:
            self._last_adapters = jobs[0].adapters.key
            self.adapter_switches += 1
            info["switch"] = True
        for job in jobs:
            job.sessions = sessions
            if job.adapters.items:
                job.timings["lora"] = info["seconds"]  # merging and opening sessions, ~0 when the set is cached
                job.timings["lora_cached"] = info["cached"]
            if info.get("switch"):
                job.timings["lora_switch"] = info["seconds"]
                job.timings["lora_switch_first"] = job is jobs[0]  # where a service counts the switch once
        for job in jobs:
            try:
                t0 = time.perf_counter()
                job.cond = self.encode_prompt(job.request, job.sessions)
                job.timings["text_encoder"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                job.start = self.prepare_latents(job.request, job.run, job.generator, job.latents, job.shape)
                job.timings["prepare_latents"] = time.perf_counter() - t0
            except SdrtError as e:  # this call's own failure (NaN from an encoder, images that do not tile)
                job.error = e
        self.denoise_jobs([job for job in jobs if job.error is None])
        decoding = [job for job in jobs if job.error is None and job.output_type != "latent"]
        if decoding:
            t0 = time.perf_counter()
            images = self.decode(
                np.concatenate([job.out for job in decoding]) if len(decoding) > 1 else decoding[0].out
            )
            rows = np.cumsum([0] + [job.out.shape[0] for job in decoding])
            seconds = time.perf_counter() - t0
            for job, lo, hi in zip(decoding, rows[:-1], rows[1:]):
                try:
                    self._check_finite("vae_decoder", {"image": images[lo:hi]})
                    job.images = to_uint8(images[lo:hi])
                except NumericalError as e:
                    job.error = e
                job.timings["vae_decoder"] = seconds
        batch = sum(job.request.batch for job in jobs)
        results: list[GenerationResult | SdrtError] = []
        for job in jobs:
            if job.error is not None:
                results.append(job.error)
                continue
            job.timings["total"] = time.perf_counter() - job.t_start
            if len(jobs) > 1:
                job.timings["batch_size"] = batch
            latent = job.out if job.output_type == "latent" else None
            results.append(
                GenerationResult(job.images, job.seed, job.timings, latent, job.adapters.describe(), job.warnings)
            )
        return results

    # -- checking the request ----------------------------------------------------------------------
    def _check_scalars(
        self, steps, guidance_scale, images_per_prompt, seed, eta, scheduler, rng, output_type, callback, micro
    ) -> None:
        """The arguments that are single values: types, finiteness, ranges; before anything is computed."""
        v, limits = validation, self.limits
        v.integer("num_inference_steps", steps, low=1, high=limits.max_steps)
        v.number(
            "guidance_scale", guidance_scale, low=0.0, high=v.MAX_GUIDANCE,
            hint=" (guidance applies above 1.0; 1.0 turns it off; models are run at 1 to 15)",
        )  # fmt: skip
        v.integer("num_images_per_prompt", images_per_prompt, low=1, high=limits.max_images)
        if seed is not None:
            v.integer("seed", seed, low=0, high=2**64 - 1)
        v.number("eta", eta, low=0.0)
        if scheduler is not None and not isinstance(scheduler, str):
            raise InputError(
                f"scheduler: expected a scheduler name (str) or None, got {validation.describe(scheduler)}"
            )
        v.choice("rng", rng, GENERATORS)
        v.choice("output_type", output_type, OUTPUT_TYPES)
        if callback is not None and not callable(callback):
            raise InputError(
                f"callback: expected a callable (steps done, total) or None, got {validation.describe(callback)}"
            )
        if output_type != "latent" and "vae_decoder" not in self.sessions:
            raise InputError(
                "output_type: images need the VAE decoder, which this pipeline was loaded without; "
                "load it (components=) or ask for output_type='latent'"
            )
        takes = {
            "sdxl": ("original_size", "crops_coords_top_left", "target_size"),
            "refiner": ("original_size", "crops_coords_top_left", "aesthetic_score", "negative_aesthetic_score"),
        }.get(self.family.micro_conditioning or "", ())
        for name, value in micro.items():
            if value is None:
                continue
            if name not in takes:
                applies = (
                    "SDXL base" if name == "target_size" else "the SDXL refiner" if "aesthetic" in name else "SDXL"
                )
                raise InputError(
                    f"{name}: applies to {applies} models, got {validation.describe(value)} for a {self.family.name} model"
                )
            if name.endswith("score"):
                v.number(name, value)
            else:
                v.pair(name, value, low=0 if name == "crops_coords_top_left" else 1)

    def _request(
        self, prompt, negative_prompt, image, mask_image, strength, height, width, guidance_scale,
        images_per_prompt, denoising_start, denoising_end, micro,
    ) -> Request:  # fmt: skip
        prompts = validation.prompts("prompt", prompt)
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None:
                validation.number(name, value, low=0.0, high=1.0, low_open=True, high_open=True)
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise InputError(
                f"denoising_start: expected less than denoising_end ({denoising_end}), got {denoising_start}"
            )
        for name, value in (("height", height), ("width", width)):
            if value is not None:
                validation.integer(
                    name, value, low=self.manifest.spatial_multiple,
                    hint=f" (a multiple of {self.manifest.spatial_multiple} pixels, or None for the default)",
                )  # fmt: skip
        task = _task(image, mask_image)
        if mask_image is not None and image is None:
            raise InputError("mask_image: inpainting needs the image to repaint too (image=...), got only the mask")
        if task == "text-to-image" and self.family.micro_conditioning == "refiner":
            raise InputError(
                f"image: the {self.family.name} model refines images (image-to-image); give image= (an image, or "
                "a base model's latents with denoising_start), got none"
            )
        if self.dims.inpainting and task != "inpainting":
            raise InputError(
                "mask_image: this model's UNet is an inpainting UNet (9 input channels); give image= and mask_image="
            )
        if task == "inpainting" and "inpainting" not in self.family.diffusers_classes:
            raise InputError(
                f"mask_image: inpainting is supported for {', '.join(families.inpainting_families())} models, "
                f"not {self.family.name}"
            )
        latents_given = (
            isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == self.dims.latent_channels
        )
        if task != "text-to-image" and not latents_given and "vae_encoder" not in self.sessions:
            where = "exported" if "vae_encoder" not in self.manifest.components else "loaded"
            raise InputError(f"image: {task} needs the VAE encoder, which this pipeline was {where} without")
        if denoising_start is not None and task == "text-to-image":
            raise InputError("denoising_start: expected with image= (the latents to continue from), got no image")

        if task == "inpainting":
            strength = self.family.inpainting_strength if strength is None else strength
        elif task == "image-to-image":
            strength = self.family.default_strength if strength is None else strength
        elif strength is not None:
            raise InputError(
                f"strength: applies to image-to-image and inpainting (give image=), got {validation.describe(strength)}"
            )
        else:
            strength = 1.0
        strength = validation.number("strength", strength, low=0.0, high=1.0, low_open=True)
        negatives = (
            None
            if negative_prompt is None
            else validation.prompts("negative_prompt", negative_prompt, count=len(prompts))
        )
        batch = len(prompts) * images_per_prompt
        default_h, default_w = self.manifest.default_height, self.manifest.default_width
        if self.family.img2img_default_size and task == "image-to-image":  # SD 3: resized to the default size
            height, width = height or default_h, width or default_w
        if task == "image-to-image" and (height is None or width is None):
            own = _own_size(image, self.dims.vae_scale_factor)  # read from the header: nothing decoded yet
            if own is not None:
                self.limits.check(self.dims.vae_kind, batch, height or own[0], width or own[1])
        else:  # the output size is known before any image is read: refuse an oversized or misfit request first
            self.limits.check(self.dims.vae_kind, batch, height or default_h, width or default_w)
            self.latent_shape(1, height or default_h, width or default_w)

        pixels = None
        if task != "text-to-image":
            pixels = self._image(image, height, width, task)
            if pixels.shape[1] == 3:
                height, width = pixels.shape[2], pixels.shape[3]
            else:  # latents
                height = pixels.shape[2] * self.dims.vae_scale_factor
                width = pixels.shape[3] * self.dims.vae_scale_factor
        height = default_h if height is None else height
        width = default_w if width is None else width
        self.latent_shape(1, height, width)  # checks the size
        self.limits.check(self.dims.vae_kind, batch, height, width)
        self._check_profiles(batch, height, width, guidance_scale > 1.0 and not self.dims.time_cond_dim)
        mask = conditioning.preprocess_mask(mask_image, height, width) if task == "inpainting" else None

        guided = guidance_scale > 1.0 and not self.dims.time_cond_dim
        if negatives is None:
            negatives = [""] * len(prompts)
            if self.manifest.pipeline_options.get("force_zeros_for_empty_prompt"):
                negatives = None
        request_micro = {}
        if self.family.micro_conditioning:
            size = (height, width)
            request_micro = {
                "original_size": tuple(micro["original_size"] or size),
                "crops_coords_top_left": tuple(micro["crops_coords_top_left"] or (0, 0)),
                "target_size": tuple(micro["target_size"] or size),
                "aesthetic_score": 6.0 if micro["aesthetic_score"] is None else float(micro["aesthetic_score"]),
                "negative_aesthetic_score": 2.5
                if micro["negative_aesthetic_score"] is None
                else float(micro["negative_aesthetic_score"]),
            }
        return Request(
            prompts, negatives, images_per_prompt, height, width, task, guided, float(guidance_scale),
            pixels, mask, strength, denoising_start, denoising_end, request_micro,
        )  # fmt: skip

    def _text_arguments(self, request: Request, a: dict) -> Request:
        """``prompt_2``/``prompt_3`` (and negatives) per text encoder, and SD 3's ``max_sequence_length``: refused
        for a model without that encoder, counted against ``prompt``."""
        roles = self.family.text_encoders
        n = len(request.prompts)
        prompt_sets, negative_sets = [request.prompts], [request.negatives]
        for k, (pname, nname) in enumerate((("prompt_2", "negative_prompt_2"), ("prompt_3", "negative_prompt_3")), 2):
            for name in (pname, nname):
                if a[name] is not None and len(roles) < k:
                    raise InputError(
                        f"{name}: applies to models with {k} text encoders or more (SDXL, SD 3), this "
                        f"{self.family.name} model has {len(roles)}; got {validation.describe(a[name])}"
                    )
            if len(roles) >= k:
                given = a[pname]
                prompt_sets.append(request.prompts if given is None else validation.prompts(pname, given, count=n))
                given = a[nname]
                if request.negatives is None:
                    negative_sets.append(None)
                else:
                    negative_sets.append(
                        request.negatives if given is None else validation.prompts(nname, given, count=n)
                    )
        t5 = any(role.kind == "t5" for role in roles)
        length = a["max_sequence_length"]
        if length is not None and not t5:
            raise InputError(
                f"max_sequence_length: applies to models with a T5 text encoder (SD 3), not {self.family.name}; "
                f"got {validation.describe(length)}"
            )
        if t5:
            length = self.dims.t5_default_length if length is None else length
            validation.integer("max_sequence_length", length, low=1, high=T5_MAX_TOKENS)
        return dataclasses.replace(
            request, prompt_sets=tuple(prompt_sets), negative_sets=tuple(negative_sets), t5_length=int(length or 0)
        )

    @property
    def skip_mask_blocks(self) -> int:
        """The blocks of the denoiser's skip_layers mask (SD 3's transformer graph), 0 for a graph without one (a
        UNet, or a transformer exported before sdrt had the mask)."""
        inputs = [t.name for t in self.manifest.components[self.family.denoiser].inputs]
        return self.dims.transformer_layers if "skip_layers" in inputs else 0

    def _skip_layer_guidance(self, a: dict, request: Request, warnings: list[str]) -> SkipLayerGuidance | None:
        """SD 3's skip-layer guidance arguments, checked; None when not asked for (or without guidance, where
        diffusers ignores them: a warning says so)."""
        names = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
                 "skip_layer_guidance_stop")  # fmt: skip
        given = [n for n in names if a[n] is not None]
        if not given:
            return None
        if self.family.denoiser != "transformer":
            raise InputError(f"{given[0]}: applies to SD 3 models (a transformer's blocks), not {self.family.name}; "
                             f"got {validation.describe(a[given[0]])}")  # fmt: skip
        blocks = self.skip_mask_blocks
        if not blocks:
            raise InputError(f"{given[0]}: this transformer graph takes no skip_layers mask (exported by an "
                             "earlier sdrt): re-export the model with `sdrt export`")  # fmt: skip
        layers = a["skip_guidance_layers"]
        if layers is None:
            raise InputError(f"{given[0]}: applies with skip_guidance_layers (the blocks to skip), got none")
        if request.task != "text-to-image":
            raise InputError(
                f"skip_guidance_layers: applies to text-to-image (diffusers' SD 3 image-to-image and inpainting "
                f"pipelines take none), got it for {request.task}"
            )
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool) and 0 <= k < blocks for k in layers)
            or len(set(layers)) != len(layers)
        ):
            raise InputError(
                f"skip_guidance_layers: expected a non-empty list of distinct block indices in [0, {blocks - 1}] (SD "
                f"3.5 Medium is run with [7, 8, 9]), got {validation.describe(layers)}"
            )
        scale = a["skip_layer_guidance_scale"]
        scale = validation.number("skip_layer_guidance_scale", 2.8 if scale is None else scale, low=0.0,
                                  high=validation.MAX_GUIDANCE)  # fmt: skip
        start, stop = (0.01 if a["skip_layer_guidance_start"] is None else a["skip_layer_guidance_start"],
                       0.2 if a["skip_layer_guidance_stop"] is None else a["skip_layer_guidance_stop"])  # fmt: skip
        start = validation.number("skip_layer_guidance_start", start, low=0.0, high=1.0)
        stop = validation.number("skip_layer_guidance_stop", stop, low=0.0, high=1.0)
        if not request.guided:
            warnings.append("skip_guidance_layers: no effect without guidance (guidance_scale > 1), as in diffusers")
            return None
        return SkipLayerGuidance(tuple(int(k) for k in layers), float(scale), float(start), float(stop))

    def _truncation_warnings(self, request: Request) -> list[str]:
        """One line per prompt (or negative prompt) longer than its text encoder reads, naming what was cut."""
        warnings = [
            f"prompt{f'[{i}]' if len(request.prompts) > 1 else ''}: empty: the image follows no text"
            for i, text in enumerate(request.prompts)
            if not text.strip()
        ]
        for index, role in enumerate(self.family.text_encoders):
            if role.component not in self.sessions:
                continue
            kinds = [("prompt", request.texts(index, None))]
            if request.guided and request.negatives:
                kinds.append(("negative_prompt", request.texts(index, request.negatives)[len(request.prompts) :]))
            length = request.t5_length if role.kind == "t5" else 0
            tokenizer = self._sized_tokenizer(role, length)
            for what, texts in kinds:
                for i, cut in enumerate(tokenizer.dropped(texts)):
                    if cut:
                        where = f"{what}[{i}]" if len(texts) > 1 else what
                        warnings.append(
                            f"{where}: truncated to {tokenizer.max_length} tokens for {role.component} (its limit"
                            f"{', max_sequence_length' if role.kind == 't5' else ''}); not read: {describe_text(cut)}"
                        )
        return warnings

    def _sized_tokenizer(self, role, length: int = 0) -> ClipTokenizer:
        if role.kind != "t5" or not length or length == self.tokenizers[role.tokenizer].max_length:
            return self.tokenizers[role.tokenizer]
        key = (role.tokenizer, length)
        tokenizer = self._sized_tokenizers.get(key)
        if tokenizer is None:
            info = self.manifest.tokenizers[role.tokenizer]
            tokenizer = ClipTokenizer.from_tokenizer_dir(self.root / info.path, length, info.pad_token_id)
            self._sized_tokenizers[key] = tokenizer
        return tokenizer

    def _tokenize(self, role, texts: list[str], length: int = 0) -> np.ndarray:
        """Token ids of ``texts`` for ``role``; T5's at ``length`` tokens (a tokenizer per length, kept)."""
        return self._sized_tokenizer(role, length)(texts)

    def _check_profiles(self, batch: int, height: int, width: int, guided: bool) -> None:
        """Refuse, before any work, a size outside an engine's optimization profile (TensorRT sessions
        carry one; the onnxruntime and OpenVINO graphs take any size)."""
        f = self.dims.vae_scale_factor
        lh, lw = height // f, width // f
        wanted = {
            "unet": {"sample": (batch * (2 if guided else 1), self.dims.unet_in_channels, lh, lw)},
            "vae_decoder": {"latent": (batch, self.dims.latent_channels, lh, lw)},
            "vae_encoder": {"image": (batch, 3, height, width)},
        }
        for name, shapes in wanted.items():
            profile = getattr(self.sessions.get(name), "profile", None)
            if profile:
                graph = self.manifest.components[name].graph_names
                check_shapes(name, profile, {graph.get(k, k): v for k, v in shapes.items()})

    def _image(self, image, height, width, task) -> np.ndarray:
        """The image as the VAE encoder takes it, or latents given as the image (SDXL's base-to-refiner handoff)."""
        if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == self.dims.latent_channels:
            if task == "inpainting" or image.dtype != np.float32:
                raise InputError(
                    f"image: latents (float32, {self.dims.latent_channels} channels) are taken for image-to-image "
                    f"only, got {image.dtype} {image.shape} for {task}"
                )
            return validation.finite_array("image", image)
        multiple = self.dims.vae_scale_factor
        if task == "inpainting":  # diffusers' inpainting resizes to the requested (or default) size
            height = height or self.manifest.default_height
            width = width or self.manifest.default_width
        return conditioning.preprocess_image(image, height, width, multiple=multiple)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        m = self.manifest
        for name, value in (("height", height), ("width", width)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, np.integer))
                or value <= 0
                or value % m.spatial_multiple
            ):
                raise InputError(
                    f"{name}: expected a positive multiple of {m.spatial_multiple} pixels for this model, got {validation.describe(value)}"
                )
        most = self.dims.max_latent_size
        for name, value in (("height", height), ("width", width)):
            if most and int(value) // m.vae_scale_factor > most:
                raise InputError(
                    f"{name}: expected at most {most * m.vae_scale_factor} pixels (the {self.family.denoiser}'s "
                    f"position embeddings cover {self.dims.pos_embed_max_size} patches of {self.dims.patch_size} "
                    f"latents), got {value}"
                )
        return batch, m.latent_channels, int(height) // m.vae_scale_factor, int(width) // m.vae_scale_factor

    # -- schedule ----------------------------------------------------------------------------------
    def schedule(self, sched, num_inference_steps: int, request: Request, eta: float):
        """The scheduler's run for the request (img2img strength, or denoising_start's begin index) and
        how many of its steps to take (all, or up to denoising_end)."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
            raise InputError(
                f"num_inference_steps: expected an integer, got {validation.describe(num_inference_steps)}"
            )
        n_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if request.denoising_start is not None:
            full = sched.start(num_inference_steps, eta=eta)
            begin = conditioning.denoising_start_begin(full.timesteps, sched.order, n_train, request.denoising_start)
            run = sched.start(num_inference_steps, eta=eta, begin=begin)
        elif getattr(sched, "flow_matching", False):  # SD 3: the shift grows with the image's tokens (mu)
            mu = None
            if sched.config.get("use_dynamic_shifting"):
                f, patch = self.dims.vae_scale_factor, self.dims.patch_size
                mu = sched.mu((request.height // f // patch) * (request.width // f // patch))
            run = sched.start(num_inference_steps, strength=request.strength, eta=eta, mu=mu)
        else:
            run = sched.start(num_inference_steps, strength=request.strength, eta=eta)
        steps = len(run.timesteps)
        if request.denoising_end is not None:
            steps = conditioning.denoising_end_count(run.timesteps, n_train, request.denoising_end)
        if steps < 1:
            raise InputError(
                f"num_inference_steps: {num_inference_steps} steps at strength {request.strength} leave no step to run; "
                "raise the steps or the strength"
            )
        return run, steps

    # -- stage 1: the prompt -----------------------------------------------------------------------
    def encode_prompt(self, request: Request, sessions: Mapping[str, Session] | None = None) -> Conditioning:
        """Text conditioning in the UNet's batch layout: [unconditional rows, conditional rows] when guided,
        each prompt's row repeated ``images_per_prompt`` times consecutively (as diffusers). ``sessions``:
        the call's (an adapter set's text encoders), else the base's."""
        sessions = self.sessions if sessions is None else sessions
        if any(role.kind == "t5" for role in self.family.text_encoders):
            return self._encode_prompt_joint(request, sessions)
        roles, n = self.family.text_encoders, len(request.prompts)
        negatives = request.negatives if request.guided and request.negatives is not None else []
        hidden, pooled = [], None
        for index, role in enumerate(roles):
            texts = request.texts(index, negatives)
            out = sessions[role.component].run({"input_ids": self.tokenizers[role.tokenizer](texts)})
            self._check_finite(role.component, out)
            hidden.append(out[role.hidden_output])
            if role.pooled_output:
                pooled = out[role.pooled_output]
        embeds = np.concatenate(hidden, axis=-1) if len(hidden) > 1 else hidden[0]
        if request.guided:
            if request.negatives is None:  # SDXL's force_zeros_for_empty_prompt
                uncond, cond = np.zeros_like(embeds), embeds
                pooled_pair = None if pooled is None else (np.zeros_like(pooled), pooled)
            else:
                uncond, cond = embeds[n:], embeds[:n]
                pooled_pair = None if pooled is None else (pooled[n:], pooled[:n])
            rows = [uncond, cond]
        else:
            rows, pooled_pair = [embeds], None if pooled is None else (pooled,)
        k = request.images_per_prompt
        feed = {"encoder_hidden_states": np.concatenate([np.repeat(r, k, axis=0) for r in rows])}
        if pooled is not None:
            feed["text_embeds"] = np.concatenate([np.repeat(p, k, axis=0) for p in pooled_pair])
        feed.update(self._micro_conditioning(request, len(rows)))
        return Conditioning(feed)

    def _encode_prompt_joint(self, request: Request, sessions: Mapping[str, Session]) -> Conditioning:
        """SD 3's conditioning, as diffusers' StableDiffusion3Pipeline.encode_prompt: CLIP-L's and CLIP-G's
        penultimate hidden states side by side, zero-padded to T5's width, then T5's tokens (zeros without T5);
        their pooled projections side by side. Unconditional rows encode the negative prompt ("" by default)."""
        n, k = len(request.prompts), request.images_per_prompt
        negatives = (request.negatives or [""] * n) if request.guided else []
        length = request.t5_length or self.dims.t5_default_length
        hidden, pooled, t5 = [], [], None
        for index, role in enumerate(self.family.text_encoders):
            texts = request.texts(index, negatives)
            if role.kind == "t5":
                if role.component in sessions:
                    out = sessions[role.component].run({"input_ids": self._tokenize(role, texts, length)})
                    self._check_finite(role.component, out)
                    t5 = out[role.hidden_output]
                continue
            out = sessions[role.component].run({"input_ids": self.tokenizers[role.tokenizer](texts)})
            self._check_finite(role.component, out)
            hidden.append(out[role.hidden_output])
            pooled.append(out[role.pooled_output])
        clip = np.concatenate(hidden, axis=-1)
        width = self.dims.t5_hidden
        if t5 is None:  # without T5, as diffusers with text_encoder_3=None: zeros in its place
            t5 = np.zeros((clip.shape[0], length, width), np.float32)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, width - clip.shape[-1])))
        embeds = np.concatenate([clip, t5], axis=1)
        pooled_all = np.concatenate(pooled, axis=-1)
        if request.guided:  # [unconditional rows, conditional rows]
            rows, pooled_rows = [embeds[n:], embeds[:n]], [pooled_all[n:], pooled_all[:n]]
        else:
            rows, pooled_rows = [embeds], [pooled_all]
        feed = {
            "encoder_hidden_states": np.concatenate([np.repeat(r, k, axis=0) for r in rows]).astype(np.float32),
            "pooled_projections": np.concatenate([np.repeat(r, k, axis=0) for r in pooled_rows]).astype(np.float32),
        }
        return Conditioning(feed)

    def _micro_conditioning(self, request: Request, groups: int) -> dict[str, np.ndarray]:
        """SDXL's time_ids and LCM's guidance embedding, one row per UNet row."""
        extra, b = {}, request.batch
        m = request.micro
        if self.family.micro_conditioning == "sdxl":
            ids = conditioning.sdxl_time_ids(m["original_size"], m["crops_coords_top_left"], m["target_size"])
            extra["time_ids"] = np.repeat(ids, groups * b, axis=0)  # negative ids = positive ids
        elif self.family.micro_conditioning == "refiner":
            pos = conditioning.refiner_time_ids(m["original_size"], m["crops_coords_top_left"], m["aesthetic_score"])
            neg = conditioning.refiner_time_ids(
                m["original_size"], m["crops_coords_top_left"], m["negative_aesthetic_score"]
            )
            pairs = [neg, pos] if groups == 2 else [pos]
            extra["time_ids"] = np.concatenate([np.repeat(p, b, axis=0) for p in pairs])
        if self.dims.time_cond_dim:
            w = np.full((b,), request.guidance_scale - 1, dtype=np.float32)
            extra["timestep_cond"] = conditioning.guidance_scale_embedding(w, self.dims.time_cond_dim)
        return {k: v.astype(np.float32, copy=False) for k, v in extra.items()}

    # -- stage 2: the starting latents -------------------------------------------------------------
    def prepare_latents(self, request: Request, run, generator, latents: np.ndarray | None, shape) -> Latents:
        """Random draws in diffusers' order: text-to-image draws the noise; image-to-image samples the encoded
        image, then the noise; inpainting samples the image (4-channel UNets, or strength < 1), the noise,
        then the masked image."""
        scale = np.float32(run.init_noise_sigma)
        if request.task == "text-to-image":
            noise = generator.randn(shape) if latents is None else latents
            return Latents(noise * scale)
        if request.task == "image-to-image":
            image_latents = self._tile(self.encode_image(request.image, generator), request.batch)
            if request.denoising_start is not None:  # continuing a base model's run: no new noise
                return Latents(image_latents)
            return Latents(run.add_noise(image_latents, generator.randn(image_latents.shape), 0))
        # inpainting
        full_strength = request.strength == 1.0
        image_latents = None
        if not self.dims.inpainting or (latents is None and not full_strength):
            image_latents = self._tile(self.encode_image(request.image, generator), request.batch)
        if latents is None:
            noise = generator.randn(shape)
            start = noise * scale if full_strength else run.add_noise(image_latents, noise, 0)
        else:
            noise, start = latents, latents * scale
        masked = request.image * (request.mask < 0.5)
        lh, lw = shape[2], shape[3]
        mask = self._tile(conditioning.mask_to_latent(request.mask, lh, lw), request.batch)
        masked_latents = self._tile(self.encode_image(masked, generator), request.batch)
        if self.dims.inpainting:  # 9 channels: the UNet sees the mask and the masked image; no blending
            return Latents(start, mask, masked_latents, None, noise)
        return Latents(start, mask, None, image_latents, noise)

    def encode_image(self, image: np.ndarray, generator) -> np.ndarray:
        """Pixels in [-1, 1] -> scaled latents (a sample of the encoder's Gaussian, drawn from ``generator``);
        latents given as the image pass through."""
        if image.shape[1] == self.dims.latent_channels:
            return image
        out = self.sessions["vae_encoder"].run({"image": image.astype(np.float32, copy=False)})
        self._check_finite("vae_encoder", out)
        if self.dims.vae_kind == "tiny":  # AutoencoderTiny encodes to latents: nothing to sample
            latents = out["latent"]
        else:  # diffusers' DiagonalGaussianDistribution.sample
            mean, logvar = np.split(out["latent_parameters"], 2, axis=1)
            std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
            latents = mean + std * generator.randn(mean.shape)
        shift = float(self.manifest.vae.get("shift_factor") or 0.0)  # SD 3's VAE: (z - shift) * scale
        if shift:
            latents = latents - np.float32(shift)
        return (np.float32(self.manifest.vae_scaling_factor) * latents).astype(np.float32, copy=False)

    def _check_finite(self, component: str, outputs: dict[str, np.ndarray], where: str = "") -> None:
        """NumericalError naming the component, the step and the fix when an output holds NaN or infinity
        (an fp16 graph overflowing is the usual cause: diffusers would return a black image)."""
        for name, value in outputs.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                bad = int(value.size - np.count_nonzero(np.isfinite(value)))
                graph = self.manifest.components[component].precision
                if self.precision == "bf16" and not graph.startswith("fp16"):
                    fix = (
                        f"the graph is {graph}, computed in bf16, which has fp32's exponent range: no overflow, but "
                        f"a {self.backend} kernel computing wrong on this CPU; load with precision='fp32' (`sdrt "
                        "engines` checks every precision on this CPU, and backend 'auto' avoids one that fails)"
                    )
                elif graph.startswith("fp16") or self.precision != "fp32":
                    fix = (
                        f"the graph is {graph}, computed in {self.precision}: fp16/bf16 overflow is the usual cause; "
                        f"re-export it in fp32 (sdrt export --component-precision {component}=fp32) or load with "
                        "precision='fp32'"
                    )
                else:
                    fix = (
                        f"the graph is {graph}: check the inputs' scale (latents, guidance_scale) and the "
                        "artifacts (re-export)"
                    )
                raise NumericalError(
                    f"{component}{where}: expected finite values in output {name!r}, got {bad} NaN or infinite of "
                    f"{value.size} ({fix}); no image was returned"
                )

    @staticmethod
    def _tile(x: np.ndarray, batch: int) -> np.ndarray:
        """Repeat a batch of images' tensors to the request's batch (torch ``repeat``, as diffusers)."""
        if x.shape[0] == batch:
            return x
        if batch % x.shape[0]:
            raise InputError(f"image: expected 1 image or one per generated image ({batch}), got {x.shape[0]}")
        return np.tile(x, (batch // x.shape[0], 1, 1, 1))

    # -- stage 3: the loop -------------------------------------------------------------------------
    def denoise_jobs(self, jobs: list[_Job]) -> None:
        """Denoise jobs whose loops line up (``_Job.key``), each step one UNet call on all their rows; sets
        each job's ``out`` (its final latents) or ``error`` (NaN in its rows). With one job the batch is
        that job's, unchanged."""
        if not jobs:
            return
        controlled = jobs[0].control is not None
        denoiser = self.family.denoiser
        unet = (jobs[0].sessions or self.sessions)["unet_control" if controlled else denoiser]
        x_name = "hidden_states" if denoiser == "transformer" else "sample"  # the latents' input, as diffusers names it
        blocks = self.skip_mask_blocks
        no_skip = {"skip_layers": np.zeros(blocks, np.float32)} if blocks else {}  # every block runs
        times, active = StepTimes(), list(jobs)
        steps = jobs[0].steps
        with ExitStack() as stack:
            for job in jobs:  # stochastic samplers' noise, drawn one step ahead from each job's generator
                job.noise = stack.enter_context(PrefetchingNoise(job.generator))
                job.x = job.start.latents
            for i in range(steps):
                times.start()
                parts = [self._unet_rows(job, i) for job in active]
                x = np.concatenate(parts) if len(parts) > 1 else parts[0]
                if len(active) > 1:
                    feed = {k: np.concatenate([job.cond.feed[k] for job in active]) for k in active[0].cond.feed}
                else:
                    feed = active[0].cond.feed
                t = np.full((x.shape[0],), active[0].run.timesteps[i], dtype=np.float32)
                times.mark("prepare")
                if controlled:
                    feed = {**feed, **self._control_residuals(active, parts, i)}
                    times.mark("controlnet")
                pred = unet.run({x_name: x, "timestep": t, **feed, **no_skip})["out_sample"]
                times.mark("unet")
                rows = np.cumsum([0] + [len(p) for p in parts])
                preds = [pred[lo:hi] for lo, hi in zip(rows[:-1], rows[1:])]
                for job, p in zip(active, preds):
                    if not np.isfinite(p).all():
                        try:
                            self._check_finite(
                                denoiser, {"out_sample": p}, f" at step {i + 1} of {steps} (timestep {t[0]:g})"
                            )
                        except NumericalError as e:
                            job.error = e
                    elif job.request.guided:
                        uncond, text = np.split(p, 2)
                        job.pred = uncond + np.float32(job.request.guidance_scale) * (text - uncond)
                        job.text_pred = text
                    else:
                        job.pred = p
                times.mark("guidance")
                skipping = [
                    job for job in active if job.error is None and job.slg and job.slg.active(i, len(job.run.timesteps))
                ]
                if skipping:
                    self._skip_layer_step(unet, skipping, parts, active, i, steps, x_name, blocks)
                    times.mark("unet")
                active = [job for job in active if job.error is None]
                for job in active:
                    job.x = self._step(job, i)
                times.mark("scheduler")
                for job in active:
                    if job.callback is not None:
                        job.callback(i + 1, steps)
                if not active:
                    break
        for job in jobs:
            times.into(job.timings)
            if job.error is None:
                job.out = job.x.astype(np.float32, copy=False)

    def _skip_layer_step(self, unet, jobs, parts, active, i: int, steps: int, x_name: str, blocks: int) -> None:
        """Skip-layer guidance at step ``i`` for ``jobs`` (one key: the same blocks): one transformer call on their
        prompt rows with the blocks skipped; each job's prediction moves by its scale x (text - skipped)."""
        rows = [parts[active.index(job)] for job in jobs]
        x = np.concatenate([r[len(r) // 2 :] for r in rows])  # guided rows are [uncond; cond]: the prompt's half
        feed = {}
        for k in jobs[0].cond.feed:
            halves = [job.cond.feed[k][len(job.cond.feed[k]) // 2 :] for job in jobs]
            feed[k] = np.concatenate(halves) if len(halves) > 1 else halves[0]
        t = np.full((x.shape[0],), jobs[0].run.timesteps[i], dtype=np.float32)
        mask = jobs[0].slg.mask(blocks)
        pred = unet.run({x_name: x, "timestep": t, "skip_layers": mask, **feed})["out_sample"]
        bounds = np.cumsum([0] + [len(r) // 2 for r in rows])
        for job, lo, hi in zip(jobs, bounds[:-1], bounds[1:]):
            skipped = pred[lo:hi]
            try:
                self._check_finite(self.family.denoiser, {"out_sample": skipped},
                                   f" (skip-layer guidance) at step {i + 1} of {steps}")  # fmt: skip
            except NumericalError as e:
                job.error = e
                continue
            job.pred = job.pred + np.float32(job.slg.scale) * (job.text_pred - skipped)

    def _control_residuals(self, jobs: list[_Job], parts: list[np.ndarray], i: int) -> dict[str, np.ndarray]:
        """Each job's ControlNet residuals at step ``i`` (its own images, scales and window), joined in the UNet's
        rows. ``parts``: each job's UNet rows this step; the ControlNets see their four latent channels (a 9-channel
        inpainting UNet's mask and masked image left out), already scaled for the step."""
        c = self.dims.latent_channels
        residuals = []
        for job, part in zip(jobs, parts):
            rows = part if part.shape[1] == c else np.ascontiguousarray(part[:, :c])
            once = rows[rows.shape[0] // 2 :] if job.request.guided else rows  # guided rows: the latents twice
            summed = control.residuals(
                job.control, self.controlnets, self.control_embeddings, self.control_specs, rows, once,
                float(job.run.timesteps[i]), job.cond.feed, i, job.steps, job.request.guided,
            )  # fmt: skip
            if summed is None:  # outside every window: zeros, as diffusers' residuals times a zero scale
                summed = control.zero_residuals(self.dims, self.control_specs, rows.shape[0], *rows.shape[2:])
            residuals.append(summed)
        if len(residuals) == 1:
            return residuals[0]
        return {t.name: np.concatenate([r[t.name] for r in residuals]) for t in self.control_specs}

    def _unet_rows(self, job: _Job, i: int) -> np.ndarray:
        """One job's UNet input rows at step ``i``: [unconditional, conditional] when guided; a 9-channel
        UNet's mask and masked-image latents joined on the channel axis."""
        start, guided = job.start, job.request.guided
        x = np.concatenate([job.x, job.x]) if guided else job.x
        x = job.run.scale_model_input(x, i)
        if start.masked_image_latents is not None:
            if job.extra is None:
                extra = np.concatenate([start.mask, start.masked_image_latents], axis=1)
                job.extra = np.concatenate([extra, extra]) if guided else extra
            x = np.concatenate([x, job.extra], axis=1)
        return x

    def _step(self, job: _Job, i: int) -> np.ndarray:
        """The scheduler's step for one job; 4-channel inpainting then restores the known region, re-noised."""
        start, run = job.start, job.run
        latents = run.step(job.pred, i, job.x, noise=job.noise)
        if start.image_latents is not None:
            known = start.image_latents
            if i < len(run.timesteps) - 1:
                known = run.add_noise(known, start.noise, i + 1)
            latents = (1 - start.mask) * known + start.mask * latents
        return latents

    # -- stage 4: the images -----------------------------------------------------------------------
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float images in [0, 1], NHWC."""
        scaled = latents / np.float32(self.manifest.vae_scaling_factor)
        shift = float(self.manifest.vae.get("shift_factor") or 0.0)  # SD 3's VAE: latents were (z - shift) * scale
        if shift:
            scaled = scaled + np.float32(shift)
        scaled = scaled.astype(np.float32, copy=False)
        image = self.sessions["vae_decoder"].run({"latent": scaled})["image"]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def _call_arguments(call: Mapping[str, Any]) -> dict:
    """One call of ``run_batch``: ``__call__``'s keyword arguments, completed with its defaults."""
    if not isinstance(call, Mapping):
        raise InputError(f"run_batch: expected each call as a dict of keyword arguments, got {type(call).__name__}")
    try:
        bound = _CALL_SIGNATURE.bind(None, **call)
    except TypeError as e:
        raise InputError(
            f"run_batch: expected keyword arguments of Pipeline.__call__, got {sorted(call)} ({e})"
        ) from None
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k != "self"}


def _own_size(image, vae_scale_factor: int) -> tuple[int, int] | None:
    """The pixel size an image argument has, without decoding it (None where it cannot be told)."""
    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(first, np.ndarray):
        if first.ndim == 4 and first.shape[1] not in (1, 3) and first.shape[-1] not in (1, 3):  # latents
            return first.shape[2] * vae_scale_factor, first.shape[3] * vae_scale_factor
        if first.ndim == 2:  # one channel (a mask)
            return first.shape[0], first.shape[1]
        return (first.shape[-3], first.shape[-2]) if first.ndim in (3, 4) else None
    if isinstance(first, (str, Path)):
        from PIL import Image

        try:
            with Image.open(first) as opened:  # reads the header only
                width, height = opened.size
        except Exception:  # unreadable: preprocess_image says so, naming the file
            return None
        return height, width
    size = getattr(first, "size", None)  # a PIL image
    return (size[1], size[0]) if isinstance(size, tuple) and len(size) == 2 else None


def _task(image, mask_image) -> str:
    return "text-to-image" if image is None else "image-to-image" if mask_image is None else "inpainting"


_CALL_SIGNATURE = inspect.signature(Pipeline.__call__)

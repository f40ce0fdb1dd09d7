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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime import backends, conditioning, families, schedulers
from sdrt.runtime.errors import InputError
from sdrt.runtime.families import Family, ModelDims
from sdrt.runtime.images import to_uint8
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.profiles import ShapeRanges
from sdrt.runtime.rng import PrefetchingNoise, make_generator
from sdrt.runtime.session import Session
from sdrt.runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, total steps)


@dataclass
class GenerationResult:
    images: np.ndarray | None  # (batch, height, width, 3) uint8; None with output_type="latent"
    seed: int  # the seed of the generator used (drawn at random when none was given)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; "unet_steps" per step
    latents: np.ndarray | None = None  # the final latents with output_type="latent" (for a refiner's image=)

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
        timings["unet_calls"] = unet  # the UNet engine call of each step
        timings["scheduler_steps"] = step  # the scheduler's step (and inpainting's blend)
        timings["step_overhead"] = [a + b + c for a, b, c in zip(prepare, combine, step)]  # all but the UNet
        timings["unet_steps"] = [u + o for u, o in zip(unet, timings["step_overhead"])]  # each whole step
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
    ):
        self.root, self.manifest, self.sessions, self.backend = root, manifest, sessions, backend
        self.precision = precision  # the compute precision the backend was asked for (fp32 unless told)
        self.load_timings = dict(load_timings or {})  # seconds: manifest check and each component's session
        self.family: Family = manifest.model_family
        self.dims: ModelDims = manifest.model_dims
        self.tokenizers = {}
        for role in self.family.text_encoders:
            info = manifest.tokenizers[role.tokenizer]
            self.tokenizers[role.tokenizer] = ClipTokenizer.from_tokenizer_dir(
                root / info.path, info.max_length, info.pad_token_id
            )
        self.scheduler_config = schedulers.read_config(root / manifest.scheduler_config)
        self.scheduler = schedulers.from_config(self.scheduler_config, scheduler)

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
        precision: str = "fp32",
        cache: bool = True,
        components: tuple[str, ...] | list[str] | None = None,
    ) -> Pipeline:
        """Open an artifact directory written by ``sdrt export`` (checks schema and file hashes first),
        or an optimum ONNX export, on ``backend`` (see ``sdrt.runtime.backends``).

        ``precision``: the compute precision (``fp32`` runs every graph in its exported types; ``bf16``
        on CPUs that have it, backend ``openvino``); asking for one the backend or CPU lacks is an
        error, never a silent change. ``cache``: use and fill the per-machine compiled-graph caches
        under ``engines/``. ``trt_ranges``: the shape ranges onnxruntime's TensorRT provider builds its
        engines for (backend ``onnxruntime-tensorrt``; default 1-4 images, 256-1024 px). ``components``:
        open only these (the text encoders and the UNet always), e.g. no VAE decoder for an SDXL base that
        hands latents to its refiner; a call that needs one not opened is refused, naming it."""
        t_start = t0 = time.perf_counter()
        root = Path(artifacts)
        record = backends.get(backend)
        backends.check_usable(record, precision)
        manifest = Manifest.load(root, verify_hashes=verify_hashes)
        timings = {"manifest": time.perf_counter() - t0}
        options = backends.LoadOptions(threads, precision, cuda_graph, trt_ranges, cache)
        names = cls.components_of(manifest)
        if components is not None:
            family = manifest.model_family.components()
            unknown = sorted(set(components) - set(family))
            if unknown:
                raise InputError(f"components: expected names from {', '.join(family)}, got {unknown}")
            names = tuple(c for c in names if c in components or c not in ("vae_decoder", "vae_encoder"))
        sessions: dict[str, Session] = {}
        try:
            for name in names:
                t0 = time.perf_counter()
                sessions[name] = record.open(root, manifest, manifest.components[name], options)
                timings[name] = time.perf_counter() - t0
        except BaseException:
            for session in sessions.values():
                session.close()
            raise
        pipe = cls(root, manifest, sessions, backend, scheduler, precision, timings)
        pipe.load_timings["total"] = time.perf_counter() - t_start
        return pipe

    def graph_precisions(self) -> dict[str, str]:
        """Each component's graph precision as exported (fp32, fp16, fp16+fp32-attention, int8)."""
        return {name: self.manifest.components[name].precision for name in self.sessions}

    def close(self) -> None:
        for session in self.sessions.values():
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
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Generate images; arguments as diffusers' pipelines for the model's family and the task.

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
        """
        t_start = time.perf_counter()
        timings: dict = {}
        defaults = self.family.defaults(self.dims, _task(image, mask_image))
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type: expected one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if output_type != "latent" and "vae_decoder" not in self.sessions:
            raise InputError(
                "output_type: images need the VAE decoder, which this pipeline was loaded without; "
                "load it (components=) or ask for output_type='latent'"
            )
        request = self._request(
            prompt, negative_prompt, image, mask_image, strength, height, width, guidance_scale,
            num_images_per_prompt, denoising_start, denoising_end, original_size, crops_coords_top_left,
            target_size, aesthetic_score, negative_aesthetic_score,
        )  # fmt: skip
        sched = self.scheduler if scheduler is None else schedulers.from_config(self.scheduler_config, scheduler)
        run, steps = self.schedule(sched, num_inference_steps, request, eta)
        shape = self.latent_shape(request.batch, request.height, request.width)
        if latents is not None:
            latents = np.asarray(latents)
            if latents.shape != shape or latents.dtype != np.float32:
                raise InputError(
                    f"latents: expected float32 array of shape {shape}, got {latents.dtype} {latents.shape}"
                )
            if request.task == "image-to-image":
                raise InputError("latents: image-to-image noises the encoded image; give a seed instead of latents")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        generator = make_generator(seed, rng)

        t0 = time.perf_counter()
        cond = self.encode_prompt(request)
        timings["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        start = self.prepare_latents(request, run, generator, latents, shape)
        timings["prepare_latents"] = time.perf_counter() - t0
        out = self.denoise(start, run, steps, cond, request, generator, timings, callback)
        if output_type == "latent":
            timings["total"] = time.perf_counter() - t_start
            return GenerationResult(images=None, seed=seed, timings=timings, latents=out)
        t0 = time.perf_counter()
        images = to_uint8(self.decode(out))
        timings["vae_decoder"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(images=images, seed=seed, timings=timings)

    # -- checking the request ----------------------------------------------------------------------
    def _request(
        self, prompt, negative_prompt, image, mask_image, strength, height, width, guidance_scale,
        images_per_prompt, denoising_start, denoising_end, original_size, crops, target_size, score, negative_score,
    ) -> Request:  # fmt: skip
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt: expected an integer >= 1, got {images_per_prompt!r}")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale):
            raise InputError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
                raise InputError(f"{name}: expected a fraction of the schedule in (0, 1), got {value!r}")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise InputError(
                f"denoising_start: expected less than denoising_end ({denoising_end}), got {denoising_start}"
            )
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
            raise InputError(f"strength: applies to image-to-image and inpainting (give image=), got {strength}")
        else:
            strength = 1.0
        if not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
            raise InputError(f"strength: expected a value in (0, 1], got {strength!r}")

        pixels = None
        if task != "text-to-image":
            pixels = self._image(image, height, width, task)
            if pixels.shape[1] == 3:
                height, width = pixels.shape[2], pixels.shape[3]
            else:  # latents
                height = pixels.shape[2] * self.dims.vae_scale_factor
                width = pixels.shape[3] * self.dims.vae_scale_factor
        height = height or self.manifest.default_height
        width = width or self.manifest.default_width
        self.latent_shape(1, height, width)  # checks the size
        mask = conditioning.preprocess_mask(mask_image, height, width) if task == "inpainting" else None

        guided = guidance_scale > 1.0 and not self.dims.time_cond_dim
        negatives = _negative_prompts(negative_prompt, len(prompts))
        if negative_prompt is None and self.manifest.pipeline_options.get("force_zeros_for_empty_prompt"):
            negatives = None
        micro = {}
        if self.family.micro_conditioning:
            size = (height, width)
            micro = {
                "original_size": _pair(original_size or size, "original_size"),
                "crops_coords_top_left": _pair(crops, "crops_coords_top_left"),
                "target_size": _pair(target_size or size, "target_size"),
                "aesthetic_score": float(score),
                "negative_aesthetic_score": float(negative_score),
            }
        return Request(
            prompts, negatives, images_per_prompt, height, width, task, guided, float(guidance_scale),
            pixels, mask, float(strength), denoising_start, denoising_end, micro,
        )  # fmt: skip

    def _image(self, image, height, width, task) -> np.ndarray:
        """The image as the VAE encoder takes it, or latents given as the image (SDXL's base-to-refiner handoff)."""
        if isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == self.dims.latent_channels:
            if task == "inpainting" or image.dtype != np.float32:
                raise InputError(
                    f"image: latents (float32, {self.dims.latent_channels} channels) are taken for image-to-image "
                    f"only, got {image.dtype} {image.shape} for {task}"
                )
            return image
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
                    f"{name}: expected a positive multiple of {m.spatial_multiple} pixels for this model, got {value!r}"
                )
        return batch, m.latent_channels, int(height) // m.vae_scale_factor, int(width) // m.vae_scale_factor

    # -- schedule ----------------------------------------------------------------------------------
    def schedule(self, sched, num_inference_steps: int, request: Request, eta: float):
        """The scheduler's run for the request (img2img strength, or denoising_start's begin index) and
        how many of its steps to take (all, or up to denoising_end)."""
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
            raise InputError(f"num_inference_steps: expected an integer, got {num_inference_steps!r}")
        n_train = int(self.scheduler_config.get("num_train_timesteps", 1000))
        if request.denoising_start is not None:
            full = sched.start(num_inference_steps, eta=eta)
            begin = conditioning.denoising_start_begin(full.timesteps, sched.order, n_train, request.denoising_start)
            run = sched.start(num_inference_steps, eta=eta, begin=begin)
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
    def encode_prompt(self, request: Request) -> Conditioning:
        """Text conditioning in the UNet's batch layout: [unconditional rows, conditional rows] when guided,
        each prompt's row repeated ``images_per_prompt`` times consecutively (as diffusers)."""
        roles, n = self.family.text_encoders, len(request.prompts)
        negatives = request.negatives if request.guided and request.negatives is not None else []
        texts = request.prompts + negatives
        hidden, pooled = [], None
        for role in roles:
            out = self.sessions[role.component].run({"input_ids": self.tokenizers[role.tokenizer](texts)})
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
        if self.dims.vae_kind == "tiny":  # AutoencoderTiny encodes to latents: nothing to sample
            latents = out["latent"]
        else:  # diffusers' DiagonalGaussianDistribution.sample
            mean, logvar = np.split(out["latent_parameters"], 2, axis=1)
            std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
            latents = mean + std * generator.randn(mean.shape)
        return (np.float32(self.manifest.vae_scaling_factor) * latents).astype(np.float32, copy=False)

    @staticmethod
    def _tile(x: np.ndarray, batch: int) -> np.ndarray:
        """Repeat a batch of images' tensors to the request's batch (torch ``repeat``, as diffusers)."""
        if x.shape[0] == batch:
            return x
        if batch % x.shape[0]:
            raise InputError(f"image: expected 1 image or one per generated image ({batch}), got {x.shape[0]}")
        return np.tile(x, (batch // x.shape[0], 1, 1, 1))

    # -- stage 3: the loop -------------------------------------------------------------------------
    def denoise(self, start: Latents, run, steps: int, cond: Conditioning, request: Request, generator,
                timings: dict, callback: StepCallback | None = None) -> np.ndarray:  # fmt: skip
        latents, unet, times, g = start.latents, self.sessions["unet"], StepTimes(), request.guidance_scale
        if start.masked_image_latents is not None:  # 9-channel UNet: the mask and masked image join every input
            extra = np.concatenate([start.mask, start.masked_image_latents], axis=1)
            extra = np.concatenate([extra, extra]) if request.guided else extra
        with PrefetchingNoise(generator) as noise:  # stochastic samplers' noise, drawn one step ahead
            for i in range(steps):
                times.start()
                x = np.concatenate([latents, latents]) if request.guided else latents
                x = run.scale_model_input(x, i)
                if start.masked_image_latents is not None:
                    x = np.concatenate([x, extra], axis=1)
                t = np.full((x.shape[0],), run.timesteps[i], dtype=np.float32)
                times.mark("prepare")
                pred = unet.run({"sample": x, "timestep": t, **cond.feed})["out_sample"]
                times.mark("unet")
                if request.guided:
                    uncond, text = np.split(pred, 2)
                    pred = uncond + np.float32(g) * (text - uncond)
                times.mark("guidance")
                latents = run.step(pred, i, latents, noise=noise)
                if start.image_latents is not None:  # 4-channel inpainting: keep the known region, re-noised
                    known = start.image_latents
                    if i < len(run.timesteps) - 1:
                        known = run.add_noise(known, start.noise, i + 1)
                    latents = (1 - start.mask) * known + start.mask * latents
                times.mark("scheduler")
                if callback is not None:
                    callback(i + 1, steps)
        times.into(timings)
        return latents.astype(np.float32, copy=False)

    # -- stage 4: the images -----------------------------------------------------------------------
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float images in [0, 1], NHWC."""
        scaled = (latents / np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)
        image = self.sessions["vae_decoder"].run({"latent": scaled})["image"]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def _task(image, mask_image) -> str:
    return "text-to-image" if image is None else "image-to-image" if mask_image is None else "inpainting"


def _pair(value, name: str) -> tuple[int, int]:
    try:
        a, b = value
        return int(a), int(b)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a pair of integers (height, width) or (top, left), got {value!r}") from None


def _negative_prompts(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n or not all(isinstance(x, str) for x in negatives):
        raise InputError(f"negative_prompt: expected 1 or {n} strings (one per prompt), got {negative_prompt!r}")
    return negatives

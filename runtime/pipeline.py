"""Text-to-image on exported graphs: tokenizer -> text encoder -> denoising loop -> VAE decoder.

Mirrors diffusers' ``StableDiffusionPipeline.__call__`` (same arguments, same arithmetic, same
batch layout: unconditional rows first), with NumPy arrays between components.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdrt.runtime import backends, schedulers
from sdrt.runtime.errors import InputError
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
    images: np.ndarray  # (batch, height, width, 3) uint8
    seed: int  # the seed of the generator used (drawn at random when none was given)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage; "unet_steps" per step

    def to_pil(self) -> list:
        from PIL import Image

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


class Pipeline:
    COMPONENTS = ("text_encoder", "unet", "vae_decoder")

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
        info = manifest.tokenizers["tokenizer"]
        self.tokenizer = ClipTokenizer.from_tokenizer_dir(root / info.path, info.max_length, info.pad_token_id)
        self.scheduler_config = schedulers.read_config(root / manifest.scheduler_config)
        self.scheduler = schedulers.from_config(self.scheduler_config, scheduler)

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
    ) -> Pipeline:
        """Open an artifact directory written by ``sdrt export`` (checks schema and file hashes first),
        or an optimum ONNX export, on ``backend`` (see ``sdrt.runtime.backends``).

        ``precision``: the compute precision (``fp32`` runs every graph in its exported types; ``bf16``
        on CPUs that have it, backend ``openvino``); asking for one the backend or CPU lacks is an
        error, never a silent change. ``cache``: use and fill the per-machine compiled-graph caches
        under ``engines/``. ``trt_ranges``: the shape ranges onnxruntime's TensorRT provider builds its
        engines for (backend ``onnxruntime-tensorrt``; default 1-4 images, 256-1024 px)."""
        t_start = t0 = time.perf_counter()
        root = Path(artifacts)
        record = backends.get(backend)
        backends.check_usable(record, precision)
        manifest = Manifest.load(root, verify_hashes=verify_hashes)
        timings = {"manifest": time.perf_counter() - t0}
        options = backends.LoadOptions(threads, precision, cuda_graph, trt_ranges, cache)
        sessions: dict[str, Session] = {}
        try:
            for name in cls.COMPONENTS:
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
        return {name: self.manifest.components[name].precision for name in self.COMPONENTS}

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages -----------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts)
        return self.sessions["text_encoder"].run({"input_ids": ids})["last_hidden_state"]

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float images in [0, 1], NHWC."""
        scaled = (latents / np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)
        image = self.sessions["vae_decoder"].run({"latent": scaled})["image"]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        m = self.manifest
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m.spatial_multiple:
                raise InputError(
                    f"{name}: expected a positive multiple of {m.spatial_multiple} pixels for this model, got {value}"
                )
        return batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor

    # -- the call ----------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        eta: float = 0.0,
        scheduler: str | None = None,
        rng: str = "torch",
        callback: StepCallback | None = None,
    ) -> GenerationResult:
        """Generate images; arguments as diffusers' ``StableDiffusionPipeline.__call__``.

        ``seed`` drives the initial latents and any scheduler noise. With ``rng="torch"`` (default)
        the stream equals ``torch.Generator("cpu").manual_seed(seed)``, so the same seed gives
        diffusers' image; ``rng="numpy"`` uses NumPy's PCG64 instead. ``latents`` replaces the
        initial draw. ``scheduler`` overrides the model's sampler by name (see ``sdrt.runtime.schedulers``).
        """
        t_start = time.perf_counter()
        timings: dict = {}
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt: expected a string or a non-empty list of strings, got {prompt!r}")
        negatives = _negative_prompts(negative_prompt, len(prompts))
        if num_images_per_prompt < 1:
            raise InputError(f"num_images_per_prompt: expected >= 1, got {num_images_per_prompt}")
        height = height or self.manifest.default_height
        width = width or self.manifest.default_width
        batch = len(prompts) * num_images_per_prompt
        shape = self.latent_shape(batch, height, width)
        sched = self.scheduler if scheduler is None else schedulers.from_config(self.scheduler_config, scheduler)
        run = sched.start(num_inference_steps, eta=eta)
        guided = guidance_scale > 1.0

        if seed is None:
            seed = int(np.random.SeedSequence().entropy % 2**63)
        generator = make_generator(seed, rng)
        if latents is None:
            latents = generator.randn(shape)
        else:
            latents = np.asarray(latents)
            if latents.shape != shape or latents.dtype != np.float32:
                raise InputError(
                    f"latents: expected float32 array of shape {shape}, got {latents.dtype} {latents.shape}"
                )
        latents = latents * np.float32(run.init_noise_sigma)

        t0 = time.perf_counter()
        texts = prompts + negatives if guided else prompts
        embeds = self.encode_prompt(texts)
        # diffusers repeats each prompt's row num_images_per_prompt times, consecutively.
        embeds = np.repeat(embeds, num_images_per_prompt, axis=0)
        if guided:
            cond, uncond = np.split(embeds, 2)
            embeds = np.concatenate([uncond, cond])
        timings["text_encoder"] = time.perf_counter() - t0

        unet, step_times, unet_times, sched_times, scheduler_times = self.sessions["unet"], [], [], [], []
        # Stochastic samplers' noise is drawn one step ahead, during the UNet call.
        with PrefetchingNoise(generator) as noise:
            for i, t in enumerate(run.timesteps):
                t0 = time.perf_counter()
                model_input = np.concatenate([latents, latents]) if guided else latents
                model_input = run.scale_model_input(model_input, i)
                timestep = np.full((model_input.shape[0],), t, dtype=np.float32)
                t1 = time.perf_counter()
                feed = {"sample": model_input, "timestep": timestep, "encoder_hidden_states": embeds}
                noise_pred = unet.run(feed)["out_sample"]
                t2 = time.perf_counter()
                if guided:
                    uncond_pred, text_pred = np.split(noise_pred, 2)
                    noise_pred = uncond_pred + np.float32(guidance_scale) * (text_pred - uncond_pred)
                t_sched = time.perf_counter()
                latents = run.step(noise_pred, i, latents, noise=noise)
                t3 = time.perf_counter()
                step_times.append(t3 - t0)
                unet_times.append(t2 - t1)
                sched_times.append((t1 - t0) + (t3 - t2))
                scheduler_times.append(t3 - t_sched)
                if callback is not None:
                    callback(i + 1, len(run.timesteps))
        timings["unet_steps"] = step_times  # wall time of each whole step
        timings["unet_calls"] = unet_times  # of which the UNet engine call
        timings["step_overhead"] = sched_times  # and the rest: input scaling, guidance, scheduler step
        timings["scheduler_steps"] = scheduler_times  # of which the scheduler's step alone
        timings["denoise"] = sum(step_times)
        timings["scheduler_and_guidance"] = sum(sched_times)

        t0 = time.perf_counter()
        images = to_uint8(self.decode(latents))
        timings["vae_decoder"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        return GenerationResult(images=images, seed=seed, timings=timings)


def _negative_prompts(negative_prompt: str | list[str] | None, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) == 1 and n > 1:
        negatives = negatives * n
    if len(negatives) != n:
        raise InputError(f"negative_prompt: expected 1 or {n} strings (one per prompt), got {len(negatives)}")
    return negatives

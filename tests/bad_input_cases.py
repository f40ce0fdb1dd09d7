"""Bad requests and damaged artifacts, each with the error sdrt must give; tests/test_bad_inputs.py runs every
case, and ``python tests/bad_input_cases.py docs/bad-inputs.md`` writes the table of what each one gets.

A call case is keyword arguments for ``Pipeline.__call__`` on the tiny model (text-to-image unless it gives
``image=``); ``{tmp}`` in a string is replaced by a scratch folder holding ``not-an-image.png`` (text) and
``tiny.png`` (4x4 pixels). An artifact case names a fault made in a copy of the tiny model's artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sdrt.runtime.errors import ArtifactError, BackendError, InputError
from sdrt.runtime.lora import LoraError
from sdrt.runtime.validation import BudgetError

NAN, INF = float("nan"), float("inf")
LATENT = (1, 4, 32, 32)  # the tiny model's latents at its default 256x256


def _image(value: float = 0.5, size: int = 64, dtype=np.float32) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=dtype)


def _nan_image() -> np.ndarray:
    image = _image()
    image[3, 4, 1] = np.nan
    return image


@dataclass(frozen=True)
class CallCase:
    id: str
    kwargs: dict
    error: type
    says: str  # a fragment the message must contain
    before: str = ""  # what this input did before the runtime checked it (the issue's findings), for the table
    lora_limits: dict = field(default_factory=dict)  # LoraLimits fields other than the defaults, for this call
    available_bytes: int | None = None  # the memory the machine has available now, as this call sees it
    controlnets: int = 0  # the ControlNets the pipeline is loaded with (the tiny model's, that many times)
    model: str = "tiny"  # the preset whose artifacts take the call: "tiny" (SD 1.x) or "tiny-sd3"


def _latents(fill: float = 0.0, shape=LATENT, dtype=np.float32) -> np.ndarray:
    return np.full(shape, fill, dtype=dtype)


# fmt: off
CALL_CASES = [
    # -- the seven the issue found --------------------------------------------------------------
    CallCase("height=width=65536", dict(height=65536, width=65536), BudgetError, "pixels per call",
             "the process was killed by the kernel's OOM killer"),
    CallCase("width=0", dict(width=0), InputError, "width: expected an integer >= 16",
             "silently replaced by the default width"),
    CallCase("guidance_scale=nan", dict(guidance_scale=NAN), InputError, "guidance_scale: expected a finite number",
             "an image returned"),
    CallCase("guidance_scale=inf", dict(guidance_scale=INF), InputError, "guidance_scale: expected a finite number",
             "an image returned"),
    CallCase("latents all NaN", dict(latents=_latents(NAN)), InputError, "latents: expected finite values",
             "an image returned"),
    CallCase("prompt=None", dict(prompt=None), InputError, "prompt: expected a string or a non-empty list",
             "a bare TypeError from deep inside"),
    CallCase("prompt=123", dict(prompt=123), InputError, "prompt: expected a string or a non-empty list",
             "a bare TypeError from deep inside"),
    # -- prompt, negative_prompt ----------------------------------------------------------------
    CallCase("prompt=[]", dict(prompt=[]), InputError, "prompt: expected a string or a non-empty list"),
    CallCase("prompt=['ok', 5]", dict(prompt=["ok", 5]), InputError, "prompt: expected a string or a non-empty"),
    CallCase("prompt=b'bytes'", dict(prompt=b"a cat"), InputError, "prompt: expected a string"),
    CallCase("negative_prompt=3", dict(negative_prompt=3), InputError, "negative_prompt: expected a string or 1"),
    CallCase("2 negatives for 1 prompt", dict(negative_prompt=["a", "b"]), InputError,
             "negative_prompt: expected 1 string (one prompt was given), got 2"),
    # -- height, width --------------------------------------------------------------------------
    CallCase("height=-64", dict(height=-64), InputError, "height: expected an integer >= 16"),
    CallCase("height=72 (not a multiple)", dict(height=72), InputError, "height: expected a positive multiple of 16"),
    CallCase("height=64.0 (float)", dict(height=64.0), InputError, "height: expected an integer >= 16"),
    CallCase("width=True (bool)", dict(width=True), InputError, "width: expected an integer >= 16"),
    CallCase("height='64'", dict(height="64"), InputError, "height: expected an integer >= 16"),
    # -- steps, images, guidance ----------------------------------------------------------------
    CallCase("num_inference_steps=0", dict(num_inference_steps=0), InputError,
             "num_inference_steps: expected an integer in [1, 1000]"),
    CallCase("num_inference_steps=2.5", dict(num_inference_steps=2.5), InputError,
             "num_inference_steps: expected an integer"),
    CallCase("num_inference_steps=10**6", dict(num_inference_steps=10**6), InputError,
             "num_inference_steps: expected an integer in [1, 1000]"),
    CallCase("num_images_per_prompt=0", dict(num_images_per_prompt=0), InputError,
             "num_images_per_prompt: expected an integer in [1, 64]"),
    CallCase("num_images_per_prompt=10**6", dict(num_images_per_prompt=10**6), InputError,
             "num_images_per_prompt: expected an integer in [1, 64]"),
    CallCase("64 images of 2048x2048", dict(num_images_per_prompt=64, height=2048, width=2048), BudgetError,
             "pixels per call"),
    CallCase("65 prompts", dict(prompt=["a"] * 65), BudgetError, "images per call: expected at most 64"),
    CallCase("guidance_scale='7.5'", dict(guidance_scale="7.5"), InputError, "guidance_scale: expected a finite"),
    CallCase("guidance_scale=True", dict(guidance_scale=True), InputError, "guidance_scale: expected a finite"),
    # -- seed, latents, eta, scheduler, rng -----------------------------------------------------
    CallCase("seed=-1", dict(seed=-1), InputError, "seed: expected an integer in [0, 18446744073709551615]"),
    CallCase("seed=2**64", dict(seed=2**64), InputError, "seed: expected an integer in [0,"),
    CallCase("seed=1.5", dict(seed=1.5), InputError, "seed: expected an integer"),
    CallCase("seed='42'", dict(seed="42"), InputError, "seed: expected an integer"),
    CallCase("latents with inf", dict(latents=_latents(INF)), InputError, "latents: expected finite values"),
    CallCase("latents of the wrong shape", dict(latents=_latents(shape=(1, 4, 16, 16))), InputError,
             "latents: expected a float32 array of shape (1, 4, 32, 32)"),
    CallCase("latents float64", dict(latents=_latents(dtype=np.float64)), InputError,
             "latents: expected a float32 array"),
    CallCase("latents as a list", dict(latents=[[0.0]]), InputError, "latents: expected a NumPy array"),
    CallCase("eta=nan", dict(eta=NAN), InputError, "eta: expected a finite number >= 0"),
    CallCase("eta=-1", dict(eta=-1.0), InputError, "eta: expected a finite number >= 0"),
    CallCase("scheduler='nope'", dict(scheduler="nope"), InputError, "scheduler: expected one of"),
    CallCase("scheduler=123", dict(scheduler=123), InputError, "scheduler: expected a scheduler name"),
    CallCase("rng='mt'", dict(rng="mt"), InputError, "rng: expected one of torch, numpy"),
    # -- schedule fractions, output -------------------------------------------------------------
    CallCase("denoising_end=1.5", dict(denoising_end=1.5), InputError, "denoising_end: expected a finite number in (0, 1)"),
    CallCase("denoising_end=nan", dict(denoising_end=NAN), InputError, "denoising_end: expected a finite number"),
    CallCase("denoising_start without image", dict(denoising_start=0.5), InputError,
             "denoising_start: expected with image="),
    CallCase("denoising_start >= denoising_end", dict(image=_image(), denoising_start=0.8, denoising_end=0.5),
             InputError, "denoising_start: expected less than denoising_end"),
    CallCase("output_type='pil'", dict(output_type="pil"), InputError, "output_type: expected one of uint8, latent"),
    CallCase("callback=5", dict(callback=5), InputError, "callback: expected a callable"),
    # -- SDXL-only arguments on an SD model ----------------------------------------------------
    CallCase("original_size on SD 1.x", dict(original_size=(1024, 1024)), InputError,
             "original_size: applies to SDXL models"),
    CallCase("aesthetic_score on SD 1.x", dict(aesthetic_score=6.0), InputError,
             "aesthetic_score: applies to the SDXL refiner models"),
    # -- image, mask_image, strength ------------------------------------------------------------
    CallCase("strength without image", dict(strength=0.5), InputError, "strength: applies to image-to-image"),
    CallCase("strength=0", dict(image=_image(), strength=0), InputError, "strength: expected a finite number in (0, 1]"),
    CallCase("strength=1.5", dict(image=_image(), strength=1.5), InputError, "strength: expected a finite number in (0, 1]"),
    CallCase("strength=nan", dict(image=_image(), strength=NAN), InputError, "strength: expected a finite number"),
    CallCase("image=123", dict(image=123), InputError, "image: expected a PIL image, a path"),
    CallCase("image=[]", dict(image=[]), InputError, "image: expected an image or a non-empty list"),
    CallCase("image path missing", dict(image="{tmp}/missing.png"), InputError,
             "image: expected a readable image file"),
    CallCase("image path not an image", dict(image="{tmp}/not-an-image.png"), InputError,
             "image: expected a readable image file"),
    CallCase("image of 4x4 pixels", dict(image="{tmp}/tiny.png"), InputError, "height: expected at least 8"),
    CallCase("image with NaN", dict(image=_nan_image()), InputError, "image: expected finite values"),
    CallCase("image float values > 1", dict(image=_image(2.0)), InputError, "image: expected float values in [0, 1]"),
    CallCase("image of 1 dimension", dict(image=np.zeros(3, np.float32)), InputError, "image: expected"),
    CallCase("image with height=2**20", dict(image=_image(), height=2**20), BudgetError, "pixels per call"),
    CallCase("image latents with NaN", dict(image=_latents(NAN)), InputError, "image: expected finite values"),
    CallCase("mask_image without image", dict(mask_image=_image()[..., 0]), InputError,
             "mask_image: inpainting needs the image"),
    CallCase("mask_image=1.5", dict(image=_image(), mask_image=1.5), InputError, "mask_image: expected"),
    CallCase("mask_image with NaN", dict(image=_image(), mask_image=_nan_image()[..., 1:2]), InputError,
             "mask_image: expected finite values"),
    # -- LoRA adapters (files written by make_scratch) -------------------------------------------
    CallCase("lora file missing", dict(loras=[("{tmp}/missing.safetensors", 1.0)]), LoraError,
             "expected an existing .safetensors file, got no such file"),
    CallCase("lora for another architecture (SDXL shapes)", dict(loras=[("{tmp}/sdxl-shaped.safetensors", 1.0)]),
             LoraError, "has weight shape [64, 64] in these artifacts, the adapter's update is [640, 640]"),
    CallCase("lora keys matching nothing", dict(loras=[("{tmp}/unknown-modules.safetensors", 1.0)]), LoraError,
             "2 of its 3 unet modules match no layer of these artifacts, e.g. 'mid_block.attentions.7"),
    CallCase("lora with inf in a factor", dict(loras=[("{tmp}/inf.safetensors", 1.0)]), LoraError,
             "expected finite values in the up factor, got 1 NaN or infinite"),
    CallCase("lora file over the size limit", dict(loras=[("{tmp}/ok.safetensors", 1.0)]), LoraError,
             "expected a file of at most 1,024 bytes", lora_limits=dict(max_file_bytes=1024)),
    CallCase("lora set beyond the memory available", dict(loras=[("{tmp}/ok.safetensors", 1.0)], height=16, width=16),
             BudgetError,
             "the adapter set needs sessions of its own for unet", available_bytes=2**20),
    CallCase("lora scale over the limit", dict(loras=[("{tmp}/ok.safetensors", 1000.0)]), LoraError,
             "loras[0] scale: expected a finite number in [-100, 100], got 1000.0"),
    CallCase("lora with NaN in a factor", dict(loras=[("{tmp}/nan.safetensors", 1.0)]), LoraError,
             "expected finite values in the up factor, got 1 NaN"),
    CallCase("lora scale=nan", dict(loras=[("{tmp}/ok.safetensors", NAN)]), LoraError,
             "loras[0] scale: expected a finite number"),
    CallCase("lora scale=inf", dict(loras=[("{tmp}/ok.safetensors", INF)]), LoraError,
             "loras[0] scale: expected a finite number"),
    CallCase("lora pickle (.ckpt)", dict(loras=[("{tmp}/style.ckpt", 1.0)]), LoraError,
             "expected a .safetensors file, got a pickle"),
    CallCase("lora pickle under a .safetensors name", dict(loras=[("{tmp}/pickled.safetensors", 1.0)]), LoraError,
             "got a pickle"),
    CallCase("9 loras (limit 8)", dict(loras=[("{tmp}/ok.safetensors", 1.0)] * 9), LoraError,
             "loras: expected at most 8 adapters per call, got 9"),
    CallCase("lora rank 2048 (limit 1024)", dict(loras=[("{tmp}/rank-2048.safetensors", 1.0)]), LoraError,
             "expected rank at most 1024, got 2048"),
    CallCase("loras='style' (not a list)", dict(loras="style"), LoraError, "loras: expected a list"),
    CallCase("lora named twice", dict(loras=[("{tmp}/ok.safetensors", 1.0), ("{tmp}/ok.safetensors", 0.5)]),
             LoraError, "is the same file as an adapter named before it"),
    # -- ControlNet (a pipeline loaded with `controlnets` of the tiny model's ControlNet) ----------
    CallCase("control_image, pipeline loaded without a ControlNet", dict(control_image=_image(), guess_mode=True),
             InputError, "control_image, guess_mode: this pipeline was loaded without a ControlNet"),
    CallCase("1 control image for 2 ControlNets", dict(control_image=_image()), InputError,
             "control_image: expected one image per ControlNet (2), got 1", controlnets=2),
    CallCase("3 control images for 2 ControlNets", dict(control_image=[_image()] * 3), InputError,
             "control_image: expected one image per ControlNet (2), got 3", controlnets=2),
    CallCase("2 control images for 1 prompt and 1 ControlNet", dict(control_image=[_image(), _image()]), InputError,
             "control_image: expected 1 image or one per prompt (1), got 2", controlnets=1),
    CallCase("ControlNet arguments without control_image", dict(controlnet_conditioning_scale=0.5), InputError,
             "control_image: expected one image per ControlNet (1) with controlnet_conditioning_scale, got none",
             controlnets=1),
    CallCase("controlnet_conditioning_scale=nan", dict(control_image=_image(), controlnet_conditioning_scale=NAN),
             InputError, "controlnet_conditioning_scale[0]: expected a finite number >= 0, got nan", controlnets=1),
    CallCase("controlnet_conditioning_scale=inf", dict(control_image=_image(), controlnet_conditioning_scale=INF),
             InputError, "controlnet_conditioning_scale[0]: expected a finite number >= 0, got inf", controlnets=1),
    CallCase("controlnet_conditioning_scale=-1", dict(control_image=_image(), controlnet_conditioning_scale=-1.0),
             InputError, "controlnet_conditioning_scale[0]: expected a finite number >= 0, got -1.0", controlnets=1),
    CallCase("2 scales for 1 ControlNet", dict(control_image=_image(), controlnet_conditioning_scale=[1.0, 0.5]),
             InputError, "controlnet_conditioning_scale: expected one value per ControlNet (1), got 2", controlnets=1),
    CallCase("controlnet_conditioning_scale='1'", dict(control_image=_image(), controlnet_conditioning_scale="1"),
             InputError, "controlnet_conditioning_scale[0]: expected a number, got str", controlnets=1),
    CallCase("control_guidance_start >= control_guidance_end",
             dict(control_image=_image(), control_guidance_start=0.8, control_guidance_end=0.2), InputError,
             "control_guidance_start[0]: expected less than control_guidance_end (0.2), got 0.8", controlnets=1),
    CallCase("control_guidance_end=1.5", dict(control_image=_image(), control_guidance_end=1.5), InputError,
             "control_guidance_end[0]: expected a finite number in [0, 1], got 1.5", controlnets=1),
    CallCase("control_guidance_start=nan", dict(control_image=_image(), control_guidance_start=NAN), InputError,
             "control_guidance_start[0]: expected a finite number in [0, 1], got nan", controlnets=1),
    CallCase("guess_mode='yes'", dict(control_image=_image(), guess_mode="yes"), InputError,
             "guess_mode: expected True or False, got str", controlnets=1),
    CallCase("control_image with NaN", dict(control_image=_nan_image()), InputError,
             "control_image: expected finite values", controlnets=1),
    CallCase("control_image float values > 1", dict(control_image=_image(2.0)), InputError,
             "control_image: expected float values in [0, 1]", controlnets=1),
    CallCase("control_image with 5 channels", dict(control_image=np.zeros((64, 64, 5), np.float32)), InputError,
             "control_image: expected", controlnets=1),
    CallCase("control_image path not an image", dict(control_image="{tmp}/not-an-image.png"), InputError,
             "control_image: expected a readable image file", controlnets=1),
    CallCase("control_image=123", dict(control_image=123), InputError, "control_image: expected a PIL image, a path",
             controlnets=1),
    CallCase("control_image of 20000x20000 (the output takes its size)",
             dict(control_image=np.broadcast_to(np.float32(0.5), (20000, 20000, 3))), BudgetError, "pixels per call",
             controlnets=1),
    CallCase("control_image[1] with NaN (2 ControlNets)", dict(control_image=[_image(), _nan_image()]), InputError,
             "control_image[1]: expected finite values", controlnets=2),
    # -- SD 3's arguments on SD 1.x, and the reverse; SD 3's own bounds (the tiny SD 3 model: 64 x 64 patches) --
    CallCase("prompt_3 on SD 1.x", dict(prompt_3="a cat"), InputError,
             "prompt_3: applies to models with 3 text encoders or more"),
    CallCase("negative_prompt_2 on SD 1.x", dict(negative_prompt_2="dark"), InputError,
             "negative_prompt_2: applies to models with 2 text encoders or more"),
    CallCase("max_sequence_length on SD 1.x", dict(max_sequence_length=128), InputError,
             "max_sequence_length: applies to models with a T5 text encoder (SD 3), not sd1"),
    CallCase("skip_guidance_layers on SD 1.x", dict(skip_guidance_layers=[7, 8, 9]), InputError,
             "skip_guidance_layers: applies to SD 3 models (a transformer's blocks), not sd1"),
    CallCase("SD 3: skip_guidance_layers=[5] (2 blocks)", dict(skip_guidance_layers=[5]), InputError,
             "skip_guidance_layers: expected a non-empty list of distinct block indices in [0, 1]", model="tiny-sd3"),
    CallCase("SD 3: max_sequence_length=513 (T5's limit is 512)", dict(max_sequence_length=513), InputError,
             "max_sequence_length: expected an integer in [1, 512], got 513", model="tiny-sd3"),
    CallCase("SD 3: max_sequence_length=0", dict(max_sequence_length=0), InputError,
             "max_sequence_length: expected an integer in [1, 512], got 0", model="tiny-sd3"),
    CallCase("SD 3: height=1040 (beyond the position-embedding grid)", dict(height=1040, width=64), InputError,
             "height: expected at most 1024 pixels (the transformer's position embeddings cover 64 patches",
             model="tiny-sd3"),
    CallCase("SD 3: img2img at 2048x2048 (beyond the grid)",
             dict(image=_image(size=64), height=2048, width=2048), InputError,
             "height: expected at most 1024 pixels", model="tiny-sd3"),
    CallCase("SD 3: prompt_3 with 2 strings for 1 prompt", dict(prompt_3=["a", "b"]), InputError,
             "prompt_3: expected 1 string (one prompt was given), got 2", model="tiny-sd3"),
    CallCase("SD 3: original_size (SDXL's)", dict(original_size=(1024, 1024)), InputError,
             "original_size: applies to SDXL models", model="tiny-sd3"),
    CallCase("SD 3: aesthetic_score (the SDXL refiner's)", dict(aesthetic_score=6.0), InputError,
             "aesthetic_score: applies to the SDXL refiner models", model="tiny-sd3"),
    # -- what issue 22 found over HTTP, refused by the runtime itself ------------------------------
    CallCase("prompt with a lone surrogate ('\\ud800')", dict(prompt="a \ud800 cat"), InputError,
             "prompt: expected valid Unicode text, got a lone surrogate '\\ud800' at character 2",
             "500 for it and for the two valid requests batched with it"),
    CallCase("prompt of 100,000 characters", dict(prompt="x" * 100_000), InputError,
             "prompt: expected at most 20,000 characters", "accepted silently, truncated to 77 tokens"),
    CallCase("guidance_scale=1e308", dict(guidance_scale=1e308), InputError,
             "guidance_scale: expected a finite number in [0, 100]", "500 NumericalError after the run"),
    CallCase("height = a list of 1,000,000 integers", dict(height=list(range(1_000_000))), InputError,
             "got a list of 1,000,000 items, [0, 1, 2, ...]", "a 7.9 MB error message echoing the list"),
    CallCase("width = a dict of 200,000 keys", dict(width={str(i): i for i in range(200_000)}), InputError,
             "got a dict of 200,000 items", "a 3.4 MB error message"),
    CallCase("SD 3: a LoRA (UNet models only so far)", dict(loras=[("{tmp}/missing.safetensors", 1.0)]), LoraError,
             "loras: LoRA adapters are for UNet models so far, not sd3", model="tiny-sd3"),
]
# fmt: on


@dataclass(frozen=True)
class HttpCase:
    """A request to `sdrt serve` (the tiny model; an API key and loopback's host names set) and its answer."""

    id: str
    body: bytes | None  # None: no body
    status: int
    type: str  # the error's "type"
    says: str
    method: str = "POST"
    path: str = "/v1/images/generations"
    headers: dict = field(default_factory=dict)  # beside the right key, Host localhost and JSON's Content-Type
    before: str = ""


def _big_png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its data would not decode; nothing reads that far)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


HTTP_KEY = "k" * 24
# fmt: off
HTTP_CASES = [
    HttpCase("GET /nope (no such route)", None, 404, "not_found", "/nope: expected one of POST /v1/images/generations",
             method="GET", path="/nope", before="FastAPI's {'detail': 'Not Found'}"),
    HttpCase("GET on the generation route", None, 405, "method_not_allowed", "GET /v1/images/generations: expected POST",
             method="GET", before="FastAPI's {'detail': 'Method Not Allowed'}"),
    HttpCase("body not UTF-8", b'{"prompt": "\xff\xfe"}', 400, "invalid_request",
             "body: expected a JSON object in UTF-8", before="FastAPI's {'detail': ...}"),
    HttpCase("seed of 5,000 digits", b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, "invalid_request",
             "body: expected a JSON object in UTF-8", before="FastAPI's {'detail': ...}"),
    HttpCase("100,000-deep nesting", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_request",
             "body: expected a JSON object in UTF-8", before="FastAPI's {'detail': ...}"),
    HttpCase("prompt '\\ud800' (a lone surrogate in JSON)", b'{"prompt": "\\ud800", "num_inference_steps": 2}', 400,
             "InputError", "prompt: expected valid Unicode text",
             before="500 internal_error, and the same for the valid requests batched with it"),
    HttpCase("image: a PNG header of 20000x20000", b'{"prompt": "a", "image": "' + _b64(_big_png_header(20000, 20000)).encode() + b'"}',
             400, "InputError", "image: expected at most 16,777,216 pixels, got 400,000,000 pixels",
             before="'encode the image file itself, not its pixels'"),
    HttpCase("guidance_scale: 1e308", b'{"prompt": "a", "guidance_scale": 1e308}', 400, "InputError",
             "guidance_scale: expected a finite number in [0, 100]", before="500 NumericalError"),
    HttpCase("no API key (the service has --api-key)", b'{"prompt": "a"}', 401, "unauthorized",
             "Authorization: expected 'Bearer <the service's API key>', got no Authorization header",
             headers={"Authorization": ""}, before="no authentication option: 200"),
    HttpCase("Host: evil.example (DNS rebinding)", b'{"prompt": "a"}', 400, "invalid_host",
             "Host: expected one of localhost, 127.0.0.1, ::1 (--allowed-hosts), got 'evil.example'",
             headers={"Host": "evil.example"}, before="200"),
]
# fmt: on


@dataclass(frozen=True)
class ArtifactCase:
    id: str
    error: type
    says: str
    load: dict = field(default_factory=dict)  # extra Pipeline.load arguments


# The faults themselves are made by tests/test_bad_inputs.py (FAULTS), keyed by these ids.
ARTIFACT_CASES = [
    ArtifactCase("no manifest.json", ArtifactError, "manifest.json"),
    ArtifactCase("manifest.json not JSON", ArtifactError, "expected JSON"),
    ArtifactCase("manifest schema newer than the runtime", ArtifactError, "expected schema_version"),
    ArtifactCase("graph file missing", ArtifactError, "expected a file listed in the manifest"),
    ArtifactCase("graph file changed (hash)", ArtifactError, "sha256"),
    ArtifactCase("graph file truncated, hashes not checked", ArtifactError, "unet", {"verify_hashes": False}),
    ArtifactCase("file path escaping the folder (../)", ArtifactError, ".."),
    ArtifactCase("external data at an absolute path", ArtifactError, "/etc/hostname"),
    ArtifactCase("external data outside the folder (../)", ArtifactError, "../outside.bin"),
    ArtifactCase("unknown model family", ArtifactError, "family"),
    ArtifactCase("scheduler config missing", ArtifactError, "scheduler_config.json"),
    ArtifactCase("tokenizer missing", ArtifactError, "tokenizer"),
    ArtifactCase("backend='nope'", InputError, "backend: expected one of", {"backend": "nope"}),
    ArtifactCase("bf16 on onnxruntime's CPU provider", BackendError, "precision", {"precision": "bf16"}),
    # ControlNets (the tiny model's, loaded with `controlnets=[its directory]`), each faulted in a copy
    ArtifactCase(
        "controlnet for another family (sdxl)",
        ArtifactError,
        "controlnets[0] (<cn>): expected a ControlNet for the model's family 'sd1', got one for 'sdxl'",
    ),
    ArtifactCase(
        "controlnet for other UNet blocks",
        ArtifactError,
        "controlnets[0] (<cn>): unet_block_channels of the model is [32, 64], of the ControlNet [320, 640]: "
        "they do not fit",
    ),
    ArtifactCase(
        "controlnet for another text width",
        ArtifactError,
        "cross_attention_dim of the model is 32, of the ControlNet 768",
    ),
    ArtifactCase(
        "controlnet directory without controlnet.json",
        ArtifactError,
        "controlnet: expected <cn>/controlnet.json, found none",
    ),
    ArtifactCase("controlnet graph changed (hash)", ArtifactError, "sha256"),
    ArtifactCase(
        "controlnets, model exported without unet_control",
        ArtifactError,
        "controlnets: expected the model's UNet that takes ControlNet residuals (unet_control)",
    ),
]
CONTROLNET_ARTIFACT_CASES = {c.id for c in ARTIFACT_CASES if "controlnet" in c.id}


def call_kwargs(case: CallCase, tmp) -> dict:
    kwargs = {"prompt": "a photo", "num_inference_steps": 2, "seed": 0}
    for key, value in case.kwargs.items():
        if key == "loras" and isinstance(value, list):
            value = [(path.replace("{tmp}", str(tmp)), scale) for path, scale in value]
        kwargs[key] = value.replace("{tmp}", str(tmp)) if isinstance(value, str) else value
    return kwargs


# A self-attention projection and a 3x3 convolution of the tiny model's UNet, with their weight shapes.
TINY_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # (64, 64)


def _lora_file(path, modules: dict, rank: int = 2, poison: float | None = None) -> None:
    """A peft-format LoRA for ``modules`` (name -> (out, in)); ``poison``: that value (NaN, inf) in the first up
    factor."""
    from safetensors.numpy import save_file

    rng, tensors = np.random.default_rng(0), {}
    for name, (out, inp) in modules.items():
        tensors[f"unet.{name}.lora_A.weight"] = rng.normal(size=(rank, inp)).astype(np.float32)
        tensors[f"unet.{name}.lora_B.weight"] = rng.normal(size=(out, rank)).astype(np.float32)
    if poison is not None:
        tensors[f"unet.{next(iter(modules))}.lora_B.weight"][0, 0] = poison
    save_file(tensors, str(path))


def make_scratch(tmp) -> None:
    import pickle

    from PIL import Image

    (tmp / "not-an-image.png").write_text("this is text, not a PNG")
    Image.new("RGB", (4, 4)).save(tmp / "tiny.png")
    _lora_file(tmp / "ok.safetensors", {TINY_Q: (64, 64)})
    _lora_file(tmp / "sdxl-shaped.safetensors", {TINY_Q: (640, 640)})  # SDXL's down_blocks.1 width
    _lora_file(
        tmp / "unknown-modules.safetensors",
        {TINY_Q: (64, 64), "mid_block.attentions.7.proj_in": (64, 64), "up_blocks.9.attentions.0.proj_out": (64, 64)},
    )
    _lora_file(tmp / "nan.safetensors", {TINY_Q: (64, 64)}, poison=NAN)
    _lora_file(tmp / "inf.safetensors", {TINY_Q: (64, 64)}, poison=-INF)
    _lora_file(tmp / "rank-2048.safetensors", {TINY_Q: (64, 64)}, rank=2048)
    (tmp / "style.ckpt").write_bytes(pickle.dumps({"a": 1}))
    (tmp / "pickled.safetensors").write_bytes(pickle.dumps({"a": 1}))


if __name__ == "__main__":  # writes the table: python tests/bad_input_cases.py docs/bad-inputs.md
    import sys

    print("run `.venv/bin/pytest tests/test_bad_inputs.py --write-table docs/bad-inputs.md`", file=sys.stderr)
    sys.exit(2)

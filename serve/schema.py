"""The HTTP request body of ``POST /v1/images/generations`` and the response it gets.

The body names ``Pipeline.__call__``'s arguments (plus OpenAI-style ``n`` and ``size``). Values are passed to the
runtime as JSON gave them, never coerced: the runtime checks every one and its message is the answer, so
``"height": "64"`` gets the same error over HTTP as ``pipe(height="64")``. What only the service can check is
checked here: unknown fields, the aliases, ``response_format``, and the images, which arrive as base64 and are
decoded here (a string is never handed to the runtime as an image: it would read it as a path on the server).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from sdrt.runtime.errors import InputError
from sdrt.runtime.lora import RegisteredName

RESPONSE_FORMATS = ("b64_json", "png")
MAX_IMAGE_PIXELS = 4096 * 4096  # an uploaded image's own size, checked before it is decoded (PNG bombs)


class SchemaError(ValueError):
    """A body the service cannot read as a generation request (HTTP 422)."""


class GenerationBody(BaseModel):
    """The JSON body. Values are the runtime's to check (types included), so every field takes any JSON value."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any = Field(description="a string, or a list of strings (one image set per prompt)")
    negative_prompt: Any = Field(None, description="what to steer away from: one string, or one per prompt")
    prompt_2: Any = Field(None, description="SDXL, SD 3: the second text encoder's prompt (default: prompt)")
    prompt_3: Any = Field(None, description="SD 3: T5's prompt (default: prompt)")
    negative_prompt_2: Any = Field(None, description="SDXL, SD 3: the second text encoder's negative prompt")
    negative_prompt_3: Any = Field(None, description="SD 3: T5's negative prompt")
    max_sequence_length: Any = Field(None, description="SD 3: T5's tokens per prompt, 1..512 (default 256)")
    skip_guidance_layers: Any = Field(
        None, description="SD 3 text-to-image: transformer blocks skipped for skip-layer guidance, e.g. [7, 8, 9]"
    )
    skip_layer_guidance_scale: Any = Field(None, description="SD 3: skip-layer guidance scale (default 2.8)")
    skip_layer_guidance_start: Any = Field(None, description="SD 3: fraction of the steps where it starts (0.01)")
    skip_layer_guidance_stop: Any = Field(None, description="SD 3: fraction of the steps where it stops (0.2)")
    height: Any = Field(None, description="pixels, a multiple of the model's spatial multiple (default: the model's)")
    width: Any = Field(None, description="pixels (default: the model's)")
    size: Any = Field(None, description="'WIDTHxHEIGHT', e.g. '512x512': instead of width and height")
    num_inference_steps: Any = Field(None, description="denoising steps (default: the model family's)")
    guidance_scale: Any = Field(None, description="classifier-free guidance; <= 1 turns it off")
    seed: Any = Field(None, description="seed of every random draw, 0 <= seed < 2**64 (random when omitted)")
    scheduler: Any = Field(None, description="sampler name, e.g. 'euler-a' (default: the model's)")
    num_images_per_prompt: Any = Field(None, description="images per prompt (default 1)")
    n: Any = Field(None, description="alias of num_images_per_prompt")
    strength: Any = Field(None, description="image-to-image and inpainting: how far the image is noised, (0, 1]")
    image: Any = Field(None, description="base64 PNG or JPEG to start from (image-to-image; inpainting with a mask)")
    mask_image: Any = Field(None, description="base64 PNG or JPEG inpainting mask: white is repainted")
    denoising_end: Any = Field(None, description="stop at this fraction of the schedule, (0, 1)")
    loras: Any = Field(
        None,
        description="LoRA adapters registered at start-up (sdrt serve --lora-dir): "
        '[{"name": "style", "scale": 0.8}, ...]; scale defaults to 1. Never a path',
    )
    control_image: Any = Field(
        None,
        description="ControlNet (sdrt serve --controlnet): a base64 PNG or JPEG, or a list with one per ControlNet",
    )
    controlnet_conditioning_scale: Any = Field(
        None, description="a number, or one per ControlNet (default: the task's)"
    )
    control_guidance_start: Any = Field(None, description="fraction of the schedule where control starts, [0, 1)")
    control_guidance_end: Any = Field(None, description="fraction of the schedule where control ends, (0, 1]")
    guess_mode: Any = Field(None, description="true: the ControlNets see the prompt only")
    response_format: Any = Field("b64_json", description="'b64_json' (JSON, default) or 'png' (one image's bytes)")


FIELDS = tuple(GenerationBody.model_fields)


@dataclass(frozen=True)
class Call:
    """One request, ready for ``Pipeline.run_batch``."""

    kwargs: dict  # Pipeline.__call__ keyword arguments
    images: int  # the images it asks for, for batching (1 where the runtime will refuse the count anyway)
    response_format: str


def to_call(body: GenerationBody) -> Call:
    """The runtime call a body asks for: aliases resolved, images decoded; SchemaError or InputError otherwise."""
    given = {name: getattr(body, name) for name in body.model_fields_set}
    response_format = given.pop("response_format", "b64_json")
    if response_format not in RESPONSE_FORMATS:
        raise SchemaError(f"response_format: expected one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}")
    if "n" in given:
        if "num_images_per_prompt" in given:
            raise SchemaError("n: expected n or num_images_per_prompt (the same thing), got both (drop one)")
        given["num_images_per_prompt"] = given.pop("n")
    if "size" in given:
        if "height" in given or "width" in given:
            raise SchemaError("size: expected size or height/width, got both (drop one)")
        given["width"], given["height"] = _size(given.pop("size"))
    if given.get("loras") is not None:
        given["loras"] = _loras(given["loras"])
    for name in ("image", "mask_image"):
        if given.get(name) is not None:
            given[name] = decode_image(name, given[name])
    control = given.get("control_image")
    if isinstance(control, list):
        given["control_image"] = [decode_image(f"control_image[{k}]", v) for k, v in enumerate(control)]
    elif control is not None:
        given["control_image"] = decode_image("control_image", control)
    for name in ("control_guidance_start", "control_guidance_end", "guess_mode"):
        if name in given and given[name] is None:  # JSON null: the runtime's default
            del given[name]
    images = _count_images(given)
    if response_format == "png" and images != 1:
        raise InputError(
            f"response_format: 'png' returns one image, got a request for {images} (ask for b64_json, or one image)"
        )
    return Call(given, images, response_format)


def _loras(value) -> list[dict]:
    """The adapters as the runtime takes them; only names (the runtime refuses names not registered)."""
    if not isinstance(value, list):
        raise SchemaError(
            f'loras: expected a list of {{"name": ..., "scale": ...}} objects, got {type(value).__name__}'
        )
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "scale"}:
            raise SchemaError(
                f'loras[{i}]: expected an object with "name" (a registered adapter) and optionally "scale", '
                f"got {json_preview(entry)}"
            )
        if not isinstance(entry["name"], str):
            raise SchemaError(f"loras[{i}].name: expected a string, got {json_preview(entry['name'])}")
    return [{"name": RegisteredName(e["name"]), "scale": e.get("scale", 1.0)} for e in value]


def json_preview(value) -> str:
    from sdrt.runtime.validation import describe  # bounded, whatever the value's size

    return describe(value)


def _size(value) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value) if isinstance(value, str) else None
    if match is None:
        raise SchemaError(f"size: expected 'WIDTHxHEIGHT' such as '512x512', got {json_preview(value)}")
    return int(match[1]), int(match[2])


def _count_images(kwargs: dict) -> int:
    prompt, n = kwargs.get("prompt"), kwargs.get("num_images_per_prompt", 1)
    prompts = len(prompt) if isinstance(prompt, list) and prompt else 1
    per_prompt = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return prompts * per_prompt


def decode_image(name: str, value):
    """A base64 PNG or JPEG (a data: URL too) -> a decoded PIL image; InputError naming ``name`` otherwise."""
    from PIL import Image

    if not isinstance(value, str):
        raise InputError(f"{name}: expected a base64-encoded PNG or JPEG (a string), got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{name}: expected a base64-encoded PNG or JPEG, got invalid base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError as e:  # a header declaring more pixels than PIL will open
        declared = re.search(r"\((\d+) pixels\)", str(e))
        got = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than PIL opens"
        raise InputError(
            f"{name}: expected at most {MAX_IMAGE_PIXELS:,} pixels, got {got} (send a smaller image)"
        ) from None
    except Exception:  # PIL's message names the BytesIO object: say what the bytes are instead
        raise InputError(
            f"{name}: expected a base64-encoded PNG or JPEG, got {len(data):,} bytes starting {data[:8]!r} "
            "(encode the image file itself, not its pixels)"
        ) from None
    width, height = image.size  # from the header: nothing decoded yet
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name}: expected at most {MAX_IMAGE_PIXELS:,} pixels, got {width}x{height} (send a smaller image)"
        )
    try:
        image.load()
    except Exception as e:  # PIL raises many kinds (OSError for a truncated file, SyntaxError, ...)
        raise InputError(f"{name}: expected a complete PNG or JPEG, got one PIL cannot decode ({e})") from None
    return image


# -- the response --------------------------------------------------------------------------------
def encode_png(image) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def timings(result, queue_wait: float) -> dict[str, float]:
    """The result's single-number timings (seconds; ``batch_size`` in images when it shared a batch) and the
    time the request waited in the queue."""
    numbers = {k: round(v, 4) for k, v in result.timings.items() if isinstance(v, (int, float))}
    return {"queue_wait": round(queue_wait, 4), **numbers}


def json_body(result, queue_wait: float) -> dict:
    return {
        "created": int(time.time()),
        "seed": result.seed,
        "data": [{"b64_json": base64.b64encode(encode_png(image)).decode()} for image in result.images],
        "timings": timings(result, queue_wait),
        "warnings": list(result.warnings),  # e.g. a prompt truncated to the text encoder's tokens
    }


def png_headers(result, queue_wait: float) -> dict[str, str]:
    """The seed, and the timings as a standard Server-Timing header (milliseconds)."""
    stages = timings(result, queue_wait)
    stages.pop("batch_size", None)
    server_timing = ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in stages.items())
    headers = {"X-Seed": str(result.seed), "Server-Timing": server_timing}
    if result.warnings:  # JSON with ASCII escapes: header values are Latin-1
        headers["X-Sdrt-Warnings"] = json.dumps(result.warnings)
    return headers

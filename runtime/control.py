"""ControlNet in the denoising loop, as diffusers' ControlNet pipelines run it.

A call's control: one image per loaded ControlNet (in [0, 1], at the output size, one row per generated image), a
conditioning scale, and a window of the schedule (``control_guidance_start`` / ``_end``) outside which the
ControlNet's residuals count zero. Each image's features (the ControlNet's conditioning embedding) are computed once
per call, on those rows, and put in the UNet's batch layout: doubled under guidance, or only the conditional half in
guess mode (diffusers runs the embedding at every step, on the doubled rows: the same numbers, computed again). Per
step each ControlNet runs on the step's latents, text and features; its residuals are
scaled (in guess mode by ``logspace(-1, 0)`` from the first residual to the mid block's, times the scale), several
ControlNets' residuals are added in order, and the UNet that takes residuals (``unet_control``) runs with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sdrt.runtime import conditioning, families
from sdrt.runtime.errors import InputError

# The keyword arguments, as diffusers' ControlNet pipelines name them, with their defaults.
ARGUMENTS = {
    "control_image": None,
    "controlnet_conditioning_scale": None,  # diffusers' default for the task (DEFAULT_SCALES)
    "control_guidance_start": 0.0,
    "control_guidance_end": 1.0,
    "guess_mode": False,
}


# diffusers' ControlNet pipelines' default conditioning scale per task.
DEFAULT_SCALES = {"text-to-image": 1.0, "image-to-image": 0.8, "inpainting": 0.5}


@dataclass
class Control:
    """One call's control, checked."""

    images: list[np.ndarray]  # per ControlNet: NCHW in [0, 1], one row per generated image
    scales: list[float]
    starts: list[float]
    ends: list[float]
    guess_mode: bool
    doubled: bool = False  # the ControlNet's rows are the images twice (guidance without guess mode)
    features: list[np.ndarray] | None = None  # per ControlNet, in its rows: computed at the call's first step

    def keep(self, k: int, i: int, steps: int) -> float:
        """1 inside ControlNet ``k``'s window at step ``i`` of ``steps``, else 0 (diffusers' ``controlnet_keep``)."""
        return 1.0 - float(i / steps < self.starts[k] or (i + 1) / steps > self.ends[k])


def _is_default(value, default) -> bool:
    """``value`` is the argument's default (None counts as the default; an image or array never does)."""
    if value is None:
        return True
    if default is None or not isinstance(value, (bool, int, float)):
        return False
    return type(value) is type(default) and value == default if isinstance(default, bool) else value == default


def _per_controlnet(value, count: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise InputError(f"{name}: expected one value per ControlNet ({count}), got {len(value)}")
        return list(value)
    return [value] * count


def _number(value, name: str, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise InputError(f"{name}: expected a finite number {bound}, got {value}")
    return value


def prepare(
    count: int,
    args: dict,
    batch: int,
    images_per_prompt: int,
    guided: bool,
    height: int,
    width: int,
    multiple: int,
    task: str = "text-to-image",
) -> Control | None:
    """Check a call's ControlNet arguments against ``count`` loaded ControlNets; None when none are loaded and none
    were given. ``batch``: images of the call; ``height``/``width``: its output size."""
    given = {k: args.get(k, d) for k, d in ARGUMENTS.items()}
    if count == 0:
        asked = [k for k, d in ARGUMENTS.items() if not _is_default(given[k], d)]
        if asked:
            raise InputError(
                f"{', '.join(asked)}: this pipeline was loaded without a ControlNet (Pipeline.load(..., "
                "controlnets=[DIR, ...]))"
            )
        return None
    image = given["control_image"]
    if image is None:  # a call without control runs the model alone (zero residuals), unless it asked for control
        asked = [k for k, d in ARGUMENTS.items() if k != "control_image" and not _is_default(given[k], d)]
        if asked:
            raise InputError(
                f"control_image: expected one image per ControlNet ({count}) with {', '.join(asked)}, got none"
            )
        return None
    images = [image] if count == 1 and not (isinstance(image, list) and len(image) == 1) else image
    if not isinstance(images, (list, tuple)) or len(images) != count:
        got = len(images) if isinstance(images, (list, tuple)) else 1
        raise InputError(f"control_image: expected one image per ControlNet ({count}), got {got}")
    scales = [
        _number(s, f"controlnet_conditioning_scale[{k}]", 0.0)
        for k, s in enumerate(
            _per_controlnet(
                DEFAULT_SCALES[task]
                if given["controlnet_conditioning_scale"] is None
                else given["controlnet_conditioning_scale"],
                count,
                "controlnet_conditioning_scale",
            )
        )
    ]
    starts = _per_controlnet(given["control_guidance_start"], count, "control_guidance_start")
    ends = _per_controlnet(given["control_guidance_end"], count, "control_guidance_end")
    starts = [_number(s, f"control_guidance_start[{k}]", 0.0, 1.0) for k, s in enumerate(starts)]
    ends = [_number(e, f"control_guidance_end[{k}]", 0.0, 1.0) for k, e in enumerate(ends)]
    for k, (s, e) in enumerate(zip(starts, ends)):
        if s >= e:
            raise InputError(f"control_guidance_start[{k}]: expected less than control_guidance_end ({e:g}), got {s:g}")
    guess = given["guess_mode"]
    if not isinstance(guess, bool):
        raise InputError(f"guess_mode: expected True or False, got {type(guess).__name__}")
    rows = []
    for k, one in enumerate(images):
        what = f"control_image[{k}]" if count > 1 else "control_image"
        pixels = conditioning.preprocess_image(one, height, width, multiple=multiple, normalize=False, what=what)
        if pixels.shape[2:] != (height, width):
            raise InputError(
                f"{what}: expected {height}x{width} after resizing, got {pixels.shape[2]}x{pixels.shape[3]}"
            )
        if pixels.shape[0] == 1:  # one image for every generated image (diffusers' repeat_interleave)
            pixels = np.repeat(pixels, batch, axis=0)
        elif pixels.shape[0] * images_per_prompt == batch:
            pixels = np.repeat(pixels, images_per_prompt, axis=0)
        else:
            raise InputError(
                f"{what}: expected 1 image or one per prompt ({batch // images_per_prompt}), got {pixels.shape[0]}"
            )
        rows.append(pixels)
    return Control(rows, scales, starts, ends, guess, doubled=guided and not guess)


def zero_residuals(dims, specs: tuple, rows: int, latent_height: int, latent_width: int) -> dict[str, np.ndarray]:
    """Residuals that change nothing (all zero) for ``rows`` UNet rows at that latent size; ``specs``:
    ``families.control_residual_specs(dims)``."""
    values = families.sizes(dims, rows, latent_height, latent_width)
    return {t.name: np.zeros(tuple(values[d] if isinstance(d, str) else d for d in t.shape), np.float32) for t in specs}


def residuals(
    control: Control,
    controlnets: list,
    embeddings: list,
    specs: tuple,
    latents_rows: np.ndarray,
    latents_conditional: np.ndarray,
    timestep: float,
    feed: dict[str, np.ndarray],
    i: int,
    steps: int,
    guided: bool,
) -> dict[str, np.ndarray] | None:
    """The summed, scaled residuals of every ControlNet at step ``i``, in the UNet's rows, or None when every
    ControlNet is outside its window (their residuals all count zero). ``embeddings``: the ControlNets'
    conditioning embeddings, run at the first step that needs them. ``specs``: the residuals'
    tensor specs (``families.control_residual_specs``); ``latents_rows``: the UNet's (scaled) latent rows;
    ``latents_conditional``: the scaled latents once (guess mode's input); ``feed``: the UNet's text feed in its
    rows."""
    names = [t.name for t in specs]
    guess_half = control.guess_mode and guided
    x = latents_conditional if guess_half else latents_rows
    text = {k: (np.split(v, 2)[1] if guess_half else v) for k, v in feed.items() if k != "timestep_cond"}
    t = np.full((x.shape[0],), timestep, dtype=np.float32)
    total: list[np.ndarray] | None = None
    for k, session in enumerate(controlnets):
        scale = control.scales[k] * control.keep(k, i, steps)
        if scale == 0.0:
            continue  # residuals times zero: nothing to add
        if control.features is None:
            control.features = [None] * len(controlnets)
        if control.features[k] is None:  # once per call: the same image's features at every step
            once = embeddings[k].run({"controlnet_cond": control.images[k]})["controlnet_features"]
            control.features[k] = np.concatenate([once, once]) if control.doubled else once
        out = session.run({"sample": x, "timestep": t, "controlnet_features": control.features[k], **text})
        res = [out[n] for n in names]
        if control.guess_mode:  # diffusers: torch.logspace(-1, 0, n) in float32, times the scale
            factors = (np.logspace(-1, 0, len(res), dtype=np.float32) * np.float32(scale)).astype(np.float32)
            res = [r * f for r, f in zip(res, factors)]
        else:
            res = [r * np.float32(scale) for r in res]
        if guess_half:  # the unconditional rows get none
            res = [np.concatenate([np.zeros_like(r), r]) for r in res]
        total = res if total is None else [a + b for a, b in zip(total, res)]
    return None if total is None else dict(zip(names, total))  # None: every ControlNet outside its window

"""Conditioning inputs of the img2img, inpainting, LCM and SDXL pipelines, computed as diffusers computes them.

Each function mirrors one piece of diffusers (named in its docstring) in NumPy and PIL, to float32 rounding:

* :func:`preprocess_image` and :func:`preprocess_mask`: ``VaeImageProcessor.preprocess`` as the Stable Diffusion
  img2img/inpaint pipelines configure it (the image processor, and the mask processor with ``do_normalize=False,
  do_binarize=True, do_convert_grayscale=True``).
* :func:`mask_to_latent`: the ``torch.nn.functional.interpolate(mask, size=...)`` (mode "nearest") of
  ``prepare_mask_latents``.
* :func:`guidance_scale_embedding`: ``get_guidance_scale_embedding`` (LCM and guidance-distilled UNets).
* :func:`sdxl_time_ids`, :func:`refiner_time_ids`: SDXL's micro-conditioning ``_get_add_time_ids``.
* :func:`denoising_end_count`, :func:`denoising_start_begin`: SDXL's base/refiner split of one schedule.

Where this module knowingly differs from diffusers (all are inputs diffusers mishandles or does not take):

* uint8 NumPy arrays are read as 0..255 and scaled by 1/255, as the same pixels in a PIL image are; diffusers' NumPy
  path never scales, so it would map a uint8 image to [-1, 509] and binarize any nonzero uint8 mask value to 1.
* Float NumPy images must lie in [0, 1]; diffusers silently skips the [-1, 1] normalization of a batch whose minimum
  is negative (a deprecated input convention), and normalizes values above 1 without complaint.
* A PIL image not in mode RGB is converted to RGB before resizing, as ``diffusers.utils.load_image`` does; diffusers'
  image processor would pass its own channel count (1 for "L", 4 for "RGBA") on to the VAE, which rejects it. Paths
  are opened exactly as ``load_image`` opens them (EXIF orientation applied, then RGB).
* Masks may also be boolean arrays (True = masked).

NumPy inputs whose size differs from the target are resized as diffusers resizes them, with the "nearest" rule of
``torch.nn.functional.interpolate`` (reproduced index for index), not with the lanczos filter PIL images get.

Nothing here imports torch or diffusers; PIL is imported when an image is handled, so importing this module costs
only NumPy.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sdrt.runtime.errors import InputError
from sdrt.runtime.validation import describe

VAE_SCALE_FACTOR = 8  # diffusers' vae_scale_factor for every SD 1.x/2.x/XL VAE (2 ** (len(block_out_channels) - 1))


# ---- loading and validating inputs ----


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return f"a value of type {type(value).__name__}"


def _open_path(path: str | Path, what: str):
    """A path as ``diffusers.utils.load_image`` loads it: EXIF orientation applied, converted to RGB."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            return ImageOps.exif_transpose(opened).convert("RGB")  # convert() decodes, so truncated files fail here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{what}: expected a readable image file, could not read {str(path)!r}: {e}") from e


def _items(value, what: str) -> list:
    """The input as a non-empty list of PIL images and/or NumPy arrays (paths opened), all of one kind."""
    from PIL import Image

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise InputError(
            f"{what}: expected an image or a non-empty list of images, got an empty {type(value).__name__}"
        )
    loaded = []
    for item in items:
        if isinstance(item, (str, Path)):
            item = _open_path(item, what)
        elif not isinstance(item, (Image.Image, np.ndarray)):
            raise InputError(
                f"{what}: expected a PIL image, a path (str or pathlib.Path), a NumPy array, or a list of those, "
                f"got {_describe(item)}"
            )
        loaded.append(item)
    if len({isinstance(item, np.ndarray) for item in loaded}) > 1:
        raise InputError(f"{what}: expected a list of all PIL images/paths or all NumPy arrays, got a mix of both")
    return loaded


def _check_multiple(multiple) -> int:
    if isinstance(multiple, bool) or not isinstance(multiple, numbers.Integral) or multiple < 1:
        raise InputError(f"multiple: expected a positive integer, got {describe(multiple)}")
    return int(multiple)


def _target_size(size: tuple[int, int], height, width, multiple: int, what: str) -> tuple[int, int]:
    """diffusers' ``get_default_height_width``: the image's own size where not given, then (given or not) rounded
    down to a multiple of ``multiple`` (the VAE scale factor)."""
    chosen = []
    for name, value, own in (("height", height, size[0]), ("width", width, size[1])):
        source = "requested"
        if value is None:
            value, source = own, "the image's own"
        elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InputError(f"{what} {name}: expected a positive integer or None, got {describe(value)}")
        value = int(value)
        if value < multiple:  # rounding down would leave nothing
            raise InputError(
                f"{what} {name}: expected at least {multiple} (sizes are rounded down to a multiple of {multiple}), "
                f"got {value} ({source})"
            )
        chosen.append(value - value % multiple)
    return chosen[0], chosen[1]


def _float_pixels(array: np.ndarray, what: str, *, unit_range: bool, allow_bool: bool = False) -> np.ndarray:
    """uint8 -> float32 in [0, 1] (as PIL pixels are read); float arrays as they are (checked); bool -> 0/1."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if allow_bool and array.dtype == np.bool_:
        return array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        kinds = "uint8 (0..255), boolean" if allow_bool else "uint8 (0..255)"
        raise InputError(f"{what}: expected a {kinds} or floating-point array, got {_describe(array)}")
    if not np.isfinite(array).all():
        raise InputError(f"{what}: expected finite values, got an array containing NaN or infinity")
    if unit_range and array.size and (array.min() < 0 or array.max() > 1):
        raise InputError(
            f"{what}: expected float values in [0, 1] (or uint8 values in 0..255), got values in "
            f"[{array.min()}, {array.max()}]"
        )
    return array


def _stack(arrays: list[np.ndarray], what: str) -> np.ndarray:
    """Concatenate per-item batches (all NHWC), requiring one size."""
    sizes = {a.shape[1:3] for a in arrays}
    if len(sizes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise InputError(f"{what}: expected every array in the list to have one height x width, got {listed}")
    return np.concatenate(arrays, axis=0)


# ---- resizing ----


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output index under torch's CPU "nearest" rule (``nearest_idx`` in ATen's UpSample.h):
    identity and 2x upsampling are special-cased, otherwise floor(i * (float32) in/out) computed in float32."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_size - 1)


def _resize_nearest(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """``torch.nn.functional.interpolate(images, size=(height, width))`` (mode "nearest") of an NCHW array."""
    rows = _nearest_indices(images.shape[-2], height)
    cols = _nearest_indices(images.shape[-1], width)
    return images[..., rows[:, None], cols[None, :]]


def _resize_pil(image, height: int, width: int):
    """``VaeImageProcessor.resize`` for PIL images: lanczos (its default ``resample``), ``reducing_gap=None``."""
    from PIL import Image

    return image.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)


def _pil_to_nchw(images: list) -> np.ndarray:
    """``pil_to_numpy`` then ``numpy_to_pt``: float32 pixels / 255, channels first (a channel axis added for "L")."""
    array = np.stack([np.array(image).astype(np.float32) / 255.0 for image in images], axis=0)
    if array.ndim == 3:
        array = array[..., None]
    return array.transpose(0, 3, 1, 2)


# ---- images and masks ----


def preprocess_image(
    image,
    height: int | None = None,
    width: int | None = None,
    *,
    multiple: int = 8,
    normalize: bool = True,
    what: str = "image",
) -> np.ndarray:
    """An init image as ``VaeImageProcessor(vae_scale_factor=multiple).preprocess(image, height, width)``:
    float32 NCHW in [-1, 1].

    ``image``: a PIL image, a path (opened as ``diffusers.utils.load_image`` does), a NumPy array HWC or NHWC with
    3 channels (uint8 0..255 or float 0..1), or a list of those. Height and width default to the (first) image's,
    and are rounded down to a multiple of ``multiple``. PIL images are resized with lanczos when their size differs
    (every image of a list to the same size, as in diffusers); NumPy arrays with torch's "nearest" rule, as diffusers
    resizes them. See the module docstring for the inputs diffusers mishandles and this function treats otherwise.
    ``normalize=False``: in [0, 1], as diffusers' ControlNet pipelines take their control images.
    """
    multiple = _check_multiple(multiple)
    items = _items(image, what)
    if not isinstance(items[0], np.ndarray):
        rgb = [item if item.mode == "RGB" else item.convert("RGB") for item in items]
        h, w = _target_size((rgb[0].height, rgb[0].width), height, width, multiple, what)
        pixels = _pil_to_nchw([_resize_pil(item, h, w) for item in rgb])
        return np.ascontiguousarray(2.0 * pixels - 1.0 if normalize else pixels, dtype=np.float32)
    batches = []
    for array in items:
        if array.ndim not in (3, 4):
            raise InputError(
                f"{what}: expected a NumPy array of shape HWC or NHWC (3 channels), got {_describe(array)}"
            )
        if array.shape[-1] != 3:
            raise InputError(
                f"{what}: expected 3 (RGB) channels in the last axis of an HWC/NHWC array, got {_describe(array)}"
            )
        batches.append(array if array.ndim == 4 else array[None])
    if len({a.ndim for a in items}) > 1:
        raise InputError(f"{what}: expected a list of all HWC or all NHWC arrays, got a mix of both")
    nhwc = _stack(batches, what)
    h, w = _target_size(nhwc.shape[1:3], height, width, multiple, what)
    pixels = _float_pixels(nhwc, what, unit_range=True)
    pixels = _resize_nearest(pixels.transpose(0, 3, 1, 2), h, w)
    # in the array's own precision first (float16 stays half), as diffusers computes it
    return np.ascontiguousarray(2.0 * pixels - 1.0 if normalize else pixels, dtype=np.float32)


def preprocess_mask(mask, height: int, width: int, *, multiple: int = 8) -> np.ndarray:
    """An inpainting mask as ``StableDiffusionInpaintPipeline.mask_processor.preprocess(mask, height, width)``:
    float32 N1HW, 1 where the image is repainted and 0 where it is kept.

    ``mask``: a PIL image of any mode (resized with lanczos, then converted to grayscale, in diffusers' order), a
    path (opened as ``load_image`` opens it), or a NumPy array: HW; HW1; NHW (a 3-D array whose last axis is not 1 is
    a batch, as diffusers reads it); NHW1; or a list of HW/HW1/NHW1 arrays. uint8 arrays are read as 0..255, boolean
    arrays as 0/1, float arrays as they are. Values are binarized at 0.5 after resizing (NumPy arrays with torch's
    "nearest" rule). ``height``/``width`` are rounded down to a multiple of ``multiple``, as diffusers does.
    """
    what = "mask_image"
    multiple = _check_multiple(multiple)
    for name, value in (("height", height), ("width", width)):
        if value is None:
            raise InputError(f"{what} {name}: expected a positive integer (the image's), got None")
    items = _items(mask, what)
    if not isinstance(items[0], np.ndarray):
        h, w = _target_size((items[0].height, items[0].width), height, width, multiple, what)
        values = _pil_to_nchw([_resize_pil(item, h, w).convert("L") for item in items])
    else:
        if len(items) == 1 and not isinstance(mask, (list, tuple)):
            nhwc = _mask_batch(items[0], what, single=True)
        else:
            nhwc = _stack([_mask_batch(array, what, single=False) for array in items], what)
        h, w = _target_size(nhwc.shape[1:3], height, width, multiple, what)
        values = _float_pixels(nhwc, what, unit_range=False, allow_bool=True)
        values = _resize_nearest(values.transpose(0, 3, 1, 2), h, w)
    return np.ascontiguousarray(values >= 0.5, dtype=np.float32)  # diffusers' binarize: < 0.5 -> 0, >= 0.5 -> 1


def _mask_batch(array: np.ndarray, what: str, *, single: bool) -> np.ndarray:
    """One mask array as NHW1, following diffusers' reading of its shape."""
    expected = "HW, HW1, NHW or NHW1" if single else "HW, HW1 or NHW1 (a list of masks)"
    if array.ndim == 2:
        return array[None, :, :, None]
    if array.ndim == 3:
        if array.shape[-1] == 1:
            return array[None]
        if single:  # diffusers' grayscale rule: a 3-D array not ending in 1 is a batch of HW masks
            return array[..., None]
        raise InputError(f"{what}: expected list items of shape {expected} (one channel), got {_describe(array)}")
    if array.ndim == 4:
        if array.shape[-1] != 1:
            raise InputError(f"{what}: expected one channel in the last axis of an NHWC mask, got {_describe(array)}")
        return array
    raise InputError(f"{what}: expected a NumPy array of shape {expected}, got {_describe(array)}")


def mask_to_latent(mask: np.ndarray, latent_height: int, latent_width: int) -> np.ndarray:
    """A preprocessed NCHW mask at latent resolution, as ``prepare_mask_latents`` resizes it:
    ``torch.nn.functional.interpolate(mask, size=(latent_height, latent_width))`` (mode "nearest"), float32."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 4:
        raise InputError(f"mask: expected a NumPy array of shape NCHW (e.g. N1HW), got {_describe(mask)}")
    for name, value in (("latent_height", latent_height), ("latent_width", latent_width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {describe(value)}")
    return np.ascontiguousarray(_resize_nearest(mask, int(latent_height), int(latent_width)), dtype=np.float32)


# ---- guidance embedding ----


def guidance_scale_embedding(w, embedding_dim: int = 512) -> np.ndarray:
    """diffusers' ``get_guidance_scale_embedding(w, embedding_dim)`` (float32): for each guidance weight ``w[i]``
    (the pipelines pass ``guidance_scale - 1``), [sin(1000 w f_k), cos(1000 w f_k)] over frequencies
    f_k = exp(-k log(10000) / (embedding_dim // 2 - 1)), zero-padded to an odd ``embedding_dim``. Shape (len(w), dim).

    ``w`` is used in its own precision as diffusers uses the tensor it is given: a float64 array multiplies by 1000 in
    float64; lists and Python numbers become float32, as ``torch.tensor`` makes them (and as the pipelines' own
    ``torch.tensor(guidance_scale - 1)`` is). Every other step is float32 as in diffusers, with correctly rounded
    exp/sin/cos. torch computes exp on CPU through MKL, which rounds about 1% of values to the other neighbour; a
    frequency one ulp off moves sin/cos of arguments up to 1000 w by up to ~1e-4 * w. That is the one difference.
    """
    w = np.asarray(w) if isinstance(w, np.ndarray) else np.asarray(w, dtype=np.float32)
    if w.ndim != 1:
        raise InputError(f"w: expected a 1-D array of guidance weights (one per sample), got {_describe(w)}")
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise InputError(f"w: expected a numeric array, got {_describe(w)}")
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, numbers.Integral) or embedding_dim < 4:
        raise InputError(f"embedding_dim: expected an integer >= 4, got {describe(embedding_dim)}")
    if np.issubdtype(w.dtype, np.integer):
        w = w.astype(np.float32)  # torch: an integer tensor times 1000.0 is a float32 tensor
    w = (w * 1000.0).astype(np.float32)  # in w's own precision (half, float or double), then .to(float32)
    half = int(embedding_dim) // 2
    step = np.float32(math.log(10000.0)) / np.float32(half - 1)  # torch.log(torch.tensor(10000.0)) / (half - 1)
    exponents = np.arange(half, dtype=np.float32) * -step
    frequencies = np.exp(exponents.astype(np.float64)).astype(np.float32)
    args = (w[:, None] * frequencies[None, :]).astype(np.float64)
    emb = np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)
    if embedding_dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb


# ---- SDXL micro-conditioning ----


def _pair(value, name: str) -> list[float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)) or len(value) != 2:
        raise InputError(f"{name}: expected a pair of numbers (e.g. (1024, 1024)), got {describe(value)}")
    return [_number(v, name) for v in value]


def _number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{name}: expected finite numbers, got {describe(value)}")
    return value


def sdxl_time_ids(original_size, crops_coords_top_left, target_size) -> np.ndarray:
    """SDXL's ``add_time_ids`` (``StableDiffusionXLPipeline._get_add_time_ids``): original (height, width), crop
    (top, left), target (height, width), as float32 of shape (1, 6). The pipeline's negative ids default to the same.
    """
    values = _pair(original_size, "original_size") + _pair(crops_coords_top_left, "crops_coords_top_left")
    return np.array([values + _pair(target_size, "target_size")], dtype=np.float32)


def refiner_time_ids(original_size, crops_coords_top_left, aesthetic_score) -> np.ndarray:
    """The SDXL refiner's ``add_time_ids`` (``StableDiffusionXLImg2ImgPipeline._get_add_time_ids`` with
    ``requires_aesthetics_score``): original (height, width), crop (top, left), aesthetic score; float32 (1, 5).
    diffusers' defaults: aesthetic_score 6.0, and 2.5 for the negative ids."""
    values = _pair(original_size, "original_size") + _pair(crops_coords_top_left, "crops_coords_top_left")
    return np.array([[*values, _number(aesthetic_score, "aesthetic_score")]], dtype=np.float32)


# ---- SDXL's split of one schedule between base and refiner ----


def _cutoff(num_train_timesteps, fraction, name: str) -> int:
    if isinstance(fraction, (bool, np.bool_)) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise InputError(f"{name}: expected a fraction strictly between 0 and 1, got {describe(fraction)}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, numbers.Integral):
        raise InputError(f"num_train_timesteps: expected a positive integer, got {describe(num_train_timesteps)}")
    if num_train_timesteps < 1:
        raise InputError(f"num_train_timesteps: expected a positive integer, got {describe(num_train_timesteps)}")
    n = int(num_train_timesteps)
    return int(round(n - (float(fraction) * n)))  # Python's round (half to even), in float64, as diffusers


def _timesteps(timesteps) -> np.ndarray:
    array = np.asarray(timesteps)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.number):
        raise InputError(f"timesteps: expected a non-empty 1-D array of a run's timesteps, got {_describe(array)}")
    return array


def denoising_end_count(timesteps, num_train_timesteps: int, denoising_end: float) -> int:
    """How many of ``timesteps`` (a run's, highest first) an SDXL pipeline with ``denoising_end`` executes:
    those at or above the cutoff round(T - denoising_end * T), as ``StableDiffusionXLPipeline.__call__`` counts them.
    The run is then ``timesteps[:count]``; for a second-order scheduler the count includes the repeated timesteps."""
    cutoff = _cutoff(num_train_timesteps, denoising_end, "denoising_end")
    return int(np.count_nonzero(_timesteps(timesteps) >= cutoff))


def denoising_start_begin(timesteps, order: int, num_train_timesteps: int, denoising_start: float) -> int:
    """Index into the FULL run's ``timesteps`` (strength 1, as ``set_timesteps`` made them) where an SDXL img2img
    pipeline with ``denoising_start`` begins: ``StableDiffusionXLImg2ImgPipeline.get_timesteps`` keeps the timesteps
    below round(T - denoising_start * T), one more for a second-order scheduler (``order`` 2) when that count is even
    so that no Heun step is cut between its two calls. Pass the result as ``begin`` to a scheduler's ``start``.

    If no timestep lies below the cutoff (a first-order scheduler), the result is ``len(timesteps)``: diffusers then
    denoises nothing and decodes the given latents; ``start`` rejects that index, so handle it before starting a run.
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise InputError(f"order: expected a positive integer (the scheduler's order), got {describe(order)}")
    cutoff = _cutoff(num_train_timesteps, denoising_start, "denoising_start")
    array = _timesteps(timesteps)
    count = int(np.count_nonzero(array < cutoff))
    if order == 2 and count % 2 == 0:
        count += 1
    return len(array) - count

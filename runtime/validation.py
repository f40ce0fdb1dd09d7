"""Checks at the runtime's entry: each argument of a call, and the request's size against a budget.

Every check raises :class:`~sdrt.runtime.errors.InputError` (or :class:`BudgetError`, a kind of it) with
"what: expected X, got Y (how to fix)" and runs before anything the size of an image is allocated, so a
bad request costs the process nothing and leaves it serving.

The budget (:class:`Limits`) bounds one call: images per call, denoising steps, and pixels (images x
height x width). Its default pixel limit follows from the machine's memory through
:func:`request_bytes`, an estimate of the working memory a call needs beyond the loaded weights (the
VAE decoder's full-resolution activations dominate it); a call whose estimate exceeds the memory
available right now is refused as well.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import reprlib
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.errors import InputError


class BudgetError(InputError):
    """A request larger than the pipeline's limits or the memory the machine has for it."""


# Working memory per output pixel of one image, in bytes (float32 activations). The VAE decoder's last
# up-block runs 128 channels (SD 1.x/2.x/XL) at full resolution: with its input, output and residual
# alive at once that is 3 x 128 x 4 B; the tiny autoencoder runs 64 channels. The UNet works at 1/64
# of the pixels and adds less. A floor of what a call needs, not a ceiling.
BYTES_PER_PIXEL = {"kl": 3 * 128 * 4, "tiny": 3 * 64 * 4}
# The default pixel budget lets one call use at most this share of the machine's physical memory.
MEMORY_SHARE = 0.5


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 3, 3, 3, 3
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 40, 40, 40


def describe(value) -> str:
    """A refused value for an error message, bounded whatever its size: arrays by dtype and shape, long strings by
    length and start, containers by type, length and first items, huge integers by digit count (a request's value
    may be a million-element list or a 5,000-digit integer; its message stays a line)."""
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, (str, bytes)) and len(value) > 60:
        return f"a {type(value).__name__} of length {len(value):,} starting {value[:20]!r}"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and abs(int(value)).bit_length() > 100:
        return f"an integer of about {int(abs(int(value)).bit_length() * math.log10(2)) + 1:,} digits"
    if isinstance(value, (list, tuple, dict, set, frozenset)) and len(value) > 3:
        # the first items in their own order (reprlib would sort a dict's or set's keys: all of them)
        first = itertools.islice(value.items() if isinstance(value, dict) else value, 3)
        shown = (
            [f"{_SHORT.repr(k)}: {_SHORT.repr(v)}" for k, v in first]
            if isinstance(value, dict)
            else [_SHORT.repr(v) for v in first]
        )
        opening, closing = {dict: "{}", list: "[]", tuple: "()"}.get(type(value), "{}")
        return f"a {type(value).__name__} of {len(value):,} items, {opening}{', '.join(shown)}, ...{closing}"
    return _SHORT.repr(value)


def integer(name: str, value, *, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """An integer (not a bool, not a float, however whole) in [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if ok and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    bounds = f" in [{low}, {high}]" if low is not None and high is not None else f" >= {low}" if low is not None else ""
    raise InputError(f"{name}: expected an integer{bounds}, got {describe(value)}{hint}")


def number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """A finite real number (not a bool) within the bounds; NaN and infinity are refused."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    if ok:
        v = float(value)
        above = low is None or (v > low if low_open else v >= low)
        below = high is None or (v < high if high_open else v <= high)
        if above and below:
            return v
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    bounds = f" in {lo}, {hi}" if lo and hi else f" {'>' if low_open else '>='} {low:g}" if lo else ""
    if hi and not lo:
        bounds = f" {'<' if high_open else '<='} {high:g}"
    raise InputError(f"{name}: expected a finite number{bounds}, got {describe(value)}{hint}")


def choice(name: str, value, options) -> str:
    if isinstance(value, str) and value in options:
        return value
    raise InputError(f"{name}: expected one of {', '.join(map(str, options))}, got {describe(value)}")


def finite_array(name: str, value, *, dtype=np.float32, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A NumPy array of ``dtype`` (and ``shape``) with no NaN or infinity."""
    if not isinstance(value, np.ndarray):
        raise InputError(f"{name}: expected a NumPy array, got {type(value).__name__}")
    if value.dtype != dtype or (shape is not None and value.shape != tuple(shape)):
        want = f"{np.dtype(dtype)} array" + ("" if shape is None else f" of shape {tuple(shape)}")
        raise InputError(f"{name}: expected a {want}, got {describe(value)}")
    if not np.isfinite(value).all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        raise InputError(f"{name}: expected finite values, got {bad} NaN or infinite of {value.size}")
    return value


MAX_SIDE = 2**20  # pixels: no image side is larger, whatever the memory (a 5,000-digit height is refused here)
# Classifier-free guidance scales used in practice run from 1 to ~15; far beyond, the guided prediction overflows
# (1e308 gives NaN latents): such a value is a mistake in the request, refused as one, not a NumericalError.
MAX_GUIDANCE = 100.0
# Characters per prompt. CLIP reads 77 tokens and T5 at most 512 (a few thousand characters); longer text is
# truncated (and the result says so), but a megabyte of it would only cost tokenizer time.
PROMPT_CHARS = 20_000


def prompts(name: str, value, *, count: int | None = None) -> list[str]:
    """A string or a non-empty list/tuple of strings (``count`` of them, or one to repeat), each valid Unicode
    (encodable as UTF-8: no lone surrogates, which JSON's \\ud800 escapes can carry) of at most PROMPT_CHARS."""
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not items or not all(isinstance(p, str) for p in items):
        want = "a string or a non-empty list of strings" if count is None else f"a string or {count} strings"
        raise InputError(f"{name}: expected {want}, got {describe(value)}")
    for i, text in enumerate(items):
        where = f"{name}[{i}]" if len(items) > 1 else name
        if len(text) > PROMPT_CHARS:
            raise InputError(
                f"{where}: expected at most {PROMPT_CHARS:,} characters (the text encoders read the first 77 or 512 "
                f"tokens), got {len(text):,}"
            )
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"{where}: expected valid Unicode text, got a lone surrogate {text[e.start]!r} at character {e.start} "
                "(a JSON \\ud800-\\udfff escape must be half of a pair)"
            ) from None
    if count is not None:
        if len(items) == 1:
            items = items * count
        if len(items) != count:
            want = "1 string (one prompt was given)" if count == 1 else f"1 or {count} strings (one per prompt)"
            raise InputError(f"{name}: expected {want}, got {len(items)}")
    return items


def pair(name: str, value, *, low: int) -> tuple[int, int]:
    """Two integers >= ``low``: (height, width) or (top, left)."""
    try:
        a, b = value
    except (TypeError, ValueError):
        a = b = None
    try:
        return integer(name, a, low=low), integer(name, b, low=low)
    except InputError:
        kind = "(height, width) >= 1" if low else "(top, left) >= 0"
        raise InputError(f"{name}: expected a pair of integers {kind}, got {describe(value)}") from None


# -- the budget -----------------------------------------------------------------------------------
def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes the kernel says a process could still allocate without swapping (Linux: MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def request_bytes(vae_kind: str, images: int, height: int, width: int) -> int:
    """Working memory a call needs beyond the loaded weights (a floor; see BYTES_PER_PIXEL)."""
    return images * height * width * BYTES_PER_PIXEL.get(vae_kind, BYTES_PER_PIXEL["kl"])


@dataclass(frozen=True)
class Limits:
    """What one call may ask for. ``max_pixels``: images x height x width per call (None: what
    ``MEMORY_SHARE`` of this machine's memory affords, by :func:`request_bytes`); ``check_memory``:
    also refuse a call whose estimate exceeds the memory available when it starts."""

    max_pixels: int | None = None
    max_images: int = 64
    max_steps: int = 1000
    check_memory: bool = True

    def pixels_for(self, vae_kind: str) -> int:
        if self.max_pixels is not None:
            return self.max_pixels
        memory = physical_memory() or 8 * 2**30
        return int(memory * MEMORY_SHARE) // BYTES_PER_PIXEL.get(vae_kind, BYTES_PER_PIXEL["kl"])

    def check(self, vae_kind: str, images: int, height: int, width: int) -> None:
        """BudgetError unless a call of ``images`` images of height x width fits."""
        if images > self.max_images:
            raise BudgetError(
                f"images per call: expected at most {self.max_images}, got {images} "
                "(split the request, or raise Limits.max_images)"
            )
        for name, side in (("height", height), ("width", width)):
            if isinstance(side, numbers.Integral) and side > MAX_SIDE:  # before any product of it is formatted
                raise BudgetError(f"{name}: expected at most {MAX_SIDE:,} pixels, got {describe(side)}")
        pixels, allowed = images * height * width, self.pixels_for(vae_kind)
        if pixels > allowed:
            raise BudgetError(
                f"request size: expected at most {allowed:,} pixels per call (images x height x width), got "
                f"{images} x {height} x {width} = {pixels:,} (fewer or smaller images, or raise Limits.max_pixels)"
            )
        if self.check_memory:
            need, free = request_bytes(vae_kind, images, height, width), available_memory()
            if free is not None and need > free:
                raise BudgetError(
                    f"request size: {images} x {height} x {width} needs about {need / 2**20:,.0f} MiB of working "
                    f"memory, the machine has {free / 2**20:,.0f} MiB available now (fewer or smaller images, or "
                    "retry when other work has finished)"
                )

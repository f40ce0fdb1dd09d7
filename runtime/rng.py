"""``torch.Generator("cpu").manual_seed(seed)`` + ``torch.randn``, reproduced in NumPy, bit for bit.

So that ``seed=N`` gives the image diffusers gives with ``generator=torch.Generator("cpu").manual_seed(N)``,
without torch. What PyTorch's CPU generator does (ATen ``CPUGeneratorImpl``, ``DistributionTemplates.h``):

* The engine is the reference MT19937, seeded with the low 32 bits of the seed by the standard
  Knuth initialisation: exactly NumPy's legacy ``RandomState(seed)``, whose raw 32-bit outputs we use.
* A float uniform is ``(next32 & 0xFFFFFF) * 2**-24``.
* ``randn`` of >= 16 float32 elements first draws one uniform per element, then turns each block
  of 16 into normals in place by Box-Muller over the pairs (j, j + 8), with the fp32 Cephes
  polynomials of ``avx_mathfun.h`` (``log256_ps``, ``sincos256_ps``) as compiled with fused
  multiply-adds. When the size is not a multiple of 16, 16 fresh uniforms are drawn for the last
  16 elements (overlapping the converted ones) and converted again.
* Fewer than 16 elements take the scalar path: double-precision Box-Muller from 53-bit uniforms
  (two 32-bit draws each), whose second value is cached in the generator for the next element.

A fused multiply-add is emulated in float64: the product of two float32 values is exact there, so
only the final rounding can differ, never observed in the tests against torch.
"""

from __future__ import annotations

import numpy as np

from sdrt.runtime.errors import InputError

_F = np.float32


def _c(value: float) -> float:
    """A float32 constant as the exact float64 value (the AVX code's constants are float32)."""
    return float(np.float32(value))


_CHUNK = 16384  # elements per Box-Muller pass, a multiple of 16
_LOG_P0 = _c(7.0376836292e-2)
_RED2, _RED3 = _c(-2.4187564849853515625e-4), _c(-3.77489497744594108e-8)
_COS0, _COS1, _COS2 = _c(2.443315711809948e-5), _c(-1.388731625493765e-3), _c(4.166664568298827e-2)
_SIN0, _SIN1, _SIN2 = _c(-1.9515295891e-4), _c(8.3321608736e-3), _c(-1.6666654611e-1)
_LOG_P = tuple(
    _c(p)
    for p in (
        -1.1514610310e-1,
        1.1676998740e-1,
        -1.2420140846e-1,
        1.4249322787e-1,
        -1.6668057665e-1,
        2.0000714765e-1,
        -2.4999993993e-1,
        3.3333331174e-1,
    )
)


def _fma(a, b, c, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, into ``out``. ``a`` and ``b`` hold float32 values (in float32
    or float64 arrays, or float32-exact Python floats), so their float64 product is exact."""
    np.multiply(a, b, out=tmp, dtype=np.float64)
    return np.add(tmp, c, out=out, dtype=np.float64, casting="unsafe")


def _log(u: np.ndarray) -> np.ndarray:
    """``log256_ps``: natural log of float32 values in (0, 1]."""
    m, e = np.frexp(u)  # u = m * 2**e, m in [0.5, 1): the AVX code's exponent and mantissa bit masks
    small = m < _F(0.707106781186547524)
    x = m - _F(1)
    x += np.where(small, m, _F(0))
    e = e.astype(np.float32)
    e -= small
    x64, z = x.astype(np.float64), x * x
    tmp, y = np.empty_like(x64), np.empty_like(x)
    _fma(x64, _LOG_P0, _LOG_P[0], y, tmp)
    for p in _LOG_P[1:]:
        _fma(y, x64, p, y, tmp)
    y *= x
    _fma(y, z, e * _F(-2.12194440e-4), y, tmp)
    y -= z * _F(0.5)  # fma(z, -0.5, y): z * 0.5 is exact, so one float32 subtraction rounds the same
    x += y
    return _fma(e, 0.693359375, x, x, tmp)


def _sincos(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` for theta >= 0 (Box-Muller angles are in [0, 2 pi))."""
    octant = (theta * _F(1.27323954473516)).astype(np.int32)  # 4 / pi, truncated
    octant += 1
    octant &= ~1
    q, tmp, x = octant.astype(np.float64), np.empty(theta.shape, np.float64), np.empty_like(theta)
    # Extended-precision reduction to [-pi/4, pi/4], each step one fused multiply-add.
    _fma(q, -0.78515625, theta, x, tmp)
    _fma(q, _RED2, x, x, tmp)
    _fma(q, _RED3, x, x, tmp)
    z = x * x
    z64, cos_poly, sin_poly = z.astype(np.float64), np.empty_like(x), np.empty_like(x)
    _fma(z64, _COS0, _COS1, cos_poly, tmp)
    _fma(cos_poly, z64, _COS2, cos_poly, tmp)
    cos_poly *= z
    _fma(cos_poly, z64, -(z * _F(0.5)), cos_poly, tmp)
    cos_poly += _F(1)
    _fma(z64, _SIN0, _SIN1, sin_poly, tmp)
    _fma(sin_poly, z64, _SIN2, sin_poly, tmp)
    sin_poly *= z
    _fma(sin_poly, x, x, sin_poly, tmp)
    swap = (octant & 2).astype(bool)
    sin, cos = np.where(swap, cos_poly, sin_poly), np.where(swap, sin_poly, cos_poly)
    # Signs by flipping the float32 sign bit, as the AVX code does.
    sin.view(np.uint32)[...] ^= (octant & 4).view(np.uint32) << 29
    cos.view(np.uint32)[...] ^= ((octant + 2) & 4).view(np.uint32) << 29
    return sin, cos


def _box_muller_16(uniforms: np.ndarray) -> np.ndarray:
    blocks = uniforms.reshape(-1, 16)
    radius = np.sqrt(_F(-2) * _log(_F(1) - blocks[:, :8]))
    sin, cos = _sincos(_F(2 * np.pi) * blocks[:, 8:])
    out = np.empty_like(blocks)
    np.multiply(radius, cos, out=out[:, :8])
    np.multiply(radius, sin, out=out[:, 8:])
    return out.reshape(-1)


class TorchCompatibleGenerator:
    """A NumPy stand-in for a seeded ``torch.Generator("cpu")``: same stream for ``randn`` calls in order."""

    def __init__(self, seed: int):
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
            raise InputError(f"seed: expected an integer in [0, 2**64), got {seed!r}")
        self.seed = int(seed)
        self._mt = np.random.RandomState(self.seed & 0xFFFFFFFF)
        self._cached_normal: float | None = None

    def _next32(self, n: int) -> np.ndarray:
        return self._mt.randint(0, 2**32, size=n, dtype=np.uint32)

    def _uniform_f32(self, n: int) -> np.ndarray:
        return (self._next32(n) & 0xFFFFFF).astype(np.float32) * _F(2**-24)

    def _uniform_f64(self) -> float:
        hi, lo = (int(v) for v in self._next32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _scalar_normal(self) -> float:
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1, u2 = self._uniform_f64(), self._uniform_f64()
        radius = np.sqrt(-2.0 * np.log1p(-u2))
        theta = 2.0 * np.pi * u1
        self._cached_normal = float(radius * np.sin(theta))
        return float(radius * np.cos(theta))

    def randn(self, shape) -> np.ndarray:
        """Standard normal float32 array, as ``torch.randn(shape, generator=g)`` would return."""
        shape = tuple(int(s) for s in shape)
        n = int(np.prod(shape))
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32).reshape(shape)
        data = self._uniform_f32(n)
        full = n // 16 * 16
        for i in range(0, full, _CHUNK):  # cache-sized chunks: half the time of one pass at SD latent sizes
            data[i : min(i + _CHUNK, full)] = _box_muller_16(data[i : min(i + _CHUNK, full)])
        if n % 16:
            data[n - 16 :] = _box_muller_16(self._uniform_f32(16))
        return data.reshape(shape)

    __call__ = randn

    def get_state(self):
        return self._mt.get_state(), self._cached_normal

    def set_state(self, state) -> None:
        self._mt.set_state(state[0])
        self._cached_normal = state[1]


class NumpyGenerator:
    """NumPy's own PCG64 stream: faster, but its images differ from diffusers' for the same seed."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def randn(self, shape) -> np.ndarray:
        return self._rng.standard_normal(tuple(shape), dtype=np.float32)

    __call__ = randn

    def get_state(self):
        return self._rng.bit_generator.state

    def set_state(self, state) -> None:
        self._rng.bit_generator.state = state


GENERATORS = {"torch": TorchCompatibleGenerator, "numpy": NumpyGenerator}


def make_generator(seed: int, kind: str = "torch"):
    if kind not in GENERATORS:
        raise InputError(f"rng: expected one of {', '.join(GENERATORS)}, got {kind!r}")
    return GENERATORS[kind](seed)


class PrefetchingNoise:
    """Noise for a sampler's steps, drawn one step ahead on a worker thread.

    After each draw it starts the next draw of the same shape, so the work overlaps whatever the
    caller does next (the UNet call, which releases the GIL). The stream is exactly the generator's:
    a request of another shape waits for the speculative draw, rewinds the generator to before it,
    and draws afresh. ``close()`` (or the context manager) waits for any draw in flight.
    """

    def __init__(self, generator: TorchCompatibleGenerator | NumpyGenerator):
        from concurrent.futures import ThreadPoolExecutor

        self._generator = generator
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdrt-noise")
        self._pending = None  # (shape, state before the draw, future)

    def __call__(self, shape) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        out = None
        if self._pending is not None:
            pending_shape, state, future = self._pending
            self._pending = None
            out = future.result()
            if pending_shape != shape:
                self._generator.set_state(state)
                out = None
        if out is None:
            out = self._generator.randn(shape)
        state = self._generator.get_state()
        self._pending = (shape, state, self._executor.submit(self._generator.randn, shape))
        return out

    def close(self) -> None:
        """Wait for the draw in flight and rewind it: the generator ends where the caller's draws ended."""
        if self._pending is not None:
            _, state, future = self._pending
            future.result()
            self._generator.set_state(state)
            self._pending = None
        self._executor.shutdown(wait=True)

    def __enter__(self) -> PrefetchingNoise:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

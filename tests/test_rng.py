"""seed=N gives diffusers' latents: our NumPy generator against torch.Generator("cpu").manual_seed(N)."""

import numpy as np
import pytest
import torch

from sdrt.runtime import InputError
from sdrt.runtime.rng import TorchCompatibleGenerator, make_generator

SHAPES = [(1, 4, 64, 64), (2, 4, 96, 64), (3, 4, 9, 7), (1, 4, 8, 8), (17,), (16,), (1, 4, 128, 96), (5, 3), (1,)]


@pytest.mark.parametrize("seed", [0, 1, 42, 123456789, 2**32 - 1, 2**40 + 5])
@pytest.mark.parametrize("shape", SHAPES)
def test_randn_is_bit_identical_to_torch(seed, shape):
    want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
    got = TorchCompatibleGenerator(seed).randn(shape)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def test_a_stream_of_calls_matches_torch():
    """Latents first, then per-step noise of another shape, then small draws (cached second normal)."""
    shapes = [(2, 4, 32, 32), (2, 4, 32, 32), (3,), (5,), (1, 4, 5, 5), (7,), (2, 4, 32, 32)]
    g = torch.Generator("cpu").manual_seed(2024)
    ours = TorchCompatibleGenerator(2024)
    for shape in shapes:
        np.testing.assert_array_equal(ours(shape), torch.randn(shape, generator=g).numpy(), err_msg=str(shape))


def test_bad_seeds_and_kinds_are_refused():
    with pytest.raises(InputError, match=r"seed: expected an integer in \[0, 2\*\*64\), got -1"):
        TorchCompatibleGenerator(-1)
    with pytest.raises(InputError, match="rng: expected one of torch, numpy, got 'mt'"):
        make_generator(0, "mt")


def test_numpy_generator_is_reproducible():
    a, b = make_generator(5, "numpy"), make_generator(5, "numpy")
    first = a((2, 3))
    np.testing.assert_array_equal(first, b((2, 3)))
    assert not np.array_equal(first, make_generator(6, "numpy")((2, 3)))  # the seed decides the stream
    assert not np.array_equal(first, a((2, 3)))  # and the stream moves on


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_prefetching_noise_keeps_the_stream(kind):
    """Drawing one step ahead changes nothing: same arrays, also when the shape changes mid-stream."""
    from sdrt.runtime.rng import PrefetchingNoise

    shapes = [(2, 4, 8, 8)] * 3 + [(1, 4, 8, 8), (5,), (2, 4, 8, 8), (2, 4, 8, 8)]
    plain = make_generator(11, kind)
    want = [plain(s) for s in shapes] + [plain((3, 4))]
    gen = make_generator(11, kind)
    with PrefetchingNoise(gen) as noise:
        got = [noise(s) for s in shapes]
    got.append(gen((3, 4)))  # after close() the generator continues where the caller's draws ended
    for s, g, w in zip(shapes + [(3, 4)], got, want):
        np.testing.assert_array_equal(g, w, err_msg=str(s))

"""One Pipeline, many threads: each call gets the image it would get alone; bad calls among them get their
errors; memory does not grow with the number of calls (the soak, marked slow: `make soak`)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from sdrt.benchmarks.soak import soak
from sdrt.runtime import Pipeline
from sdrt.runtime.errors import InputError


def test_threads_get_the_images_of_serial_calls(tiny_artifacts):
    with Pipeline.load(tiny_artifacts) as pipe:
        args = [("a red cube", 11, 2), ("a blue sphere", 12, 3), ("a green cone", 13, 2), ("a cat", 14, 3)]
        serial = {seed: pipe(p, seed=seed, num_inference_steps=n, height=64, width=64).images for p, seed, n in args}
        got, errors = {}, []

        def call(prompt, seed, steps):
            try:
                got[seed] = pipe(prompt, seed=seed, num_inference_steps=steps, height=64, width=64).images
                pipe(prompt, seed=seed, width=0)  # a bad call in the same thread, between good ones
            except InputError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=call, args=a) for a in args * 2]  # two threads per request
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(errors) == len(threads) and all(e.startswith("width: expected an integer") for e in errors)
    assert sorted(got) == sorted(serial)
    for seed, image in got.items():
        np.testing.assert_array_equal(image, serial[seed])
    assert len({image.tobytes() for image in serial.values()}) == len(serial)  # the requests really differ


@pytest.mark.slow
def test_soak_8_threads_x_50_requests(tiny_artifacts):
    with Pipeline.load(tiny_artifacts) as pipe:
        report = soak(pipe, threads=8, requests=50, size=128)
    print(report.table())
    assert not report.failures, report.failures[:5]
    assert report.invalid == 8 * (50 // 4) and report.valid == 8 * 50 - report.invalid
    assert report.valid_identical == report.valid and report.invalid_refused == report.invalid
    assert report.growth <= 0.05, report.table()

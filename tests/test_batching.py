"""Pipeline.run_batch: calls whose loops line up share UNet and VAE calls, and each gets exactly the result
it gets alone; bad calls get their own errors in their slots."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.errors import InputError, NumericalError

IMAGE = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
MASK = np.zeros((64, 64), np.float32)
MASK[16:48, 16:48] = 1
SMALL = {"height": 64, "width": 64}


class CountingUnet:
    def __init__(self, inner, nan_last_row: bool = False):
        self.inner, self.nan_last_row, self.batches = inner, nan_last_row, []
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feed):
        self.batches.append(feed["sample"].shape[0])
        out = self.inner.run(feed)
        if self.nan_last_row and feed["sample"].shape[0] > 2:
            out["out_sample"] = out["out_sample"].copy()
            out["out_sample"][-1] = np.nan
        return out

    def close(self):
        self.inner.close()


@pytest.fixture
def pipe(runtime_pipeline):
    unet = runtime_pipeline.sessions["unet"]
    yield runtime_pipeline
    runtime_pipeline.sessions["unet"] = unet


CALLS = [
    dict(prompt="a cow", seed=3, num_inference_steps=3, num_images_per_prompt=2, scheduler="euler-a", **SMALL),
    dict(prompt=["a", "b"], seed=7, num_inference_steps=3, scheduler="euler-a", guidance_scale=3.0, **SMALL),
    dict(prompt="unguided", seed=4, num_inference_steps=3, scheduler="euler-a", guidance_scale=1.0, **SMALL),
    dict(prompt="bad", width=0),
    dict(prompt="img2img", image=IMAGE, seed=8, num_inference_steps=5, strength=0.6),
    dict(prompt="img2img 2", image=IMAGE, seed=9, num_inference_steps=5, strength=0.6, guidance_scale=1.0),
    dict(prompt="inpaint", image=IMAGE, mask_image=MASK, seed=10, num_inference_steps=5, strength=0.6),
    dict(prompt="latents", seed=11, num_inference_steps=3, output_type="latent", **SMALL),
    dict(prompt="other size", seed=12, num_inference_steps=3, height=128, width=64),
]


def test_each_call_of_a_batch_gets_its_own_result(pipe):
    pipe.sessions["unet"] = unet = CountingUnet(pipe.sessions["unet"])
    results = pipe.run_batch(CALLS)
    batched_calls = len(unet.batches)
    assert max(unet.batches) == 2 * 2 + 2 * 2 + 1  # the three euler-a calls' rows in one UNet call
    for call, result in zip(CALLS, results):
        if call["prompt"] == "bad":
            assert isinstance(result, InputError) and str(result).startswith("width: expected an integer")
            continue
        alone = pipe(**call)
        want, got = (alone.latents, result.latents) if "output_type" in call else (alone.images, result.images)
        np.testing.assert_array_equal(got, want, err_msg=call["prompt"])
        assert result.seed == call["seed"]
    # 3 steps for the euler-a group, 3 img2img steps (strength 0.6 of 5) shared by two calls, 3 inpainting,
    # 3 latents, 3 other size: 15 UNet calls for 8 valid calls
    assert batched_calls == 3 + 3 + 3 + 3 + 3


def test_nan_in_one_calls_rows_fails_that_call_only(pipe):
    pipe.sessions["unet"] = CountingUnet(pipe.sessions["unet"], nan_last_row=True)
    calls = [
        dict(prompt="first", seed=1, num_inference_steps=2, **SMALL),
        dict(prompt="second", seed=2, num_inference_steps=2, **SMALL),
    ]
    first, second = pipe.run_batch(calls)
    assert isinstance(second, NumericalError) and "unet at step 1 of 2" in str(second)
    pipe.sessions["unet"].nan_last_row = False
    np.testing.assert_array_equal(first.images, pipe(**calls[0]).images)


def test_run_batch_names_what_is_wrong_with_a_call(pipe):
    bogus, not_a_dict = pipe.run_batch([{"prompt": "x", "bogus": 1}, ["x"]])
    assert isinstance(bogus, InputError) and "bogus" in str(bogus)
    assert isinstance(not_a_dict, InputError) and "expected each call as a dict" in str(not_a_dict)

"""Sessions check every feed against the manifest's specs and say what was expected and what was given."""

import numpy as np
import pytest

from sdrt.runtime import BackendError, InputError, Manifest
from sdrt.runtime.backends import BACKENDS, LoadOptions, available, open_session
from sdrt.runtime.session import check_feed


@pytest.fixture(scope="module")
def unet_session(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    return open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime")


def feed(batch=2, h=8, w=8, text=77, dtype=np.float32):
    return {
        "sample": np.zeros((batch, 4, h, w), dtype),
        "timestep": np.zeros((batch,), np.float32),
        "encoder_hidden_states": np.zeros((batch, text, 32), np.float32),
    }


def test_valid_feed_runs(unet_session):
    out = unet_session.run(feed(batch=3, h=12, w=8))
    assert out["out_sample"].shape == (3, 4, 12, 8)


def test_wrong_inputs_are_named(unet_session):
    bad = feed()
    del bad["timestep"]
    with pytest.raises(InputError, match=r"expected inputs \['sample', 'timestep', 'encoder_hidden_states'\]"):
        unet_session.run(bad)
    with pytest.raises(InputError, match="'sample': expected dtype float32, got float16"):
        unet_session.run(feed(dtype=np.float16))
    with pytest.raises(
        InputError, match=r"'encoder_hidden_states': expected shape \(batch, 77, 32\), got \(2, 76, 32\)"
    ):
        unet_session.run(feed(text=76))


def test_symbolic_dims_must_agree_across_inputs(unet_session):
    bad = feed(batch=2)
    bad["timestep"] = np.zeros((3,), np.float32)
    with pytest.raises(InputError, match=r"'timestep': expected shape \(batch\), got \(3,\)"):
        unet_session.run(bad)


def test_check_feed_binds_sizes(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    bound = check_feed("unet", m.components["unet"].inputs, feed(batch=4, h=6, w=10))
    assert bound == {"batch": 4, "latent_height": 6, "latent_width": 10}


def test_unknown_and_unavailable_backends(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    with pytest.raises(InputError, match="backend: expected one of onnxruntime"):
        open_session(tiny_artifacts, m, m.components["unet"], "nope")
    with pytest.raises(BackendError, match="backend='onnxruntime'"):
        open_session(tiny_artifacts, m, m.components["unet"], "tensorrt")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="install onnxruntime-gpu"):
            open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime-cuda")


def test_pipeline_argument_errors(runtime_pipeline):
    with pytest.raises(InputError, match="height: expected a positive multiple of 16 pixels for this model, got 60"):
        runtime_pipeline("x", height=60, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match="negative_prompt: expected 1 or 2 strings"):
        runtime_pipeline(["a", "b"], negative_prompt=["x", "y", "z"], height=64, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match=r"latents: expected float32 array of shape \(1, 4, 8, 8\)"):
        runtime_pipeline("x", height=64, width=64, num_inference_steps=1, latents=np.zeros((1, 4, 8, 4), np.float32))
    with pytest.raises(InputError, match="num_inference_steps: expected 1..1000, got 0"):
        runtime_pipeline("x", height=64, width=64, num_inference_steps=0)
    with pytest.raises(InputError, match="prompt: expected a string"):
        runtime_pipeline([], height=64, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match="scheduler: expected one of"):
        runtime_pipeline("x", height=64, width=64, num_inference_steps=1, scheduler="warp-drive")


def test_registry_names_every_backend_once():
    assert list(BACKENDS) == ["onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt"]
    assert "onnxruntime" in available()
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.device in ("cpu", "gpu")
        reason = backend.unavailable_reason()
        assert (name in available()) == (reason is None)


def test_precision_the_backend_lacks_is_refused(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    with pytest.raises(BackendError, match=r"precision: backend 'onnxruntime' offers fp32 on this machine, got 'bf16'"):
        open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime", LoadOptions(precision="bf16"))
    with pytest.raises(InputError, match="precision: expected one of fp32, bf16, fp16, got 'int4'"):
        open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime", LoadOptions(precision="int4"))

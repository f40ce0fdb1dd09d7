"""Sessions check every feed against the manifest's specs and say what was expected and what was given."""

import re

import numpy as np
import pytest

from sdrt.runtime import BackendError, InputError, Manifest, Pipeline, backends
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


def test_unknown_backends_are_named(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    with pytest.raises(InputError, match="backend: expected one of onnxruntime"):
        open_session(tiny_artifacts, m, m.components["unet"], "nope")


@pytest.mark.no_gpu
def test_gpu_backends_are_refused_without_a_gpu(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    with pytest.raises(BackendError, match="backend='onnxruntime'"):
        open_session(tiny_artifacts, m, m.components["unet"], "tensorrt")
    fix = re.escape("pip uninstall -y onnxruntime && pip install 'sdrt[gpu]', which installs onnxruntime-gpu")
    with pytest.raises(BackendError, match=f"lacks CUDAExecutionProvider.*{fix}"):
        open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime-cuda")


@pytest.mark.parametrize(
    ("installed", "importable", "message"),
    [
        (
            (("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.32.0")),
            True,
            "onnxruntime: expected one onnxruntime distribution installed, got 2 (onnxruntime 1.32.0, onnxruntime-gpu "
            "1.32.0), which overwrite each other's files in site-packages (pip uninstall -y onnxruntime "
            "onnxruntime-gpu && pip install 'sdrt[cpu]', or 'sdrt[gpu]' on an NVIDIA machine)",
        ),
        (
            (),
            False,
            "onnxruntime: expected one onnxruntime distribution installed, got none (pip install 'sdrt[cpu]' for the "
            "CPU, or 'sdrt[gpu]' on an NVIDIA machine)",
        ),
    ],
    ids=["both", "none"],
)
def test_onnxruntime_backends_refuse_both_builds_or_none(tiny_artifacts, monkeypatch, installed, importable, message):
    """onnxruntime and onnxruntime-gpu install the same package folder: together they are an error, as is neither."""
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    monkeypatch.setattr(backends, "_ort_distributions", lambda: installed)
    monkeypatch.setattr(backends, "_ort_importable", lambda: importable)
    for name in ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt"):
        with pytest.raises(BackendError) as error:
            open_session(tiny_artifacts, m, m.components["unet"], name)
        assert str(error.value) == message, name
    with pytest.raises(BackendError, match="expected one onnxruntime distribution"):
        Pipeline.load(tiny_artifacts, verify_hashes=False)


def test_one_onnxruntime_build_passes_the_check_once_per_process(monkeypatch):
    assert len(backends._ort_distributions()) == 1  # this environment: the `cpu` extra's onnxruntime
    backends.check_onnxruntime_install()
    monkeypatch.setattr(backends, "_ort_importable", lambda: False)  # a distribution alone suffices
    backends.check_onnxruntime_install()
    assert backends._ort_distributions.cache_info().hits >= 1  # the metadata lookup is cached


def test_pipeline_argument_errors(runtime_pipeline):
    with pytest.raises(InputError, match="height: expected a positive multiple of 16 pixels for this model, got 60"):
        runtime_pipeline("x", height=60, width=64, num_inference_steps=1)
    with pytest.raises(InputError, match="negative_prompt: expected 1 or 2 strings"):
        runtime_pipeline(["a", "b"], negative_prompt=["x", "y", "z"], height=64, width=64, num_inference_steps=1)
    with pytest.raises(
        InputError,
        match=r"latents: expected a float32 array of shape \(1, 4, 8, 8\), got a float32 array of shape \(1, 4, 8, 4\)",
    ):
        runtime_pipeline("x", height=64, width=64, num_inference_steps=1, latents=np.zeros((1, 4, 8, 4), np.float32))
    with pytest.raises(InputError, match=r"num_inference_steps: expected an integer in \[1, 1000\], got 0"):
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
        if reason is None:  # what the registry calls available passes the gate every session goes through
            backends.check_usable(backend, "fp32")
        else:  # and what it does not is refused there, with the same reason
            with pytest.raises(BackendError, match=re.escape(reason)):
                backends.check_usable(backend, "fp32")


def test_precision_the_backend_lacks_is_refused(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    with pytest.raises(BackendError, match=r"precision: backend 'onnxruntime' offers fp32 on this machine, got 'bf16'"):
        open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime", LoadOptions(precision="bf16"))
    with pytest.raises(InputError, match="precision: expected one of fp32, bf16, fp16, got 'int4'"):
        open_session(tiny_artifacts, m, m.components["unet"], "onnxruntime", LoadOptions(precision="int4"))

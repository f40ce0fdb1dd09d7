"""TensorRT on a real NVIDIA GPU (`make test-gpu`; skipped elsewhere with the reason).

Builds engines for the tiny model with a dynamic profile, checks every engine against onnxruntime
(CPU, fp32) at the profile's min, opt and max shapes within fp16 tolerance, then the whole pipeline's
image against the onnxruntime backend's.
"""

import shutil

import numpy as np
import pytest

from sdrt.runtime import Manifest, Pipeline
from sdrt.runtime.profiles import Range, ShapeRanges, input_profile

pytestmark = pytest.mark.gpu

RANGES = ShapeRanges(batch=Range(1, 1, 2), height=Range(64, 128, 256), width=Range(64, 128, 256))


@pytest.fixture(scope="module")
def gpu_artifacts(tiny_artifacts, tmp_path_factory):
    from sdrt.export.engines import EngineOptions, build_engines
    from sdrt.runtime.tensorrt_backend import current_device

    root = tmp_path_factory.mktemp("gpu") / "tiny-sd"
    shutil.copytree(tiny_artifacts, root)
    report = build_engines(root, current_device(), EngineOptions(ranges=RANGES, precision="fp16"))
    assert sorted(report.built) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    again = build_engines(root, current_device(), EngineOptions(ranges=RANGES, precision="fp16"))
    assert again.built == []  # cached: nothing stale
    return root


def feed_for(component, shapes, rng):
    feed = {}
    for spec in component.inputs:
        shape = shapes[spec.name]
        if spec.dtype == "int64":
            feed[spec.name] = rng.integers(0, 49408, size=shape, dtype=np.int64)
        elif spec.name == "timestep":
            feed[spec.name] = np.full(shape, 500.0, np.float32)
        else:
            feed[spec.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["min", "opt", "max"])
def test_engine_matches_onnxruntime(gpu_artifacts, name, which):
    from sdrt.runtime.session import OrtSession
    from sdrt.runtime.tensorrt_backend import TensorRTSession

    m = Manifest.load(gpu_artifacts)
    component = m.components[name]
    profile = input_profile(component, m, RANGES)
    feed = feed_for(component, {k: v[which] for k, v in profile.items()}, np.random.default_rng(which))
    want = OrtSession(gpu_artifacts, component).run(feed)
    session = TensorRTSession(gpu_artifacts, component)
    try:
        got = session.run(feed)
    finally:
        session.close()
    for key, ref in want.items():
        scale = max(1.0, float(np.abs(ref).max()))
        assert got[key].shape == ref.shape
        assert float(np.abs(got[key] - ref).max()) / scale < 2e-2, key


def test_pipeline_image_matches_onnxruntime_backend(gpu_artifacts):
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    args = dict(prompt="a red bicycle", height=128, width=128, num_inference_steps=10, latents=latents)
    with Pipeline.load(gpu_artifacts, backend="onnxruntime") as cpu:
        want = cpu(**args).images.astype(int)
    with Pipeline.load(gpu_artifacts, backend="tensorrt") as gpu:
        got = gpu(**args).images.astype(int)
        with pytest.raises(Exception, match="outside the engine's profile"):
            gpu(**{**args, "height": 512, "latents": None, "seed": 0})
    diff = np.abs(got - want)
    assert diff.max() <= 8 and diff.mean() < 1.0, (diff.max(), diff.mean())

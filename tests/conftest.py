"""Shared fixtures: the tiny model and its artifacts are built once per test session, locally."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    gpu = _gpu_skip_reason()
    if gpu:
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=gpu))


def _gpu_skip_reason() -> str | None:
    """Why GPU tests cannot run here (they need an NVIDIA GPU, TensorRT and cuda-python), or None."""
    from sdrt.runtime.tensorrt_backend import unavailable_reason

    reason = unavailable_reason()
    return f"needs an NVIDIA GPU with TensorRT: {reason}" if reason else None


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdrt.export.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_model, tmp_path_factory) -> Path:
    from sdrt.export.build import export_pipeline

    logging.getLogger("sdrt").setLevel(logging.INFO)
    out = tmp_path_factory.mktemp("artifacts") / "tiny-sd"
    export_pipeline(str(tiny_model), out)
    return out


@pytest.fixture(scope="session")
def diffusers_pipeline(tiny_model):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def runtime_pipeline(tiny_artifacts):
    from sdrt.runtime import Pipeline

    with Pipeline.load(tiny_artifacts) as pipe:
        yield pipe


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tiny_model):
    """``family_models(preset)``: the random-weight model folder of a preset, built once per session."""
    from sdrt.export.random_model import write_random_model

    built = {"tiny": tiny_model}
    root = tmp_path_factory.mktemp("family-models")

    def get(preset: str) -> Path:
        if preset not in built:
            built[preset] = write_random_model(root / preset, preset)
        return built[preset]

    return get


@pytest.fixture(scope="session")
def family_artifacts(tmp_path_factory, family_models, tiny_artifacts):
    """``family_artifacts(name)``: a preset exported (fp32) once per session; ``"tiny-sd+taesd"`` is the
    tiny model exported with the tiny autoencoder in place of its VAE."""
    from sdrt.export.build import ExportOptions, export_pipeline

    built = {"tiny": tiny_artifacts}
    root = tmp_path_factory.mktemp("family-artifacts")

    def get(name: str) -> Path:
        if name not in built:
            preset, _, vae = name.partition("+")
            model = family_models("tiny" if preset == "tiny-sd" else preset)
            options = ExportOptions(vae=str(family_models(f"tiny-{vae}")) if vae else None)
            export_pipeline(str(model), root / name, options)
            built[name] = root / name
        return built[name]

    return get

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

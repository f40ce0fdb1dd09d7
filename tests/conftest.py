"""Shared fixtures: the tiny model and its artifacts are built once per test session, locally."""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest


def pytest_collection_modifyitems(config, items):
    apply_gpu_skips(items, _gpu_skip_reason, nvidia_gpu_evidence)


def apply_gpu_skips(items, gpu_skip_reason, gpu_evidence) -> None:
    """Skip `gpu` tests where TensorRT cannot run, and `no_gpu` tests (the no-GPU paths) where an NVIDIA
    GPU stack is present. Each probe runs only when a collected test needs its answer."""
    if any("gpu" in item.keywords for item in items):
        reason = gpu_skip_reason()
        if reason:
            for item in items:
                if "gpu" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))
    if any("no_gpu" in item.keywords for item in items):
        evidence = gpu_evidence()
        if evidence:
            reason = f"checks the no-GPU path; this machine has an NVIDIA GPU stack: {'; '.join(evidence)}"
            for item in items:
                if "no_gpu" in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


@functools.cache
def nvidia_gpu_evidence() -> tuple[str, ...]:
    """What says this machine has an NVIDIA GPU, or TensorRT/CUDA software that changes what the no-GPU
    tests see; empty on a machine without. Once per session."""
    return gpu_evidence()


def gpu_evidence(dev: Path = Path("/dev/nvidia0"), smi: str = "nvidia-smi") -> tuple[str, ...]:
    found = []
    if dev.exists():
        found.append(f"{dev} exists")
    smi_path = shutil.which(smi)
    if smi_path:
        try:
            run = subprocess.run([smi_path, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            run = None
        if run is not None and run.returncode == 0 and run.stdout.strip():
            found.append(f"nvidia-smi lists {run.stdout.strip().splitlines()[0]}")
    try:
        import onnxruntime

        providers = [p for p in onnxruntime.get_available_providers() if p in _NVIDIA_PROVIDERS]
    except ImportError:
        providers = []
    if providers:
        found.append(f"onnxruntime offers {', '.join(providers)}")
    if importlib.util.find_spec("tensorrt") is not None:
        found.append("the tensorrt package is installed")
    return tuple(found)


_NVIDIA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


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


@pytest.fixture(scope="session")
def controlnet_artifacts(tmp_path_factory, family_models, family_artifacts):
    """``controlnet_artifacts(preset)`` -> (artifacts, controlnet folder, controlnet artifacts), once per session:
    the preset's artifacts ("tiny" or "tiny-sdxl") with ``unet_control`` added as ``sdrt export --controlnet-unet``
    writes it (checked against PyTorch), and the random-weight ControlNet preset for them (``<preset>-controlnet``)
    exported by ``sdrt export --controlnet --base``."""
    from sdrt.export.build import ExportOptions, _export_component
    from sdrt.export.modules import load_pipeline
    from sdrt.export.random_model import write_random_model
    from sdrt.runtime.cli import main
    from sdrt.runtime.manifest import Manifest

    built = {}
    root = tmp_path_factory.mktemp("controlnet")

    def get(preset: str) -> tuple[Path, Path, Path]:
        if preset not in built:
            artifacts = root / preset
            shutil.copytree(family_artifacts(preset), artifacts, ignore=shutil.ignore_patterns("engines"))
            manifest = Manifest.load(artifacts)  # one more component; the others' exports are shared
            manifest.components["unet_control"] = _export_component(
                load_pipeline(family_models(preset)), "unet_control", artifacts, ExportOptions()
            )
            manifest.save(artifacts)
            folder = write_random_model(root / f"{preset}-controlnet-folder", f"{preset}-controlnet")
            out = root / f"{preset}-controlnet"
            assert main(["export", "--controlnet", str(folder), "--base", str(artifacts), "--out", str(out)]) == 0
            built[preset] = artifacts, folder, out
        return built[preset]

    return get

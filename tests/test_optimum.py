"""Interop: an ONNX folder exported by optimum (`optimum-cli export onnx --task text-to-image`) from the
tiny model runs in the sdrt runtime and gives diffusers' image.

optimum pins transformers < 4.58 and diffusers 0.39, so it lives in its own environment; `make test`
builds the folder with it (`make models/tiny-sd-optimum`). Run directly, point SDRT_OPTIMUM_FOLDER at it.
"""

import os
from pathlib import Path

import numpy as np
import pytest

from sdrt.runtime import Manifest, Pipeline

FOLDER = Path(os.environ.get("SDRT_OPTIMUM_FOLDER", Path(__file__).parents[1] / "models" / "tiny-sd-optimum"))

pytestmark = pytest.mark.skipif(
    not (FOLDER / "unet" / "model.onnx").is_file(),
    reason=f"no optimum export at {FOLDER} (build it with `make models/tiny-sd-optimum`; `make test` does)",
)


def test_optimum_folder_reads_as_a_manifest():
    m = Manifest.load(FOLDER)
    assert m.source["format"] == "optimum" and m.family == "sd1"
    assert (m.vae_scale_factor, m.latent_channels, m.text_length, m.spatial_multiple) == (8, 4, 77, 16)
    assert m.components["vae_decoder"].graph_names == {"latent": "latent_sample", "image": "sample"}
    assert m.components["unet"].scalar_inputs == ["timestep"]  # optimum's UNet takes one timestep
    assert all(c.precision == "fp32" for c in m.components.values())


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 64, 64), (2, 96, 64)])
def test_optimum_folder_generates_diffusers_image(diffusers_pipeline, batch, height, width):
    import torch

    prompts = ["a photograph of an astronaut riding a horse", "a bowl of fruit, oil painting"][:batch]
    latents = np.random.default_rng(batch).standard_normal((batch, 4, height // 8, width // 8)).astype(np.float32)
    want = diffusers_pipeline(
        prompts,
        negative_prompt=["blurry"] * batch,
        height=height,
        width=width,
        num_inference_steps=8,
        guidance_scale=7.5,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    want = (want * 255).round().astype(np.uint8)
    with Pipeline.load(FOLDER) as pipe:
        got = pipe(
            prompts, negative_prompt="blurry", height=height, width=width, num_inference_steps=8, latents=latents
        ).images
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_per_image_timesteps_are_refused_by_a_scalar_timestep_graph():
    from sdrt.runtime import InputError

    with Pipeline.load(FOLDER) as pipe:
        unet = pipe.sessions["unet"]
        feed = {
            "sample": np.zeros((2, 4, 8, 8), np.float32),
            "timestep": np.array([1.0, 2.0], np.float32),
            "encoder_hidden_states": np.zeros((2, 77, 32), np.float32),
        }
        with pytest.raises(InputError, match="one value for the whole batch"):
            unet.run(feed)


def test_engine_plan_for_an_optimum_folder_uses_its_tensor_names():
    """The engine builder reads optimum folders too: profiles carry the graph's own tensor names and
    the UNet's scalar timestep, and the ONNX fingerprint is hashed from the files (no manifest)."""
    from sdrt.export.engines import EngineOptions, loader_chain, plan_engines
    from sdrt.runtime.engine_cache import DeviceInfo, onnx_fingerprint
    from sdrt.runtime.hashing import sha256_file
    from sdrt.runtime.profiles import Range, ShapeRanges

    m = Manifest.load(FOLDER)
    ranges = ShapeRanges(Range(1, 1, 2), Range(64, 128, 256), Range(64, 128, 256))
    device = DeviceInfo("NVIDIA L4", (8, 9), "10.13.0.35")
    plans = {p.component: p for p in plan_engines(FOLDER, m, device, EngineOptions(ranges=ranges)).plans}
    assert plans["vae_decoder"].profile == {"latent_sample": [[1, 4, 8, 8], [1, 4, 16, 16], [2, 4, 32, 32]]}
    assert plans["vae_decoder"].output_max == {"sample": [2, 3, 256, 256]}
    assert plans["unet"].profile["timestep"] == [[], [], []]
    assert plans["unet"].profile["sample"] == [[1, 4, 8, 8], [2, 4, 16, 16], [4, 4, 32, 32]]
    import hashlib

    expected = hashlib.sha256(f"unet/model.onnx\0{sha256_file(FOLDER / 'unet' / 'model.onnx')}\n".encode()).hexdigest()
    assert plans["unet"].onnx_print == onnx_fingerprint(FOLDER, m.components["unet"]) == expected
    chain = loader_chain(plans["unet"].onnx_path, plans["unet"].profile, plans["unet"].build, FOLDER / "t.cache")
    (profile,) = chain._config.profiles
    assert sorted(profile.keys()) == ["encoder_hidden_states", "sample", "timestep"]


PYTHON = Path(os.environ.get("SDRT_OPTIMUM_PYTHON", Path(__file__).parents[1] / ".venv-optimum" / "bin" / "python"))


@pytest.mark.skipif(not PYTHON.is_file(), reason=f"no optimum environment at {PYTHON} (`make test` makes one)")
def test_bench_runs_optimum_as_a_second_baseline(tiny_artifacts, tmp_path):
    """optimum's own onnxruntime pipeline, in its own environment, timed in the same interleaved pairs."""
    from sdrt.benchmarks.bench import BenchConfig, run_benchmark

    config = BenchConfig(
        artifacts=tiny_artifacts,
        sizes=((64, 64),),
        steps=(3,),
        runs=2,
        warmups=1,
        results_dir=tmp_path,
        optimum_folder=FOLDER,
        optimum_python=PYTHON,
        backends=("onnxruntime",),
        precisions=("fp32",),
        matmul_size=256,  # the machine's matmul rate is tested in test_bench.py; here it only has to exist
        matmul_budget_s=0.05,
    )
    rows = run_benchmark(config, progress=lambda line: None)
    assert [r["implementation"] for r in rows] == ["sdrt", "diffusers", "optimum"]
    optimum = rows[2]["metrics"]
    assert optimum["unet_step_ms"]["n"] == optimum["step_wall_ms"]["n"] == 2 * 3  # runs x steps, timed by optimum
    assert optimum["text_encoder_ms"]["n"] == optimum["vae_decode_ms"]["n"] == 2
    fastest_parts = (
        optimum["text_encoder_ms"]["min"] + 3 * optimum["step_wall_ms"]["min"] + optimum["vae_decode_ms"]["min"]
    )
    assert 1e3 * optimum["end_to_end_s"]["min"] >= fastest_parts  # its stages are measured inside its runs
    # Each ratio is one sdrt run over optimum's run of the same round: within the quotients of the extremes.
    ratio = rows[0]["ratio_to"]["optimum"]["end_to_end"]
    ours, theirs = rows[0]["metrics"]["end_to_end_s"], optimum["end_to_end_s"]
    assert ratio["n"] == 2
    assert ours["min"] / theirs["max"] <= ratio["min"] and ratio["max"] <= ours["max"] / theirs["min"]

"""onnxruntime CPU engines: built once per machine, loaded without re-optimizing, equal to the portable graphs."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import onnx
import pytest

from sdrt.runtime import Manifest, Pipeline
from sdrt.runtime.engine_cache import onnx_fingerprint
from sdrt.runtime.ort_cpu_engines import RECORDS, engine_folder, find_engine, isa_key, read_records, stale_reason
from sdrt.runtime.session import OrtSession


@pytest.fixture(scope="module")
def engine_artifacts(tiny_artifacts, tmp_path_factory):
    """A copy of the tiny artifacts with CPU engines (the shared fixture stays engine-free)."""
    from sdrt.export.cpu_engines import build_cpu_engines

    root = tmp_path_factory.mktemp("cpu-engines") / "tiny-sd"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("engines"))
    report = build_cpu_engines(root, threads=2)
    assert report.built == ["text_encoder", "unet", "vae_decoder", "vae_encoder"] and not report.kept
    return root


def test_isa_key_names_the_instruction_sets():
    assert isa_key({"avx2", "fma", "sse4_2"}) == "avx2"
    assert isa_key({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"}) == "avx512"
    zen4 = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
    assert isa_key(zen4) == "avx512-vnni-bf16"
    assert isa_key({"avx2", "fma", "avx_vnni", "amx_tile"}) == "avx2-avx-vnni-amx"
    assert isa_key({"sse2"}) == "sse"


def test_engines_are_fused_optimized_and_recorded(engine_artifacts):
    folder = engine_folder(engine_artifacts)
    records = read_records(folder)
    manifest = Manifest.load(engine_artifacts)
    for name, record in records.items():
        assert record.onnx_fingerprint == onnx_fingerprint(engine_artifacts, manifest.components[name])
        assert record.verification["max_abs_error"] <= 1e-3 * max(record.verification["scale"], 1.0)
        graph = onnx.load(str(folder / record.file), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        # The saved graph is onnxruntime's optimized one (NCHWc layouts), its weights in the data file.
        if isa_key().startswith(("avx2", "avx512")) and name != "text_encoder":  # no convolutions in CLIP
            assert {"ReorderInput", "ReorderOutput"} & ops, (name, sorted(ops))
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
        if name in ("unet", "text_encoder"):  # the graphs with attention: fused into onnxruntime's kernel
            assert "MultiHeadAttention" in ops, (name, sorted(ops))
            assert record.fusions.get("sdpa", 0) >= 1
    unet_ops = {n.op_type for n in onnx.load(str(folder / "unet.onnx"), load_external_data=False).graph.node}
    assert "Softmax" not in unet_ops  # no attention left unfused in the UNet


def test_second_build_keeps_every_engine(engine_artifacts):
    import subprocess
    import sys

    run = subprocess.run(
        # --no-choice: the measured choice has its own tests (test_choice.py)
        [sys.executable, "-m", "sdrt.runtime", "engines", "--artifacts", str(engine_artifacts), "--no-choice"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == (
        f"onnxruntime CPU engines in {engine_folder(engine_artifacts)}: built none, "
        "up to date text_encoder, unet, vae_decoder, vae_encoder"
    )


def test_pipeline_with_engines_equals_the_portable_graphs(engine_artifacts):
    args = dict(prompt="a red bicycle", height=64, width=96, num_inference_steps=4, seed=3)
    with (
        Pipeline.load(engine_artifacts, threads=2) as fast,
        Pipeline.load(engine_artifacts, threads=2, cache=False) as plain,
    ):
        assert all(s.engine is not None for s in fast.sessions.values())
        assert all(s.engine is None for s in plain.sessions.values())
        a, b = fast(**args).images.astype(int), plain(**args).images.astype(int)
    assert np.abs(a - b).max() <= 1


def test_stale_engines_are_named_and_skipped(engine_artifacts, caplog):
    folder = engine_folder(engine_artifacts)
    manifest = Manifest.load(engine_artifacts)
    unet = manifest.components["unet"]
    record = read_records(folder)["unet"]
    fingerprint = onnx_fingerprint(engine_artifacts, unet)
    assert stale_reason(record, folder, fingerprint) is None
    assert "re-exported" in stale_reason(record, folder, "0" * 64)
    old = type(record)(**{**record.__dict__, "onnxruntime_version": "1.0.0"})
    assert "built by onnxruntime 1.0.0" in stale_reason(old, folder, fingerprint)
    assert stale_reason(None, folder, fingerprint) == "no engine yet"

    # A record that no longer matches its ONNX: the runtime loads the portable graph and says why.
    path = folder / RECORDS
    saved = path.read_text()
    data = json.loads(saved)
    data["engines"]["unet"]["onnx_fingerprint"] = "0" * 64
    path.write_text(json.dumps(data))
    try:
        engine, why = find_engine(engine_artifacts, unet)
        assert engine is None and "re-exported" in why and "sdrt engines" in why
        with caplog.at_level(logging.INFO, logger="sdrt.runtime.session"):
            session = OrtSession(engine_artifacts, unet, use_engine=True)
        assert session.engine is None
        assert "loading the portable graph" in caplog.text
    finally:
        path.write_text(saved)


def test_engine_folder_is_keyed_by_isa_and_onnxruntime(engine_artifacts):
    import onnxruntime

    name = engine_folder(engine_artifacts).name
    assert name == f"onnxruntime-cpu_{isa_key()}_ort{onnxruntime.__version__}"


def test_int8_engines_may_differ_by_their_quantization_error(tiny_artifacts):
    import dataclasses

    from sdrt.export.cpu_engines import tolerance

    unet = Manifest.load(tiny_artifacts).components["unet"]
    assert tolerance(unet, scale=4.0) == pytest.approx(4e-3)  # float graphs: 1e-3 of the output's scale
    int8 = dataclasses.replace(unet, precision="int8", verification={"max_abs_error": 0.3, "psnr_db": 35.0})
    assert tolerance(int8, scale=4.0) == pytest.approx(0.6)  # two int8 approximations of one fp32 graph


def test_lora_sessions_start_from_the_engines_fused_graph(engine_artifacts, diffusers_pipeline, tmp_path):
    """Adapter sessions on a machine with engines: the fused graph kept beside the engine, weights replaced before
    onnxruntime optimizes (so the NCHWc layout and pre-packing stay on, convolutions included), and the image is
    diffusers' with the same LoRA (attention, LoCon convolutions, text encoder)."""
    from lora_files import diffusers_images, make_lora

    records = read_records(engine_folder(engine_artifacts))
    assert {n for n, r in records.items() if r.lora_source} == {"text_encoder", "unet"}
    path = make_lora(diffusers_pipeline, tmp_path / "style.safetensors", seed=1)
    latents = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
    call = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64)
    want = diffusers_images(diffusers_pipeline, [(path, 0.8)], latents, **call)
    base = diffusers_images(diffusers_pipeline, [], latents, **call)
    with Pipeline.load(engine_artifacts, threads=2) as p:
        got = p(**call, latents=latents, loras=[(str(path), 0.8)]).images
        (adapted,) = p.adapters._cache.values()
    for name in ("unet", "text_encoder"):
        assert adapted[name].engine.name == f"{name}.lora.onnx" and adapted[name].disabled_optimizers == []
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(want.astype(int) - base.astype(int)).mean() > 5  # the adapter moved the image


def test_a_build_without_lora_graphs_removes_the_kept_one(engine_artifacts):
    """`sdrt engines --no-lora-graphs` gives the disk back: the rebuilt engine's record keeps no fused graph and its
    files are gone; asking again keeps it again."""
    from sdrt.export.cpu_engines import build_cpu_engines

    folder = engine_folder(engine_artifacts)
    graph = folder / "text_encoder.lora.onnx"
    assert graph.is_file() and graph.with_name(graph.name + ".data").is_file()
    report = build_cpu_engines(engine_artifacts, ("text_encoder",), threads=2, lora_sources=False)
    assert report.reasons == {"text_encoder": "a graph for LoRA adapters no longer asked for"}
    assert read_records(folder)["text_encoder"].lora_source == "" and not list(folder.glob("text_encoder.lora.*"))
    build_cpu_engines(engine_artifacts, ("text_encoder",), threads=2)
    assert read_records(folder)["text_encoder"].lora_source == graph.name and graph.is_file()

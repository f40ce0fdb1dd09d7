"""int8 quantization of the tiny model's artifacts: the graph really is int8, the recorded errors are
the true ones, and the output directory behaves like an export (atomic, idempotent, source untouched).

The tiny model has random weights: its int8 error is large and says nothing about a real model. These
tests check that the error is measured and recorded truthfully, not that it is small.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sdrt.export import quantize
from sdrt.export.quantize import QuantizeOptions, quantize_artifacts
from sdrt.runtime.errors import ExportError
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import Manifest
from sdrt.runtime.pipeline import Pipeline

# Just enough calibration to exercise every path: 2 prompts x 2 steps at 64x64.
OPTIONS = QuantizeOptions(
    calibration_prompts=2, calibration_steps=2, calibration_height=64, calibration_width=64, verification_prompts=2
)


def tree_hashes(root: Path) -> dict[str, str]:
    # engines/ is a per-machine cache other tests' backends may fill; the artifacts proper are the rest.
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] != "engines"
    }


@pytest.fixture(scope="module")
def int8(tiny_artifacts, tmp_path_factory):
    before = tree_hashes(tiny_artifacts)
    out = tmp_path_factory.mktemp("int8") / "tiny-sd-int8"
    report = quantize_artifacts(tiny_artifacts, out, OPTIONS)
    return SimpleNamespace(out=out, report=report, manifest=Manifest.load(out), source_hashes=before)


@pytest.fixture(scope="module")
def fp32_pipeline(tiny_artifacts):
    # The portable fp32 graphs, as the quantizer's reference (not a CPU engine another test may have built).
    with Pipeline.load(tiny_artifacts, cache=False) as pipe:
        yield pipe


def weight_nodes(model: onnx.ModelProto) -> dict[str, int]:
    """Conv, Gemm and weight-bearing MatMul nodes of an fp32 graph, by op type."""
    weights = {t.name for t in model.graph.initializer}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm") or (node.op_type == "MatMul" and node.input[1] in weights):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_unet_weights_are_int8_behind_dequantize_linear(int8, tiny_artifacts):
    fp32 = onnx.load(str(tiny_artifacts / "onnx" / "unet.onnx"))
    q = onnx.load(str(int8.out / "onnx" / "unet.onnx"))
    int8_weights = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    producer = {out: node for node in q.graph.node for out in node.output}
    counts: dict[str, int] = {}
    for node in q.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in int8_weights:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts == weight_nodes(fp32)  # every weight-bearing node, none missed
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Attention's activation x activation MatMuls stay float: neither operand comes out of a DequantizeLinear.
    step = int8.manifest.components["unet"].optimization["steps"][-1]
    weights = {t.name for t in q.graph.initializer}
    float_matmuls = [
        n
        for n in q.graph.node
        if n.op_type == "MatMul" and n.input[1] not in weights and producer[n.input[1]].op_type != "DequantizeLinear"
    ]
    assert step["float_matmuls"] == len(float_matmuls) > 0
    assert step["quantized_nodes"] == counts


def test_manifest_records_int8_with_its_calibration(int8, tiny_artifacts):
    m = int8.manifest
    unet = m.components["unet"]
    assert unet.precision == "int8"
    assert m.components["vae_decoder"].precision == "fp32"  # not asked for: carried over as is
    steps = unet.optimization["steps"]
    fp32_steps = Manifest.load(tiny_artifacts).components["unet"].optimization["steps"]
    assert steps[:-1] == fp32_steps and steps[-1]["step"] == "int8"
    calibration = steps[-1]["calibration"]
    assert calibration["samples"] == OPTIONS.calibration_prompts * OPTIONS.calibration_steps
    assert (calibration["height"], calibration["width"], calibration["steps"]) == (64, 64, 2)
    assert "onnxruntime" in steps[-1]["tool"] and steps[-1]["format"] == "QDQ"
    # Everything else comes from the source, byte for byte.
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        assert m.components[name].files == Manifest.load(tiny_artifacts).components[name].files
    assert m.build["quantization"]["source"]["manifest_sha256"] == sha256_file(tiny_artifacts / "manifest.json")


def record_unet(pipe: Pipeline, record: dict) -> list[dict[str, np.ndarray]]:
    """The UNet feeds of the fp32 pipeline for the recorded held-out prompts and seeds."""
    feeds = []
    unet = pipe.sessions["unet"]

    class Recorder:
        name, inputs, outputs = unet.name, unet.inputs, unet.outputs

        def run(self, feed):
            feeds.append({k: v.copy() for k, v in feed.items()})
            return unet.run(feed)

        def close(self):
            pass

    pipe.sessions["unet"] = Recorder()
    try:
        for prompt, seed in zip(record["prompts"], record["seeds"]):
            generate(pipe, prompt, seed, record)
    finally:
        pipe.sessions["unet"] = unet
    return feeds


def generate(pipe: Pipeline, prompt: str, seed: int, record: dict) -> np.ndarray:
    return pipe(
        prompt,
        negative_prompt=record["negative_prompt"],
        height=record["height"],
        width=record["width"],
        num_inference_steps=record["steps"],
        guidance_scale=record["guidance_scale"],
        seed=seed,
    ).images[0]


def test_recorded_graph_error_is_the_measured_one(int8, tiny_artifacts, fp32_pipeline):
    check = int8.manifest.components["unet"].verification
    assert all(np.isfinite(check[k]) for k in ("max_abs_error", "mean_abs_error", "psnr_db"))
    e2e = int8.manifest.build["quantization"]["end_to_end"]
    feeds = record_unet(fp32_pipeline, {**e2e, "prompts": check["prompts"], "seeds": check["seeds"]})
    assert len(feeds) == check["samples"]
    fp32 = ort.InferenceSession(str(tiny_artifacts / "onnx" / "unet.onnx"), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(int8.out / "onnx" / "unet.onnx"), providers=["CPUExecutionProvider"])
    want = np.stack([fp32.run(None, f)[0] for f in feeds]).astype(np.float64)
    got = np.stack([q.run(None, f)[0] for f in feeds]).astype(np.float64)
    peak = max(1.0, np.abs(want).max())
    psnr = 10 * np.log10(peak**2 / np.mean((got - want) ** 2))
    assert check["max_abs_error"] == pytest.approx(np.abs(got - want).max(), rel=1e-4)
    assert check["psnr_db"] == pytest.approx(psnr, abs=1e-3)


def test_int8_pipeline_images_match_recorded_psnr(int8, fp32_pipeline):
    e2e = int8.manifest.build["quantization"]["end_to_end"]
    with Pipeline.load(int8.out, cache=False) as pipe:
        assert pipe.manifest.components["unet"].precision == "int8"
        got = np.stack([generate(pipe, p, s, e2e) for p, s in zip(e2e["prompts"], e2e["seeds"])]).astype(np.float64)
    want = np.stack([generate(fp32_pipeline, p, s, e2e) for p, s in zip(e2e["prompts"], e2e["seeds"])])
    want = want.astype(np.float64)
    assert got.shape == (len(e2e["prompts"]), 64, 64, 3)
    psnr = 10 * np.log10(255.0**2 / np.mean((got - want) ** 2))
    assert e2e["psnr_db"] == pytest.approx(psnr, abs=1e-6)
    assert e2e["max_abs_difference"] == np.abs(got - want).max()


def test_rerun_is_a_no_op_and_the_source_is_untouched(int8, tiny_artifacts):
    stamp = (int8.out / "manifest.json").stat().st_mtime_ns
    again = quantize_artifacts(tiny_artifacts, int8.out, OPTIONS)
    assert not again.built
    assert (int8.out / "manifest.json").stat().st_mtime_ns == stamp
    assert tree_hashes(tiny_artifacts) == int8.source_hashes
    leftovers = [p.name for p in int8.out.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert not any(p.name.startswith(".quantize-") for p in int8.out.iterdir())  # the scratch folder is gone


def test_interrupted_run_leaves_the_previous_output(int8, tiny_artifacts, monkeypatch):
    before = tree_hashes(int8.out)
    copy = quantize._copy_artifacts

    def copy_then_interrupt(*args, **kwargs):
        copy(*args, **kwargs)
        raise KeyboardInterrupt  # the temporary directory holds the copied files

    monkeypatch.setattr(quantize, "_copy_artifacts", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        quantize_artifacts(tiny_artifacts, int8.out, OPTIONS, force=True)
    assert tree_hashes(int8.out) == before
    fresh = int8.out.parent / "never-written"
    with pytest.raises(KeyboardInterrupt):
        quantize_artifacts(tiny_artifacts, fresh, OPTIONS)
    assert not fresh.exists()
    assert [p.name for p in int8.out.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"components": ("text_encoder",)}, "components: expected one or more of denoiser, unet, transformer, vae_d"),
        ({"components": ()}, "components: expected one or more"),
        ({"calibration_prompts": 0}, "calibration prompts: expected 1 to 16, got 0"),
        ({"calibration_steps": 0}, "calibration steps: expected 1 to 1000, got 0"),
        ({"verification_prompts": 9}, "verification prompts: expected 1 to 4, got 9"),
        ({"activation_type": "int4"}, "activation type: expected one of uint8, int8, got 'int4'"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ExportError, match=message):
        QuantizeOptions(**kwargs)


def test_bad_sources_are_refused_before_any_work(int8, tiny_artifacts, tmp_path):
    with pytest.raises(ExportError, match="expected an fp32 graph to quantize, got int8"):
        quantize_artifacts(int8.out, tmp_path / "twice", OPTIONS)
    with pytest.raises(ExportError, match="expected a directory other than the source"):
        quantize_artifacts(tiny_artifacts, tiny_artifacts, OPTIONS)
    with pytest.raises(ExportError, match="expected an sdrt artifact directory with manifest.json"):
        quantize_artifacts(tmp_path, tmp_path / "out", OPTIONS)
    odd = QuantizeOptions(calibration_height=72, calibration_width=64)
    with pytest.raises(ExportError, match="calibration height: expected a multiple of 16 pixels"):
        quantize_artifacts(tiny_artifacts, tmp_path / "out", odd)
    assert not (tmp_path / "out").exists() and not (tmp_path / "twice").exists()


def test_cli(int8, tiny_artifacts, capsys):
    from sdrt.export.cli import register_quantize

    parser = argparse.ArgumentParser()
    register_quantize(parser.add_subparsers(dest="command"))
    common = ["quantize", "--artifacts", str(tiny_artifacts), "--out", str(int8.out)]
    calibration = ["--calibration-prompts", "2", "--calibration-steps", "2", "--calibration-size", "64x64"]
    args = parser.parse_args(common + calibration)
    assert args.func(args) == 0
    assert "up to date" in capsys.readouterr().out
    args = parser.parse_args(common + ["--calibration-size", "64by64"])
    with pytest.raises(ExportError, match="expected HEIGHTxWIDTH in pixels such as 256x256, got '64by64'"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["--components", "text_encoder"])


def test_manifest_is_plain_json(int8):
    def refuse(constant):
        raise AssertionError(f"manifest.json holds {constant}, which is not JSON")

    # Python's json reads NaN and Infinity unless told not to; other JSON readers refuse them.
    data = json.loads((int8.out / "manifest.json").read_text(), parse_constant=refuse)
    assert data["components"]["unet"]["precision"] == "int8"


def test_sd3s_transformer_is_quantized_as_the_denoiser(family_artifacts, tmp_path):
    """The default component is the family's denoiser: SD 3's transformer gets int8 weights in every weight-bearing
    node (its attention's activation x activation MatMuls stay float), its error is measured on held-out inputs, and
    the int8 pipeline generates; the UNet named on a transformer model is refused."""
    source = family_artifacts("tiny-sd3")
    with pytest.raises(ExportError, match=r"unet: expected it among the source's components"):
        quantize_artifacts(source, tmp_path / "unet", QuantizeOptions(components=("unet",)))
    options = QuantizeOptions(calibration_prompts=1, calibration_steps=2, calibration_height=64,
                              calibration_width=64, verification_prompts=1)  # fmt: skip
    report = quantize_artifacts(source, tmp_path / "int8", options)
    component = report.manifest.components["transformer"]
    assert component.precision == "int8" and report.manifest.build["quantization"]["components"] == ["transformer"]
    fp32 = onnx.load(str(source / "onnx" / "transformer.onnx"))
    assert quantize.quantized_node_counts(tmp_path / "int8" / "onnx" / "transformer.onnx") == weight_nodes(fp32)
    assert component.verification["samples"] == 2 and np.isfinite(component.verification["psnr_db"])
    with Pipeline.load(tmp_path / "int8", cache=False) as pipe:
        image = pipe("a cat", height=64, width=64, num_inference_steps=2, seed=1).images[0]
    assert image.shape == (64, 64, 3) and image.std() > 0

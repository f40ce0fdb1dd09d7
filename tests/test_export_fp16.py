"""fp16 export of the tiny model: converted graphs, float32 I/O, verification against float32 PyTorch,
the fp32 islands and per-component overrides, and images from the fp16 artifacts."""

import shutil

import numpy as np
import onnx
import pytest

from sdrt.export import graph
from sdrt.export.build import ExportOptions, export_pipeline
from sdrt.runtime import Manifest, Pipeline
from sdrt.runtime.families import FAMILIES

FP16 = onnx.TensorProto.FLOAT16
FP32 = onnx.TensorProto.FLOAT


@pytest.fixture(scope="module")
def fp16_artifacts(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16") / "tiny-sd-fp16"
    options = ExportOptions(precision="fp16", component_precision=(("vae_encoder", "fp32"),))
    export_pipeline(str(tiny_model), out, options)
    return out


def weight_types(path):
    model = onnx.load(str(path))
    return {t.data_type for t in model.graph.initializer if t.data_type in (FP16, FP32) and len(t.dims) >= 2}


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_fp16_components_are_converted_and_verified(fp16_artifacts, tiny_artifacts, name):
    m = Manifest.load(fp16_artifacts)
    c = m.components[name]
    assert c.precision == "fp16"
    assert weight_types(fp16_artifacts / c.path) == {FP16}  # every weight matrix and kernel is half
    model = onnx.load(str(fp16_artifacts / c.path), load_external_data=False)
    assert all(
        v.type.tensor_type.elem_type in (FP32, onnx.TensorProto.INT64)
        for v in (*model.graph.input, *model.graph.output)
    )
    assert [s["step"] for s in c.optimization["steps"]] == ["export", "slim", "fp16"]
    fp32_bytes = sum(f.bytes for f in Manifest.load(tiny_artifacts).components[name].files)
    assert sum(f.bytes for f in c.files) < 0.6 * fp32_bytes
    v = c.verification
    assert v["precision"] == "fp16" and v["passed"]
    assert v["relative_error"] <= v["tolerance"]["relative_max_error"] and v["psnr_db"] >= v["tolerance"]["min_psnr_db"]
    # fp16 is measurably less exact than fp32 (the verification sees the conversion) ...
    assert v["max_abs_error"] > 10 * Manifest.load(tiny_artifacts).components[name].verification["max_abs_error"]
    # ... and still close: ~3 significant digits
    assert v["relative_error"] < 1e-2


def test_override_keeps_a_component_in_fp32(fp16_artifacts):
    c = Manifest.load(fp16_artifacts).components["vae_encoder"]
    assert c.precision == "fp32" and [s["step"] for s in c.optimization["steps"]] == ["export", "slim"]
    assert weight_types(fp16_artifacts / c.path) == {FP32}
    assert Manifest.load(fp16_artifacts).build["options"]["component_precision"] == {"vae_encoder": "fp32"}


def test_family_exceptions_and_overrides():
    fp16 = ExportOptions(precision="fp16")
    assert fp16.precision_of("unet", FAMILIES["sd1"]) == "fp16"
    assert fp16.precision_of("unet", FAMILIES["sd2"]) == "fp16+fp32-attention"
    assert fp16.precision_of("vae_decoder", FAMILIES["sdxl"]) == "fp32"
    forced = ExportOptions(precision="fp16", component_precision=(("unet", "fp16"), ("text_encoder", "fp32")))
    assert (
        forced.precision_of("unet", FAMILIES["sd2"]) == "fp16"
        and forced.precision_of("text_encoder", FAMILIES["sd1"]) == "fp32"
    )
    assert ExportOptions().precision_of("unet", FAMILIES["sd2"]) == "fp32"


def test_attention_islands_stay_fp32(tiny_artifacts, tmp_path):
    path = tmp_path / "unet.onnx"
    shutil.copy(tiny_artifacts / "onnx" / "unet.onnx", path)
    record = graph.to_fp16(path, ("attention",))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    producers = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmaxes and record["fp32_nodes"] >= 2 * len(softmaxes)
    for node in softmaxes:
        assert types[node.input[0]] == FP32 and types[node.output[0]] == FP32
        scores = producers[node.input[0]]
        while scores.op_type != "MatMul":
            scores = producers[scores.input[0]]
        assert all(types[i] == FP32 for i in scores.input)  # q and k^T enter the score MatMul as float32
    # everything else is half: the convolutions' weights are fp16
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert {t.data_type for t in model.graph.initializer if t.name in conv_weights} == {FP16}


def test_fp16_artifacts_generate_diffusers_image(fp16_artifacts, diffusers_pipeline):
    import torch

    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = diffusers_pipeline(
        "a red bicycle",
        height=64,
        width=64,
        num_inference_steps=10,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images[0]
    want = (want * 255).round().astype(np.uint8)
    with Pipeline.load(fp16_artifacts) as pipe:
        got = pipe("a red bicycle", height=64, width=64, num_inference_steps=10, latents=latents).images[0]
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())

"""Export of the tiny model: manifest contents, verification figures, no-op re-runs, atomicity, tamper checks."""

import json
import math
import time

import onnx
import pytest

from sdrt.export import build, graph
from sdrt.export.build import ExportOptions, export_pipeline
from sdrt.runtime import ArtifactError, ExportError, Manifest, Pipeline
from sdrt.runtime.manifest import SCHEMA_VERSION

# Max abs error of an fp32 ONNX graph against PyTorch on the tiny model. Measured ~1e-5 at worst
# (VAE decoder); 1e-4 leaves headroom for onnxruntime versions without hiding a wrong graph.
FP32_MAX_ABS_ERROR = 1e-4


def test_manifest_describes_the_artifacts(tiny_artifacts):
    m = Manifest.load(tiny_artifacts)
    assert m.schema_version == SCHEMA_VERSION
    assert m.family == "sd1" and m.prediction_type == "epsilon"
    assert (m.vae_scale_factor, m.latent_channels, m.text_length) == (8, 4, 77)
    assert m.spatial_multiple == 16 and m.default_height == 256
    assert m.vae_scaling_factor == pytest.approx(0.18215)
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert json.loads((tiny_artifacts / m.scheduler_config).read_text())["_class_name"] == "DDIMScheduler"
    for name in ("torch", "diffusers", "onnx", "sdrt"):
        assert m.build["versions"][name] != "not installed"


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_each_component_was_verified_against_pytorch(tiny_artifacts, name):
    c = Manifest.load(tiny_artifacts).components[name]
    v = c.verification
    assert v["passed"] and v["max_abs_error"] < FP32_MAX_ABS_ERROR
    assert len({json.dumps(check["input_shapes"]) for check in v["checks"]}) == 2  # two shapes in the range
    assert c.opset >= 17 and c.precision == "fp32"
    # The summary is the worst shape's, and the check compared two computations (a graph against itself gives 0).
    assert v["max_abs_error"] == max(check["max_abs_error"] for check in v["checks"]) > 0
    assert v["psnr_db"] == min(check["psnr_db"] for check in v["checks"])
    for check in v["checks"]:  # PSNR as defined: peak = the reference's largest magnitude (>= 1)
        peak = max(1.0, check["reference_max_abs"])
        if check["max_abs_error"] > 0:
            assert check["psnr_db"] >= 10 * math.log10(peak**2 / check["max_abs_error"] ** 2) - 1e-9


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_optimization_steps_are_recorded_with_true_node_counts(tiny_artifacts, name):
    c = Manifest.load(tiny_artifacts).components[name]
    steps = c.optimization["steps"]
    assert [s["step"] for s in steps] == ["export", "slim"]
    final = onnx.load(tiny_artifacts / c.path, load_external_data=False)
    assert steps[-1]["nodes_after"] == len(final.graph.node)
    assert steps[-1]["bytes_after"] == sum(f.bytes for f in c.files)
    assert steps[1]["nodes_before"] == steps[0]["nodes_after"] >= steps[1]["nodes_after"]


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_graph_io_has_the_declared_dynamic_dims(tiny_artifacts, name):
    c = Manifest.load(tiny_artifacts).components[name]
    graph = onnx.load(tiny_artifacts / c.path, load_external_data=False).graph
    declared = {t.name: t.shape for t in (*c.inputs, *c.outputs)}
    for value in (*graph.input, *graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == declared[value.name]
    assert "batch" in c.inputs[0].shape


def test_unchanged_rerun_does_no_work(tiny_model, tiny_artifacts):
    before = {p: p.stat().st_mtime_ns for p in tiny_artifacts.rglob("*")}
    t0 = time.perf_counter()
    report = export_pipeline(str(tiny_model), tiny_artifacts)
    assert not report.built
    assert {p: p.stat().st_mtime_ns for p in tiny_artifacts.rglob("*")} == before
    assert time.perf_counter() - t0 < 10


def test_tampered_onnx_is_refused_with_both_hashes(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, copy)
    unet = copy / "onnx" / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    unet.write_bytes(bytes(data))
    expected = Manifest.load(tiny_artifacts).components["unet"].files[0].sha256
    with pytest.raises(ArtifactError, match=f"expected sha256 {expected}.*got [0-9a-f]{{64}}"):
        Pipeline.load(copy)
    unet.write_bytes(bytes(data[:-1]))
    with pytest.raises(ArtifactError, match="bytes per the manifest"):
        Manifest.load(copy)


def test_other_schema_version_is_refused(tiny_artifacts, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"expected schema_version {SCHEMA_VERSION}, got 999"):
        Manifest.load(copy)
    with pytest.raises(ArtifactError, match=r"or an optimum ONNX export folder\), found neither"):
        Manifest.load(tmp_path / "nowhere")


def test_interrupted_build_leaves_nothing(tiny_model, tiny_artifacts, tmp_path, monkeypatch):
    real = build._export_component
    calls = []
    fail_at = [2]

    def export_then_fail(pipe, name, root, options, release=None):
        calls.append(name)
        if len(calls) == fail_at[0]:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this component
        return real(pipe, name, root, options, release)

    monkeypatch.setattr(build, "_export_component", export_then_fail)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(str(tiny_model), fresh, ExportOptions(verify=False))
    assert not fresh.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory left beside it

    # over existing artifacts: --force that fails keeps the old, complete directory untouched
    before = {p.relative_to(tiny_artifacts): p.read_bytes() for p in tiny_artifacts.rglob("*") if p.is_file()}
    calls.clear()
    fail_at[0] = 1  # the new directory is already begun (the interrupted one above had a finished component)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(str(tiny_model), tiny_artifacts, force=True)
    after = {p.relative_to(tiny_artifacts): p.read_bytes() for p in tiny_artifacts.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tiny_artifacts.parent.iterdir() if p.name.startswith(".")] == []


def test_bad_inputs_get_clear_errors(tmp_path, tiny_model):
    with pytest.raises(ExportError, match="expected a diffusers folder or a hub id"):
        export_pipeline(str(tmp_path / "no" / "such" / "dir"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="model_index.json"):
        export_pipeline(str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(ExportError, match="expected 17 or newer, got 13"):
        ExportOptions(opset=13)
    from sdrt.runtime.families import FAMILIES

    with pytest.raises(ExportError, match="text-to-image needs unet"):
        ExportOptions(components=("text_encoder", "vae_decoder")).components_of(FAMILIES["sd1"])
    with pytest.raises(ExportError, match="expected names from the sdxl-refiner family's text_encoder_2, unet"):
        ExportOptions(components=("text_encoder", "unet", "vae_decoder")).components_of(FAMILIES["sdxl-refiner"])
    assert ExportOptions().components_of(FAMILIES["sdxl"])[:2] == ("text_encoder", "text_encoder_2")
    with pytest.raises(ExportError, match="precision: expected one of fp32, fp16, got 'int8'"):
        ExportOptions(precision="int8")
    with pytest.raises(ExportError, match="got vae=fp16"):
        ExportOptions(component_precision=(("vae", "fp16"),))
    with pytest.raises(ExportError, match="expected names from slim, ort-fusion, got"):
        ExportOptions(optimizations=("fold",))


def test_large_graphs_keep_weights_as_external_data(tiny_model, tmp_path, monkeypatch):
    """Past the 2 GB protobuf limit weights go to <name>.onnx.data; forced here with a zero threshold."""
    import numpy as np

    from sdrt.export import onnx_export
    from sdrt.export.modules import load_pipeline
    from sdrt.runtime.families import sizes

    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 0)
    pipe = load_pipeline(tiny_model)
    spec = pipe.family.specs(pipe.dims)["vae_decoder"]
    feed = spec.sample(sizes(pipe.dims, 2, 4, 6), np.random.default_rng(0))
    path = tmp_path / "onnx" / "vae_decoder.onnx"
    files = onnx_export.export_onnx(spec, pipe.module("vae_decoder"), feed, path, 18)
    data = path.with_name("vae_decoder.onnx.data")
    assert files == [path, data]
    assert path.stat().st_size < data.stat().st_size / 4  # the graph keeps only small constants
    reference = onnx_export.reference_outputs(spec, pipe.module("vae_decoder"), [feed])
    result = onnx_export.verify_onnx(spec, reference, path, [feed])
    assert result["passed"] and result["max_abs_error"] < FP32_MAX_ABS_ERROR
    # every later step writes its result with external data too, and leaves no stale data behind
    graph.slim(path)
    assert graph.graph_files(path) == [path, data] and path.stat().st_size < data.stat().st_size / 4
    graph.to_fp16(path)
    assert graph.graph_files(path) == [path, data] and path.stat().st_size < data.stat().st_size / 4
    result = onnx_export.verify_onnx(spec, reference, path, [feed], "fp16")
    assert result["passed"] and sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["onnx", "vae_decoder.onnx", "vae_decoder.onnx.data"]
    )


def test_verification_fails_clearly_when_the_graph_differs(tiny_model, tiny_artifacts):
    """A graph that does not compute the module's function is caught, with the figures in the message."""
    import numpy as np
    import torch

    from sdrt.export import onnx_export
    from sdrt.export.modules import load_pipeline
    from sdrt.runtime.families import sizes

    pipe = load_pipeline(tiny_model)
    spec = pipe.family.specs(pipe.dims)["vae_decoder"]
    feed = spec.sample(sizes(pipe.dims, 1, 4, 4), np.random.default_rng(0))
    module = pipe.module("vae_decoder")

    class Shifted(torch.nn.Module):  # PyTorch says one thing, the exported graph computed another
        def forward(self, latent):
            return module(latent) + 0.01

    path = tiny_artifacts / Manifest.load(tiny_artifacts).components["vae_decoder"].path
    with pytest.raises(ExportError, match=r"vae_decoder: fp32 ONNX output 'image' differs from PyTorch by 0\.01.*PSNR"):
        onnx_export.verify_onnx(spec, onnx_export.reference_outputs(spec, Shifted(), [feed]), path, [feed])
    # the same difference is within fp16's tolerance, as it should be for a half-precision graph
    shifted = onnx_export.reference_outputs(spec, Shifted(), [feed])
    assert onnx_export.verify_onnx(spec, shifted, path, [feed], "fp16")["passed"]

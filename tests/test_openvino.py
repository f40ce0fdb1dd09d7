"""The OpenVINO backend runs the same graphs as onnxruntime and gives the same numbers in fp32.

Tolerances: per component, fp32 outputs agree with onnxruntime's within 1e-4 of the output's scale
(max |reference|, at least 1); measured 2e-6 on the tiny model. bf16 on the UNet differs by ~3e-2,
so the fp32 bound also proves OpenVINO did not fall back to its bf16 default.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'openvino>=2026.4.1'; `make test` does)")

from sdrt.runtime import ArtifactError, BackendError, InputError, Manifest, Pipeline  # noqa: E402
from sdrt.runtime import openvino_backend as ovb  # noqa: E402
from sdrt.runtime.cpu_features import cpu_flags, cpu_summary, has_bf16  # noqa: E402
from sdrt.runtime.openvino_backend import OpenVINOSession, compile_config, cpu_precisions  # noqa: E402
from sdrt.runtime.session import OrtSession  # noqa: E402

FP32_TOLERANCE = 1e-4  # of the output's scale
OPTIMUM = Path(os.environ.get("SDRT_OPTIMUM_FOLDER", Path(__file__).parents[1] / "models" / "tiny-sd-optimum"))
SHAPES = [(1, 8, 8), (2, 12, 8)]  # (batch, latent height, latent width): 64x64 and 96x64 px


@pytest.fixture(scope="module")
def manifest(tiny_artifacts) -> Manifest:
    return Manifest.load(tiny_artifacts, verify_hashes=False)


@pytest.fixture(scope="module")
def unet_session(tiny_artifacts, manifest) -> OpenVINOSession:
    return OpenVINOSession(tiny_artifacts, manifest.components["unet"])


def make_feed(component: str, batch: int, h: int, w: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of ``component`` for ``batch`` images of ``h`` x ``w`` latent cells."""
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    if component == "text_encoder":
        return {"input_ids": rng.integers(0, 49408, (batch, 77), dtype=np.int64)}
    if component == "unet":
        return {
            "sample": normal(batch, 4, h, w),
            "timestep": np.full((batch,), 500.0, np.float32),
            "encoder_hidden_states": normal(batch, 77, 32),
        }
    if component == "vae_decoder":
        return {"latent": normal(batch, 4, h, w)}
    return {"image": normal(batch, 3, h * 8, w * 8)}


def max_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    """Largest abs difference over all outputs, relative to each output's scale (at least 1)."""
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    return max(float(np.abs(got[n] - want[n]).max() / max(1.0, np.abs(want[n]).max())) for n in want)


# -- fp32: the same numbers as onnxruntime -----------------------------------------------------------
@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_fp32_component_matches_onnxruntime_at_two_shapes(tiny_artifacts, manifest, name, rng):
    component = manifest.components[name]
    ov_session, ort_session = OpenVINOSession(tiny_artifacts, component), OrtSession(tiny_artifacts, component)
    assert ov_session.precision == "fp32" and ov_session.load_seconds > 0
    for batch, h, w in SHAPES:  # one compiled model serves every shape: the graphs' axes are dynamic
        feed = make_feed(name, batch, h, w, rng)
        assert max_error(ov_session.run(feed), ort_session.run(feed)) < FP32_TOLERANCE, (batch, h, w)


def test_pipeline_image_on_openvino_equals_onnxruntime(tiny_artifacts, runtime_pipeline):
    args = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", height=64, width=64, num_inference_steps=4)
    want = runtime_pipeline(**args, seed=0).images
    with Pipeline.load(tiny_artifacts, backend="openvino", verify_hashes=False, cache=False) as pipe:
        got = pipe(**args, seed=0).images
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_outputs_are_owned_copies(tiny_artifacts, manifest, rng):
    """OpenVINO reuses its output tensors on the next inference; what run() returned must not change."""
    session = OpenVINOSession(tiny_artifacts, manifest.components["vae_decoder"])
    first = session.run(make_feed("vae_decoder", 1, 8, 8, rng))["image"]
    kept = first.copy()
    session.run(make_feed("vae_decoder", 1, 8, 8, rng))
    assert first.flags.owndata and np.array_equal(first, kept)


@pytest.mark.skipif(not (OPTIMUM / "unet" / "model.onnx").is_file(), reason=f"no optimum export at {OPTIMUM}")
@pytest.mark.parametrize("name", ["unet", "vae_decoder"])
def test_optimum_folder_runs_with_its_tensor_names(name, rng):
    """optimum's graphs: other tensor names (VAE) and one scalar timestep for the batch (UNet)."""
    component = Manifest.load(OPTIMUM).components[name]
    feed = make_feed(name, 2, 8, 8, rng)
    got = OpenVINOSession(OPTIMUM, component).run(feed)
    assert max_error(got, OrtSession(OPTIMUM, component).run(feed)) < FP32_TOLERANCE


# -- precision --------------------------------------------------------------------------------------
def test_cpu_precisions_come_from_openvino(monkeypatch):
    import openvino

    reported = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    precisions = cpu_precisions()
    assert precisions[0] == "fp32" and ("bf16" in precisions) == ("BF16" in reported)
    # OpenVINO's order and its non-precision entries do not matter: fp32 first, then what else it offers.
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ["BF16", "WINOGRAD", "FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    assert cpu_precisions() == ["fp32", "bf16"]
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda: ["FP32", "INT8", "FP16"])
    assert cpu_precisions() == ["fp32", "fp16"]


def test_bf16_on_this_cpu(tiny_artifacts, manifest, rng):
    """Where OpenVINO offers bf16 it runs in bf16: close to fp32 but not equal. Elsewhere it is refused."""
    component = manifest.components["unet"]
    if "bf16" not in cpu_precisions():
        with pytest.raises(BackendError, match="'bf16'.*OPTIMIZATION_CAPABILITIES.*precision='fp32'"):
            OpenVINOSession(tiny_artifacts, component, precision="bf16")
        return
    feed = make_feed("unet", 2, 8, 8, rng)
    bf16 = OpenVINOSession(tiny_artifacts, component, precision="bf16")
    assert bf16.precision == "bf16"
    error = max_error(bf16.run(feed), OpenVINOSession(tiny_artifacts, component).run(feed))
    assert 1e-4 < error < 0.1  # it really ran in lower precision, and still computes the same function


def test_bf16_is_refused_on_a_cpu_without_it(tiny_artifacts, manifest, monkeypatch):
    """Runs on every machine: a CPU without bf16 is simulated by OpenVINO reporting fp32 only."""
    monkeypatch.setattr(ovb, "cpu_precisions", lambda: ["fp32"])
    with pytest.raises(BackendError) as error:
        OpenVINOSession(tiny_artifacts, manifest.components["vae_decoder"], precision="bf16")
    message = str(error.value)
    assert "'bf16'" in message and "['fp32']" in message and "OPTIMIZATION_CAPABILITIES" in message
    assert "precision='fp32'" in message
    with pytest.raises(BackendError, match="bf16"):  # and through the registry, before anything loads
        Pipeline.load(tiny_artifacts, backend="openvino", precision="bf16", verify_hashes=False, cache=False)


@pytest.mark.skipif("bf16" not in cpu_precisions(), reason="OpenVINO's default is f32 on a CPU without bf16")
def test_openvino_default_precision_would_be_caught(tiny_artifacts, manifest, monkeypatch):
    """Without the explicit hint OpenVINO picks bf16 on this CPU; the session must notice, not run it as fp32."""
    monkeypatch.setattr(ovb, "compile_config", lambda *args: {"PERFORMANCE_HINT": "LATENCY"})
    with pytest.raises(BackendError, match="expected the compiled model to run in f32 .*OpenVINO chose bf16"):
        OpenVINOSession(tiny_artifacts, manifest.components["vae_decoder"])


def test_unknown_precision_lists_the_choices(tiny_artifacts, manifest):
    with pytest.raises(InputError, match=r"expected one of fp32, bf16, fp16, got 'int4'"):
        OpenVINOSession(tiny_artifacts, manifest.components["vae_decoder"], precision="int4")


def test_compile_config_always_names_the_precision():
    assert compile_config("fp32") == {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    config = compile_config("bf16", threads=2, cache_dir=Path("/c"))
    assert config == {
        "INFERENCE_PRECISION_HINT": "bf16",
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": "2",
        "CACHE_DIR": "/c",
    }


# -- compiled-model cache -----------------------------------------------------------------------------
def test_cache_is_written_then_loaded(tiny_artifacts, manifest, tmp_path, rng):
    component, cache = manifest.components["unet"], tmp_path / "cache"
    feed = make_feed("unet", 2, 8, 8, rng)
    first = OpenVINOSession(tiny_artifacts, component, threads=1, cache_dir=cache)
    blobs = sorted(cache.iterdir())
    assert blobs and not first.loaded_from_cache
    second = OpenVINOSession(tiny_artifacts, component, threads=1, cache_dir=cache)
    assert second.loaded_from_cache and sorted(cache.iterdir()) == blobs
    for batch, h, w in SHAPES:  # the cached model keeps the dynamic shapes
        feed = make_feed("unet", batch, h, w, rng)
        np.testing.assert_array_equal(second.run(feed)["out_sample"], first.run(feed)["out_sample"])


def test_unwritable_cache_compiles_without_it(tiny_artifacts, manifest, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    session = OpenVINOSession(tiny_artifacts, manifest.components["vae_decoder"], cache_dir=blocker / "cache")
    assert not session.loaded_from_cache and "not writable" in caplog.text


# -- inputs the session refuses -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: {**f, "sample": f["sample"].astype(np.float64)}, "'sample': expected dtype float32, got float64"),
        (lambda f: {**f, "sample": f["sample"][:, :, :, 0]}, r"'sample': expected shape \(batch, 4, latent_height"),
        (lambda f: {**f, "timestep": f["timestep"][:1]}, r"'timestep': expected shape \(batch\), got \(1,\)"),
        (lambda f: {k: v for k, v in f.items() if k != "timestep"}, r"expected inputs \['sample', 'timestep'"),
    ],
    ids=["dtype", "rank", "batch", "missing"],
)
def test_bad_feed_is_an_input_error(unet_session, rng, change, message):
    """Checked before OpenVINO sees it: OpenVINO itself would cast a wrong dtype without a word."""
    with pytest.raises(InputError, match=message):
        unet_session.run(change(make_feed("unet", 2, 8, 8, rng)))


def test_graph_that_disagrees_with_the_manifest_is_an_artifact_error(tiny_artifacts, manifest):
    component = manifest.components["vae_decoder"]
    renamed = dataclasses.replace(component, inputs=[dataclasses.replace(component.inputs[0], name="latents")])
    with pytest.raises(ArtifactError, match=r"expected graph inputs \['latents'\].*got \['latent'\]"):
        OpenVINOSession(tiny_artifacts, renamed)


# -- cpu_features -----------------------------------------------------------------------------------------
def test_cpu_features_read_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512f", "avx512_bf16"} and has_bf16(cpuinfo)
    summary = cpu_summary(cpuinfo)
    assert summary["model"] == "Test CPU" and summary["flags"]["avx512_bf16"] and not summary["flags"]["amx_bf16"]
    missing = tmp_path / "none"
    assert cpu_flags(missing) == set() and not has_bf16(missing) and cpu_summary(missing)["model"] == "unknown"


LOWER = [p for p in cpu_precisions() if p != "fp32"]


@pytest.mark.skipif(not LOWER, reason="OpenVINO offers no precision below fp32 on this CPU")
def test_each_precision_compiles_into_its_own_cache(tiny_artifacts, tmp_path):
    """OpenVINO names one cached blob per model path whatever the precision hint: a bf16 compile after an fp32 one
    imported the fp32 blob and returned NaN on an AMX Xeon. Each precision has its own folder: the lower one is
    compiled (not imported), runs in its precision with finite outputs, and comes from its own cache next time."""
    import shutil

    root = tmp_path / "tiny-sd"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("engines"))
    call = dict(height=64, width=64, num_inference_steps=1, guidance_scale=7.5, seed=1234)
    with Pipeline.load(root, backend="openvino", precision="fp32", threads=2, verify_hashes=False) as pipe:
        fp32 = pipe("a photograph of an astronaut riding a horse", **call).images
    for precision in LOWER:
        images = []
        for load in range(2):
            with Pipeline.load(root, backend="openvino", precision=precision, threads=2, verify_hashes=False) as pipe:
                unet = pipe.sessions["unet"]
                assert unet.loaded_from_cache == bool(load), (precision, load)
                counts = unet.runtime_precisions()
                assert max(counts, key=counts.get) == {"bf16": "bf16", "fp16": "f16"}[precision], counts
                images.append(pipe("a photograph of an astronaut riding a horse", **call).images)  # finite, or raises
        np.testing.assert_array_equal(images[0], images[1])
        assert np.abs(images[0].astype(int) - fp32).mean() < 8  # the same picture, computed in lower precision
    folders = sorted(p.name.rsplit("-", 1)[1] for p in (root / "engines").glob("openvino_*/unet-*"))
    assert folders == sorted(["fp32", *LOWER])


def test_ir_engines_hold_fp16_weights_a_static_unet_and_serve_the_lower_precisions(tiny_artifacts, tmp_path, rng):
    """`sdrt engines`' OpenVINO IR: one per component (fp16 weights, within 2e-2 of the ONNX in fp32), the UNet also
    static at the profile's optimum; kept when up to date, rebuilt when the ONNX changes. bf16/fp16 sessions read it
    (the static graph for the optimum's shapes, the dynamic one for others, compiled on first use); fp32 reads the
    ONNX, so fp32 stays exact."""
    import shutil

    from sdrt.export.openvino_engines import build_openvino_engines
    from sdrt.runtime.openvino_backend import find_ir, ir_folder, read_ir_records
    from sdrt.runtime.profiles import Range, ShapeRanges

    root = tmp_path / "tiny-sd"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("engines"))
    ranges = ShapeRanges(Range(1, 1, 2), Range(64, 64, 128), Range(64, 64, 128))
    report = build_openvino_engines(root, ranges)
    manifest = Manifest.load(root)
    assert sorted(report.built) == sorted(manifest.components) and not report.kept
    records = read_ir_records(ir_folder(root))
    for name, record in records.items():
        assert record.verification["relative_error"] <= 2e-2 and (ir_folder(root) / record.file).is_file()
        assert bool(record.static_file) == (name == "unet")
    assert records["unet"].static_shapes["sample"] == [2, 4, 8, 8]  # guided batch at 64x64
    assert build_openvino_engines(root, ranges).kept == report.built  # up to date: nothing rebuilt
    wider = ShapeRanges(Range(1, 1, 2), Range(64, 96, 128), Range(64, 96, 128))
    assert build_openvino_engines(root, wider, ("unet",)).built == ["unet"]  # another optimum: a new static IR
    assert read_ir_records(ir_folder(root))["unet"].static_shapes["sample"] == [2, 4, 12, 12]
    build_openvino_engines(root, ranges, ("unet",))
    unet = manifest.components["unet"]
    if not LOWER:
        return
    record, _ = find_ir(root, unet)
    precision = LOWER[0]
    ir = OpenVINOSession(root, unet, threads=2, precision=precision, ir=record)
    onnx_session = OpenVINOSession(root, unet, threads=2, precision=precision)
    for batch, size in ((2, 8), (1, 16)):
        feed = make_feed("unet", batch, size, size, rng)
        got, want = ir.run(feed)["out_sample"], onnx_session.run(feed)["out_sample"]
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # the same function, in the lower precision
    assert ir.calls == {"static": 1, "dynamic": 1}
    with Pipeline.load(root, backend="openvino", precision="fp32", verify_hashes=False) as pipe:
        assert pipe.sessions["unet"].source.suffix == ".onnx"
    with Pipeline.load(root, backend="openvino", precision=precision, verify_hashes=False) as pipe:
        assert pipe.sessions["unet"].source.suffix == ".xml"

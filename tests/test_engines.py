"""TensorRT engine logic that runs without a GPU: shape profiles, device keys, cache staleness, the
engine manifest, polygraphy's loader chain as configured, and the CPU-only paths of the commands."""

import json
import subprocess
import sys

import pytest

from sdrt.export.engines import EngineOptions, build_options, loader_chain, plan_engines
from sdrt.runtime import BackendError, InputError, Manifest
from sdrt.runtime.engine_cache import (
    DeviceInfo,
    EngineManifest,
    EngineRecord,
    check_engine_for_runtime,
    device_key,
    find_engine_folder,
    onnx_fingerprint,
    stale_reason,
)
from sdrt.runtime.profiles import Range, ShapeRanges, check_shapes, input_profile, output_max_shapes

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35", 80 * 2**30)
RANGES = ShapeRanges(batch=Range(1, 2, 4), height=Range(256, 512, 768), width=Range(256, 512, 1024))


# -- profiles --------------------------------------------------------------------------------------
def test_range_parsing():
    assert Range.parse("512", "h") == Range(512, 512, 512)
    assert Range.parse("1:4", "b") == Range(1, 4, 4)
    assert Range.parse("256:512:1024", "h") == Range(256, 512, 1024)
    with pytest.raises(InputError, match=r"--height: expected N, MIN:MAX or MIN:OPT:MAX \(integers\), got 'big'"):
        Range.parse("big", "--height")
    with pytest.raises(InputError, match="expected 0 < min <= opt <= max, got min=4 opt=2 max=8"):
        Range(4, 2, 8)


def test_profiles_map_batch_and_pixels_to_every_input(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    f, n, d = m.vae_scale_factor, m.text_length, m.components["unet"].inputs[2].shape[2]
    assert f == 8
    # batch 1..4 (opt 2); pixels 256..768 x 256..1024 (opt 512x512). Latents are pixels / 8.
    unet = input_profile(m.components["unet"], m, RANGES)
    # guided calls double the batch: opt 2 -> 4, max 4 -> 8; min stays 1 for guidance_scale <= 1
    assert unet["sample"] == ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 96, 128))
    assert unet["timestep"] == ((1,), (4,), (8,))
    assert unet["encoder_hidden_states"] == ((1, n, d), (4, n, d), (8, n, d))
    assert input_profile(m.components["text_encoder"], m, RANGES) == {"input_ids": ((1, n), (4, n), (8, n))}
    assert input_profile(m.components["vae_decoder"], m, RANGES) == {
        "latent": ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))
    }
    assert input_profile(m.components["vae_encoder"], m, RANGES) == {
        "image": ((1, 3, 256, 256), (2, 3, 512, 512), (4, 3, 768, 1024))
    }
    assert output_max_shapes(m.components["vae_decoder"], m, RANGES) == {"image": (4, 3, 768, 1024)}
    assert output_max_shapes(m.components["unet"], m, RANGES) == {"out_sample": (8, 4, 96, 128)}


def test_static_profile_and_pixel_multiples(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    static = ShapeRanges(Range(1, 1, 1), Range(512, 512, 512), Range(512, 512, 512))
    assert static.is_static and not RANGES.is_static
    lo, opt, hi = input_profile(m.components["vae_decoder"], m, static)["latent"]
    assert lo == opt == hi == (1, 4, 64, 64)
    bad = ShapeRanges(Range(1, 1, 1), Range(256, 520, 1024), Range(512, 512, 512))
    with pytest.raises(InputError, match="height range: expected multiples of 16 pixels .* got 256:520:1024"):
        input_profile(m.components["unet"], m, bad)


def test_requests_outside_the_profile_name_the_range():
    profile = {"sample": ((1, 4, 32, 32), (4, 4, 64, 64), (8, 4, 96, 128))}
    check_shapes("unet", profile, {"sample": (8, 4, 96, 128)})
    check_shapes("unet", profile, {"sample": (1, 4, 40, 33)})  # anything inside the box
    with pytest.raises(
        InputError,
        match=r"shape \(2, 4, 128, 64\) is outside the engine's profile \(1, 4, 32, 32\) \.\. \(8, 4, 96, 128\)",
    ):
        check_shapes("unet", profile, {"sample": (2, 4, 128, 64)})


# -- device keys and the engine cache ------------------------------------------------------------
def test_device_key():
    assert device_key(H100, "fp16") == "nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35_fp16"
    assert device_key(DeviceInfo("NVIDIA GeForce RTX 4090", (8, 9), "10.8.0"), "bf16") == (
        "nvidia-geforce-rtx-4090_sm89_trt10.8.0_bf16"
    )
    keys = {
        device_key(d, p)
        for d in (H100, DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), "10.14.1"))
        for p in ("fp16", "fp32")
    }
    assert len(keys) == 4  # TensorRT version and precision each make their own folder
    with pytest.raises(BackendError, match="expected one of fp32, fp16, bf16, got 'int8'"):
        device_key(H100, "int8")


def record(tmp_path, **changes):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "unet.plan").write_bytes(b"engine bytes")
    import hashlib

    base = dict(
        component="unet",
        file="unet.plan",
        sha256=hashlib.sha256(b"engine bytes").hexdigest(),
        bytes=12,
        onnx_fingerprint="a" * 64,
        profile={"sample": [[1, 4, 32, 32], [2, 4, 64, 64], [4, 4, 64, 64]]},
        output_max={"out_sample": [4, 4, 64, 64]},
        options={"precision": "fp16", "optimization_level": 3},
        tensorrt_version="10.13.0.35",
    )
    return EngineRecord(**{**base, **changes})


def test_staleness_decisions(tmp_path):
    r = record(tmp_path)
    args = dict(onnx_print="a" * 64, profile=r.profile, options=r.options, tensorrt_version="10.13.0.35")
    assert stale_reason(r, tmp_path, **args) is None
    assert stale_reason(None, tmp_path, **args) == "no engine built yet"
    assert "its ONNX source changed" in stale_reason(r, tmp_path, **{**args, "onnx_print": "b" * 64})
    assert "TensorRT changed from 10.13.0.35 to 10.14.1" in stale_reason(
        r, tmp_path, **{**args, "tensorrt_version": "10.14.1"}
    )
    wider = {"sample": [[1, 4, 32, 32], [2, 4, 64, 64], [8, 4, 128, 128]]}
    assert "shape profile changed" in stale_reason(r, tmp_path, **{**args, "profile": wider})
    assert "optimization_level 3 -> 5" in stale_reason(
        r, tmp_path, **{**args, "options": {**r.options, "optimization_level": 5}}
    )
    (tmp_path / "unet.plan").write_bytes(b"engine byteZ")  # same size, other content
    assert "changed since it was built" in stale_reason(r, tmp_path, **args)
    (tmp_path / "unet.plan").unlink()
    assert "is missing" in stale_reason(r, tmp_path, **args)


def test_engine_manifest_round_trip_and_runtime_checks(tmp_path):
    key = device_key(H100, "fp16")
    m = EngineManifest(key, H100, {"unet": record(tmp_path)})
    folder = tmp_path / "engines" / key
    m.save(folder)
    loaded = EngineManifest.load(folder)
    assert loaded.to_dict() == m.to_dict() and loaded.device == H100
    assert find_engine_folder(tmp_path, H100) == (folder, key)
    check_engine_for_runtime(loaded.engines["unet"], loaded, H100, key, "a" * 64)
    with pytest.raises(BackendError, match="built from ONNX aaaaaaaaaaaaaaaa..., the artifacts now hold bbbb"):
        check_engine_for_runtime(loaded.engines["unet"], loaded, H100, key, "b" * 64)
    newer = DeviceInfo(H100.name, (9, 0), "10.14.1")
    with pytest.raises(BackendError, match=r"expected engines for this device \(nvidia-h100-80gb-hbm3_sm90_trt10.14.1"):
        check_engine_for_runtime(loaded.engines["unet"], loaded, newer, device_key(newer, "fp16"), "a" * 64)
    # a folder copied under this device's name still carries the TensorRT version it was built with
    with pytest.raises(BackendError, match="built with TensorRT 10.13.0.35, this machine has 10.14.1"):
        check_engine_for_runtime(loaded.engines["unet"], loaded, newer, key, "a" * 64)
    with pytest.raises(BackendError, match=r"expected .*nvidia-h100-80gb-hbm3_sm90_trt10.14.1_fp16.* found \['" + key):
        find_engine_folder(tmp_path, newer)
    data = json.loads((folder / "engines.json").read_text())
    data["schema_version"] = 7
    (folder / "engines.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="expected engine schema_version 1, got 7"):
        EngineManifest.load(folder)


def test_plan_reports_every_engine_missing_with_its_profile(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    report = plan_engines(tiny_artifacts, m, H100, EngineOptions(ranges=RANGES))
    assert report.folder == tiny_artifacts / "engines" / "nvidia-h100-80gb-hbm3_sm90_trt10.13.0.35_fp16"
    assert [p.component for p in report.plans] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert all(p.reason == "no engine built yet" for p in report.plans)
    unet = report.plans[1]
    assert unet.profile["sample"] == [[1, 4, 32, 32], [4, 4, 64, 64], [8, 4, 96, 128]]
    assert unet.onnx_print == onnx_fingerprint(tiny_artifacts, m.components["unet"])
    assert unet.build == {
        "precision": "fp16",
        "strongly_typed": False,
        "fp16_flag": True,
        "bf16_flag": False,
        "optimization_level": 3,
        "workspace_bytes": None,
    }


# -- polygraphy's loader chain, configured without TensorRT ---------------------------------------
def unet_chain(artifacts, tmp_path):
    m = Manifest.load(artifacts, verify_hashes=False)
    unet = m.components["unet"]
    profile = {k: [list(s) for s in v] for k, v in input_profile(unet, m, RANGES).items()}
    build = build_options(unet, EngineOptions(ranges=RANGES, workspace_bytes=4 << 30))
    return loader_chain(artifacts / unet.path, profile, build, tmp_path / "timing.cache"), unet, profile


def test_loader_chain_is_configured_as_asked(tiny_artifacts, tmp_path):
    chain, unet, profile = unet_chain(tiny_artifacts, tmp_path)
    assert chain.timing_cache_path == str(tmp_path / "timing.cache")  # saved (merged) after the build
    network = chain._network
    assert network.path == str(tiny_artifacts / unet.path) and not network.strongly_typed
    config = chain._config._config  # PostprocessConfig (workspace limit) around CreateConfig
    assert config.fp16 and not config.bf16 and config.builder_optimization_level == 3
    assert config.timing_cache_path == str(tmp_path / "timing.cache")
    (trt_profile,) = config.profiles
    assert {k: [list(s) for s in trt_profile[k]] for k in trt_profile.keys()} == profile


@pytest.mark.no_gpu
def test_loader_chain_is_configured_without_importing_tensorrt(tiny_artifacts, tmp_path):
    chain, _, _ = unet_chain(tiny_artifacts, tmp_path)
    assert "tensorrt" not in sys.modules
    with pytest.raises(Exception, match="tensorrt"):  # calling it is what needs TensorRT
        chain()


def test_fp16_graphs_build_strongly_typed(tiny_artifacts):
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    import dataclasses

    fp16_unet = dataclasses.replace(m.components["unet"], precision="fp16")
    build = build_options(fp16_unet, EngineOptions())
    assert build["strongly_typed"] and not build["fp16_flag"]  # TensorRT takes no precision flags then
    assert build_options(m.components["unet"], EngineOptions(precision="bf16"))["bf16_flag"]


def test_engine_option_errors():
    with pytest.raises(Exception, match="optimization level: expected 0..5, got 7"):
        EngineOptions(optimization_level=7)
    with pytest.raises(Exception, match="precision: expected one of fp32, fp16, bf16, got 'int4'"):
        EngineOptions(precision="int4")


# -- CPU-only behaviour of the commands -----------------------------------------------------------
@pytest.mark.no_gpu
def test_engines_command_skips_cleanly_without_tensorrt(tiny_artifacts):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdrt.runtime",
            "engines",
            "--artifacts",
            str(tiny_artifacts),
            "--batch",
            "1:2:4",
            "--no-cpu",  # CPU engines: tests/test_cpu_engines.py, on a copy (this fixture is shared)
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert (
        "  unet          sample                 min (1, 4, 32, 32)  opt (4, 4, 64, 64)  max (8, 4, 128, 128)" in lines
    )
    assert lines[-1].startswith("TensorRT engines skipped: tensorrt is not installed")
    assert "--backend onnxruntime" in lines[-1]
    # No TensorRT engine folder (<gpu>_sm<cc>_trt<version>_<precision>); other tests' loads may have left
    # OpenVINO's cache and the verified-hash record in this shared fixture.
    assert not [p.name for p in (tiny_artifacts / "engines").glob("*") if "_trt" in p.name]
    strict = subprocess.run(
        [sys.executable, "-m", "sdrt.runtime", "engines", "--artifacts", str(tiny_artifacts), "--require", "--no-cpu"],
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 1


@pytest.mark.no_gpu
def test_generate_with_tensorrt_backend_fails_clearly(tiny_artifacts, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdrt.runtime",
            "generate",
            "--artifacts",
            str(tiny_artifacts),
            "--prompt",
            "x",
            "--backend",
            "tensorrt",
            "--out",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "backend 'tensorrt' is not available on this machine" in run.stderr
    assert "--backend onnxruntime" in run.stderr


@pytest.mark.slow  # two exports of the tiny model, ~90 s: kept out of the default suite's time budget
def test_reexport_keeps_the_engine_cache(tiny_model, tmp_path):
    """A forced re-export replaces the directory atomically but keeps engines/: staleness is then
    decided per engine by its ONNX fingerprint, not by losing every engine."""
    from sdrt.export.build import ExportOptions, export_pipeline

    out = tmp_path / "art"
    options = ExportOptions(components=("text_encoder", "unet", "vae_decoder"), verify=False, optimizations=())
    export_pipeline(str(tiny_model), out, options)
    key = device_key(H100, "fp16")
    EngineManifest(key, H100, {"unet": record(out / "engines" / key)}).save(out / "engines" / key)
    before = (out / "engines" / key / "unet.plan").read_bytes()
    report = export_pipeline(str(tiny_model), out, options, force=True)
    assert report.built
    assert (out / "engines" / key / "unet.plan").read_bytes() == before
    assert EngineManifest.load(out / "engines" / key).engines["unet"].sha256 == record(tmp_path / "ref").sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ref"]  # no partial or old directory left


@pytest.mark.no_gpu
def test_device_query_reports_every_reason_without_a_gpu():
    """cuda-python's bindings install without a GPU: the no-device path runs for real here."""
    from sdrt.runtime.tensorrt_backend import current_device

    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    with pytest.raises(BackendError) as e:
        current_device()
    message = str(e.value)
    assert "tensorrt is not installed" in message or "no TensorRT library" in message
    assert "no CUDA device (cudaGetDeviceCount: " in message  # the driver's own error, e.g. InsufficientDriver


NO_GPU_TESTS = (
    test_loader_chain_is_configured_without_importing_tensorrt,
    test_engines_command_skips_cleanly_without_tensorrt,
    test_generate_with_tensorrt_backend_fails_clearly,
    test_device_query_reports_every_reason_without_a_gpu,
)


def test_no_gpu_tests_are_skipped_where_a_gpu_stack_is_found(tmp_path, monkeypatch):
    """The tests above expect no NVIDIA GPU; conftest skips them, with the evidence, on a machine with one."""
    import conftest

    assert all("no_gpu" in [m.name for m in test.pytestmark] for test in NO_GPU_TESTS)
    # The probes: a working nvidia-smi and a device node are evidence, a failing nvidia-smi is not.
    bin_dir, node = tmp_path / "bin", tmp_path / "nvidia0"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA L4 (UUID: GPU-1234)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "nvidia-smi lists GPU 0: NVIDIA L4 (UUID: GPU-1234)" in conftest.gpu_evidence(dev=node)
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no NVIDIA driver' >&2\nexit 9\n")
    assert not [e for e in conftest.gpu_evidence(dev=node) if "nvidia" in e.lower()]
    node.touch()
    assert f"{node} exists" in conftest.gpu_evidence(dev=node)

    class Item:
        def __init__(self, *marks):
            self.keywords, self.markers = dict.fromkeys(marks, True), []

        def add_marker(self, marker):
            self.markers.append(marker.mark)

    def skips(item):
        return [m.kwargs["reason"] for m in item.markers if m.name == "skip"]

    no_gpu, gpu, plain = Item("no_gpu"), Item("gpu"), Item()
    conftest.apply_gpu_skips([no_gpu, gpu, plain], lambda: None, lambda: ("nvidia-smi lists GPU 0: NVIDIA L4",))
    assert skips(no_gpu) == [
        "checks the no-GPU path; this machine has an NVIDIA GPU stack: nvidia-smi lists GPU 0: NVIDIA L4"
    ]
    assert skips(gpu) == skips(plain) == []
    no_gpu, gpu = Item("no_gpu"), Item("gpu")
    conftest.apply_gpu_skips([no_gpu, gpu], lambda: "needs an NVIDIA GPU with TensorRT: no CUDA device", lambda: ())
    assert skips(no_gpu) == [] and skips(gpu) == ["needs an NVIDIA GPU with TensorRT: no CUDA device"]


def test_onnxruntime_tensorrt_provider_gets_the_same_profiles(tiny_artifacts):
    """The second route (onnxruntime's TensorRT provider) is given explicit profiles from the same
    translation, and engine/timing caches beside sdrt's engines."""
    from sdrt.runtime.ort_tensorrt import provider_options

    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    n, d = m.text_length, m.components["unet"].inputs[2].shape[2]
    options = provider_options(tiny_artifacts, m.components["unet"], m, RANGES)
    assert options["trt_profile_min_shapes"] == f"encoder_hidden_states:1x{n}x{d},sample:1x4x32x32,timestep:1"
    assert options["trt_profile_opt_shapes"] == f"encoder_hidden_states:4x{n}x{d},sample:4x4x64x64,timestep:4"
    assert options["trt_profile_max_shapes"] == f"encoder_hidden_states:8x{n}x{d},sample:8x4x96x128,timestep:8"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tiny_artifacts / "engines" / "onnxruntime-tensorrt")


def test_sdxl_profiles_cover_the_extra_unet_inputs_and_both_text_encoders(family_artifacts):
    """`sdrt engines` on SDXL prints a profile for text_embeds and time_ids (doubled batch like the UNet's
    sample), and for both text encoders."""
    sdxl = family_artifacts("tiny-sdxl")
    run = subprocess.run(
        [sys.executable, "-m", "sdrt.runtime", "engines", "--artifacts", str(sdxl), "--batch", "1:2:4", "--no-cpu"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    m = Manifest.load(sdxl)
    pooled, n = m.model_dims.pooled_dim, m.text_length
    for expected in (
        f"  unet          text_embeds            min (1, {pooled})  opt (4, {pooled})  max (8, {pooled})",
        "  unet          time_ids               min (1, 6)  opt (4, 6)  max (8, 6)",
        f"  text_encoder  input_ids              min (1, {n})  opt (4, {n})  max (8, {n})",
        f"  text_encoder_2 input_ids              min (1, {n})  opt (4, {n})  max (8, {n})",
    ):
        assert expected in lines, f"{expected!r} not in:\n{run.stdout}"


@pytest.mark.slow  # the refiner's export (~70 s) is kept out of the default suite's time budget
def test_sdxl_refiner_profile_has_five_time_ids_and_only_the_second_encoder(family_artifacts):
    refiner = Manifest.load(family_artifacts("tiny-sdxl-refiner"))
    profile = input_profile(refiner.components["unet"], refiner, RANGES)
    assert profile["time_ids"] == ((1, 5), (2 * RANGES.batch.opt, 5), (2 * RANGES.batch.max, 5))
    assert "text_encoder" not in refiner.components and "text_encoder_2" in refiner.components

"""Which machine a benchmark row names (benchmarks/devices.py): CPU identity from /proc/cpuinfo texts (a Zen 3
AVX2-only EPYC and a Zen 4 EPYC with AVX-512 bf16), keys that tell machines apart and stay put on one
machine, results files by key, GPU devices from fake DeviceInfo, legacy rows; and the pure parts of
`make bench-gpu` (benchmarks/gpu_plan.py): arguments, commands, the time budget's arithmetic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from sdrt.benchmarks import bench, devices, gpu_plan
from sdrt.benchmarks.devices import device_key, device_label
from sdrt.runtime.cpu_features import microarchitecture, parse_identity
from sdrt.runtime.engine_cache import DeviceInfo, cuda_version_string, parse_nvidia_driver_version
from sdrt.runtime.errors import BackendError, InputError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ZEN4_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx "
    "mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave "
    "avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext "
    "vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr "
    "arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm"
)
ZEN3_FLAGS = re.sub(r" (avx512\w*|avx512_\w+)", "", ZEN4_FLAGS)  # Milan: AVX2, no AVX-512 of any kind


def cpuinfo_text(name="AMD EPYC", family=25, model=17, stepping=1, flags=ZEN4_FLAGS, mhz="2596.138", cpus=2) -> str:
    """A /proc/cpuinfo as a KVM guest on an AMD EPYC shows it (this machine's, as a template)."""
    block = (
        "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        "model name\t: {name}\nstepping\t: {stepping}\nmicrocode\t: 0x1000065\ncpu MHz\t\t: {mhz}\n"
        "cache size\t: 1024 KB\nphysical id\t: 0\nsiblings\t: {cpus}\ncore id\t\t: {n}\ncpu cores\t: {cpus}\n"
        "fpu\t\t: yes\ncpuid level\t: 16\nwp\t\t: yes\nflags\t\t: {flags}\nbogomips\t: 5192.27\n\n"
    )
    return "".join(
        block.format(n=n, family=family, model=model, name=name, stepping=stepping, mhz=mhz, cpus=cpus, flags=flags)
        for n in range(cpus)
    )


ZEN4 = {}  # cpuinfo_text's defaults: family 0x19 model 0x11 (Genoa), avx512_bf16
ZEN3 = {"name": "AMD EPYC 7R13 Processor", "model": 1, "stepping": 1, "flags": ZEN3_FLAGS}  # Milan, AVX2 only


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """``fake_cpu(**cpuinfo_text kwargs)``: from now on this process's CPU is described by that text (no
    cpufreq, as in most VMs). Returns the device ``device_info`` then gives."""
    monkeypatch.setattr(devices, "SYS_CPU", tmp_path / "no-sys")

    def describe(**kw) -> dict:
        path = tmp_path / "cpuinfo"
        path.write_text(cpuinfo_text(**kw))
        monkeypatch.setattr(devices, "CPUINFO", path)
        return devices.device_info("onnxruntime")

    return describe


# -- CPU identity --------------------------------------------------------------------------------------
def test_an_amx_xeon_behind_a_hypervisors_model_number_is_not_named_after_that_model():
    """A KVM guest on an AMX Xeon reported family 6 model 0xA7 (Rocket Lake: no AMX); its flags decide."""
    amx = ZEN4_FLAGS + " avx512_fp16 amx_bf16 amx_tile amx_int8"
    text = cpuinfo_text(name="Intel(R) Xeon(R) Processor", family=6, model=0xA7, flags=amx).replace(
        "AuthenticAMD", "GenuineIntel")  # fmt: skip
    ident = parse_identity(text)
    assert (
        microarchitecture("Intel", 6, 0xA7) == "Rocket Lake"
        and ident["microarchitecture"] == "AMX Xeon (model number hidden)"
    )
    assert {"amx_bf16", "amx_int8", "avx512_fp16"} <= set(ident["features"])
    emerald = parse_identity(text.replace("model\t\t: 167", "model\t\t: 207"))
    assert emerald["microarchitecture"] == "Emerald Rapids"


def test_cpuinfo_texts_give_vendor_family_microarchitecture_and_features():
    zen4, zen3 = parse_identity(cpuinfo_text(**ZEN4)), parse_identity(cpuinfo_text(**ZEN3))
    assert (zen4["vendor"], zen4["family"], zen4["model"], zen4["stepping"]) == ("AMD", 0x19, 0x11, 1)
    assert zen4["microarchitecture"] == "Zen 4" and zen3["microarchitecture"] == "Zen 3"
    assert zen4["features"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"]
    assert zen3["features"] == ["avx2", "fma"]
    assert (zen4["logical_cpus"], zen4["threads_per_core"], zen4["mhz"], zen4["hypervisor"]) == (2, 1, 2596.1, True)
    assert parse_identity("") == parse_identity("") and parse_identity("")["microarchitecture"] == "unknown"


@pytest.mark.parametrize(
    "vendor, family, model, stepping, want",
    [
        ("AMD", 0x17, 0x31, 0, "Zen 2"),  # Rome
        ("AMD", 0x19, 0x01, 1, "Zen 3"),  # Milan
        ("AMD", 0x19, 0x21, 0, "Zen 3"),  # Vermeer
        ("AMD", 0x19, 0x11, 1, "Zen 4"),  # Genoa
        ("AMD", 0x19, 0xA0, 2, "Zen 4"),  # Bergamo
        ("AMD", 0x1A, 0x02, 1, "Zen 5"),  # Turin
        ("AMD", 0x1A, 0x11, 0, "Zen 5"),
        ("Intel", 6, 0x55, 4, "Skylake"),
        ("Intel", 6, 0x55, 7, "Cascade Lake"),
        ("Intel", 6, 0x6A, 6, "Ice Lake"),
        ("Intel", 6, 0x8F, 8, "Sapphire Rapids"),
        ("Intel", 6, 0xCF, 2, "Emerald Rapids"),
        ("Intel", 6, 0xAD, 1, "Granite Rapids"),
        ("Intel", 6, 0x01, 1, "unknown"),
        ("AMD", 0x15, 0x01, 1, "unknown"),
        ("Arm", 0x41, 0xD40, 1, "Neoverse V1"),  # Graviton 3
        ("Hygon", None, None, None, "unknown"),
    ],
)
def test_microarchitecture(vendor, family, model, stepping, want):
    assert microarchitecture(vendor, family, model, stepping) == want


def test_arm_cpuinfo():
    text = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
    text += "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\nCPU revision\t: 1\n\n"
    ident = parse_identity(text)
    assert (ident["vendor"], ident["microarchitecture"], ident["features"]) == (
        "Arm",
        "Neoverse V1",
        ["asimd", "sve", "bf16", "i8mm"],
    )


# -- keys ------------------------------------------------------------------------------------------------
def test_the_key_changes_with_the_cpu_model_or_its_features(fake_cpu):
    zen4, zen3 = fake_cpu(**ZEN4), fake_cpu(**ZEN3)
    assert zen4["microarchitecture"] == "Zen 4" and zen3["microarchitecture"] == "Zen 3"
    assert zen4["isa"] == "avx512-vnni-bf16" and zen3["isa"] == "avx2"
    assert device_key(zen4) != device_key(zen3)
    # Either alone changes it: the same model name on another part, or the same part without avx512_bf16.
    same_name = fake_cpu(**{**ZEN3, "name": "AMD EPYC"})
    no_bf16 = fake_cpu(flags=ZEN4_FLAGS.replace(" avx512_bf16", ""))
    keys = {device_key(d) for d in (zen4, zen3, same_name, no_bf16)}
    assert len(keys) == 4
    # The readable part: vendor and model, microarchitecture, ISA key, cores; then 8 hex digits.
    assert re.fullmatch(r"cpu_amd-epyc_zen4_avx512-vnni-bf16_\d+c_[0-9a-f]{8}", device_key(zen4))
    assert re.fullmatch(r"cpu_amd-epyc-7r13_zen3_avx2_\d+c_[0-9a-f]{8}", device_key(zen3))


def test_the_key_stays_put_on_one_machine(fake_cpu):
    first, again = fake_cpu(mhz="2596.138"), fake_cpu(mhz="3701.250")  # the kernel's current MHz moves
    assert first["mhz"] != again["mhz"] and device_key(first) == device_key(again)
    assert device_key({**first, "memory_bytes": first["memory_bytes"] - 2**19, "platform": "Linux-7.0"}) == (
        device_key(first)  # the exact MemTotal and the kernel differ from boot to boot
    )
    assert device_key({**first, "cores": first["cores"] + 2}) != device_key(first)  # fewer CPUs: another machine


def test_this_machines_key_is_the_same_from_run_to_run():
    a, b = devices.device_info("onnxruntime"), devices.device_info("onnxruntime")
    assert device_key(a) == device_key(b) and not devices.is_legacy(a)
    assert bench.device_slug is device_key  # load.py's name for it


def test_labels(fake_cpu):
    assert device_label(fake_cpu(**ZEN3)).startswith("AMD EPYC 7R13 Processor (Zen 3, AVX2, ")
    zen4 = fake_cpu(**ZEN4)
    assert device_label(zen4) == f"AMD EPYC (Zen 4, AVX-512 bf16, {zen4['cores']} cores)"


def test_different_cpus_write_different_result_files(fake_cpu, tmp_path):
    """The real append of bench.py, for rows measured under two CPU descriptions."""
    config = bench.BenchConfig(artifacts=tmp_path, results_dir=tmp_path / "results")
    written = []
    for description in (ZEN4, ZEN3, ZEN4):
        device = fake_cpu(**description)
        context = bench.Context(config, {}, {}, 1, device)
        measured = {"schema": bench.ROW_SCHEMA, "device": device, "implementation": "sdrt", "backend": "onnxruntime"}
        measured |= {"precision": "fp32", "threads": 2, "batch": 1, "height": 64, "width": 64, "steps": 2}
        measured |= {
            "timestamp": f"2026-12-03T00:00:0{len(written)}Z",
            "metrics": {"end_to_end_s": {"n": 1, "median": 1.0 + len(written)}},
        }
        bench._append(context, [measured], progress=lambda line: None)
        written.append(bench.results_file(config.results_dir, device))
    assert written[0] != written[1] and written[0] == written[2]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted({p.name for p in written})
    assert len(written[0].read_text().splitlines()) == 2 and len(written[1].read_text().splitlines()) == 1
    # ... and appear in the report as two devices, each with its own (latest) row of the one case
    from sdrt.benchmarks import report

    cmp = report.compare(report.load_rows(sorted(set(written))))
    assert sorted(cmp.devices) == sorted({device_key(fake_cpu(**d)) for d in (ZEN4, ZEN3)})
    (case,) = cmp.cases
    assert {cmp.median(case, device_key(fake_cpu(**d)), "end_to_end_s") for d in (ZEN4, ZEN3)} == {3.0, 2.0}
    from sdrt.benchmarks.load import results_file as load_file

    assert load_file(tmp_path, fake_cpu(**ZEN3)).name == f"load_{written[1].name}"


# -- GPUs --------------------------------------------------------------------------------------------------
H100 = DeviceInfo(
    "NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35", 85_031_714_816, 132, "550.54.15", "12.8", "12.4"
)  # fmt: skip
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), "10.13.0.35", 85_097_971_712, 108, "550.54.15", "12.8", "12.4")


def test_gpu_devices_get_keys_and_labels(fake_cpu):
    host = fake_cpu(**ZEN4)
    h100, a100 = devices.gpu_device(H100, host), devices.gpu_device(A100, host)
    assert re.fullmatch(r"gpu_nvidia-h100-80gb-hbm3_sm90_[0-9a-f]{8}", device_key(h100))
    assert re.fullmatch(r"gpu_nvidia-a100-sxm4-80gb_sm80_[0-9a-f]{8}", device_key(a100))
    assert device_label(h100) == "NVIDIA H100 80GB HBM3 (sm 9.0, 132 SMs, 79 GiB)"
    assert devices.missing_gpu_fields(h100) == [] and "host" in devices.missing_gpu_fields(host)
    assert (h100["tensorrt_version"], h100["driver_version"], h100["cuda_version"]) == (
        "10.13.0.35",
        "550.54.15",
        "12.8",
    )
    assert h100["host"] == host and h100["cores"] == host["cores"] and h100["isa"] == host["isa"]  # as schema 2 had
    # Software versions are recorded, not hashed: a driver or TensorRT upgrade keeps the machine's key ...
    upgraded = devices.gpu_device(replace(H100, driver_version="570.86.15", tensorrt_version="10.14.1"), host)
    assert device_key(upgraded) == device_key(h100)
    # ... while the same GPU in another host, or a cut-down part, is another machine.
    assert device_key(devices.gpu_device(H100, fake_cpu(**ZEN3))) != device_key(h100)
    assert device_key(devices.gpu_device(replace(H100, sm_count=114), host)) != device_key(h100)
    assert json.loads(json.dumps(h100)) == h100  # a row is JSON


def test_device_info_round_trips_the_new_fields_and_reads_old_manifests():
    assert DeviceInfo.from_dict(H100.to_dict()) == H100
    old = {"name": "NVIDIA L4", "compute_capability": [8, 9], "tensorrt_version": "10.8.0", "memory_bytes": 1}
    assert DeviceInfo.from_dict(old) == DeviceInfo("NVIDIA L4", (8, 9), "10.8.0", 1)
    assert (cuda_version_string(12040), cuda_version_string(12080), cuda_version_string(0)) == ("12.4", "12.8", "")
    proc = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n"
    assert parse_nvidia_driver_version(proc) == "570.86.15" and parse_nvidia_driver_version("") == ""


# -- legacy rows -------------------------------------------------------------------------------------------
def test_legacy_rows_get_their_old_slug_with_legacy():
    """This repository's rows of schema 1 and 2 (written before issue 14) keep their file's name, marked."""
    legacy = [
        (f, row)
        for f in sorted(RESULTS.glob("*.jsonl"))
        for row in map(json.loads, filter(str.strip, f.read_text().splitlines()))
        if devices.is_legacy(row["device"])
    ]
    assert {row["schema"] for _, row in legacy} == {1, 2}
    for f, row in legacy:
        assert device_key(row["device"]) == f"{f.stem}-legacy"  # the old slug stays visible
        assert device_label(row["device"]).endswith("legacy row)")
    old_gpu = {"kind": "gpu", "name": "NVIDIA L4", "cores": 8, "compute_capability": [8, 9], "gpu_memory_bytes": 1}
    assert device_key(old_gpu) == "gpu_nvidia-l4-legacy" and device_label(old_gpu) == "NVIDIA L4 (legacy row)"


# -- bench.py: explicit variants and the GPU baseline ------------------------------------------------------
def test_explicit_variants_are_planned_as_given(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    config = bench.BenchConfig(artifacts=(a, b), variants=((a, "onnxruntime", "fp32"), (b, "onnxruntime", "fp16")))
    runnable, unsupported = bench.plan(config)
    assert [(v.artifacts, v.backend, v.precision, v.tag) for v in runnable] == [(a, "onnxruntime", "fp32", "a")]
    assert [(v.artifacts, v.precision) for v, _ in unsupported] == [(b, "fp16")]


def test_a_baseline_that_ignores_its_device_is_refused(monkeypatch):
    class FakeWorker:
        closed = False

        def __init__(self, name, command):
            self.hello, self.spec = {"ready": True, "pipeline": "StableDiffusionPipeline"}, json.loads(command[-1])

        def close(self):
            FakeWorker.closed = True

    monkeypatch.setattr(bench, "Worker", FakeWorker)
    assert "device" not in bench.start_diffusers(Path("m"), 2, None).spec  # the CPU spec is as before
    with pytest.raises(BackendError, match="expected the baseline on cuda in fp16, the worker ran it on cpu in fp32"):
        bench.start_diffusers(Path("m"), 2, None, "cuda", "fp16")
    assert FakeWorker.closed


@pytest.mark.parametrize("device, dtype", [("tpu", "fp32"), ("cpu", "fp16"), ("cuda", "bf16")])
def test_the_diffusers_baseline_refuses_a_device_or_dtype_it_cannot_run(device, dtype):
    from sdrt.benchmarks.worker import DiffusersRunner
    from sdrt.runtime.errors import InputError

    want = f"diffusers baseline: expected one of cpu/fp32|bf16, cuda/fp32|fp16, got {device}/{dtype}"
    with pytest.raises(InputError, match=re.escape(want)):
        DiffusersRunner(Path("no-model"), 1, None, device, dtype)


# -- make bench-gpu: the plan ------------------------------------------------------------------------------
def test_plan_arguments_and_commands(tmp_path):
    step, plan, assumptions = gpu_plan.plan_from_args(["check"])
    assert (step, plan.height, plan.width, plan.steps, plan.budget_min) == ("check", 512, 512, (25, 50), 10.0)
    assert assumptions == gpu_plan.Assumptions()
    assert plan.static == Path("artifacts/sd15-random-gpu-static")
    assert [(b, p) for _, b, p in plan.variants()] == [
        ("onnxruntime-cuda", "fp32"),
        ("onnxruntime-tensorrt", "fp32"),
        ("tensorrt", "fp16"),
        ("tensorrt", "fp16"),
    ]
    dynamic, static = plan.engine_commands(tmp_path / "t.cache")
    flags = lambda c: dict(zip(c[c.index("--batch") :: 2], c[c.index("--batch") + 1 :: 2]))  # noqa: E731
    assert flags(dynamic) == {"--batch": "1:1:4", "--height": "256:512:1024", "--width": "256:512:1024"} | {
        "--timing-cache": str(tmp_path / "t.cache")
    }
    assert flags(static)["--height"] == "512" and flags(static)["--batch"] == "1" and "--require" in static
    assert dynamic[dynamic.index("--artifacts") + 1] == str(plan.artifacts)
    assert static[static.index("--artifacts") + 1] == str(plan.static)
    assert plan.export_command()[-4:] == ["--components", "text_encoder", "unet", "vae_decoder"]
    _, big, _ = gpu_plan.plan_from_args(["bench", "--size", "768x1280", "--steps", "30", "--runs", "2"])
    dynamic, static = big.engine_commands(tmp_path / "t.cache")
    assert flags(dynamic)["--width"] == "256:1280:1280" and flags(static)["--width"] == "1280"
    config = big.bench_config()
    assert (config.sizes, config.steps, config.runs, config.batches) == (((768, 1280),), (30,), 2, (1,))
    assert (config.baseline, config.baseline_device, config.baseline_dtype) == (True, "cuda", "fp16")
    assert config.variants == big.variants() and config.artifact_dirs() == (big.artifacts, big.static)
    with pytest.raises(InputError, match="multiples of 8"):
        gpu_plan.plan_from_args(["check", "--size", "500x512"])


def test_the_budget_is_arithmetic_over_the_stages():
    a = gpu_plan.Assumptions(
        model_min=1,
        export_min=2,
        engines_min=3,
        static_engines_min=1,
        test_gpu_min=4,
        done_min=0.5,
        matmul_min=0,
        ort_trt_build_min=2,
        load_min=dict.fromkeys(("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "diffusers"), 0.25),
        step_s=dict.fromkeys(("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "diffusers"), 0.1),
        run_s=dict.fromkeys(("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "diffusers"), 1.0),
        warmup_rounds=2,
    )
    plan = gpu_plan.GpuPlan(steps=(20,), runs=4, warmups=1)
    stages = {s.name: s for s in gpu_plan.estimate(plan, a)}
    # 5 workers (tensorrt twice) x (20 steps x 0.1 s + 1 s) = 15 s a round; 2 warm-up + 4 timed rounds.
    assert stages["bench: 512x512, 20 steps"].minutes == pytest.approx(6 * 15 / 60)
    assert stages["bench: load"].minutes == pytest.approx(5 * 0.25 + 2)
    # test-gpu (4 min) runs beside model + export (3 min): the span costs 4.
    want = 4 + 3 + 1 + (1.25 + 2) + 0 + 1.5
    assert gpu_plan.total_minutes(list(stages.values())) == pytest.approx(want)
    # Twice the pixels, twice the measuring; what is done costs done_min (and the side stage now dominates).
    wide = {s.name: s for s in gpu_plan.estimate(replace(plan, width=1024), a)}
    assert wide["bench: 512x1024, 20 steps"].minutes == pytest.approx(2 * 1.5)
    done = gpu_plan.estimate(plan, a, {"model", "export", "engines", "static engines", "onnxruntime-tensorrt engines"})
    assert gpu_plan.total_minutes(done) == pytest.approx(4 + 0.5 + 0.5 + 1.25 + 1.5)
    gpu_plan.check_budget(plan, done)
    with pytest.raises(InputError, match=r"refusing a plan estimated at 12\.8 min, over the budget of 10 min"):
        gpu_plan.check_budget(plan, list(stages.values()))
    assert "bench: load" in gpu_plan.budget_table(list(stages.values()), 10)


def test_the_default_plan_fits_its_budget_and_a_bigger_one_is_refused():
    default = gpu_plan.GpuPlan()
    stages = gpu_plan.estimate(default)
    assert gpu_plan.total_minutes(stages) <= default.budget_min
    big = replace(default, steps=(25, 50, 100), runs=10)
    with pytest.raises(InputError, match="over the budget"):
        gpu_plan.check_budget(big, gpu_plan.estimate(big))


def test_assumptions_from_json():
    a = gpu_plan.Assumptions.from_json('{"export_min": 5, "step_s": {"tensorrt": 0.01}}')
    assert a.export_min == 5 and a.step_s["tensorrt"] == 0.01 and a.step_s["diffusers"] == 0.03
    with pytest.raises(InputError, match="expected fields"):
        gpu_plan.Assumptions.from_json('{"exprt_min": 5}')
    with pytest.raises(InputError, match="step, run and load times for diffusers"):
        gpu_plan.estimate(gpu_plan.GpuPlan(), replace(a, step_s={"tensorrt": 0.01}))


def test_link_tree_mirrors_the_onnx_and_keeps_its_own_engines(tmp_path):
    src, dst = tmp_path / "dyn", tmp_path / "static"
    for rel, text in (("manifest.json", "{}"), ("unet/model.onnx", "u"), ("engines/x/engines.json", "dyn")):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (dst / "engines" / "y").mkdir(parents=True)
    (dst / "engines" / "y" / "engines.json").write_text("static")
    (dst / "old.onnx").write_text("stale")
    assert gpu_plan.link_tree(src, dst) == 2
    assert (dst / "unet" / "model.onnx").samefile(src / "unet" / "model.onnx")
    assert not (dst / "old.onnx").exists() and not (dst / "engines" / "x").exists()
    assert (dst / "engines" / "y" / "engines.json").read_text() == "static"
    assert gpu_plan.link_tree(src, dst) == 0  # already linked


@pytest.mark.no_gpu
def test_bench_gpu_stops_at_once_without_a_gpu(capsys):
    assert gpu_plan.main(["check"]) == 2
    out = capsys.readouterr().out
    assert "this machine cannot run the GPU benchmark" in out
    for backend in gpu_plan.GPU_BACKENDS:
        assert f"\n  {backend}: " in out
    # The script itself stops there: nothing after the check runs.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PY": sys.executable, "MAKE": "false"}
    run = subprocess.run(["bash", "tools/bench_gpu.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "cannot run the GPU benchmark" in run.stdout
    assert "test-gpu" not in run.stdout + run.stderr

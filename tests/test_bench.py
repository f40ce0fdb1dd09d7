"""The benchmark instrument: FLOP counting against PyTorch's counter, statistics, rows (one process
per implementation, per backend and precision, the machine's matmul rate), and the cross-machine
report (table and chart) from two result files and an old schema-1 row."""

import json
import sys
import time

import numpy as np
import pytest

from sdrt.benchmarks.bench import BenchConfig, Worker, device_slug, metrics, ratios, run_benchmark, stats
from sdrt.benchmarks.flops import count_flops
from sdrt.benchmarks.report import chart, load_rows, markdown_table, write_report
from sdrt.benchmarks.worker import RunTimes, SdrtRunner
from sdrt.runtime import InputError, Manifest, backends
from sdrt.runtime.cpu_features import cpu_summary, has_bf16
from sdrt.runtime.errors import BackendError

OPENVINO = "openvino" in backends.available()
BF16_CPU = has_bf16()


def test_unet_flops_match_pytorchs_flop_counter(tiny_model, tiny_artifacts):
    """Counted from the ONNX graph vs counted by torch.utils.flop_counter on the diffusers UNet
    (attention through the plain processor, whose bmm/baddbmm torch counts; SDPA it does not)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()
    unet.set_attn_processor(AttnProcessor())
    m = Manifest.load(tiny_artifacts, verify_hashes=False)
    d = m.components["unet"].inputs[2].shape[2]
    for batch, h, w in ((2, 32, 32), (1, 16, 24)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.randn(batch, 4, h, w), torch.full((batch,), 10.0), torch.randn(batch, 77, d))
        ours = count_flops(
            tiny_artifacts / m.components["unet"].path,
            {"sample": (batch, 4, h, w), "timestep": (batch,), "encoder_hidden_states": (batch, 77, d)},
        )
        assert ours["uncounted"] == []
        assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=0.01)


def test_stats_closed_form():
    s = stats([float(x) for x in range(1, 11)])
    assert (s["n"], s["median"], s["min"], s["max"], s["mean"]) == (10, 5.5, 1.0, 10.0, 5.5)
    assert s["p10"] == pytest.approx(1.9) and s["p90"] == pytest.approx(9.1)
    assert s["spread"] == pytest.approx((9.1 - 1.9) / 5.5)


@pytest.fixture(scope="module")
def two_result_files(tiny_artifacts, tmp_path_factory):
    """Rows from two configurations, as two machines would write them. 1 thread: onnxruntime in fp32
    and bf16 (which it never offers: an unsupported row) beside diffusers; 2 threads: onnxruntime and,
    where installed, openvino in fp32, without a baseline (a diffusers process is the costly one)."""
    files = []
    plans = (
        (1, ("onnxruntime",), ("fp32", "bf16"), True),
        (2, ("onnxruntime", "openvino") if OPENVINO else ("onnxruntime",), ("fp32",), False),
    )
    for threads, names, precisions, baseline in plans:
        # the first also asks for PyTorch bf16: a measured baseline where the CPU has bf16, a row saying why not elsewhere
        out = tmp_path_factory.mktemp(f"results{threads}")
        config = BenchConfig(
            artifacts=tiny_artifacts,
            backends=names,
            precisions=precisions,
            baseline=baseline,
            sizes=((64, 64),),
            steps=(3,),
            runs=2,
            warmups=1,
            threads=threads,
            results_dir=out,
            matmul_size=256,
            matmul_budget_s=0.05,
            baseline_dtypes=("bf16",) if baseline else (),
        )
        rows = run_benchmark(config, progress=lambda line: None)
        want = [("sdrt", n, "fp32") for n in names] + ([("diffusers", "pytorch", "fp32")] if baseline else [])
        want += [("diffusers", "pytorch", "bf16")] if baseline and BF16_CPU else []
        want += [("sdrt", n, p) for n in names for p in precisions if p != "fp32"]
        want += [("diffusers", "pytorch", "bf16")] if baseline and not BF16_CPU else []
        assert [(r["implementation"], r["backend"], r["compute_precision"]) for r in rows] == want
        (file,) = out.glob("*.jsonl")
        files.append(file)
    return files


def test_rows_are_self_describing_and_consistent(two_result_files, tiny_artifacts):
    rows = load_rows(two_result_files)
    assert len(rows) == 3 + 1 + OPENVINO + 1
    ours = next(r for r in rows if r["implementation"] == "sdrt" and r["threads"] == 1 and "metrics" in r)
    for key in ("device", "versions", "model", "precision", "batch", "height", "width", "steps", "scheduler"):
        assert key in ours
    assert ours["device"]["kind"] == "cpu" and two_result_files[0].name == f"{device_slug(ours['device'])}.jsonl"
    assert ours["versions"]["onnxruntime"] and ours["scheduler"] == "DDIMScheduler"
    m = ours["metrics"]
    # One sample per run for the stages, one per step for the steps: 2 runs x 3 steps.
    assert [m[k]["n"] for k in ("end_to_end_s", "text_encoder_ms", "vae_decode_ms")] == [2, 2, 2]
    assert [m[k]["n"] for k in ("unet_step_ms", "step_wall_ms", "overhead_per_step_ms", "scheduler_step_ms")] == [6] * 4
    # The stages are measured inside the run they belong to: no run is shorter than its fastest parts.
    fastest_parts = m["text_encoder_ms"]["min"] + 3 * m["step_wall_ms"]["min"] + m["vae_decode_ms"]["min"]
    assert 1e3 * m["end_to_end_s"]["min"] >= fastest_parts
    assert m["images_per_s"]["median"] == pytest.approx(1 / m["end_to_end_s"]["median"], rel=0.5)
    # FLOPs recorded for the doubled (guided) UNet batch at this size
    man = Manifest.load(tiny_artifacts, verify_hashes=False)
    d = man.components["unet"].inputs[2].shape[2]
    want = count_flops(
        tiny_artifacts / man.components["unet"].path,
        {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, d)},
    )["total"]
    assert ours["unet_flops_per_call"] == want
    # Each ratio is one of our runs over the baseline's run of the same round: within the quotients of the extremes.
    ratio = ours["ratio_to"]["diffusers"]["end_to_end"]
    diffusers = next(r for r in rows if r["implementation"] == "diffusers")["metrics"]["end_to_end_s"]
    e2e = m["end_to_end_s"]
    assert ratio["n"] == 2
    assert e2e["min"] / diffusers["max"] <= ratio["min"] and ratio["max"] <= e2e["max"] / diffusers["min"]


def test_ratios_pair_each_run_with_the_baseline_run_of_its_round():
    def run(total: float, unet: float) -> RunTimes:
        return RunTimes(total, total / 10, total / 5, [unet] * 3, [unet * 1.5] * 3)

    r = ratios([run(1.0, 0.1), run(3.0, 0.2)], [run(2.0, 0.4), run(4.0, 0.1)])
    # Rounds (1/2, 3/4); pairing across rounds would give 1/4 and 3/2, a ratio of medians 2/3.
    assert (r["end_to_end"]["min"], r["end_to_end"]["max"], r["end_to_end"]["n"]) == (0.5, 0.75, 2)
    assert (r["unet_step"]["min"], r["unet_step"]["max"]) == (0.25, 2.0)
    assert r["text_encoder"]["median"] == pytest.approx(0.625) and r["vae_decode"]["median"] == pytest.approx(0.625)


class Slowed:
    """A session that sleeps before every call: the time it adds must land in its own component's figure."""

    def __init__(self, session, delay: float):
        self.session, self.delay = session, delay

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, feed):
        time.sleep(self.delay)
        return self.session.run(feed)


def test_a_slowed_component_shows_up_in_its_own_time(tiny_artifacts):
    """The sdrt worker's timings attribute time to the right stage: slow one session, and only its figure grows."""
    delay, steps = 0.25, 3
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    runner = SdrtRunner(tiny_artifacts, "onnxruntime", "fp32", 1, None)
    try:
        for name in ("text_encoder", "unet", "vae_decoder"):
            real = runner.pipe.sessions[name]
            runner.pipe.sessions[name] = Slowed(real, delay)
            try:
                t = runner(["a cat"], 64, 64, steps, 7.5, latents)
            finally:
                runner.pipe.sessions[name] = real
            assert len(t.unet_calls) == len(t.step_walls) == len(t.scheduler_steps) == steps  # one per step asked
            figures = {"text_encoder": t.text_encoder, "unet": min(t.unet_calls), "vae_decoder": t.vae_decoder}
            assert figures[name] >= delay, (name, figures)
            assert all(v < delay for k, v in figures.items() if k != name), (name, figures)
            assert t.total >= t.text_encoder + sum(t.step_walls) + t.vae_decoder
            if name == "unet":  # and the row's statistics keep it, in milliseconds
                m = metrics([t], batch=1)
                assert m["unet_step_ms"]["min"] >= 1e3 * delay and m["step_wall_ms"]["min"] >= 1e3 * delay
                assert m["overhead_per_step_ms"]["max"] < 1e3 * delay
    finally:
        runner.close()


def test_pytorch_bf16_is_a_baseline_where_the_cpu_has_bf16(two_result_files):
    """diffusers with torch_dtype=bfloat16 in its own process: measured, with a ratio of every sdrt row to it, on
    a CPU with AMX or AVX-512 BF16; elsewhere a row saying why it is no baseline there."""
    rows = load_rows(two_result_files)
    (torch_bf16,) = [r for r in rows if r["implementation"] == "diffusers" and r["compute_precision"] == "bf16"]
    if BF16_CPU:
        assert "metrics" in torch_bf16 and torch_bf16["backend"] == "pytorch" and torch_bf16["precision"] == "bf16"
        ours = next(r for r in rows if r["implementation"] == "sdrt" and r["threads"] == 1 and "metrics" in r)
        assert set(ours["ratio_to"]) == {"diffusers", "diffusers bf16"}
    else:
        assert "metrics" not in torch_bf16 and "AMX" in torch_bf16["unsupported"] or "amx" in torch_bf16["unsupported"]


def test_rows_per_backend_and_precision_with_the_reason_for_what_is_not_measured(two_result_files):
    rows = load_rows(two_result_files)
    (bf16,) = [r for r in rows if "unsupported" in r and r["implementation"] == "sdrt"]
    with pytest.raises(BackendError) as e:
        backends.check_usable(backends.get("onnxruntime"), "bf16")
    assert (bf16["backend"], bf16["compute_precision"], bf16["unsupported"]) == ("onnxruntime", "bf16", str(e.value))
    assert "metrics" not in bf16 and bf16["precision"] == "bf16"
    for r in rows:
        if r["implementation"] == "sdrt" and "metrics" in r:
            assert (r["graph_precision"], r["compute_precision"], r["precision"]) == ("fp32", "fp32", "fp32")
    if OPENVINO:
        assert any(r["backend"] == "openvino" and "metrics" in r for r in rows)


def test_each_implementation_reports_its_own_load_time_and_memory(two_result_files):
    """Separate processes: the sdrt worker's peak is not the diffusers worker's (which holds torch)."""
    rows = [r for r in load_rows(two_result_files) if "metrics" in r]
    for r in rows:
        assert r["load_s"] > 0 and r["rss_after_load_bytes"] > 0, r["implementation"]
    sdrt = next(r for r in rows if r["implementation"] == "sdrt" and r["threads"] == 1)
    diffusers = next(r for r in rows if r["implementation"] == "diffusers")
    # Only the diffusers process holds torch: its memory is its own, not a figure of one shared process.
    assert sdrt["rss_after_load_bytes"] < diffusers["rss_after_load_bytes"]
    assert sdrt["peak_rss_bytes"] < diffusers["peak_rss_bytes"]
    assert {"manifest", "text_encoder", "unet", "vae_decoder", "total"} <= set(sdrt["load_timings"])
    assert sdrt["load_s"] >= sdrt["load_timings"]["total"]  # the worker's load time includes the Pipeline's
    assert "load_timings" not in diffusers


def test_unet_rate_is_a_fraction_of_the_measured_matmul_rate(two_result_files):
    for r in load_rows(two_result_files):
        fp32 = r["machine"]["matmul"]["fp32"]
        assert fp32["gflops"] > 0 and fp32["shape"] == [256, 256, 256] and fp32["threads"] == r["threads"]
        assert r["machine"]["cpu"] == cpu_summary()  # this machine's CPU model and flags
        if "metrics" in r:
            # From the row's own measurements: FLOPs per UNet call over the median call time.
            achieved = r["unet_flops_per_call"] / (r["metrics"]["unet_step_ms"]["median"] / 1e3)
            assert r["unet_tflops_achieved"] == pytest.approx(achieved / 1e12)
            assert r["unet_fraction_of_matmul"] == pytest.approx(achieved / (fp32["gflops"] * 1e9))
            assert 0 < r["unet_fraction_of_matmul"] < 1  # a tiny UNet's small ops stay below a large MatMul's rate


def test_a_worker_that_dies_or_hangs_is_an_error_naming_it():
    with pytest.raises(BackendError, match=r"(?s)bench: sdrt x: the worker ended \(exit code 3\) during loading.*boom"):
        Worker("sdrt x", [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(BackendError, match=r"bench: diffusers: expected an answer to loading within 0 s"):
        Worker("diffusers", [sys.executable, "-c", "import time; time.sleep(60)"], load_timeout=0.3)
    error = '{"error": "no such folder", "type": "InputError"}'
    with pytest.raises(InputError, match="bench: diffusers: loading failed: InputError: no such folder"):
        Worker("diffusers", [sys.executable, "-c", f"print({error!r})"])


def test_report_merges_files_into_table_and_chart(two_result_files, tmp_path):
    from PIL import Image

    old = tmp_path / "schema1.jsonl"  # a row as the bench wrote them before processes and matmul rates
    row = json.loads(two_result_files[0].read_text().splitlines()[0])
    for key in ("machine", "load_s", "load_timings", "rss_after_load_bytes", "unet_fraction_of_matmul"):
        row.pop(key)
    old.write_text(json.dumps(row | {"schema": 1, "peak_rss_bytes": 123 * 2**20}) + "\n")
    files = [*two_result_files, old]
    md, png, bars = write_report(files, tmp_path / "report")
    measured = [r for r in load_rows(files) if "metrics" in r]
    assert bars == 4 * len(measured)  # every measured row drawn in each of the four panels
    image = np.asarray(Image.open(png).convert("L"))
    assert image.shape[0] > 200 and image.shape[1] > 800 and image.std() > 10  # a drawn chart, not a blank
    text = md.read_text()
    assert "1 threads" in text and "2 threads" in text and "diffusers/PyTorch" in text and "sdrt/onnxruntime" in text
    assert text.count("| tiny-sd b1 64x64 3 steps |") == len(measured)
    assert "| — | — | 123 |" in text  # the schema-1 row: no matmul fraction or load time, its peak RSS
    assert "Not measured" in text and "sdrt/onnxruntime · bf16" in text and "no bf16 compute on x86" in text
    assert "report.png" in text


def test_report_refuses_what_is_not_a_result_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: expected a benchmark row of schema 1 or 2"):
        load_rows([bad])
    bad.write_text("not json\n")
    with pytest.raises(InputError, match="expected one JSON row per line"):
        load_rows([bad])
    with pytest.raises(InputError, match="could not read"):
        load_rows([tmp_path / "missing.jsonl"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match="found none"):
        load_rows([tmp_path / "empty.jsonl"])


def test_table_and_chart_from_hand_written_rows(tmp_path):
    """Rows as another machine (a GPU) would write them render too."""
    row = json.loads(
        json.dumps(
            {
                "schema": 1,
                "device": {"kind": "gpu", "name": "NVIDIA L4", "cores": 8},
                "implementation": "sdrt",
                "backend": "tensorrt",
                "precision": "fp16",
                "threads": 8,
                "batch": 1,
                "height": 512,
                "width": 512,
                "steps": 30,
                "metrics": {
                    k: stats([1.0, 2.0])
                    for k in ("text_encoder_ms", "unet_step_ms", "vae_decode_ms", "end_to_end_s", "images_per_s")
                },
            }
        )
    )
    assert "NVIDIA L4 · sdrt/tensorrt · fp16" in markdown_table([row])
    assert chart([row, row], tmp_path / "c.png") == 8


@pytest.mark.slow  # diffusers' SDXL baseline run; the SDXL bench rows' plumbing is shared with SD's tests
def test_sdxl_bench_runs_beside_the_diffusers_sdxl_pipeline(family_artifacts, tmp_path):
    """The benchmark on the tiny SDXL model: its baseline is diffusers' StableDiffusionXLPipeline (the class the
    model folder names), and the UNet FLOPs count the SDXL inputs."""
    artifacts = family_artifacts("tiny-sdxl")
    config = BenchConfig(
        artifacts=artifacts,
        backends=("onnxruntime",),
        precisions=("fp32",),
        baseline=True,
        sizes=((64, 64),),
        steps=(2,),
        runs=1,
        warmups=1,
        threads=2,
        results_dir=tmp_path,
        matmul_size=256,
        matmul_budget_s=0.05,
    )
    rows = run_benchmark(config, progress=lambda line: None)
    assert [(r["implementation"], r["backend"]) for r in rows] == [("sdrt", "onnxruntime"), ("diffusers", "pytorch")]
    assert all(r["model"]["family"] == "sdxl" and r["unet_flops_per_call"] > 0 for r in rows)
    sdrt, diffusers = rows
    # One UNet call per step (guidance batched into it) timed in each implementation: 1 run x 2 steps.
    assert sdrt["metrics"]["unet_step_ms"]["n"] == diffusers["metrics"]["unet_step_ms"]["n"] == 2
    assert diffusers["pipeline"] == "StableDiffusionXLPipeline"


class FakeWorker:
    """A worker's interface without a process: fixed timings, and an error from call ``fail_at`` on."""

    def __init__(self, name: str, fail_at: int | None = None):
        self.name, self.fail_at, self.calls = name, fail_at, 0
        self.hello, self.last_reply = {"dtype": "fp32"}, {}

    def run(self, case, args) -> RunTimes:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise BackendError(f"bench: {self.name}: a run failed: NumericalError: unet at step 1 of 2: NaN")
        return RunTimes(1.0, 0.1, 0.2, [0.2, 0.2], [0.3, 0.3])

    def memory(self) -> dict:
        return {"load_s": 1.0, "rss_after_load_bytes": 1, "peak_rss_bytes": 1}


def test_a_lane_failing_mid_run_is_a_failed_row_and_the_others_are_measured(tiny_artifacts, tmp_path):
    """The rounds go on without a lane whose call failed: its row says where and why, and the rows measured
    keep their pairs with the baseline round by round."""
    from sdrt.benchmarks import bench
    from sdrt.benchmarks.devices import device_info

    config = BenchConfig(artifacts=tiny_artifacts, runs=3, warmups=1, results_dir=tmp_path)
    ctx = bench.Context(
        config,
        {tiny_artifacts: Manifest.load(tiny_artifacts, verify_hashes=False)},
        {"cpu": cpu_summary(), "matmul": {"fp32": {"gflops": 100.0}}},
        1,
        device_info("onnxruntime"),
    )
    good, bad = bench.Variant(tiny_artifacts, "onnxruntime", "fp32"), bench.Variant(tiny_artifacts, "openvino", "bf16")
    # warm-up takes two calls (the second agrees with the first): the bad lane fails in its second timed run
    ours = {good: FakeWorker(good.name), bad: FakeWorker(bad.name, fail_at=4)}
    baseline = FakeWorker("diffusers")
    latents = np.zeros((1, 4, 8, 8), np.float32)
    rows = bench._measure_rounds(
        ctx, ours, [baseline], bench.Case(1, 64, 64, 2), (["a"], 64, 64, 2, 7.5, latents, None), latents.shape,
        lambda line: None,
    )  # fmt: skip
    (failed,) = [r for r in rows if "failed" in r]
    assert (failed["lane"], failed["failed_in"], failed["backend"], failed["precision"]) == (
        bad.name, "run 2", "openvino", "bf16")  # fmt: skip
    assert "NumericalError" in failed["failed"] and "metrics" not in failed
    measured = {r["implementation"] + " " + r["backend"]: r for r in rows if "metrics" in r}
    assert set(measured) == {"sdrt onnxruntime", "diffusers pytorch"}
    assert measured["sdrt onnxruntime"]["ratio_to"]["diffusers"]["end_to_end"]["n"] == 3
    assert ours[good].calls == baseline.calls == 2 + 3 and ours[bad].calls == 4  # no call after its failure
    assert "Failed (recorded as rows" in markdown_table(rows) and "failed in run 2" in markdown_table(rows)


def test_an_implementation_that_fails_to_load_is_a_row_and_the_run_goes_on(tiny_artifacts, tmp_path):
    """A copy of the artifacts with one graph changed fails its hash check in its worker: that variant is a
    failed row for every case, the intact one is measured; only a run that measured nothing is an error."""
    import shutil

    from sdrt.benchmarks.bench import check_measured

    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken, ignore=shutil.ignore_patterns("engines"))
    graph = broken / Manifest.load(broken, verify_hashes=False).components["vae_decoder"].path
    import onnx

    weight = max(onnx.load(graph).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(graph.read_bytes())
    data[data.index(weight) + len(weight) // 2] ^= 0x01  # one weight's low bit: still a valid graph, another hash
    graph.write_bytes(bytes(data))
    config = BenchConfig(
        artifacts=(tiny_artifacts, broken), backends=("onnxruntime",), precisions=("fp32",), baseline=False,
        sizes=((64, 64),), steps=(2,), runs=1, warmups=1, threads=2, results_dir=tmp_path / "results",
        matmul_size=128, matmul_budget_s=0.02,
    )  # fmt: skip
    rows = run_benchmark(config, progress=lambda line: None)
    (failed,) = [r for r in rows if "failed" in r]
    assert failed["failed_in"] == "load" and failed["artifacts"] == str(broken) and "sha256" in failed["failed"]
    assert [r["artifacts"] for r in rows if "metrics" in r] == [str(tiny_artifacts)]
    assert len(load_rows(list((tmp_path / "results").glob("*.jsonl")))) == 2  # both rows written, both readable
    check_measured(rows)
    with pytest.raises(BackendError, match=r"(?s)expected at least one implementation measured, got none:.*sha256"):
        check_measured([failed])


@pytest.mark.slow  # two more worker processes (~10 s); the denoiser-role plumbing it checks is read by every bench row
def test_sd3_bench_runs_beside_the_diffusers_sd3_pipeline(family_artifacts, tmp_path):
    """The benchmark reads the family's denoiser: on the tiny SD 3 model, one transformer call per step timed in each
    implementation, FLOPs counted on the transformer graph, beside diffusers' StableDiffusion3Pipeline."""
    from sdrt.benchmarks.flops import count_flops

    artifacts = family_artifacts("tiny-sd3")
    config = BenchConfig(
        artifacts=artifacts, backends=("onnxruntime",), precisions=("fp32",), baseline=True, sizes=((64, 64),),
        steps=(2,), runs=1, warmups=1, threads=2, results_dir=tmp_path, matmul_size=256, matmul_budget_s=0.05,
    )  # fmt: skip
    rows = run_benchmark(config, progress=lambda line: None)
    assert [(r["implementation"], r["backend"]) for r in rows] == [("sdrt", "onnxruntime"), ("diffusers", "pytorch")]
    sdrt, diffusers = rows
    assert diffusers["pipeline"] == "StableDiffusion3Pipeline" and sdrt["model"]["family"] == "sd3"
    assert sdrt["metrics"]["unet_step_ms"]["n"] == diffusers["metrics"]["unet_step_ms"]["n"] == 2
    m = Manifest.load(artifacts, verify_hashes=False)
    shapes = {"hidden_states": (2, 16, 8, 8), "encoder_hidden_states": (2, 77 + 256, 80), "pooled_projections": (2, 64),
              "timestep": (2,)}  # fmt: skip
    assert sdrt["unet_flops_per_call"] == count_flops(artifacts / m.components["transformer"].path, shapes)["total"] > 0

"""The benchmark instrument: FLOP counting against PyTorch's counter, statistics, rows (one process
per implementation, per backend and precision, the machine's matmul rate), and the cross-machine
report (table and chart) from two result files and an old schema-1 row."""

import json
import sys

import numpy as np
import pytest

from sdrt.benchmarks.bench import BenchConfig, Worker, run_benchmark, stats
from sdrt.benchmarks.flops import count_flops
from sdrt.benchmarks.report import chart, load_rows, markdown_table, write_report
from sdrt.runtime import InputError, Manifest, backends
from sdrt.runtime.errors import BackendError

OPENVINO = "openvino" in backends.available()


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
        )
        rows = run_benchmark(config, progress=lambda line: None)
        want = [("sdrt", n, "fp32") for n in names] + ([("diffusers", "pytorch", "fp32")] if baseline else [])
        want += [("sdrt", n, p) for n in names for p in precisions if p != "fp32"]
        assert [(r["implementation"], r["backend"], r["compute_precision"]) for r in rows] == want
        (file,) = out.glob("*.jsonl")
        files.append(file)
    return files


def test_rows_are_self_describing_and_consistent(two_result_files, tiny_artifacts):
    rows = load_rows(two_result_files)
    assert len(rows) == 3 + 1 + OPENVINO
    ours = next(r for r in rows if r["implementation"] == "sdrt" and r["threads"] == 1 and "metrics" in r)
    for key in ("device", "versions", "model", "precision", "batch", "height", "width", "steps", "scheduler"):
        assert key in ours
    assert ours["device"]["kind"] == "cpu" and ours["device"]["cores"] >= 1
    assert ours["versions"]["onnxruntime"] and ours["scheduler"] == "DDIMScheduler"
    m = ours["metrics"]
    assert m["unet_step_ms"]["n"] == 2 * 3  # runs x steps
    assert m["unet_step_ms"]["median"] < m["step_wall_ms"]["median"]
    assert 0 < m["overhead_fraction"]["median"] < 1
    assert m["images_per_s"]["median"] == pytest.approx(1 / m["end_to_end_s"]["median"], rel=0.5)
    # FLOPs recorded for the doubled (guided) UNet batch at this size
    man = Manifest.load(tiny_artifacts, verify_hashes=False)
    d = man.components["unet"].inputs[2].shape[2]
    want = count_flops(
        tiny_artifacts / man.components["unet"].path,
        {"sample": (2, 4, 8, 8), "timestep": (2,), "encoder_hidden_states": (2, 77, d)},
    )["total"]
    assert ours["unet_flops_per_call"] == want
    ratio = ours["ratio_to"]["diffusers"]["end_to_end"]
    assert ratio["n"] == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]


def test_rows_per_backend_and_precision_with_the_reason_for_what_is_not_measured(two_result_files):
    rows = load_rows(two_result_files)
    (bf16,) = [r for r in rows if "unsupported" in r]
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
        assert r["load_s"] > 0 and r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0, r["implementation"]
    sdrt = next(r for r in rows if r["implementation"] == "sdrt" and r["threads"] == 1)
    diffusers = next(r for r in rows if r["implementation"] == "diffusers")
    assert sdrt["peak_rss_bytes"] != diffusers["peak_rss_bytes"]
    assert {"manifest", "text_encoder", "unet", "vae_decoder", "total"} <= set(sdrt["load_timings"])
    assert "load_timings" not in diffusers


def test_unet_rate_is_a_fraction_of_the_measured_matmul_rate(two_result_files):
    for r in load_rows(two_result_files):
        fp32 = r["machine"]["matmul"]["fp32"]
        assert fp32["gflops"] > 0 and fp32["shape"] == [256, 256, 256] and fp32["threads"] == r["threads"]
        assert r["machine"]["cpu"]["model"] and "avx2" in r["machine"]["cpu"]["flags"]
        if "metrics" in r:
            achieved = r["unet_tflops_achieved"] * 1e12
            assert r["unet_fraction_of_matmul"] == pytest.approx(achieved / (fp32["gflops"] * 1e9))


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
    assert sdrt["metrics"]["unet_step_ms"]["median"] > 0 and diffusers["metrics"]["unet_step_ms"]["median"] > 0
    assert diffusers["pipeline"] == "StableDiffusionXLPipeline"

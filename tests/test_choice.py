"""The measured choice of CPU backend and precision (`sdrt engines`, `backend="auto"`): every candidate timed and
checked against onnxruntime fp32 on this CPU, the fastest that passed run by auto, a failed one refused by name,
a stale record ignored with the reason, and a non-finite value traced to the node that made it."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from sdrt.runtime import Manifest, Pipeline, backends, choice
from sdrt.runtime.choice import Candidate
from sdrt.runtime.errors import BackendError

OPENVINO = "openvino" in backends.available()
LOWER = [p for p in (backends.get("openvino").precisions() if OPENVINO else ()) if p != "fp32"]
SIZE = 64


@pytest.fixture(scope="module")
def measured(tiny_artifacts, tmp_path_factory):
    """A copy of the tiny artifacts (the shared fixture keeps no record) and the choice measured on it."""
    from sdrt.export.choose import measure_choice

    root = tmp_path_factory.mktemp("choice") / "tiny-sd"
    shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("engines"))
    lines: list[str] = []
    record = measure_choice(root, SIZE, SIZE, steps=20, measure_steps=2, threads=2, progress=lines.append)
    return root, record, lines


def test_every_cpu_backend_and_precision_is_measured_and_checked(measured):
    root, record, lines = measured
    names = [c.name for c in record.candidates]
    assert names[0] == "onnxruntime fp32"  # the reference comes first
    want = {f"{b} {p}" for b, p in [("onnxruntime", "fp32")] + [("openvino", p) for p in ("fp32", *LOWER)] if
            b == "onnxruntime" or OPENVINO}  # fmt: skip
    assert set(names) == want
    reference = record.candidates[0]
    assert (reference.status, reference.mean_levels, reference.max_levels) == ("ok", 0.0, 0)
    for c in record.candidates:
        assert c.status == "ok", (c.name, c.reason)  # on this CPU, every offered precision runs the tiny model
        assert c.unet_step_ms > 0 and c.vae_decode_ms > 0 and c.load_s > 0
        assert c.estimate_s == pytest.approx((c.text_encoder_ms + 20 * c.unet_step_ms + c.vae_decode_ms) / 1e3)
        assert c.mean_levels <= choice.MAX_MEAN_LEVELS
        if c.backend == "openvino":  # what OpenVINO really compiled: the precision asked for, in most nodes
            counts = c.runtime_precisions["unet"]
            want_precision = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[c.precision]
            assert max(counts, key=counts.get) == want_precision, counts
    assert record.chosen == min(record.passed(), key=lambda c: c.estimate_s).name
    assert lines[-1].startswith(f"backend auto runs {record.chosen} here")
    saved = json.loads(choice.record_path(root).read_text())
    assert saved["chosen"] == record.chosen and len(saved["candidates"]) == len(record.candidates)


def test_auto_runs_the_recorded_choice_and_fp32_when_asked(measured):
    root, record, _ = measured
    with Pipeline.load(root, backend="auto") as pipe:
        assert f"{pipe.backend} {pipe.precision}" == record.chosen
        assert pipe.choice.startswith(f"{record.chosen}, measured fastest on this CPU")
        auto = pipe("a cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=3).images
    with Pipeline.load(root, backend="auto", precision="fp32") as pipe:
        fastest_fp32 = record.passed("fp32")[0]
        assert (pipe.backend, pipe.precision) == (fastest_fp32.backend, "fp32")
        assert "fastest in fp32" in pipe.choice
    with Pipeline.load(root, backend=record.chosen.split()[0], precision=record.chosen.split()[1]) as pipe:
        assert np.array_equal(pipe("a cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=3).images, auto)


def test_a_record_that_no_longer_fits_is_ignored_with_the_reason(measured, tmp_path):
    root, record, _ = measured
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = choice.record_path(copy)
    data = json.loads(path.read_text())
    data["fingerprints"]["unet"] = "0" * 64
    path.write_text(json.dumps(data))
    manifest = Manifest.load(copy, verify_hashes=False)
    resolved = choice.resolve(copy, manifest)
    assert (resolved.backend, resolved.precision) == ("onnxruntime", "fp32")
    assert "unet re-exported since it was measured" in resolved.why
    data = json.loads(path.read_text()) | {"versions": {"onnxruntime": "0.0.1", "openvino": None}}
    path.write_text(json.dumps(data))
    assert "was measured with" in choice.read(copy, manifest)[1]
    path.unlink()
    assert "no measured choice for this CPU" in choice.resolve(copy, manifest).why
    with pytest.raises(BackendError, match="expected a measured choice for this CPU, got none"):
        choice.resolve(copy, manifest, "bf16")


def test_decide_takes_the_fastest_candidate_that_passed():
    ok = Candidate("onnxruntime", "fp32", "ok", estimate_s=10.0)
    fast_but_wrong = Candidate("openvino", "bf16", "failed", "NaN", estimate_s=3.0)
    faster = Candidate("openvino", "fp16", "ok", estimate_s=5.0)
    assert choice.decide([ok, fast_but_wrong, faster]) == "openvino fp16"
    assert choice.decide([ok, fast_but_wrong]) == "onnxruntime fp32"
    assert choice.decide([fast_but_wrong, Candidate("openvino", "fp32", "error", "could not load")]) == ""


def test_a_precision_that_failed_here_is_refused_by_name(measured, tmp_path):
    """As `sdrt engines` records it on a CPU where a kernel returns NaN: asking for that precision by name is an
    error carrying what the check found, auto runs the fastest that passed, and fp32 is never refused."""
    root, record, _ = measured
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    failed = Candidate("openvino", "bf16", "failed", "unet at step 1 of 2: NaN; the first non-finite value comes from "
                       "node 'Softmax_7' (Softmax)")  # fmt: skip
    others = [c for c in record.candidates if c.name != failed.name]
    choice.write(copy, replace(record, candidates=[*others, failed], chosen=choice.decide([*others, failed])))
    manifest = Manifest.load(copy, verify_hashes=False)
    why = choice.refusal(copy, manifest, "openvino", "bf16")
    assert "openvino bf16 failed its check on this CPU" in why and "'Softmax_7'" in why
    assert choice.refusal(copy, manifest, "openvino", "fp32") is None
    resolved = choice.resolve(copy, manifest)
    assert f"{resolved.backend} {resolved.precision}" == choice.decide(others)  # auto: the fastest that passed
    if "bf16" in LOWER:
        with pytest.raises(BackendError, match=r"openvino bf16 failed its check on this CPU.*Softmax_7"):
            Pipeline.load(copy, backend="openvino", precision="bf16")
        with pytest.raises(BackendError, match=r"expected a candidate in bf16 that passed on this CPU, got none"):
            Pipeline.load(copy, backend="auto", precision="bf16")


@pytest.mark.skipif(not OPENVINO, reason="the locator compiles with OpenVINO, which is not installed here")
def test_the_first_non_finite_node_is_located(tmp_path):
    """exp overflows to infinity in fp32 beyond 88.7; a subtraction of two infinities then gives NaN. The locator
    names the Exp, not the nodes after it (nor the finite MatMul before)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from sdrt.runtime.openvino_backend import first_nonfinite

    w = numpy_helper.from_array(np.full((4, 4), 30.0, np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"], name="scale_up"),
        helper.make_node("Exp", ["m"], ["e"], name="grow"),
        helper.make_node("Sub", ["e", "e"], ["d"], name="cancel"),
        helper.make_node("Relu", ["d"], ["y"], name="after"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])  # fmt: skip
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    found = first_nonfinite(path, {"x": np.ones((1, 4), np.float32)}, "fp32", threads=1)
    assert "'grow' (Exp" in found and "node 2 of 4" in found
    finite = first_nonfinite(path, {"x": np.full((1, 4), 0.1, np.float32)}, "fp32")
    assert finite.startswith("every one of 4 intermediate outputs checked in fp32 is finite")

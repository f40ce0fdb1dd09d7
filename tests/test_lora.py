"""LoRA adapters against diffusers (load_lora_weights + set_adapters): one adapter, two with their own scales, a
kohya file, an SDXL LoRA (both text encoders), switching between sets in one pipeline, batches of mixed sets,
fusing at export, and the service's named adapters. The files are made with peft on the tiny models (tests/lora_files.py)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from lora_files import diffusers_images, make_lora, to_kohya
from PIL import Image

from sdrt.runtime import Pipeline
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.lora import LoraError, LoraLimits

CALL = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64)
TOLERANCE = 1  # 1/255 per pixel at fp32


@pytest.fixture(scope="module")
def files(diffusers_pipeline, tmp_path_factory):
    """Two diffusers-format LoRAs on the UNet (attention and LoCon convolutions) and text encoder, and a kohya copy."""
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(diffusers_pipeline, root / "style.safetensors", seed=1)
    b = make_lora(diffusers_pipeline, root / "character.safetensors", seed=2, alpha=2.0, convs=False)
    k = to_kohya(a, root / "style-kohya.safetensors")
    return {"a": a, "b": b, "kohya": k, "root": root}


@pytest.fixture(scope="module")
def latents():
    return np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_artifacts):
    with Pipeline.load(tiny_artifacts, lora_limits=LoraLimits(cached_sets=2)) as p:
        yield p


def _close(got, want, base=None):
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= TOLERANCE, f"max difference {diff}/255 from diffusers"
    if base is not None:  # the adapter really moved the image, so the agreement above says something
        moved = np.abs(want.astype(int) - base.astype(int))
        assert moved.mean() > 5 and moved.max() > 40, f"the adapter moved pixels by only {moved.mean():.1f}"


@pytest.mark.parametrize(
    "case",
    ["one", "two with their own scales", "kohya", "negative scale"],
)
def test_adapters_match_diffusers(case, pipe, files, diffusers_pipeline, latents):
    loras = {
        "one": [(files["a"], 1.0)],
        "two with their own scales": [(files["a"], 0.8), (files["b"], 0.5)],
        "kohya": [(files["kohya"], 0.7)],
        "negative scale": [(files["a"], -0.5)],
    }[case]
    want = diffusers_images(diffusers_pipeline, loras, latents, **CALL)
    base = diffusers_images(diffusers_pipeline, [], latents, **CALL)
    result = pipe(**CALL, latents=latents, loras=[(str(p), s) for p, s in loras])
    _close(result.images, want, base)
    assert sorted(d["scale"] for d in result.loras) == sorted(s for _, s in loras)


def test_kohya_file_reads_as_the_same_adapter(files):
    from sdrt.runtime.lora import load_file

    a, k = load_file(files["a"]), load_file(files["kohya"])
    assert (a.format, k.format) == ("diffusers", "kohya") and a.modules == k.modules


def test_switching_sets_gives_each_sets_image_and_leaks_nothing(pipe, files, diffusers_pipeline, latents):
    """One loaded pipeline, sets in turn: A, B, base, A+B, A. Each equals diffusers' for that set, repeats are
    identical, and a set used before comes from the cache (no merge, no session opened)."""
    sets = {
        "A": [(files["a"], 1.0)],
        "B": [(files["b"], 1.0)],
        "base": [],
    }
    want = {name: diffusers_images(diffusers_pipeline, loras, latents, **CALL) for name, loras in sets.items()}
    seen = {}
    for name in ("A", "B", "base", "A", "B", "base", "A"):
        result = pipe(**CALL, latents=latents, loras=[(str(p), s) for p, s in sets[name]])
        _close(result.images, want[name])
        if name in seen:
            np.testing.assert_array_equal(result.images, seen[name])
            if name != "base":
                assert result.timings["lora_cached"] is True
        seen[name] = result.images
    assert pipe.adapters.stats["hits"] >= 3


def test_lru_cache_keeps_only_the_limit(tiny_artifacts, files, latents):
    with Pipeline.load(tiny_artifacts, lora_limits=LoraLimits(cached_sets=1)) as p:
        first = p(**CALL, latents=latents, loras=[(str(files["a"]), 1.0)])
        p(**CALL, latents=latents, loras=[(str(files["b"]), 1.0)])
        again = p(**CALL, latents=latents, loras=[(str(files["a"]), 1.0)])
        assert again.timings["lora_cached"] is False and p.adapters.stats["builds"] == 3
        assert len(p.adapters._cache) == 1
        np.testing.assert_array_equal(first.images, again.images)


def test_batch_of_mixed_sets_gives_each_call_its_own_image(pipe, files, latents):
    calls = [
        dict(CALL, latents=latents, loras=[(str(files["a"]), 1.0)]),
        dict(CALL, latents=latents),
        dict(CALL, latents=latents, loras=[(str(files["b"]), 0.5)]),
        dict(CALL, latents=latents, loras=[(str(files["a"]), 1.0)]),
    ]
    batched = pipe.run_batch(calls)
    for call, result in zip(calls, batched):
        np.testing.assert_array_equal(result.images, pipe(**call).images)
    assert batched[0].timings.get("batch_size") == 2  # the two calls with set A shared their UNet steps


def test_registered_names_and_a_refusal_leave_the_pipeline_serving(pipe, files, latents):
    pipe.register_lora("style", files["a"])
    named = pipe(**CALL, latents=latents, loras=[("style", 1.0)])
    by_path = pipe(**CALL, latents=latents, loras=[(str(files["a"]), 1.0)])
    np.testing.assert_array_equal(named.images, by_path.images)
    with pytest.raises(LoraError, match="no such file"):
        pipe(**CALL, latents=latents, loras=[("nope", 1.0)])
    np.testing.assert_array_equal(pipe(**CALL, latents=latents, loras=[("style", 1.0)]).images, named.images)


def test_openvino_applies_the_same_weights(tiny_artifacts, files, diffusers_pipeline, latents):
    pytest.importorskip("openvino")
    loras = [(files["a"], 0.8), (files["b"], 0.5)]
    want = diffusers_images(diffusers_pipeline, loras, latents, **CALL)
    with Pipeline.load(tiny_artifacts, backend="openvino") as p:
        _close(p(**CALL, latents=latents, loras=[(str(f), s) for f, s in loras]).images, want)


def test_sdxl_lora_on_both_text_encoders_matches_diffusers(family_artifacts, family_models, tmp_path):
    from test_families import reference

    ref = reference("StableDiffusionXLPipeline", family_models("tiny-sdxl"))
    path = make_lora(ref, tmp_path / "xl.safetensors", seed=3)
    kohya = to_kohya(path, tmp_path / "xl-kohya.safetensors", sdxl=True)
    sgm = to_kohya(path, tmp_path / "xl-kohya-sgm.safetensors", sdxl=True, sgm=True)  # as sd-scripts writes SDXL's
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    base = diffusers_images(ref, [], latents, **CALL)
    want = diffusers_images(ref, [(path, 0.9)], latents, **CALL)
    # SDXL's UNet takes the first encoder's penultimate hidden states: its last layer is in no graph, and a LoRA
    # that adapts it (as this one and most SDXL LoRAs do) is applied everywhere else, as diffusers' changes nothing.
    summary = json.loads((family_artifacts("tiny-sdxl") / "manifest.json").read_text())["components"]
    assert summary["text_encoder"]["optimization"]["lora_map"]["unused"] == 6  # q, k, v, out, fc1, fc2
    with Pipeline.load(family_artifacts("tiny-sdxl")) as p:
        assert {"text_encoder", "text_encoder_2", "unet"} <= set(p.adapters.targets)
        got = p(**CALL, latents=latents, loras=[(str(path), 0.9)])
        _close(got.images, want, base)
        np.testing.assert_array_equal(p(**CALL, latents=latents, loras=[(str(kohya), 0.9)]).images, got.images)
        # The SGM-named file: diffusers reads it into the same adapter, and so does sdrt.
        _close(diffusers_images(ref, [(sgm, 0.9)], latents, **CALL), want)
        np.testing.assert_array_equal(p(**CALL, latents=latents, loras=[(str(sgm), 0.9)]).images, got.images)


@pytest.mark.slow  # its own export (~30 s): the default suite stays in its time budget
def test_fused_export_matches_diffusers(tiny_model, files, diffusers_pipeline, latents, tmp_path):
    from sdrt.export.build import ExportOptions, export_pipeline

    loras = [(files["a"], 0.8), (files["b"], 0.5)]
    options = ExportOptions(components=("text_encoder", "unet", "vae_decoder"), verify=False,
                            loras=tuple((str(p), s) for p, s in loras))  # fmt: skip
    report = export_pipeline(str(tiny_model), tmp_path / "fused", options)
    fused = report.manifest.build["fused_loras"]
    assert [(f["scale"], f["sha256"]) for f in fused] == [
        (0.8, sha256_file(files["a"])),
        (0.5, sha256_file(files["b"])),
    ]
    want = diffusers_images(diffusers_pipeline, loras, latents, **CALL)
    with Pipeline.load(tmp_path / "fused") as p:
        _close(p(**CALL, latents=latents).images, want)


def test_service_serves_registered_adapters_by_name_only(pipe, files, latents):
    pytest.importorskip("fastapi")
    from test_serve import post, serving

    from sdrt.serve.api import register_loras

    folder = files["root"] / "served"
    folder.mkdir(exist_ok=True)
    (folder / "style.safetensors").write_bytes(files["a"].read_bytes())
    (folder / "notes.txt").write_text("not an adapter")
    assert register_loras(pipe, folder) == ["style"]
    try:
        want = pipe(**CALL, seed=5, loras=[("style", 0.7)]).images[0]
        base = pipe(**CALL, seed=5).images[0]
        with serving(pipe) as (client, _, _):
            body = {**CALL, "seed": 5}
            got = []
            for loras in ([{"name": "style", "scale": 0.7}], None, [{"name": "style", "scale": 0.7}]):
                r = post(client, {**body, **({"loras": loras} if loras else {})})
                assert r.status_code == 200, r.text
                data = base64.b64decode(r.json()["data"][0]["b64_json"])
                got.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            np.testing.assert_array_equal(got[0], want)
            np.testing.assert_array_equal(got[1], base)
            np.testing.assert_array_equal(got[2], want)
            r = post(client, {**body, "loras": [{"name": str(files["a"]), "scale": 1.0}]})
            assert r.status_code == 400 and "registered adapters (style)" in r.json()["error"]["message"]
            r = post(client, {**body, "loras": [{"path": "/etc/passwd"}]})
            assert r.status_code == 422 and "loras[0]" in r.json()["error"]["message"]
            # A path stays refused even where the pipeline itself takes paths (library use beside the service).
            pipe.lora_paths = True
            r = post(client, {**body, "loras": [{"name": str(files["a"]), "scale": 1.0}]})
            assert r.status_code == 400 and "registered adapters (style)" in r.json()["error"]["message"]
            for loras, says in (
                ([{"name": "style", "scale": 1000}], "loras[0] scale: expected a finite number in [-100, 100]"),
                ([{"name": "style", "scale": 0.1 * i} for i in range(9)], "expected at most 8 adapters per call"),
                ("style", "loras: expected a list"),
            ):
                r = post(client, {**body, "loras": loras})
                assert r.status_code in (400, 422) and says in r.json()["error"]["message"], r.text
            metrics = client.get("/metrics").text
            switches = sum(
                float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("sdrt_lora_switches_total")
            )
            assert switches >= 2, metrics
    finally:
        pipe.lora_paths = True
        pipe.loras.names.clear()


def test_lora_map_is_recorded_for_every_adaptable_module(tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    for name in ("unet", "text_encoder"):
        c = manifest["components"][name]
        summary = c["optimization"]["lora_map"]
        assert summary["mapped"] == summary["modules"] == len(c["lora_targets"]) > 0 and "unused" not in summary
    assert {t["layout"] for t in manifest["components"]["unet"]["lora_targets"].values()} == {"same", "transposed"}


def test_random_lora_files_fit_the_artifacts_they_are_written_for(tiny_artifacts, tmp_path, latents):
    """sdrt bench's random adapters (written from the manifest, no torch): every Linear module (or every module)
    of the UNet and text encoder once, at the rank asked, and they move the image."""
    from sdrt.benchmarks.random_lora import write_random_lora
    from sdrt.runtime.lora import load_file, resolve

    targets = json.loads((tiny_artifacts / "manifest.json").read_text())["components"]
    for modules in ("linear", "all"):
        path = write_random_lora(tiny_artifacts, tmp_path / f"{modules}.safetensors", rank=4, modules=modules)
        f = load_file(path)
        want = {c: {m for m, t in targets[c]["lora_targets"].items() if modules == "all" or len(t["shape"]) == 2}
                for c in ("unet", "text_encoder")}  # fmt: skip
        assert {c: set(layers) for c, layers in f.layers.items()} == want
        assert {layer.rank for layers in f.layers.values() for layer in layers.values()} == {4}
    from sdrt.runtime.cli import main

    cli = tmp_path / "cli.safetensors"  # `sdrt random-lora` writes the same file
    assert (
        main(["random-lora", "--artifacts", str(tiny_artifacts), "--out", str(cli), "--rank", "4", "--modules", "all"])
        == 0
    )
    assert cli.read_bytes() == path.read_bytes()
    with Pipeline.load(tiny_artifacts) as p:
        adapters = p.adapters
        resolve(f, adapters.targets)  # refuses a file that does not fit
        base = p(**CALL, latents=latents).images
        adapted = p(**CALL, latents=latents, loras=[(str(path), 1.0)]).images
    assert np.abs(base.astype(int) - adapted.astype(int)).mean() > 1


def test_bench_measures_base_one_lora_and_switching_in_the_same_rounds(tiny_artifacts, tmp_path):
    """`sdrt bench --random-loras 2`: the base model, one adapter set on every call, and a set switched on every
    call, in interleaved rounds; the switching row's every call changes set yet finds it cached after warm-up,
    and each set's first use (merge and sessions) is recorded apart from the per-call cost."""
    from sdrt.benchmarks.bench import BenchConfig, run_benchmark
    from sdrt.benchmarks.random_lora import write_random_lora
    from sdrt.benchmarks.report import load_rows, markdown_table

    loras = tuple((str(write_random_lora(tiny_artifacts, tmp_path / f"r{i}.safetensors", rank=4, seed=i)), 1.0)
                  for i in range(2))  # fmt: skip
    config = BenchConfig(
        artifacts=tiny_artifacts, backends=("onnxruntime",), precisions=("fp32",), baseline=False, sizes=((64, 64),),
        steps=(2,), runs=3, warmups=1, threads=1, results_dir=tmp_path, matmul_size=128, matmul_budget_s=0.02,
        loras=loras,
    )  # fmt: skip
    rows = run_benchmark(config, progress=lambda line: None)
    assert [r["lora"]["mode"] for r in rows] == ["base", "one", "switching"]
    base, one, switching = rows
    assert "lora_ms" not in base["metrics"] and base["lora"]["sets"] == []
    assert [[f["name"] for f in s] for s in switching["lora"]["sets"]] == [["r0"], ["r1"]]
    for row, sets in ((one, 1), (switching, 2)):
        assert row["metrics"]["lora_ms"]["n"] == 3  # one figure per timed call
        first = row["lora"]["first_use_s"]
        assert len(first) == sets and all(x is not None and x > 0 for x in first)
        # Timed calls come after each set's first use: cache hits, far cheaper than merging and opening sessions.
        assert row["metrics"]["lora_ms"]["max"] / 1e3 < min(first)
        assert row["lora"]["cache"]["builds"] == sets
        ratio = row["ratio_to"]["sdrt without LoRA"]["unet_step"]
        assert ratio["n"] == 3
    (file,) = tmp_path.glob("*.jsonl")
    table = markdown_table(load_rows([file]))
    assert "LoRA set switched every call" in table and "r0 r4 x" in table


torch.set_num_threads(2)

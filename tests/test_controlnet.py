"""ControlNet in the runtime against diffusers' ControlNet pipelines (same latents or seed, fp32, within 1/255): one
ControlNet with a scale and a window of the schedule, two with their own images and scales, guess mode,
image-to-image, inpainting, an SDXL ControlNet, and the output size taken from the control image.

The ControlNets are the random-weight presets (``ControlNetModel.from_unet`` of the tiny UNets, their zero-initialized
convolutions given random weights), exported once per session beside ``unet_control`` (conftest's
``controlnet_artifacts``). Each case also checks that the ControlNet moved the image by several levels from the
model alone, so a missing control path cannot pass."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdrt.runtime import Pipeline
from sdrt.runtime.errors import ArtifactError, InputError

torch.set_num_threads(2)

CALL = dict(prompt="a photo of a cat", num_inference_steps=3, height=64, width=64)


@pytest.fixture(scope="module")
def setup(controlnet_artifacts, diffusers_pipeline):
    """The tiny artifacts with unet_control, the ControlNet's directory, and diffusers' pipelines on them (one
    ControlNet, the same ControlNet twice, image-to-image, inpainting)."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetInpaintPipeline,
        StableDiffusionControlNetPipeline,
    )

    artifacts, folder, exported = controlnet_artifacts("tiny")
    cn = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    parts = {k: v for k, v in diffusers_pipeline.components.items() if k not in ("image_encoder",)}
    parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    references = {
        "one": StableDiffusionControlNetPipeline(**parts, controlnet=cn),
        "two": StableDiffusionControlNetPipeline(**parts, controlnet=[cn, cn]),
        "img2img": StableDiffusionControlNetImg2ImgPipeline(**parts, controlnet=cn),
        "inpaint": StableDiffusionControlNetInpaintPipeline(**parts, controlnet=cn),
    }
    for ref in references.values():
        ref.set_progress_bar_config(disable=True)
    return artifacts, [exported, exported], references


@pytest.fixture(scope="module")
def pipe(setup):
    """The tiny model with its ControlNet loaded once; ``controlnets`` of two is loaded where a case needs it."""
    artifacts, dirs, _ = setup
    with Pipeline.load(artifacts, controlnets=dirs[:1]) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def control_images():
    rng = np.random.default_rng(5)  # 96x80: resized to the output size with lanczos, as diffusers does
    return [Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) for _ in range(2)]


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def _close(got, want, base, region=None):
    """``got`` equals diffusers' ``want`` within 1/255, and ``want`` is several levels from ``base`` (the model
    without its ControlNet) on average, over ``region`` (a boolean HxW mask) when given."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(int) - want.astype(int)).max()
    assert diff <= 1, f"max difference {diff}/255 from diffusers"
    moved = np.abs(want.astype(int) - base.astype(int))
    moved = moved[:, region] if region is not None else moved
    assert moved.mean() > 3, f"moved pixels by only {moved.mean():.1f} on average"


LATENTS = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)


@pytest.mark.parametrize(
    "case",
    ["one ControlNet, scale 0.7, window 0.2-0.8", "two ControlNets with their own images and scales", "guess mode"],
)
def test_controlnet_matches_diffusers(case, setup, pipe, control_images, runtime_pipeline):
    artifacts, dirs, refs = setup
    args, ours = {
        "one ControlNet, scale 0.7, window 0.2-0.8": (
            dict(image=control_images[0], controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
                 control_guidance_end=0.8),
            dict(control_image=control_images[0], controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
                 control_guidance_end=0.8),
        ),
        "two ControlNets with their own images and scales": (
            dict(image=control_images, controlnet_conditioning_scale=[0.5, 1.2], control_guidance_end=[1.0, 0.6]),
            dict(control_image=control_images, controlnet_conditioning_scale=[0.5, 1.2],
                 control_guidance_end=[1.0, 0.6]),
        ),
        "guess mode": (
            dict(image=control_images[0], guess_mode=True, guidance_scale=3.0),
            dict(control_image=control_images[0], guess_mode=True, guidance_scale=3.0),
        ),
    }[case]  # fmt: skip
    ref = refs["two" if "two" in case else "one"]
    want = _uint8(ref(**CALL, **args, latents=torch.from_numpy(LATENTS), output_type="np").images)
    base = runtime_pipeline(**CALL, latents=LATENTS, guidance_scale=args.get("guidance_scale", 7.5)).images
    if "two" in case:
        with Pipeline.load(artifacts, controlnets=dirs) as two:
            got = two(**CALL, **ours, latents=LATENTS).images
    else:
        got = pipe(**CALL, **ours, latents=LATENTS).images
    _close(got, want, base)


def test_controlnet_with_image_to_image_matches_diffusers(setup, pipe, control_images, runtime_pipeline):
    _, _, refs = setup
    init = Image.fromarray(np.random.default_rng(9).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    call = dict(CALL, image=init, strength=0.8, num_inference_steps=5)  # 4 steps run
    want = refs["img2img"](**call, control_image=control_images[0], generator=torch.Generator().manual_seed(3),
                           output_type="np").images  # fmt: skip
    base = runtime_pipeline(**call, seed=3).images
    got = pipe(**call, control_image=control_images[0], seed=3).images  # scale: the task's default, 0.8
    _close(got, _uint8(want), base)


def test_controlnet_with_inpainting_matches_diffusers(setup, pipe, control_images, runtime_pipeline):
    """A 4-channel UNet repaints the masked region (diffusers' blend); the ControlNet sees the 4 latent channels."""
    from test_families import test_image, test_mask

    _, _, refs = setup
    call = dict(CALL, image=test_image(), mask_image=test_mask(), strength=0.9, num_inference_steps=5)
    want = refs["inpaint"](**call, control_image=control_images[1], controlnet_conditioning_scale=1.5,
                           generator=torch.Generator().manual_seed(4), output_type="np").images  # fmt: skip
    base = runtime_pipeline(**call, seed=4).images
    got = pipe(**call, control_image=control_images[1], controlnet_conditioning_scale=1.5, seed=4).images
    _close(got, _uint8(want), base, region=np.asarray(test_mask()) > 0)  # only the repainted region moves


def test_output_takes_the_control_images_size(setup, pipe, control_images):
    """Without height/width, diffusers' ControlNet pipeline generates at the control image's size (96x80 here)."""
    _, _, refs = setup
    want = refs["one"](prompt=CALL["prompt"], num_inference_steps=2, image=control_images[0],
                       generator=torch.Generator().manual_seed(2), output_type="np").images  # fmt: skip
    got = pipe(prompt=CALL["prompt"], num_inference_steps=2, control_image=control_images[0], seed=2).images
    assert got.shape == want.shape == (1, 80, 96, 3)
    assert np.abs(got.astype(int) - _uint8(want).astype(int)).max() <= 1


def test_lora_adapts_the_unet_that_takes_the_residuals(setup, pipe, control_images, tmp_path, diffusers_pipeline):
    """A LoRA in a controlled call adapts unet_control as diffusers' ControlNet pipeline with the LoRA loaded; in a
    call without a control image, as diffusers' plain pipeline (the same adapted unet_control, zero residuals)."""
    from lora_files import diffusers_images, make_lora

    ref = setup[2]["one"]
    path = make_lora(ref, tmp_path / "style.safetensors", seed=4)
    call = dict(CALL, controlnet_conditioning_scale=0.8)
    want = diffusers_images(ref, [(path, 0.9)], LATENTS, image=control_images[0], **call)
    base = diffusers_images(ref, [], LATENTS, image=control_images[0], **call)  # the ControlNet without the LoRA
    got = pipe(**call, control_image=control_images[0], latents=LATENTS, loras=[(str(path), 0.9)]).images
    _close(got, want, base)
    adapted = pipe.adapters.adapted(pipe.loras.adapter_set([(str(path), 0.9)]))
    assert "unet_control" in adapted and "unet" not in adapted  # one adapted UNet serves both kinds of call
    want = diffusers_images(diffusers_pipeline, [(path, 0.9)], LATENTS, **CALL)
    base = diffusers_images(diffusers_pipeline, [], LATENTS, **CALL)
    _close(pipe(**CALL, latents=LATENTS, loras=[(str(path), 0.9)]).images, want, base)


@pytest.mark.slow  # ~2 min, most of it exporting tiny SDXL with unet_control and its ControlNet: make test-slow
def test_sdxl_controlnet_matches_diffusers(controlnet_artifacts, family_models, control_images):
    """SDXL's ControlNet takes the pooled text and time ids too; guess mode gives it only the prompt's rows."""
    from diffusers import ControlNetModel
    from test_families import reference

    artifacts, folder, exported = controlnet_artifacts("tiny-sdxl")
    cn = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ref = reference("StableDiffusionXLControlNetPipeline", family_models("tiny-sdxl"), controlnet=cn)
    latents = np.random.default_rng(8).standard_normal((1, 4, 8, 8)).astype(np.float32)
    with Pipeline.load(artifacts, controlnets=[exported]) as pipe:
        for args in (dict(controlnet_conditioning_scale=0.8, control_guidance_start=0.3),
                     dict(guess_mode=True, guidance_scale=4.0)):  # fmt: skip
            want = ref(**CALL, image=control_images[0], latents=torch.from_numpy(latents), output_type="np",
                       **args).images  # fmt: skip
            got = pipe(**CALL, control_image=control_images[0], latents=latents, **args).images
            base = pipe(**CALL, latents=latents, guidance_scale=args.get("guidance_scale", 5.0)).images
            _close(got, _uint8(want), base)


def test_controlnet_arguments_are_checked_before_any_work(setup, pipe, control_images, runtime_pipeline):
    artifacts, dirs, _ = setup
    with pytest.raises(InputError, match="loaded without a ControlNet"):
        runtime_pipeline(**CALL, control_image=control_images[0])
    for kwargs, says in (
        ({"guess_mode": True}, r"control_image: expected one image per ControlNet \(1\) with guess_mode"),
        ({"control_image": control_images}, r"expected 1 image or one per prompt \(1\), got 2"),  # a batch
        ({"control_image": control_images[0], "controlnet_conditioning_scale": float("nan")}, "finite"),
        ({"control_image": control_images[0], "controlnet_conditioning_scale": -1.0}, ">= 0"),
        ({"control_image": control_images[0], "control_guidance_start": 0.8, "control_guidance_end": 0.2},
         "less than control_guidance_end"),
        ({"control_image": control_images[0], "guess_mode": "yes"}, "guess_mode: expected True or False"),
    ):  # fmt: skip
        with pytest.raises(InputError, match=says):
            pipe(**CALL, **kwargs)
    assert pipe(**CALL, control_image=control_images[0], seed=0).images.shape == (1, 64, 64, 3)  # still serves
    with pytest.raises(ArtifactError, match="unet_control"):
        Pipeline.load(_without_control_unet(artifacts), controlnets=dirs[:1])


def _without_control_unet(artifacts):
    import json

    copy = artifacts.parent / "no-control-unet"
    if not copy.exists():
        shutil.copytree(artifacts, copy)
        data = json.loads((copy / "manifest.json").read_text())
        del data["components"]["unet_control"]
        (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def test_sdrt_generate_runs_controlnets(setup, pipe, control_images, tmp_path):
    from sdrt.runtime.cli import main

    artifacts, dirs, _ = setup
    control_images[0].save(tmp_path / "control.png")
    args = ["generate", "--artifacts", str(artifacts), "--prompt", "a photo of a cat", "--steps", "3", "--height", "64",
            "--width", "64", "--seed", "4", "--controlnet", str(dirs[0]), "--control-image", str(tmp_path / "control.png"),
            "--control-scale", "0.7", "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    want = pipe(**CALL, seed=4, control_image=str(tmp_path / "control.png"), controlnet_conditioning_scale=0.7)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), want.images[0])
    assert main([*args[:-2], "--control-scale", "0.5", "--out", str(tmp_path / "x.png")]) == 2  # two scales, one net


def test_a_pipeline_with_controlnets_keeps_one_unet(pipe, runtime_pipeline, control_images):
    """Calls without a control image run unet_control with zero residuals: the plain UNet's image, one UNet open."""
    import onnxruntime

    assert "unet" not in {s.name for s in pipe.sessions.values() if isinstance(s, onnxruntime.InferenceSession)}
    assert pipe.sessions["unet"]._inner is pipe.sessions["unet_control"]
    got, want = pipe(**CALL, seed=8).images, runtime_pipeline(**CALL, seed=8).images
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_run_batch_gives_each_controlled_call_its_own_image(pipe, control_images):
    """Calls with their own control images and scales share UNet steps, and a call without control runs apart
    (another UNet): each result equals the call alone."""
    calls = [
        dict(CALL, seed=1, control_image=control_images[0]),
        dict(CALL, seed=2, control_image=control_images[1], controlnet_conditioning_scale=0.4),
        dict(CALL, seed=3),
        dict(CALL, seed=4, control_image=control_images[0], guess_mode=True),
    ]
    batched = pipe.run_batch(calls)
    for call, result in zip(calls, batched):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result.images, pipe(**call).images)
    assert batched[0].timings.get("batch_size") == 3 and "batch_size" not in batched[2].timings


def test_sdrt_serve_takes_control_images(setup, control_images):
    pytest.importorskip("fastapi")
    from test_serve import b64, decode, png, post, serving

    artifacts, dirs, _ = setup
    pixels = np.asarray(control_images[0])
    body = dict(CALL, seed=6, control_image=b64(png(pixels)), controlnet_conditioning_scale=0.6)
    with Pipeline.load(artifacts, controlnets=dirs[:1]) as pipe, serving(pipe) as (client, _, _):
        r = post(client, body)
        assert r.status_code == 200, r.text
        want = pipe(**CALL, seed=6, control_image=Image.fromarray(pixels), controlnet_conditioning_scale=0.6).images[0]
        np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
        r = post(client, {**body, "control_image": [b64(png(pixels))] * 2})  # two images, one ControlNet: a batch
        assert r.status_code == 400 and "control_image" in r.json()["error"]["message"], r.text
        r = post(client, {**body, "control_image": "not base64!"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("control_image: expected a base64")


@pytest.mark.slow  # three engine builds (~15 s): the default suite keeps the parity cases within its time budget
def test_sdrt_engines_builds_the_controlnets_cpu_engine(setup, control_images, tmp_path):
    """`sdrt engines --controlnet DIR` puts the ControlNet's CPU engine in its own folder; the pipeline then loads it
    (and unet_control's) and gives the image of the portable graphs."""
    from sdrt.runtime.cli import main

    artifacts, dirs, _ = setup
    model, cn = tmp_path / "model", tmp_path / "cn"
    shutil.copytree(artifacts, model)
    shutil.copytree(dirs[0], cn)
    assert main(["engines", "--artifacts", str(model), "--components", "unet_control", "--controlnet", str(cn)]) == 0
    assert {p.name for p in (cn / "engines").glob("onnxruntime-cpu_*/controlnet*.onnx")} == {
        "controlnet.onnx", "controlnet_embedding.onnx"}  # fmt: skip
    call = dict(CALL, control_image=control_images[0], seed=5)
    with Pipeline.load(model, controlnets=[cn]) as fast, Pipeline.load(artifacts, controlnets=dirs[:1]) as portable:
        assert fast.controlnets[0].engine is not None and fast.sessions["unet_control"].engine is not None
        assert portable.controlnets[0].engine is None
        got, want = fast(**call).images, portable(**call).images
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


# diffusers' two processes (a torch import each) cost ~15 s: the default suite measures sdrt's own rows.
@pytest.mark.parametrize("baseline", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_bench_measures_controlnet_steps_beside_diffusers(baseline, setup, tmp_path):
    """`sdrt bench --controlnets DIR`: sdrt and diffusers each run without and with the ControlNet in the same
    rounds; the controlled rows carry the ControlNet's per-step time and the round-by-round ratio of a controlled
    step to a plain one, and the report has a ControlNet table."""
    from sdrt.benchmarks.bench import BenchConfig, run_benchmark
    from sdrt.benchmarks.report import load_rows, markdown_table

    artifacts, dirs, _ = setup
    config = BenchConfig(
        artifacts=artifacts, backends=("onnxruntime",), precisions=("fp32",), sizes=((64, 64),), steps=(2,), runs=2,
        warmups=1, threads=1, results_dir=tmp_path, matmul_size=128, matmul_budget_s=0.02, controlnets=(dirs[0],),
        baseline=baseline,
    )  # fmt: skip
    rows = run_benchmark(config, progress=lambda line: None)
    by_name = {(r["implementation"], bool(r.get("controlnet"))): r for r in rows}
    impls = ("sdrt", "diffusers") if baseline else ("sdrt",)
    assert set(by_name) == {(impl, control) for impl in impls for control in (False, True)}
    if baseline:
        assert by_name["diffusers", True]["pipeline"] == "StableDiffusionControlNetPipeline"
    for impl in impls:
        plain_name = f"{impl} without ControlNet"
        controlled, plain = by_name[impl, True], by_name[impl, False]
        assert controlled["metrics"]["controlnet_step_ms"]["n"] == 4 and "controlnet_step_ms" not in plain["metrics"]
        ratio = controlled["ratio_to"][plain_name]["step_wall"]
        assert ratio["n"] == 2 and ratio["median"] > 1  # a step with a ControlNet call costs more than one without
        assert controlled["controlnet"]["count"] == 1
        # the whole step holds the ControlNet's and the UNet's calls
        m = controlled["metrics"]
        assert m["step_wall_ms"]["median"] >= m["unet_step_ms"]["median"] + 0.9 * m["controlnet_step_ms"]["median"]
    (file,) = tmp_path.glob("*.jsonl")
    table = markdown_table(load_rows([file]))
    assert "ControlNet calls per step ms" in table and "onnxruntime · fp32 · 1 ControlNet" in table
    assert not baseline or "diffusers/PyTorch · fp32 · 1 ControlNet" in table

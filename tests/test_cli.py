"""The command line: help that explains every option, clean errors, a timed result line."""

import subprocess
import sys

import numpy as np
import pytest

from sdrt.runtime.cli import main


def sdrt(*args):
    return subprocess.run([sys.executable, "-m", "sdrt.runtime", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["generate", "export", "random-model", "engines"])
def test_help_documents_every_option(command):
    import argparse

    from sdrt.runtime.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        assert action.help, f"sdrt {command} {action.option_strings}: no help text"
    proc = sdrt(command, "--help")
    assert proc.returncode == 0 and parser.description.split()[0] in proc.stdout


def test_missing_artifacts_is_a_clean_error(tmp_path, capsys):
    code = main(["generate", "--artifacts", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sdrt generate: error: artifacts: expected" in err and "make engines" in err
    assert "Traceback" not in err


def test_generate_prints_timing_and_writes_pngs(tiny_artifacts, tmp_path, capsys):
    code = main(
        [
            "generate",
            "--artifacts",
            str(tiny_artifacts),
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--num-images",
            "2",
            "--out",
            str(tmp_path / "img.png"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img-{i}.png" for i in range(4)]
    assert "4 image(s) 64x64" in out and "2 steps in" in out


# -- the tasks: image to image, inpainting, SDXL base + refiner --------------------------------------


def _png(path, rng, mask=False):
    """A 64x64 PNG: random colours, or a mask (white square = repaint, on black)."""
    from PIL import Image

    if mask:
        pixels = np.zeros((64, 64), dtype=np.uint8)
        pixels[16:48, 16:48] = 255
    else:
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _generate(capsys, artifacts, out, *options):
    code = main(["generate", "--artifacts", str(artifacts), "--prompt", "a cat", "--out", str(out), *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _image(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image)


def test_generate_image_to_image(tiny_artifacts, tmp_path, capsys, rng):
    from sdrt.runtime import Pipeline

    init = _png(tmp_path / "init.png", rng)
    out = _generate(
        capsys, tiny_artifacts, tmp_path / "out.png", "--image", str(init), "--strength", "0.7", "--steps", "3",
        "--seed", "5",
    )  # fmt: skip
    assert "1 image(s) 64x64, image-to-image at strength 0.7, seed 5" in out  # the image's own size
    assert "image encode" in out
    with Pipeline.load(tiny_artifacts) as pipe:
        expected = pipe("a cat", image=init, strength=0.7, num_inference_steps=3, seed=5).images[0]
    np.testing.assert_array_equal(_image(tmp_path / "out.png"), expected)


# A 9-channel inpainting UNet (its export is slow-marked: tests/test_families.py), an ordinary one.
@pytest.mark.parametrize("model", [pytest.param("tiny-sd-inpaint", marks=pytest.mark.slow), "tiny"])
def test_generate_inpainting(model, family_artifacts, tmp_path, capsys, rng):
    from sdrt.runtime import Pipeline

    artifacts = family_artifacts(model)
    init, mask = _png(tmp_path / "init.png", rng), _png(tmp_path / "mask.png", rng, mask=True)
    size = ["--height", "64", "--width", "64"]  # inpainting resizes to the model's default size otherwise
    out = _generate(
        capsys, artifacts, tmp_path / "out.png", "--image", str(init), "--mask", str(mask), *size, "--steps", "2",
        "--seed", "3",
    )  # fmt: skip
    assert "1 image(s) 64x64, inpainting at strength 1, seed 3" in out
    with Pipeline.load(artifacts) as pipe:
        result = pipe("a cat", image=init, mask_image=mask, height=64, width=64, num_inference_steps=2, seed=3)
    np.testing.assert_array_equal(_image(tmp_path / "out.png"), result.images[0])


@pytest.mark.slow  # the refiner's export (~70 s) is kept out of the default suite's time budget
def test_generate_sdxl_base_and_refiner(family_artifacts, tmp_path, capsys):
    """The refiner continues from the base's latents: the CLI's image is the two Pipelines' own handoff."""
    from sdrt.runtime import Pipeline

    base, refiner = family_artifacts("tiny-sdxl"), family_artifacts("tiny-sdxl-refiner")
    out = _generate(
        capsys, base, tmp_path / "out.png", "--refiner", str(refiner), "--steps", "3", "--seed", "11",
        "--height", "64", "--width", "64",
    )  # fmt: skip
    assert "1 image(s) 64x64, text-to-image, base + refiner split at 0.8, seed 11, guidance 5, 3 steps in" in out
    assert "base: text" in out and "refiner: text" in out  # both stages' timings
    with Pipeline.load(base) as pipe:
        latents = pipe(
            "a cat", height=64, width=64, num_inference_steps=3, seed=11, denoising_end=0.8, output_type="latent"
        ).latents
    with Pipeline.load(refiner) as pipe:
        expected = pipe("a cat", image=latents, num_inference_steps=3, seed=11, denoising_start=0.8).images[0]
    np.testing.assert_array_equal(_image(tmp_path / "out.png"), expected)


# fmt: off
TASK_ERRORS = [  # (model, options, the message after "sdrt generate: error: "); {tmp}: the test's folder
    ("tiny", ["--mask", "{tmp}/m.png"], "--mask: inpainting repaints an image, expected --image PATH with --mask"),
    ("tiny", ["--image", "{tmp}/missing.png"], "--image: expected an image file, got '{tmp}/missing.png', which does"),
    ("tiny", ["--image", "{tmp}/text.png"], "image: expected a readable image file, could not read '{tmp}/text.png'"),
    ("tiny", ["--strength", "0.5"], "--strength: applies to image-to-image and inpainting, expected --image PATH"),
    ("tiny", ["--high-noise-frac", "0.7"], "--high-noise-frac: splits the schedule between a base and its refiner"),
    ("tiny", ["--refiner", "{tmp}"], "--refiner: artifacts: expected {tmp}/manifest.json"),
    ("tiny", ["--refiner", "{tmp}", "--image", "{tmp}/m.png", "--mask", "{tmp}/m.png"], "--refiner: the base hands"),
    ("tiny", ["--aesthetic-score", "7"], "--aesthetic-score: micro-conditioning of an SDXL refiner, expected such"),
    pytest.param("tiny-sdxl-refiner", [], "--artifacts: {artifacts} is an SDXL refiner, which refines an image; expected --image", marks=pytest.mark.slow),
    pytest.param("tiny-sd-inpaint", ["--image", "{tmp}/m.png"], "--artifacts: {artifacts} is an inpainting model (9-channel UNet)", marks=pytest.mark.slow),
]
# fmt: on


@pytest.mark.parametrize("model, options, message", TASK_ERRORS)
def test_generate_task_errors_are_clean(model, options, message, family_artifacts, tmp_path, capsys, rng):
    artifacts = family_artifacts(model)
    _png(tmp_path / "m.png", rng, mask=True)
    (tmp_path / "text.png").write_text("not an image")
    options = [o.format(tmp=tmp_path) for o in options]
    code = main(["generate", "--artifacts", str(artifacts), "--prompt", "x", "--steps", "2", *options])
    err = capsys.readouterr().err
    assert code == 2
    assert f"sdrt generate: error: {message.format(tmp=tmp_path, artifacts=artifacts)}" in err
    assert "Traceback" not in err


def test_generate_steps_and_guidance_default_to_the_family(tiny_artifacts, tmp_path, capsys):
    from sdrt.runtime.cli import build_parser

    args = build_parser().parse_args(["generate", "--artifacts", "a", "--prompt", "x"])
    assert args.steps is None and args.guidance_scale is None  # the Pipeline then uses the family's defaults
    out = _generate(capsys, tiny_artifacts, tmp_path / "out.png", "--steps", "2", "--height", "64", "--width", "64")
    assert "text-to-image, seed" in out and "guidance 7.5, 2 steps in" in out

"""The conditioning inputs of img2img, inpainting, LCM and SDXL against the diffusers/torch code each mirrors."""

import inspect
import textwrap
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import load_image
from PIL import Image

from sdrt.runtime import conditioning as c
from sdrt.runtime import schedulers
from sdrt.runtime.errors import InputError


def image_processor(multiple: int = 8) -> VaeImageProcessor:
    """As StableDiffusion(XL)Img2ImgPipeline builds it."""
    return VaeImageProcessor(vae_scale_factor=multiple)


def mask_processor(multiple: int = 8) -> VaeImageProcessor:
    """As StableDiffusionInpaintPipeline builds it."""
    return VaeImageProcessor(vae_scale_factor=multiple, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def same(ours: np.ndarray, reference: torch.Tensor) -> None:
    """Identical values (the operations are the same IEEE float32 ones), float32, contiguous."""
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, reference.numpy().astype(np.float32))


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (3, 45, 61, 3), dtype=np.uint8)


# ---- preprocess_image ----


@pytest.mark.parametrize("height, width", [(None, None), (40, 56), (45, 61), (70, 30), (64, None), (None, 100), (8, 8)])
def test_pil_image_matches_vae_image_processor(pixels, height, width):
    image = Image.fromarray(pixels[0])
    same(c.preprocess_image(image, height, width), image_processor().preprocess(image, height, width))


def test_pil_image_of_a_multiple_size_is_not_resampled(pixels):
    image = Image.fromarray(pixels[0, :40, :56])
    ours = c.preprocess_image(image)
    same(ours, image_processor().preprocess(image))
    np.testing.assert_array_equal(ours[0].transpose(1, 2, 0), pixels[0, :40, :56].astype(np.float32) / 255 * 2 - 1)


def test_multiple_is_the_vae_scale_factor(pixels):
    image = Image.fromarray(pixels[0])
    same(c.preprocess_image(image, multiple=16), image_processor(16).preprocess(image))
    same(c.preprocess_image(image, 50, 70, multiple=4), image_processor(4).preprocess(image, 50, 70))


def test_pil_list_is_resized_to_the_first_image_size_as_in_diffusers(pixels):
    images = [Image.fromarray(pixels[0]), Image.fromarray(pixels[1, :30, :20]), Image.fromarray(pixels[2])]
    out = c.preprocess_image(images)
    assert out.shape == (3, 3, 40, 56)
    same(out, image_processor().preprocess(images))
    same(c.preprocess_image(images, 24, 32), image_processor().preprocess(images, 24, 32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_other_pil_modes_are_converted_to_rgb_first(pixels, mode):
    image = Image.fromarray(pixels[0]).convert(mode)
    same(c.preprocess_image(image), image_processor().preprocess(image.convert("RGB")))


def test_paths_load_as_diffusers_load_image(tmp_path, pixels):
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels[0]).save(rotated, exif=exif, quality=95)
    rgba = tmp_path / "rgba.png"
    Image.fromarray(pixels[1]).convert("RGBA").save(rgba)
    for path in (rotated, rgba):
        reference = image_processor().preprocess(load_image(str(path)))
        same(c.preprocess_image(path), reference)
        same(c.preprocess_image(str(path)), reference)
    assert c.preprocess_image(rotated).shape == (1, 3, 56, 40)  # the EXIF rotation was applied
    same(
        c.preprocess_image([rotated, rgba]), image_processor().preprocess([load_image(str(p)) for p in (rotated, rgba)])
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize(
    "height, width", [(None, None), (40, 56), (64, 120), (90, 122), (24, 16), (45, 61)], ids=lambda v: str(v)
)
def test_float_arrays_match_diffusers_including_its_nearest_resize(pixels, dtype, height, width):
    array = (pixels.astype(np.float64) / 255).astype(dtype)
    reference = image_processor().preprocess(array, height, width)
    same(c.preprocess_image(array, height, width), reference)  # NHWC
    same(c.preprocess_image(list(array), height, width), reference)  # a list of HWC
    same(c.preprocess_image(array[0], height, width), reference[:1])  # HWC
    same(c.preprocess_image([array[:1], array[1:]], height, width), reference)  # a list of NHWC


def test_uint8_arrays_read_as_the_same_pixels_in_a_pil_image(pixels):
    array = pixels[:, :40, :56]
    same(c.preprocess_image(array[0]), image_processor().preprocess(Image.fromarray(array[0])))
    # resized: diffusers' NumPy path (nearest) on the pixels as floats in [0, 1]
    same(c.preprocess_image(array, 64, 72), image_processor().preprocess(array.astype(np.float32) / 255, 64, 72))


@pytest.mark.parametrize(
    "value, message",
    [
        (42, r"^image: expected a PIL image, a path .*, got a value of type int"),
        (torch.zeros(1, 3, 8, 8), r"^image: expected a PIL image, a path .*, got a value of type Tensor"),
        ([], r"^image: expected an image or a non-empty list of images, got an empty list"),
        (np.zeros((8, 8)), r"^image: expected a NumPy array of shape HWC or NHWC \(3 channels\), got a float64 array"),
        (np.zeros((1, 1, 8, 8, 3)), r"^image: expected a NumPy array of shape HWC or NHWC"),
        (np.zeros((8, 8, 4)), r"^image: expected 3 \(RGB\) channels .*got a float64 array of shape \(8, 8, 4\)"),
        (np.zeros((1, 3, 8, 8)), r"^image: expected 3 \(RGB\) channels"),
        (
            [np.zeros((8, 8, 3)), np.zeros((16, 8, 3))],
            r"^image: expected every array .* one height x width, got 8x8, 16x8",
        ),
        ([np.zeros((8, 8, 3)), np.zeros((1, 8, 8, 3))], r"^image: expected a list of all HWC or all NHWC arrays"),
        ([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))], r"^image: expected a list of all PIL images/paths or all"),
        (np.full((8, 8, 3), 1.5), r"^image: expected float values in \[0, 1\] .*got values in \[1.5, 1.5\]"),
        (np.full((8, 8, 3), -0.5), r"^image: expected float values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan), r"^image: expected finite values"),
        (np.zeros((8, 8, 3), np.int16), r"^image: expected a uint8 \(0..255\) or floating-point array, got a int16"),
        (np.zeros((8, 8, 3), bool), r"^image: expected a uint8 \(0..255\) or floating-point array, got a bool"),
        (np.zeros((7, 8, 3)), r"^image height: expected at least 8 .*got 7 \(the image's own\)"),
    ],
)
def test_bad_images_are_named(value, message):
    with pytest.raises(InputError, match=message):
        c.preprocess_image(value)


def test_bad_paths_and_sizes_are_named(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(InputError, match=r"^image: expected a readable image file, could not read '.*missing.png'"):
        c.preprocess_image(missing)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(InputError, match=r"^image: expected a readable image file, could not read '.*notes.png'"):
        c.preprocess_image(str(text))
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InputError, match=r"^image width: expected at least 8 .*got 5 \(requested\)"):
        c.preprocess_image(image, 64, 5)
    with pytest.raises(InputError, match=r"^image height: expected a positive integer or None, got 64.0"):
        c.preprocess_image(image, 64.0)
    with pytest.raises(InputError, match=r"^multiple: expected a positive integer, got 0"):
        c.preprocess_image(image, multiple=0)


# ---- preprocess_mask ----


@pytest.mark.parametrize("mode", ["L", "RGB", "1", "RGBA", "P"])
@pytest.mark.parametrize("height, width", [(40, 56), (64, 72), (45, 61), (30, 17)])
def test_pil_masks_match_the_inpaint_mask_processor(pixels, mode, height, width):
    mask = Image.fromarray(pixels[0]).convert(mode)
    ours = c.preprocess_mask(mask, height, width)
    same(ours, mask_processor().preprocess(mask, height=height, width=width))
    assert ours.shape[1] == 1 and set(np.unique(ours)) <= {0.0, 1.0}


def test_mask_paths_and_lists(tmp_path, pixels):
    path = tmp_path / "mask.png"
    Image.fromarray(pixels[0, :, :, 0]).save(path)
    same(c.preprocess_mask(path, 64, 64), mask_processor().preprocess(load_image(str(path)), height=64, width=64))
    masks = [Image.fromarray(p[:, :, 1]) for p in pixels]
    same(c.preprocess_mask(masks, 48, 40), mask_processor().preprocess(masks, height=48, width=40))


@pytest.mark.parametrize("height, width", [(40, 56), (96, 64), (45, 61), (16, 120)])
def test_numpy_masks_match_the_inpaint_mask_processor(pixels, height, width):
    gray = pixels[..., 0].astype(np.float32) / 255  # NHW
    processor = mask_processor()
    for mask in (gray[0], gray[0][..., None], gray, gray[..., None]):  # HW, HW1, NHW, NHW1
        same(c.preprocess_mask(mask, height, width), processor.preprocess(mask, height=height, width=width))
    same(c.preprocess_mask(list(gray), height, width), processor.preprocess(list(gray), height=height, width=width))
    hw1 = [g[..., None] for g in gray]
    same(c.preprocess_mask(hw1, height, width), processor.preprocess(hw1, height=height, width=width))
    # uint8 as 0..255 and bool as 0/1, as the same values in [0, 1] are read
    same(c.preprocess_mask(pixels[..., 0], height, width), processor.preprocess(gray, height=height, width=width))
    as_bool = gray > 0.3
    reference = processor.preprocess(as_bool.astype(np.float32), height=height, width=width)
    same(c.preprocess_mask(as_bool, height, width), reference)


def test_float_masks_are_binarized_at_one_half_whatever_their_range():
    mask = np.array([[-3.0, 0.4999], [0.5, 7.0]] * 4, dtype=np.float64).repeat(4, axis=1)  # 8x8
    ours = c.preprocess_mask(mask, 8, 8)
    same(ours, mask_processor().preprocess(mask, height=8, width=8))
    assert ours[0, 0, :2, 0].tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    "value, message",
    [
        (np.zeros((1, 8, 8, 3)), r"^mask_image: expected one channel in the last axis of an NHWC mask"),
        ([np.zeros((2, 8, 8))], r"^mask_image: expected list items of shape HW, HW1 or NHW1 \(a list of masks\) \(one"),
        (np.zeros((8,)), r"^mask_image: expected a NumPy array of shape HW, HW1, NHW or NHW1, got a float64 array"),
        (np.full((8, 8), np.nan), r"^mask_image: expected finite values"),
        (np.zeros((8, 8), np.int32), r"^mask_image: expected a uint8 \(0..255\), boolean or floating-point array"),
        ([np.zeros((8, 8)), np.zeros((8, 16))], r"^mask_image: expected every array .* got 8x8, 8x16"),
        ("/nonexistent/mask.png", r"^mask_image: expected a readable image file"),
    ],
)
def test_bad_masks_are_named(value, message):
    with pytest.raises(InputError, match=message):
        c.preprocess_mask(value, 8, 8)
    with pytest.raises(InputError, match=r"^mask_image height: expected a positive integer \(the image's\), got None"):
        c.preprocess_mask(np.zeros((8, 8)), None, 8)


# ---- mask_to_latent ----


def test_nearest_indices_match_torch_for_every_size_pair_up_to_96():
    for size_in in range(1, 97):
        row = torch.arange(size_in, dtype=torch.float32).view(1, 1, 1, size_in)
        for size_out in range(1, 97):
            expected = F.interpolate(row, size=(1, size_out)).view(-1).numpy()
            np.testing.assert_array_equal(c._nearest_indices(size_in, size_out), expected, f"{size_in}->{size_out}")


@pytest.mark.parametrize(
    "shape, size", [((2, 1, 512, 512), (64, 64)), ((1, 1, 768, 1000), (96, 125)), ((1, 3, 45, 61), (7, 9))]
)
def test_mask_to_latent_is_torch_nearest_interpolate(shape, size):
    mask = np.random.default_rng(1).random(shape).astype(np.float32)
    same(c.mask_to_latent(mask, *size), F.interpolate(torch.from_numpy(mask), size=size))


def test_mask_to_latent_rejects_bad_arguments():
    with pytest.raises(InputError, match=r"^mask: expected a NumPy array of shape NCHW"):
        c.mask_to_latent(np.zeros((8, 8)), 1, 1)
    with pytest.raises(InputError, match=r"^latent_width: expected a positive integer, got 0"):
        c.mask_to_latent(np.zeros((1, 1, 8, 8)), 1, 0)


# ---- guidance_scale_embedding ----


def correctly_rounded_exp(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.exp(t.numpy().astype(np.float64)).astype(np.float32))


GUIDANCE = [0.0, 0.5, 1.0, 3.5, 7.0, 14.0]


@pytest.mark.parametrize("dim", [4, 5, 31, 256, 512, 1024])
def test_guidance_embedding_matches_diffusers_given_the_same_exp(dim, monkeypatch):
    """Bit-close when diffusers' torch.exp rounds correctly too; see the next test for torch's own exp."""
    monkeypatch.setattr(torch, "exp", correctly_rounded_exp)
    for dtype in (np.float32, np.float64):
        w = np.array(GUIDANCE, dtype=dtype)
        reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim)
        ours = c.guidance_scale_embedding(w, dim)
        assert ours.dtype == np.float32 and ours.shape == (len(w), dim)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-6)
    # as the pipelines call it: torch.tensor(guidance_scale - 1).repeat(batch) is float32
    reference = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(8.5 - 1).repeat(2), embedding_dim=dim
    )
    np.testing.assert_allclose(c.guidance_scale_embedding([8.5 - 1] * 2, dim), reference.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        c.guidance_scale_embedding(np.full(2, 8.5 - 1, np.float32), dim), reference.numpy(), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("dim", [4, 256, 512, 1024])
def test_guidance_embedding_differs_from_torch_only_by_its_exp_rounding(dim):
    """torch's CPU exp (MKL) rounds ~1% of values to the other neighbour; a one-ulp frequency moves sin/cos of an
    argument up to 1000 w by at most ~1000 w * 2^-22."""
    w = np.array(GUIDANCE, dtype=np.float32)
    reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim)
    bound = 1000 * w[:, None] * 2.0**-22 + 1e-6
    assert (np.abs(c.guidance_scale_embedding(w, dim) - reference.numpy()) <= bound).all()
    if dim == 4:  # too few frequencies to hit one torch rounds differently: bit-close
        np.testing.assert_allclose(c.guidance_scale_embedding(w, dim), reference.numpy(), rtol=0, atol=1e-6)


def test_guidance_embedding_rejects_bad_arguments():
    with pytest.raises(InputError, match=r"^w: expected a 1-D array of guidance weights"):
        c.guidance_scale_embedding(np.zeros((2, 2)), 256)
    with pytest.raises(InputError, match=r"^w: expected a 1-D array"):
        c.guidance_scale_embedding(7.5, 256)
    with pytest.raises(InputError, match=r"^w: expected a numeric array"):
        c.guidance_scale_embedding(np.array(["a"]), 256)
    with pytest.raises(InputError, match=r"^embedding_dim: expected an integer >= 4, got 3"):
        c.guidance_scale_embedding([1.0], 3)


# ---- SDXL micro-conditioning ----


def fake_unet(n_ids: int, projection_dim: int = 1280, per_id: int = 256) -> SimpleNamespace:
    linear_1 = SimpleNamespace(in_features=per_id * n_ids + projection_dim)
    return SimpleNamespace(
        config=SimpleNamespace(addition_time_embed_dim=per_id), add_embedding=SimpleNamespace(linear_1=linear_1)
    )


@pytest.mark.parametrize(
    "original, crop, target",
    [
        ((1024, 1024), (0, 0), (1024, 1024)),
        ((768, 1344), (12, 40), (1024, 1024)),
        ((4096.5, 33.3), (0.1, 7), (512, 640)),
    ],
)
def test_sdxl_time_ids_match_the_pipeline(original, crop, target):
    fake = SimpleNamespace(unet=fake_unet(6))
    reference = StableDiffusionXLPipeline._get_add_time_ids(
        fake, original, crop, target, dtype=torch.float32, text_encoder_projection_dim=1280
    )
    same(c.sdxl_time_ids(original, crop, target), reference)
    same(c.sdxl_time_ids(list(original), np.array(crop), target), reference)


@pytest.mark.parametrize(
    "original, crop, score", [((1024, 1024), (0, 0), 6.0), ((832, 1216), (3, 5), 2.5), ((1, 2), (3, 4), 7.3)]
)
def test_refiner_time_ids_match_the_pipeline(original, crop, score):
    fake = SimpleNamespace(unet=fake_unet(5), config=SimpleNamespace(requires_aesthetics_score=True))
    positive, negative = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
        fake, original, crop, (1024, 1024), score, 2.5, (512, 512), (1, 1), (1024, 1024), dtype=torch.float32,
        text_encoder_projection_dim=1280,
    )  # fmt: skip
    same(c.refiner_time_ids(original, crop, score), positive)
    same(c.refiner_time_ids((512, 512), (1, 1), 2.5), negative)


@pytest.mark.parametrize(
    "args, message",
    [
        (((1024, 1024, 3), (0, 0), (1024, 1024)), r"^original_size: expected a pair of numbers"),
        (((1024, 1024), "00", (1024, 1024)), r"^crops_coords_top_left: expected a pair of numbers"),
        (((1024, 1024), (0, 0), None), r"^target_size: expected a pair of numbers"),
        (((1024, float("nan")), (0, 0), (1024, 1024)), r"^original_size: expected finite numbers, got nan"),
        (((1024, 1024), (True, 0), (1024, 1024)), r"^crops_coords_top_left: expected finite numbers, got True"),
    ],
)
def test_time_ids_arguments_are_checked(args, message):
    with pytest.raises(InputError, match=message):
        c.sdxl_time_ids(*args)
    if not message.startswith("^target_size"):
        with pytest.raises(InputError, match=message):
            c.refiner_time_ids(args[0], args[1], 6.0)


@pytest.mark.parametrize("score", ["6", None, float("inf"), False])
def test_refiner_aesthetic_score_is_checked(score):
    with pytest.raises(InputError, match=r"^aesthetic_score: expected finite numbers, got"):
        c.refiner_time_ids((1024, 1024), (0, 0), score)


# ---- denoising_end / denoising_start ----


def pipeline_snippet(method, first: str, last: str) -> str:
    """The lines of a pipeline method from the one with ``first`` up to (not including) the one with ``last``."""
    source = inspect.getsource(method)
    begin = source.rindex("\n", 0, source.index(first)) + 1
    return textwrap.dedent(source[begin : source.rindex("\n", 0, source.index(last, begin)) + 1])


BASE_END = pipeline_snippet(StableDiffusionXLPipeline.__call__, "# 8.1 Apply denoising_end", "# 9. ")
REFINER_END = pipeline_snippet(StableDiffusionXLImg2ImgPipeline.__call__, "# 9.1 Apply denoising_end", "# 9.2 ")

SDXL_EULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
)
SPLIT_SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", SDXL_EULER),
    "heun": ("HeunDiscreteScheduler", {**SDXL_EULER, "timestep_spacing": "linspace"}),
    "heun-leading": ("HeunDiscreteScheduler", SDXL_EULER),
    "dpm++2m": ("DPMSolverMultistepScheduler", {**SDXL_EULER, "use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {**SDXL_EULER, "clip_sample": False}),
    "unipc": ("UniPCMultistepScheduler", {**SDXL_EULER, "timestep_spacing": "trailing"}),
    "plms": ("PNDMScheduler", {**SDXL_EULER, "skip_prk_steps": True}),
}
FRACTIONS = [0.0005, 0.05, 0.2, 0.5, 0.75, 0.8, 0.9, 0.999]


def split_pair(name: str, steps: int):
    cls_name, config = SPLIT_SCHEDULERS[name]
    reference = getattr(diffusers, cls_name)(**config)
    reference.set_timesteps(steps)
    ours = schedulers.SCHEDULERS[cls_name]({**reference.config})
    timesteps = ours.start(steps).timesteps
    np.testing.assert_array_equal(np.asarray(timesteps, np.float32), reference.timesteps.numpy().astype(np.float32))
    return ours, reference, timesteps


@pytest.mark.parametrize("name", SPLIT_SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 25, 50])
def test_denoising_end_count_matches_the_sdxl_pipelines(name, steps):
    _, reference, timesteps = split_pair(name, steps)
    for fraction in FRACTIONS:
        ours = c.denoising_end_count(timesteps, 1000, fraction)
        base = {"self": SimpleNamespace(denoising_end=fraction, scheduler=reference), "timesteps": reference.timesteps}
        exec(BASE_END, base)
        refiner = {**base, "self": SimpleNamespace(denoising_end=fraction, denoising_start=None, scheduler=reference)}
        refiner["denoising_value_valid"] = lambda v: isinstance(v, float) and 0 < v < 1
        exec(REFINER_END, refiner)
        assert ours == base["num_inference_steps"] == refiner["num_inference_steps"], fraction


@pytest.mark.parametrize("name", SPLIT_SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 25, 50])
def test_denoising_start_begin_matches_sdxl_img2img_get_timesteps(name, steps):
    ours, reference, timesteps = split_pair(name, steps)
    for fraction in FRACTIONS:
        begin = c.denoising_start_begin(timesteps, ours.order, 1000, fraction)
        kept, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=reference), steps, 0.3, "cpu", denoising_start=fraction
        )
        assert begin == len(timesteps) - count, fraction
        if hasattr(reference, "set_begin_index"):
            assert reference.begin_index == begin
        if begin < len(timesteps):
            run = ours.start(steps, begin=begin)
            np.testing.assert_array_equal(np.asarray(run.timesteps, np.float32), kept.numpy().astype(np.float32))
        else:  # nothing below the cutoff: diffusers runs no step at all
            assert len(kept) == 0


def test_second_order_start_is_never_between_a_heun_pair():
    timesteps = schedulers.SCHEDULERS["HeunDiscreteScheduler"]({}).start(10).timesteps
    begins = {c.denoising_start_begin(timesteps, 2, 1000, f) for f in np.linspace(0.01, 0.99, 99)}
    assert all(b % 2 == 0 for b in begins) and len(begins) > 5


@pytest.mark.parametrize("fraction", [0, 1, 0.0, 1.0, -0.2, 1.5, float("nan"), True, "0.5", None])
def test_denoising_fractions_are_checked(fraction):
    with pytest.raises(InputError, match=r"^denoising_end: expected a fraction strictly between 0 and 1, got"):
        c.denoising_end_count([999, 500], 1000, fraction)
    with pytest.raises(InputError, match=r"^denoising_start: expected a fraction strictly between 0 and 1, got"):
        c.denoising_start_begin([999, 500], 1, 1000, fraction)


def test_denoising_other_arguments_are_checked():
    with pytest.raises(InputError, match=r"^timesteps: expected a non-empty 1-D array"):
        c.denoising_end_count([], 1000, 0.8)
    with pytest.raises(InputError, match=r"^num_train_timesteps: expected a positive integer, got 1000.0"):
        c.denoising_end_count([999], 1000.0, 0.8)
    with pytest.raises(InputError, match=r"^order: expected a positive integer"):
        c.denoising_start_begin([999], 0, 1000, 0.8)


def test_importing_conditioning_costs_only_numpy():
    import subprocess
    import sys

    code = (
        "import sys, sdrt.runtime.conditioning\nprint([m for m in ('PIL', 'torch', 'diffusers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == "[]"

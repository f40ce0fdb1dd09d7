"""Stable Diffusion 3 in the family registry and the exporter: the tiny SD 3 folder (MMDiT, CLIP-L/G, T5) exports
to six ONNX graphs with dynamic batch, image size and T5 token count, each equal to PyTorch at sizes it was not
traced at; its dims and VAE shift are recorded; engines' profiles cover T5's tokens; and `sdrt generate` runs the
artifacts (tests/test_sd3.py holds the runtime's images to diffusers')."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sdrt.runtime import Manifest, families
from sdrt.runtime.profiles import ShapeRanges, input_profile


@pytest.fixture(scope="module")
def sd3(family_models, family_artifacts):
    return family_models("tiny-sd3"), family_artifacts("tiny-sd3")


def test_the_sd3_family_and_its_dims_are_recorded(sd3):
    folder, artifacts = sd3
    m = Manifest.load(artifacts)
    assert m.family == "sd3" and m.model_family.denoiser == "transformer"
    assert sorted(m.components) == sorted(
        ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder"])  # fmt: skip
    d = m.model_dims
    assert (d.patch_size, d.pos_embed_max_size, d.t5_hidden, d.text_pooled) == (2, 64, 80, (32, 32))
    assert (d.pooled_dim, d.cross_attention_dim, d.latent_channels, d.latent_multiple) == (64, 80, 16, 2)
    assert d.max_latent_size == 128 and m.spatial_multiple == 16  # 8 pixels per latent, 2 latents per patch
    assert m.vae["shift_factor"] == pytest.approx(0.0609) and m.vae_scaling_factor == pytest.approx(1.5305)
    assert m.tokenizers["tokenizer_3"].max_length == 256 and m.tokenizers["tokenizer_3"].pad_token_id == 0
    for name, c in m.components.items():
        assert c.verification["psnr_db"] > 100, name  # against PyTorch at two shapes, in the export itself
    t5 = m.components["text_encoder_3"]
    assert [t.shape for t in t5.inputs] == [["batch", "t5_tokens"]]


def _session(artifacts, m, name):
    return ort.InferenceSession(str(artifacts / m.components[name].path), providers=["CPUExecutionProvider"])


def test_the_transformer_and_t5_graphs_equal_pytorch_at_untraced_sizes(sd3):
    """Traced at 2 images of 4x6 latents and 24 T5 tokens: here 3 images of 12x8 latents with 77 + 40 text tokens,
    and T5 at 40 tokens (the graphs' position crop and relative attention stay dynamic)."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    folder, artifacts = sd3
    m = Manifest.load(artifacts, verify_hashes=False)
    rng = np.random.default_rng(0)
    feed = {
        "hidden_states": rng.standard_normal((3, 16, 12, 8)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77 + 40, 80)).astype(np.float32),
        "pooled_projections": rng.standard_normal((3, 64)).astype(np.float32),
        "timestep": np.array([999.0, 500.0, 3.0], np.float32),
    }
    (got,) = _session(artifacts, m, "transformer").run(None, feed)
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=False)[0].numpy()
    assert got.shape == (3, 16, 12, 8) and np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    ids = rng.integers(0, 296, (2, 40)).astype(np.int64)
    (hidden,) = _session(artifacts, m, "text_encoder_3").run(None, {"input_ids": ids})
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_3").eval()
    with torch.no_grad():
        reference = t5(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert hidden.shape == (2, 40, 80) and np.abs(hidden - reference).max() < 1e-4


def test_engine_profiles_cover_t5_tokens_and_the_joint_text(sd3):
    _, artifacts = sd3
    m = Manifest.load(artifacts, verify_hashes=False)
    ranges = ShapeRanges()
    t5 = input_profile(m.components["text_encoder_3"], m, ranges)["input_ids"]
    assert t5 == ((1, 1), (2, 256), (8, 512))  # prompts and negative prompts in one call; T5 up to 512 tokens
    joint = input_profile(m.components["transformer"], m, ranges)["encoder_hidden_states"]
    assert joint == ((1, 78, 80), (2, 333, 80), (8, 589, 80))


def test_sdrt_generate_runs_sd3_artifacts(sd3, tmp_path):
    """The CLI end to end on SD 3 artifacts: an image, and the last line naming the family's graphs."""
    from PIL import Image

    from sdrt.runtime.cli import main

    _, artifacts = sd3
    out = tmp_path / "sd3.png"
    args = ["generate", "--artifacts", str(artifacts), "--prompt", "a cat", "--steps", "2", "--height", "64",
            "--width", "96", "--seed", "1", "--backend", "onnxruntime", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert Image.open(out).size == (96, 64)
    assert families.detect({"_class_name": "StableDiffusion3Img2ImgPipeline"}, {}).name == "sd3"

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
    assert d.transformer_layers == 2 and m.components["transformer"].inputs[-1].shape == [2]  # the skip mask
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
    session = _session(artifacts, m, "transformer")
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()
    outputs = []
    for skip in ([], [0], [1]):  # skip-layer guidance's mask: no block, the first (joint), the last (context-only)
        mask = np.isin(np.arange(2), skip).astype(np.float32)
        (got,) = session.run(None, {**feed, "skip_layers": mask})
        with torch.no_grad():
            args = {k: torch.from_numpy(v) for k, v in feed.items()}
            want = model(**args, skip_layers=skip or None, return_dict=False)[0].numpy()
        assert got.shape == (3, 16, 12, 8) and np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), skip
        outputs.append(got)
    assert np.abs(outputs[0] - outputs[1]).mean() > 1e-3 and np.abs(outputs[0] - outputs[2]).mean() > 1e-3
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


def _t5_xxl_header(path) -> int:
    """A safetensors file holding only the header of T5 v1.1 XXL's encoder (4.76 B parameters, bf16): what the
    memory estimate reads, without 9.5 GB of data. Returns the parameter count."""
    import json
    import struct

    d, ff, layers, vocab = 4096, 10240, 24, 32128
    shapes = {"shared.weight": [vocab, d], "encoder.final_layer_norm.weight": [d]}
    for i in range(layers):
        p = f"encoder.block.{i}.layer"
        shapes |= {f"{p}.0.SelfAttention.{w}.weight": [d, d] for w in "qkvo"}
        shapes |= {f"{p}.0.layer_norm.weight": [d], f"{p}.1.layer_norm.weight": [d]}
        shapes |= {f"{p}.1.DenseReluDense.wi_0.weight": [ff, d], f"{p}.1.DenseReluDense.wi_1.weight": [ff, d]}
        shapes |= {f"{p}.1.DenseReluDense.wo.weight": [d, ff]}
    shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = [32, 64]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    return sum(int(np.prod(s)) for s in shapes.values())


def test_an_export_that_cannot_fit_fails_before_loading_and_drop_t5_leaves_t5_out(sd3, tmp_path, monkeypatch):
    """A T5-XXL-sized text_encoder_3 on a 24 GiB machine: refused from the weight headers alone, naming the sizes
    and --drop-t5; with --drop-t5 the export runs without loading it, and its artifacts (no T5 graph) give the
    image the full artifacts give with T5 left closed (which tests/test_sd3.py holds to diffusers without T5)."""
    import os
    import shutil

    from sdrt.export import memory
    from sdrt.export.build import ExportOptions, export_pipeline
    from sdrt.runtime import Pipeline
    from sdrt.runtime.errors import ExportError

    folder, artifacts = sd3
    big = tmp_path / "sd3-xxl"
    shutil.copytree(folder, big, copy_function=os.link)
    (big / "text_encoder_3" / "model.safetensors").unlink()
    count = _t5_xxl_header(big / "text_encoder_3" / "model.safetensors")
    assert memory.part_parameters(big / "text_encoder_3", "model") == count > 4.7e9
    monkeypatch.setattr(memory, "available_bytes", lambda: 24 * 1024**3)
    with pytest.raises(ExportError, match=r"text_encoder_3 4\.76 B parameters \(19\.0 GB\).*--drop-t5.*fits"):
        export_pipeline(str(big), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    out = tmp_path / "no-t5"
    # no VAE encoder and no graph steps, for time: T5 is what this is about
    kept = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    export_pipeline(str(big), out, ExportOptions(drop_t5=True, verify=False, optimizations=(), components=kept))
    m = Manifest.load(out)
    assert "text_encoder_3" not in m.components and m.model_dims.t5_hidden == 80
    assert m.build["options"]["drop_t5"] is True
    call = dict(height=64, width=64, num_inference_steps=2, seed=3)
    with (
        Pipeline.load(out, backend="onnxruntime") as dropped,
        Pipeline.load(artifacts, backend="onnxruntime", components=kept) as closed,
    ):
        assert "text_encoder_3" not in dropped.sessions
        got, want = dropped("a cat", **call).images, closed("a cat", **call).images
    assert np.abs(got.astype(int) - want).max() <= 1


def test_weight_headers_count_the_parameters_pytorch_loads(sd3):
    from diffusers import SD3Transformer2DModel

    from sdrt.export import memory

    folder, _ = sd3
    model = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    # the weights and the persistent buffers (the position embeddings' table): what the file holds and loads
    assert memory.part_parameters(folder / "transformer", "diffusion_pytorch_model") == sum(
        t.numel() for t in model.state_dict().values()
    )


def test_drop_t5_and_component_lists_are_checked_against_the_family(sd3):
    from sdrt.export.build import ExportOptions
    from sdrt.runtime.errors import ExportError

    sd3_family, sd15 = families.FAMILIES["sd3"], families.FAMILIES["sd1"]
    with pytest.raises(ExportError, match="--drop-t5: the sd1 family has no T5"):
        ExportOptions(drop_t5=True).components_of(sd15)
    with pytest.raises(ExportError, match="expected no text_encoder_3 in --components as well"):
        ExportOptions(drop_t5=True, components=("text_encoder_3",)).components_of(sd3_family)
    listed = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder")
    assert ExportOptions(components=listed).components_of(sd3_family) == listed  # T5 left out by the list
    assert "text_encoder_3" not in ExportOptions(drop_t5=True).components_of(sd3_family)
    with pytest.raises(ExportError, match="text-to-image needs transformer"):
        ExportOptions(components=("text_encoder", "text_encoder_2", "vae_decoder")).components_of(sd3_family)

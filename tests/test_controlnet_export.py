"""ControlNet's graphs (issue 19, export side): the ControlNet (`sdrt export --controlnet`) and the UNet that takes
its residuals (`sdrt export --controlnet-unet`), exported with dynamic batch and size and checked against PyTorch at
another shape. Both come from conftest's ``controlnet_artifacts``, exported once per session and shared with the
runtime's parity tests; the ControlNet is the ``tiny-controlnet`` random-weight preset, whose zero-initialized
convolutions carry random weights (zero residuals would prove nothing)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from sdrt.runtime import families
from sdrt.runtime.errors import ArtifactError


# tiny-sdxl's ControlNet export (~2 min with unet_control) runs in make test-slow, with its parity test
@pytest.mark.parametrize("preset", ["tiny", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_control_graphs_are_checked_and_their_residuals_matter(preset, controlnet_artifacts, family_models):
    """Both graphs passed their check against PyTorch at two shapes; the ControlNet's residuals are non-zero and
    depend on the control image; the residual-taking UNet's output depends on them."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from sdrt.runtime.controlnet import ControlNetManifest
    from sdrt.runtime.manifest import Manifest

    artifacts, folder, out = controlnet_artifacts(preset)
    model = Manifest.load(artifacts)
    cn = ControlNetManifest.load(out)
    dims = model.model_dims
    checks = [g.verification for g in cn.graphs] + [model.components["unet_control"].verification]
    assert [g.name for g in cn.graphs] == ["controlnet_embedding", "controlnet"]
    for check in checks:
        assert check["passed"] and len({str(c["input_shapes"]) for c in check["checks"]}) >= 2, check
    assert cn.family == model.family and [t.name for t in cn.component.outputs] == [
        t.name for t in families.control_residual_specs(dims)
    ]
    controlnet = ControlNetModel.from_pretrained(folder).eval()
    specs = families.control_specs(dims)
    m = dims.latent_multiple
    feed = specs["controlnet_embedding"].sample(families.sizes(dims, 1, m, 2 * m), np.random.default_rng(0))
    feed |= specs["controlnet"].sample(families.sizes(dims, 1, m, 2 * m), np.random.default_rng(0), dims.vocab_size)
    feed.pop("controlnet_features")
    args = {k: torch.from_numpy(v) for k, v in feed.items() if k not in ("text_embeds", "time_ids")}
    if "text_embeds" in feed:
        args["added_cond_kwargs"] = {k: torch.from_numpy(feed[k]) for k in ("text_embeds", "time_ids")}
    with torch.no_grad():
        down, mid = controlnet(**args, return_dict=False)
        other_down, _ = controlnet(**{**args, "controlnet_cond": 1 - args["controlnet_cond"]}, return_dict=False)
        assert all(r.abs().max() > 0 for r in (*down, mid))
        assert max(float((a - b).abs().max()) for a, b in zip(down, other_down)) > 1e-3  # the image matters
        unet = UNet2DConditionModel.from_pretrained(family_models(preset) / "unet").eval()
        plain = unet(args["sample"], args["timestep"], args["encoder_hidden_states"],
                     added_cond_kwargs=args.get("added_cond_kwargs"), return_dict=False)[0]  # fmt: skip
        steered = unet(args["sample"], args["timestep"], args["encoder_hidden_states"],
                       added_cond_kwargs=args.get("added_cond_kwargs"), down_block_additional_residuals=down,
                       mid_block_additional_residual=mid, return_dict=False)[0]  # fmt: skip
    assert (steered - plain).abs().max() > 1e-3


def test_sdrt_export_controlnet_writes_a_checked_directory_that_fits_its_model(controlnet_artifacts, tmp_path):
    from sdrt.runtime.cli import main
    from sdrt.runtime.controlnet import ControlNetManifest
    from sdrt.runtime.manifest import Manifest

    artifacts, folder, exported = controlnet_artifacts("tiny")
    out = tmp_path / "controlnet"
    shutil.copytree(exported, out)
    cn = ControlNetManifest.load(out)  # sizes and sha256 of every file
    assert cn.family == "sd1" and cn.component.verification["max_abs_error"] < 1e-4
    model = Manifest.load(artifacts)
    cn.check_fits(model)
    with pytest.raises(ArtifactError, match="family 'sdxl', got one for 'sd1'"):
        cn.check_fits(dataclasses.replace(model, family="sdxl"))
    wider = dataclasses.replace(model, dims={**model.dims, "unet_block_channels": [320, 640, 1280, 1280]})
    with pytest.raises(
        ArtifactError,
        match=r"unet_block_channels of the model is \[320, 640, 1280, 1280\], of the ControlNet \[32, 64\]",
    ):
        cn.check_fits(wider)
    data = (out / "onnx" / "controlnet.onnx").read_bytes()
    (out / "onnx" / "controlnet.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(ArtifactError, match="sha256"):
        ControlNetManifest.load(out)
    config = json.loads((folder / "config.json").read_text())
    assert main(["export", "--controlnet", str(folder), "--model", "x", "--out", str(out)]) != 0
    assert config["_class_name"] == "ControlNetModel"

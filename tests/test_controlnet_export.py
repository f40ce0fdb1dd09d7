"""ControlNet's graphs (issue 19, export side): the ControlNet and the UNet that takes its residuals, exported with
dynamic batch and size and checked against PyTorch at another shape. The ControlNet is diffusers' from_unet of the
tiny model, its zero-initialized output convolutions given weights (zero residuals would prove nothing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrt.runtime import families


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from diffusers import ControlNetModel

    from sdrt.export.modules import load_pipeline

    pipe = load_pipeline(tiny_model)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            block.weight.copy_(torch.randn(block.weight.shape, generator=g) * 0.1)
    return pipe, controlnet


# Each export costs 10-20 s: the ControlNet's is checked through `sdrt export --controlnet` below; these stay slow
# until the runtime's parity tests share one export of each.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["controlnet", "unet_control"])
def test_control_graphs_export_and_match_pytorch(name, loaded, tmp_path):
    from sdrt.export.modules import control_module
    from sdrt.export.onnx_export import export_onnx, verify_onnx

    pipe, controlnet = loaded
    dims = pipe.dims
    spec = families.control_specs(dims)[name]
    module = control_module(spec, controlnet if name == "controlnet" else pipe.unet)
    rng, m = np.random.default_rng(0), dims.latent_multiple
    trace = spec.sample(families.sizes(dims, batch=2, latent_height=2 * m, latent_width=3 * m), rng, dims.vocab_size)
    other = spec.sample(families.sizes(dims, batch=1, latent_height=3 * m, latent_width=2 * m), rng, dims.vocab_size)
    path = tmp_path / f"{name}.onnx"
    export_onnx(spec, module, trace, path, 18)
    report = verify_onnx(spec, module, path, [trace, other])
    assert report["max_abs_error"] < 1e-4
    with torch.no_grad():  # the graph's outputs depend on every residual input / give non-zero residuals
        outs = module(*(torch.from_numpy(other[t.name]) for t in spec.inputs))
    if name == "controlnet":
        assert len(outs) == len(families.control_residual_specs(dims)) and all(o.abs().max() > 0 for o in outs)
    else:
        plain = pipe.unet(*(torch.from_numpy(other[n]) for n in ("sample", "timestep", "encoder_hidden_states")),
                          return_dict=False)[0]  # fmt: skip
        assert (outs - plain).abs().max() > 1e-3


def test_sdrt_export_controlnet_writes_a_checked_directory_that_fits_its_model(loaded, tiny_artifacts, tmp_path):
    import dataclasses
    import json

    from sdrt.runtime.cli import main
    from sdrt.runtime.controlnet import ControlNetManifest
    from sdrt.runtime.errors import ArtifactError
    from sdrt.runtime.manifest import Manifest

    _, controlnet = loaded
    folder, out = tmp_path / "controlnet-folder", tmp_path / "controlnet"
    controlnet.save_pretrained(folder)
    assert main(["export", "--controlnet", str(folder), "--base", str(tiny_artifacts), "--out", str(out)]) == 0
    cn = ControlNetManifest.load(out)  # sizes and sha256 of every file
    assert cn.family == "sd1" and cn.component.verification["max_abs_error"] < 1e-4
    assert [t.name for t in cn.component.outputs] == [t.name for t in families.control_residual_specs(
        Manifest.load(tiny_artifacts).model_dims)]  # fmt: skip
    model = Manifest.load(tiny_artifacts)
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

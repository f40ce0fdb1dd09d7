"""The LoRA reader without a model: the safetensors format, the key formats, the update's arithmetic."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from sdrt.runtime import lora


def _write(path, tensors, metadata=None):
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_reader_matches_safetensors_for_each_dtype_including_bf16(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(2, 4, 1, 1, generator=g).half(),
        "c": torch.randn(7, generator=g).bfloat16(),
        "d": torch.randn(2, 2, generator=g).double(),
    }
    save_torch(tensors, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    got, metadata = lora.read_safetensors(tmp_path / "x.safetensors")
    assert metadata == {"k": "v"}
    for key, value in tensors.items():
        want = value.float().numpy() if value.dtype in (torch.bfloat16, torch.float64) else value.numpy()
        np.testing.assert_array_equal(got[key], want)
        assert got[key].dtype == want.dtype


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:6], "expected a safetensors file"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length"),
        (lambda b: struct.pack("<Q", 4) + b"[1] " + b[12:], "JSON object"),
        (lambda b: b[: len(b) - 8], "damaged file"),
    ],
)
def test_damaged_files_are_refused_with_the_reason(tmp_path, mutate, message):
    path = _write(tmp_path / "x.safetensors", {"unet.a.lora_A.weight": np.ones((2, 3), np.float32)})
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(lora.LoraError, match=message):
        lora.read_safetensors(path)


def _peft(tmp_path, rank=2, alpha=None, metadata=None, name="p.safetensors"):
    rng = np.random.default_rng(0)
    tensors = {
        "unet.down.attn.to_q.lora_A.weight": rng.normal(size=(rank, 6)).astype(np.float32),
        "unet.down.attn.to_q.lora_B.weight": rng.normal(size=(4, rank)).astype(np.float32),
        "unet.conv1.lora_A.weight": rng.normal(size=(rank, 3, 3, 3)).astype(np.float32),
        "unet.conv1.lora_B.weight": rng.normal(size=(5, rank, 1, 1)).astype(np.float32),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": rng.normal(size=(rank, 8)).astype(
            np.float32
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": rng.normal(size=(8, rank)).astype(
            np.float32
        ),
    }
    if alpha is not None:
        tensors["unet.down.attn.to_q.alpha"] = np.array(alpha, np.float32)
    return _write(tmp_path / name, tensors, metadata), tensors


def test_layer_update_equals_the_lora_forward_pass_of_torch(tmp_path):
    """The merged weight's output equals base(x) + scale * alpha / r * B(A(x)), for Linear and a 3x3 conv."""
    path, t = _peft(tmp_path, rank=2, alpha=6.0)
    f = lora.load_file(path)
    layers = f.layers["unet"]
    assert f.format == "diffusers" and layers["down.attn.to_q"].alpha == 6.0 and layers["conv1"].alpha is None
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(6, 4)
    a, b = (
        torch.from_numpy(t["unet.down.attn.to_q.lora_A.weight"]),
        torch.from_numpy(t["unet.down.attn.to_q.lora_B.weight"]),
    )
    x = torch.randn(3, 6, generator=g)
    want = linear(x) + 0.7 * (6.0 / 2) * (x @ a.T @ b.T)
    merged = torch.nn.Linear(6, 4)
    merged.load_state_dict(linear.state_dict())
    with torch.no_grad():
        merged.weight += 0.7 * torch.from_numpy(layers["down.attn.to_q"].delta())
    torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)

    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    down = torch.nn.Conv2d(3, 2, 3, padding=1, bias=False)
    up = torch.nn.Conv2d(2, 5, 1, bias=False)
    down.weight.data = torch.from_numpy(t["unet.conv1.lora_A.weight"])
    up.weight.data = torch.from_numpy(t["unet.conv1.lora_B.weight"])
    img = torch.randn(1, 3, 8, 8, generator=g)
    with torch.no_grad():
        want = conv(img) + up(down(img))
        merged = torch.nn.Conv2d(3, 5, 3, padding=1)
        merged.load_state_dict(conv.state_dict())
        merged.weight += torch.from_numpy(layers["conv1"].delta())
        torch.testing.assert_close(merged(img), want, rtol=1e-4, atol=1e-4)


def test_alpha_from_diffusers_metadata_and_its_pattern(tmp_path):
    meta = {"unet.lora_alpha": 8, "unet.r": 2, "unet.alpha_pattern": {"conv1": 1}, "text_encoder.lora_alpha": 4}
    path, _ = _peft(tmp_path, metadata={"lora_adapter_metadata": json.dumps(meta)})
    f = lora.load_file(path)
    assert f.layers["unet"]["down.attn.to_q"].factor == 4.0  # 8 / 2
    assert f.layers["unet"]["conv1"].factor == 0.5  # the pattern's 1 / 2
    assert f.layers["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"].factor == 2.0


def test_kohya_keys_map_to_module_names_and_their_alpha(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": rng.normal(size=(2, 6)).astype(np.float32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": rng.normal(size=(4, 2)).astype(np.float32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": np.array(1.0, np.float32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": rng.normal(size=(2, 8)).astype(
            np.float32
        ),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": rng.normal(size=(8, 2)).astype(
            np.float32
        ),
    }
    f = lora.load_file(_write(tmp_path / "k.safetensors", tensors))
    assert f.format == "kohya"
    targets = {
        "unet": {"down_blocks.0.attentions.0.proj_in": lora.Target("w1", (4, 6, 1, 1), "same")},
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": lora.Target("w2", (8, 8), "transposed")},
    }
    resolved = lora.resolve(f, targets)
    assert resolved["unet"]["down_blocks.0.attentions.0.proj_in"].factor == 0.5
    assert resolved["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"].factor == 1.0
    # The merge puts a linear LoRA on a 1x1 conv into its (out, in, 1, 1) shape, and transposes where the graph does.
    bases = {"w1": np.zeros((4, 6, 1, 1), np.float32), "w2": np.ones((8, 8), np.float16)}
    merged = {}
    for component, layers in resolved.items():
        merged.update(lora.merged_weights(bases, targets[component], [(layers, 2.0)]))
    layer = resolved["text_encoder"]["text_model.encoder.layers.0.self_attn.q_proj"]
    np.testing.assert_allclose(merged["w2"], (1 + 2 * layer.delta().T).astype(np.float16))
    assert merged["w2"].dtype == np.float16 and merged["w1"].shape == (4, 6, 1, 1)


def test_mismatches_are_named(tmp_path):
    path, _ = _peft(tmp_path)
    f = lora.load_file(path)
    targets = {
        "unet": {"down.attn.to_q": lora.Target("a", (4, 6), "same"), "conv1": lora.Target("b", (5, 3, 3, 3), "same")},
        "text_encoder": {"text_model.encoder.layers.0.self_attn.q_proj": lora.Target("c", (8, 8), "same")},
    }
    lora.resolve(f, targets)  # fits
    wrong = {**targets, "unet": {**targets["unet"], "down.attn.to_q": lora.Target("a", (4, 7), "same")}}
    with pytest.raises(lora.LoraError, match=r"module 'down.attn.to_q' \(unet\) has weight shape \[4, 7\].*\[4, 6\]"):
        lora.resolve(f, wrong)
    missing = {**targets, "unet": {"down.attn.to_q": targets["unet"]["down.attn.to_q"]}}
    with pytest.raises(lora.LoraError, match=r"1 of its 2 unet modules match no layer.*'conv1'"):
        lora.resolve(f, missing)
    with pytest.raises(lora.LoraError, match="no adaptable text_encoder"):
        lora.resolve(f, {"unet": targets["unet"]})


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"unet.a.lora_A.weight": np.full((2, 3), np.nan, np.float32), "unet.a.lora_B.weight": np.ones((3, 2), np.float32)},
         "finite values in the down factor, got 6 NaN"),
        ({"unet.a.lora_A.weight": np.ones((2, 3), np.float32)}, "both factors"),
        ({"unet.a.lora_A.weight": np.ones((2, 3), np.float32), "unet.a.lora_B.weight": np.ones((3, 4), np.float32)},
         "to match down"),
        ({"unet.a.hada_w1_a": np.ones((2, 3), np.float32)}, "LoHa"),
        ({"model.diffusion_model.x.weight": np.ones((2, 3), np.float32)}, "other keys"),
        ({"unet.a.lora_A.weight": np.ones((2, 3), np.float32), "unet.a.lora_B.weight": np.ones((3, 2), np.float32),
          "unet.a.alpha": np.array(np.inf, np.float32)}, "alpha to be one finite number"),
    ],
)  # fmt: skip
def test_bad_tensors_are_refused(tmp_path, tensors, message):
    with pytest.raises(lora.LoraError, match=message):
        lora.load_file(_write(tmp_path / "x.safetensors", tensors))


def test_pickles_and_missing_files_are_refused(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "x.safetensors")  # a pickle under a safetensors name
    with pytest.raises(lora.LoraError, match="got a pickle"):
        lora.load_file(tmp_path / "x.safetensors")
    (tmp_path / "y.ckpt").write_bytes(b"anything")
    with pytest.raises(lora.LoraError, match="pickles can run code"):
        lora.load_file(tmp_path / "y.ckpt")
    with pytest.raises(lora.LoraError, match="no such file"):
        lora.load_file(tmp_path / "absent.safetensors")


def test_call_arguments_are_checked(tmp_path):
    path, _ = _peft(tmp_path)
    registry = lora.Registry(lora.LoraLimits(max_adapters=2))
    registry.register("style", path)
    one = registry.adapter_set([("style", 0.5)])
    assert (
        one.key
        == registry.adapter_set([(str(path), 0.5)]).key
        == registry.adapter_set([{"name": "style", "scale": 0.5}]).key
    )
    assert registry.adapter_set([]).key == () and registry.adapter_set(None) is lora.BASE
    for loras, message in [
        ("style", "expected a list"),
        ([("style", float("nan"))], "finite number"),
        ([("style", "1")], "expected a number"),
        ([("style", 1.0), (str(path), 1.0)], "same file"),
        ([("style", 1.0)] * 3, "at most 2 adapters"),
        ([("style",)], "pair"),
    ]:
        with pytest.raises(lora.LoraError, match=message):
            registry.adapter_set(loras)
    with pytest.raises(lora.LoraError, match=r"registered adapters \(style\), got '/etc/passwd'"):
        registry.adapter_set([("/etc/passwd", 1.0)], allow_paths=False)


def test_cli_argument():
    assert lora.parse_cli_arg("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert lora.parse_cli_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert lora.parse_cli_arg("c:/x") == ("c:/x", 1.0)
    with pytest.raises(lora.LoraError, match="finite scale"):
        lora.parse_cli_arg("x.safetensors:inf")

"""The embedded random-weight model: deterministic, and in the classic SD folder layout that every tool reads."""

import json

import numpy as np
import torch
from safetensors import safe_open

from sdrt.export.random_model import MARKER, build_pipeline, is_current


def test_text_encoder_has_the_classic_key_layout_and_loads_without_missing_keys(tiny_model):
    from transformers import CLIPTextModel

    with safe_open(tiny_model / "text_encoder" / "model.safetensors", "np") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    model, info = CLIPTextModel.from_pretrained(tiny_model / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # The weights on disk are the ones the seeded recipe draws.
    reference = build_pipeline("tiny")["text_encoder"]
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        got = model(ids).last_hidden_state.numpy()
        want = reference(ids).last_hidden_state.numpy()
    np.testing.assert_array_equal(got, want)


def test_marker_records_the_recipe(tiny_model):
    marker = json.loads((tiny_model / MARKER).read_text())
    assert marker["preset"] == "tiny" and is_current(tiny_model, "tiny", marker["seed"])
    assert not is_current(tiny_model, "sd15", marker["seed"])
    assert not is_current(tiny_model, "tiny", marker["seed"] + 1)

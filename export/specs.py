"""Component specs: for each exported component, one declaration of its tensors and how to feed it.

Everything shape-related is derived from these declarations: the ONNX dynamic axes, the
manifest's input/output specs, the sample inputs used for tracing and verification (and, later,
TensorRT optimization profiles). Symbolic dimensions are named once here:

    batch                         images in a call (the UNet sees the doubled CFG batch)
    latent_height, latent_width   latent cells = pixels / vae_scale_factor
    image_height, image_width     pixels
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from sdrt.runtime.manifest import TensorSpec

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


@dataclass(frozen=True)
class ModelDims:
    """The few numbers of a loaded pipeline that decide every tensor shape."""

    text_length: int
    text_hidden: int
    vocab_size: int
    latent_channels: int
    vae_scale_factor: int
    unet_levels: int  # number of UNet down blocks; latents must divide by 2**(levels - 1)
    cross_attention_dim: int

    @property
    def latent_multiple(self) -> int:
        return 2 ** (self.unet_levels - 1)

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * self.latent_multiple


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: Callable[[dict[str, int], np.random.Generator], dict[str, np.ndarray]]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }


def sizes(dims: ModelDims, batch: int, latent_height: int, latent_width: int) -> dict[str, int]:
    """Values for every symbolic dimension, from a batch and a latent size."""
    f = dims.vae_scale_factor
    return {
        "batch": batch,
        "latent_height": latent_height,
        "latent_width": latent_width,
        "image_height": latent_height * f,
        "image_width": latent_width * f,
    }


def random_inputs(specs: tuple[TensorSpec, ...], values: dict[str, int], rng: np.random.Generator, high: int = 0):
    feed = {}
    for t in specs:
        shape = tuple(values[d] if isinstance(d, str) else d for d in t.shape)
        if t.dtype.startswith("int"):
            feed[t.name] = rng.integers(0, high, size=shape, dtype=t.dtype)
        else:
            feed[t.name] = rng.standard_normal(shape).astype(t.dtype)
    return feed


def component_specs(dims: ModelDims) -> dict[str, ComponentSpec]:
    c, n, h = dims.latent_channels, dims.text_length, dims.text_hidden
    latent = ["batch", c, "latent_height", "latent_width"]
    image = ["batch", 3, "image_height", "image_width"]

    text_inputs = (TensorSpec("input_ids", "int64", ["batch", n]),)
    unet_inputs = (
        TensorSpec("sample", "float32", latent),
        TensorSpec("timestep", "float32", ["batch"]),
        TensorSpec("encoder_hidden_states", "float32", ["batch", n, dims.cross_attention_dim]),
    )

    def unet_sample(values, rng):
        feed = random_inputs(unet_inputs, values, rng)
        feed["timestep"] = rng.uniform(0, 999, size=feed["timestep"].shape).astype(np.float32)
        return feed

    decoder_inputs = (TensorSpec("latent", "float32", latent),)
    encoder_inputs = (TensorSpec("image", "float32", image),)
    return {
        "text_encoder": ComponentSpec(
            "text_encoder",
            text_inputs,
            (
                TensorSpec("last_hidden_state", "float32", ["batch", n, h]),
                TensorSpec("pooler_output", "float32", ["batch", h]),
            ),
            lambda values, rng: random_inputs(text_inputs, values, rng, high=dims.vocab_size),
        ),
        "unet": ComponentSpec("unet", unet_inputs, (TensorSpec("out_sample", "float32", latent),), unet_sample),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            decoder_inputs,
            (TensorSpec("image", "float32", image),),
            lambda values, rng: random_inputs(decoder_inputs, values, rng),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            encoder_inputs,
            (TensorSpec("latent_parameters", "float32", ["batch", 2 * c, "latent_height", "latent_width"]),),
            lambda values, rng: random_inputs(encoder_inputs, values, rng),
        ),
    }

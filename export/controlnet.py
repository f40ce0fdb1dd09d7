"""``sdrt export --controlnet FOLDER --out DIR``: a diffusers ControlNetModel folder to its own artifact directory.

The layout it fits is read from its config (the same numbers the model's manifest records: block channels,
layers per block, cross-attention width, latent channels; the VAE's scale factor from the conditioning
embedding's downsampling; SDXL's pooled text width from its added-conditioning projection), so a ControlNet
exports without its model. With ``base=``, the model's artifacts are checked against it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from sdrt.export import graph
from sdrt.export.atomic import atomic_directory
from sdrt.export.modules import check_weights, control_module
from sdrt.export.onnx_export import DEFAULT_OPSET, export_onnx, reference_outputs, verify_onnx
from sdrt.runtime.controlnet import ControlNetManifest, check_fits, fit_dims
from sdrt.runtime.errors import ExportError
from sdrt.runtime.families import ModelDims, control_specs, sizes
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import Component, FileRecord, Manifest

log = logging.getLogger(__name__)

SDXL_TIME_IDS = 6  # original size, crop corner, target size: what SDXL ControlNets are trained with
TEXT_LENGTH = 77


def controlnet_dims(config: dict, where: str) -> tuple[str, ModelDims, int]:
    """(family, dims, conditioning channels) of a ControlNetModel config."""
    try:
        channels = tuple(int(c) for c in config["block_out_channels"])
        layers = config["layers_per_block"]
        cross = int(config["cross_attention_dim"])
        embedding = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        addition = config.get("addition_embed_type")
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{where}: expected a diffusers ControlNetModel config, got one without {e}") from None
    if not isinstance(layers, int):
        raise ExportError(f"{where}: expected one layers_per_block for every block, got {layers!r}")
    pooled = time_ids = 0
    if addition == "text_time":
        time_ids = SDXL_TIME_IDS
        pooled = int(config["projection_class_embeddings_input_dim"]) - time_ids * int(
            config["addition_time_embed_dim"]
        )
        family = "sdxl"
    elif addition is None:
        family = "sd2" if cross == 1024 else "sd1"
    else:
        raise ExportError(
            f"{where}: expected addition_embed_type None (SD 1.x/2.x) or 'text_time' (SDXL), got {addition!r}"
        )
    dims = ModelDims(
        text_length=TEXT_LENGTH,
        text_hidden=(cross,),
        vocab_size=49408,
        latent_channels=int(config.get("in_channels", 4)),
        unet_in_channels=int(config.get("in_channels", 4)),
        vae_scale_factor=2 ** (len(embedding) - 1),
        unet_levels=len(channels),
        cross_attention_dim=cross,
        pooled_dim=pooled,
        time_ids=time_ids,
        unet_block_channels=channels,
        unet_layers_per_block=layers,
    )
    return family, dims, int(config.get("conditioning_channels", 3))


def export_controlnet(
    folder: str | Path,
    out_dir: str | Path,
    base: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    allow_pickle: bool = False,
) -> ControlNetManifest:
    """Export the ControlNetModel in ``folder`` to ``out_dir`` (replaced atomically); check it against PyTorch."""
    started = time.perf_counter()
    folder, out_dir = Path(folder), Path(out_dir)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"controlnet: expected a diffusers ControlNetModel folder with config.json, got {folder}")
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != "ControlNetModel":
        raise ExportError(f"{config_path}: expected _class_name 'ControlNetModel', got {config.get('_class_name')!r}")
    family, dims, conditioning = controlnet_dims(config, str(config_path))
    if conditioning != 3:
        raise ExportError(
            f"{config_path}: expected a 3-channel control image (conditioning_channels 3), got {conditioning}"
        )
    if base is not None:
        check_fits(family, fit_dims(dims), Manifest.load(base, verify_hashes=False), f"controlnet {folder} on {base}")
    check_weights(folder, "diffusion_pytorch_model", "controlnet", allow_pickle)
    import torch
    from diffusers import ControlNetModel

    model = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=not allow_pickle or None)
    specs = control_specs(dims)
    rng, m = np.random.default_rng(0), dims.latent_multiple
    with atomic_directory(out_dir) as tmp:
        # the conditioning embedding (once per call) and the rest (every step): two graphs
        components = {
            name: _export_graph(specs[name], control_module(specs[name], model), dims, rng, m, tmp, opset, verify)
            for name in ("controlnet_embedding", "controlnet")
        }
        fingerprint = hashlib.sha256()
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            fingerprint.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        from sdrt.export.build import tool_versions

        versions = tool_versions()
        manifest = ControlNetManifest(
            sdrt_version=versions["sdrt"],
            source={"path": str(folder), "fingerprint": fingerprint.hexdigest()},
            family=family,
            dims=fit_dims(dims),
            conditioning_channels=conditioning,
            component=components["controlnet"],
            embedding=components["controlnet_embedding"],
            build={"versions": versions, "seconds": time.perf_counter() - started},
        )
        manifest.save(tmp)
    log.info("wrote %s in %.1f s", out_dir, time.perf_counter() - started)
    return manifest


def _export_graph(spec, module, dims: ModelDims, rng, m: int, root: Path, opset: int, verify: bool) -> Component:
    """One of the ControlNet's graphs: exported at one shape, checked against PyTorch at that and another."""

    def feed(batch: int, lh: int, lw: int) -> dict[str, np.ndarray]:
        x = spec.sample(sizes(dims, batch=batch, latent_height=lh, latent_width=lw), rng, dims.vocab_size)
        if "controlnet_cond" in x:  # an image in [0, 1]
            x["controlnet_cond"] = rng.uniform(0, 1, x["controlnet_cond"].shape).astype(np.float32)
        return x

    path = root / "onnx" / f"{spec.name}.onnx"
    t0 = time.perf_counter()
    log.info("%s (%d outputs): exporting to ONNX (opset %d)", spec.name, len(spec.outputs), opset)
    trace = feed(2, 2 * m, 3 * m)
    export_onnx(spec, module, trace, path, opset)
    steps = [{"step": "export", "seconds": time.perf_counter() - t0}, graph.slim(path)]
    verification = {}
    if verify:
        feeds = [trace, feed(1, 3 * m, 2 * m)]
        verification = verify_onnx(spec, reference_outputs(spec, module, feeds), path, feeds)
        log.info("    verify: max abs error %.2e, PSNR %.1f dB", verification["max_abs_error"], verification["psnr_db"])
    return Component(
        name=spec.name,
        files=[FileRecord.of(root, f) for f in graph.graph_files(path)],
        opset=opset,
        precision="fp32",
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        verification=verification,
        optimization={"steps": steps},
    )

"""ONNX folders written by other tools, read as sdrt artifacts.

``optimum-cli export onnx --task text-to-image`` writes ``text_encoder/model.onnx``,
``unet/model.onnx``, ``vae_decoder/model.onnx``, ``vae_encoder/model.onnx`` beside each part's
``config.json``, the tokenizer (``vocab.json`` + ``merges.txt``) and the scheduler config. Its graphs
compute what ours do with other tensor names (``latent_sample`` -> ``sample`` for the VAE decoder)
and a scalar ``timestep``. This module describes such a folder as a :class:`Manifest` whose
components carry the name mapping, so the pipeline and the sessions run it unchanged.

Such a folder has no hashes to check against; its files are checked for presence and size only,
and, as every artifact directory's, for external data outside the folder (before any backend opens
a graph). The graphs are read with :mod:`sdrt.runtime.onnx_proto`: the runtime does not need ``onnx``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdrt.runtime import families, onnx_proto
from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.hashing import sha256_file
from sdrt.runtime.manifest import MANIFEST_NAME, Component, FileRecord, Manifest, TokenizerInfo, check_external_data

OPTIMUM_FILES = {
    "text_encoder": "text_encoder/model.onnx",
    "unet": "unet/model.onnx",
    "vae_decoder": "vae_decoder/model.onnx",
    "vae_encoder": "vae_encoder/model.onnx",
}
# Our tensor name -> optimum's, per component (optimum/exporters/onnx/model_configs.py).
OPTIMUM_NAMES = {
    "text_encoder": {
        "input_ids": "input_ids",
        "last_hidden_state": "last_hidden_state",
        "pooler_output": "pooler_output",
    },
    "unet": {
        "sample": "sample",
        "timestep": "timestep",
        "encoder_hidden_states": "encoder_hidden_states",
        "timestep_cond": "timestep_cond",
        "out_sample": "out_sample",
    },
    "vae_decoder": {"latent": "latent_sample", "image": "sample"},
    "vae_encoder": {"image": "sample", "latent_parameters": "latent_parameters"},
}


def is_optimum_folder(root: Path) -> bool:
    root = Path(root)
    return not (root / MANIFEST_NAME).exists() and (root / OPTIMUM_FILES["unet"]).is_file()


def _config(root: Path, part: str) -> dict:
    path = root / part / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: expected the part's config.json (optimum writes one per part), got {e}") from e


def optimum_manifest(root: Path) -> Manifest:
    """A manifest describing an optimum ONNX export folder, with each graph's tensors checked by name."""
    root = Path(root)
    missing = [f for name, f in OPTIMUM_FILES.items() if name != "vae_encoder" and not (root / f).is_file()]
    if missing:
        raise ArtifactError(f"{root}: expected an optimum ONNX export with {', '.join(missing)}; not found")
    unet, vae, text = _config(root, "unet"), _config(root, "vae_decoder"), _config(root, "text_encoder")
    scheduler = root / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        raise ArtifactError(f"{root}: expected scheduler/scheduler_config.json, found none")
    vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
    tok_config = root / "tokenizer" / "tokenizer_config.json"
    text_length = int(text.get("max_position_embeddings", 77))
    if tok_config.is_file():
        text_length = min(text_length, int(json.loads(tok_config.read_text()).get("model_max_length", text_length)))
    if unet.get("addition_embed_type") == "text_time" or (root / "text_encoder_2").exists():
        raise ArtifactError(
            f"{root}: an optimum export of an SDXL model; sdrt reads optimum folders of SD 1.x/2.x "
            "(export SDXL with `sdrt export` instead)"
        )
    family = families.FAMILIES["sd2" if int(unet["cross_attention_dim"]) == 1024 else "sd1"]
    dims = families.ModelDims(
        text_length=text_length,
        text_hidden=(int(text["hidden_size"]),),
        vocab_size=int(text.get("vocab_size", 49408)),
        latent_channels=int(vae.get("latent_channels", unet["out_channels"])),
        unet_in_channels=int(unet["in_channels"]),
        vae_scale_factor=vae_scale,
        unet_levels=len(unet["block_out_channels"]),
        cross_attention_dim=int(unet["cross_attention_dim"]),
        time_cond_dim=int(unet.get("time_cond_proj_dim") or 0),
        sample_size=int(unet["sample_size"]),
    )
    specs = family.specs(dims)
    components = {}
    for name, rel in OPTIMUM_FILES.items():
        path = root / rel
        if not path.is_file():
            continue
        model = check_external_data(path, root)
        graph_tensors = {v.name: v for v in (*model.inputs, *model.outputs)}
        ours = {t.name for t in (*specs[name].inputs, *specs[name].outputs)}
        names = {k: v for k, v in OPTIMUM_NAMES[name].items() if k in ours}
        absent = sorted(set(names.values()) - set(graph_tensors))
        if absent:
            raise ArtifactError(
                f"{path}: expected optimum's tensors {sorted(names.values())}, the graph has {sorted(graph_tensors)}"
            )
        files = [path] + [
            p for p in sorted(path.parent.iterdir()) if p.name.startswith("model.onnx_data") or p.suffix == ".data"
        ]
        # Whatever else the graph reads (checked inside the folder above) is one of its files too.
        files += [p for p in (path.parent / loc for loc in model.locations) if p not in files]
        scalars = [ours_name for ours_name, theirs in names.items() if not graph_tensors[theirs].dims]
        inputs, outputs = list(specs[name].inputs), list(specs[name].outputs)
        components[name] = Component(
            name=name,
            files=[FileRecord(p.relative_to(root).as_posix(), "", p.stat().st_size) for p in files],
            opset=model.opset,
            precision=_precision(model),
            inputs=inputs,
            outputs=outputs,
            graph_names={k: v for k, v in names.items() if k != v},
            scalar_inputs=scalars,
        )
    scheduler_config = json.loads(scheduler.read_text())
    return Manifest(
        sdrt_version="",
        source={"format": "optimum", "path": str(root), "scheduler_sha256": sha256_file(scheduler)},
        family=family.name,
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_scale_factor=vae_scale,
        latent_channels=dims.latent_channels,
        text_length=text_length,
        spatial_multiple=dims.spatial_multiple,
        default_height=dims.sample_size * vae_scale,
        default_width=dims.sample_size * vae_scale,
        tokenizers={"tokenizer": TokenizerInfo(path="tokenizer", max_length=text_length, pad_token_id=None)},
        scheduler_config="scheduler/scheduler_config.json",
        components=components,
        dims=dims.to_dict(),
        vae={"kind": "kl", "class": "AutoencoderKL"},
    )


def _precision(model: onnx_proto.OnnxInfo) -> str:
    """fp16 when the graph's weights (initializers of two or more dimensions) are float16 and none float32."""
    types = model.initializer_types
    return "fp16" if onnx_proto.FLOAT16 in types and onnx_proto.FLOAT not in types else "fp32"

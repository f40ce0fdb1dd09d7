"""A ControlNet artifact directory (``sdrt export --controlnet``): its graph and ``controlnet.json``.

A ControlNet fits one model layout: the UNet's block channels and layers per block (one residual per
down-block layer), its cross-attention width, the latent channels, the VAE's scale factor (the control
image is in pixels) and, for SDXL, the pooled text and time ids. ``controlnet.json`` records those with
the family, and :meth:`ControlNetManifest.check_fits` compares them with a model's manifest, naming both
values of the first that differs, before anything is opened. Files are checked as a model's are (inside
the folder, size and sha256, external data listed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.manifest import Component, Manifest, check_component_files, read_versioned_json

VERIFIED_NAME = "verified-files.json"  # stamps of files whose sha256 matched (see sdrt.runtime.hashing)

CONTROLNET_MANIFEST = "controlnet.json"
CONTROLNET_SCHEMA = 2  # 2: the conditioning embedding is a graph of its own (run once per call)
# The model numbers a ControlNet must share with the model it drives (ModelDims fields).
FITS = (
    "unet_block_channels",
    "unet_layers_per_block",
    "cross_attention_dim",
    "latent_channels",
    "vae_scale_factor",
    "text_length",
    "pooled_dim",
    "time_ids",
)


@dataclass
class ControlNetManifest:
    sdrt_version: str
    source: dict  # {"path": the ControlNetModel folder, "fingerprint": ...}
    family: str  # the family of the models it fits: sd1, sd2, sdxl
    dims: dict  # the FITS numbers
    conditioning_channels: int  # channels of the control image (3)
    component: Component  # the "controlnet" graph: latents, text and the control image's features -> residuals
    embedding: Component  # the "controlnet_embedding" graph: the control image -> its features
    build: dict = field(default_factory=dict)
    schema_version: int = CONTROLNET_SCHEMA

    def save(self, root: Path) -> Path:
        path = Path(root) / CONTROLNET_MANIFEST
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, root: Path, verify_hashes: bool = True) -> ControlNetManifest:
        root = Path(root)
        path = root / CONTROLNET_MANIFEST
        if not path.is_file():
            raise ArtifactError(
                f"controlnet: expected {path}, found none (export the ControlNet with `sdrt export --controlnet "
                "FOLDER --out DIR`)"
            )
        data = read_versioned_json(path, CONTROLNET_SCHEMA)
        try:
            manifest = cls(**{**data, "component": Component.from_dict(data["component"]),
                              "embedding": Component.from_dict(data["embedding"])})  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: malformed ControlNet manifest ({e}); re-export with this sdrt") from e
        graphs = manifest.graphs
        files = [f for c in graphs for f in c.files]
        check_component_files(root, graphs, files, verify_hashes, CONTROLNET_MANIFEST, VERIFIED_NAME)
        return manifest

    @property
    def graphs(self) -> list[Component]:
        """Its graphs: the conditioning embedding, then the ControlNet."""
        return [self.embedding, self.component]

    def check_fits(self, model: Manifest, where: str = "controlnet") -> None:
        """ArtifactError naming both values unless this ControlNet fits ``model``'s family and layout."""
        check_fits(self.family, self.dims, model, where)


def check_fits(family: str, fit: dict, model: Manifest, where: str = "controlnet") -> None:
    """ArtifactError naming both values unless a ControlNet of ``family`` and ``fit`` (FITS numbers) fits ``model``."""
    dims = model.model_dims.to_dict()
    if family != model.family:
        raise ArtifactError(
            f"{where}: expected a ControlNet for the model's family {model.family!r}, got one for {family!r}"
        )
    if not dims.get("unet_block_channels"):
        raise ArtifactError(
            f"{where}: the model's manifest has no UNet block layout (exported before sdrt recorded it): "
            "re-export the model with `sdrt export --controlnet-unet`"
        )
    for key in FITS:
        theirs, ours = fit.get(key), dims.get(key)
        if theirs != ours:
            raise ArtifactError(f"{where}: {key} of the model is {ours}, of the ControlNet {theirs}: they do not fit")


def fit_dims(dims) -> dict:
    """The FITS numbers of a :class:`sdrt.runtime.families.ModelDims`, as ``controlnet.json`` records them."""
    d = dims.to_dict()
    return {key: d[key] for key in FITS}

"""``manifest.json``: the contract between export and runtime.

Export writes it last, after every file it names exists; the runtime reads it first and refuses
an artifact directory whose schema, files or hashes do not match, naming both values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime.errors import ArtifactError
from sdrt.runtime.hashing import VerifiedFiles, sha256_file

SCHEMA_VERSION = 2  # 2: model dimensions, pipeline options and VAE kind (families beyond SD 1.x/2.x)
MANIFEST_NAME = "manifest.json"
# Beside the engines: per-machine state, not part of the export (whose files the manifest lists).
VERIFIED_NAME = "engines/verified-files.json"

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: list[Dim]  # ints are fixed, strings are symbolic (the same symbol means the same size)


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the artifact directory, POSIX separators
    sha256: str
    bytes: int

    @classmethod
    def of(cls, root: Path, path: Path) -> FileRecord:
        return cls(path.relative_to(root).as_posix(), sha256_file(path), path.stat().st_size)


@dataclass
class Component:
    name: str
    files: list[FileRecord]  # the ONNX graph first, then its external data files
    opset: int
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    verification: dict = field(default_factory=dict)
    optimization: dict = field(default_factory=dict)
    # For graphs exported by other tools: our tensor name -> the graph's, and the inputs the graph
    # takes as scalars (optimum's UNet takes one timestep for the whole batch).
    graph_names: dict[str, str] = field(default_factory=dict)
    scalar_inputs: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return self.files[0].path

    @classmethod
    def from_dict(cls, d: dict) -> Component:
        return cls(
            name=d["name"],
            files=[FileRecord(**f) for f in d["files"]],
            opset=d["opset"],
            precision=d["precision"],
            inputs=[TensorSpec(**t) for t in d["inputs"]],
            outputs=[TensorSpec(**t) for t in d["outputs"]],
            verification=d.get("verification", {}),
            optimization=d.get("optimization", {}),
            graph_names=d.get("graph_names", {}),
            scalar_inputs=d.get("scalar_inputs", []),
        )


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # directory holding tokenizer.json (or vocab.json + merges.txt)
    max_length: int
    pad_token_id: int | None  # None: the tokenizer folder's own pad token
    files: list[FileRecord] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerInfo:
        return cls(**{**d, "files": [FileRecord(**f) for f in d.get("files", [])]})


@dataclass
class Manifest:
    sdrt_version: str
    source: dict  # {"model": path or hub id, "revision": ..., "fingerprint": ...}
    family: str  # sd1, sd2, ...
    prediction_type: str
    vae_scaling_factor: float
    vae_scale_factor: int  # pixels per latent cell
    latent_channels: int
    text_length: int
    spatial_multiple: int  # height and width must be multiples of this many pixels
    default_height: int
    default_width: int
    tokenizers: dict[str, TokenizerInfo]
    scheduler_config: str
    components: dict[str, Component]
    dims: dict = field(default_factory=dict)  # sdrt.runtime.families.ModelDims: every number shapes come from
    # From model_index.json: SDXL's force_zeros_for_empty_prompt and requires_aesthetics_score.
    pipeline_options: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)  # kind (kl, tiny), class, and its source when it replaced the model's
    build: dict = field(default_factory=dict)  # versions, options, input fingerprint, timings
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def model_dims(self):
        """The recorded :class:`sdrt.runtime.families.ModelDims`."""
        from sdrt.runtime.families import ModelDims

        return ModelDims.from_dict(self.dims)

    @property
    def model_family(self):
        """The :class:`sdrt.runtime.families.Family` the artifacts belong to."""
        from sdrt.runtime import families

        return families.get(self.family)

    def save(self, root: Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["tokenizers"] = {k: TokenizerInfo.from_dict(v) for k, v in d["tokenizers"].items()}
        d["components"] = {k: Component.from_dict(v) for k, v in d["components"].items()}
        return cls(**d)

    @classmethod
    def load(cls, root: Path, verify_hashes: bool = True) -> Manifest:
        """Read and check ``root/manifest.json``: schema version, then every file's size and sha256."""
        root = Path(root)
        path = root / MANIFEST_NAME
        if not path.is_file():
            from sdrt.runtime.foreign import is_optimum_folder, optimum_manifest

            if is_optimum_folder(root):
                manifest = optimum_manifest(root)
                manifest.check_files(root, verify_hashes=False)  # such folders carry no hashes
                return manifest
            raise ArtifactError(
                f"artifacts: expected {path} (or an optimum ONNX export folder), found neither "
                "(build it with `make engines` or `sdrt export`)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path}: expected JSON, got a parse error: {e}") from e
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{path}: expected schema_version {SCHEMA_VERSION}, got {version!r} (re-export with this sdrt)"
            )
        try:
            manifest = cls.from_dict(data)
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: malformed manifest ({e}); re-export with this sdrt") from e
        manifest.check_files(root, verify_hashes)
        return manifest

    def all_files(self) -> list[FileRecord]:
        files = [f for c in self.components.values() for f in c.files]
        files += [f for t in self.tokenizers.values() for f in t.files]
        return files

    def check_files(self, root: Path, verify_hashes: bool = True) -> None:
        """Every listed file exists with its size; with ``verify_hashes``, its sha256 too (recomputed
        only for files changed since they last matched: see ``VerifiedFiles``)."""
        verified = VerifiedFiles(Path(root) / VERIFIED_NAME) if verify_hashes else None
        for record in self.all_files():
            check_file(Path(root), record, verify_hashes, verified)
        if verified is not None:
            verified.save()


def check_file(root: Path, record: FileRecord, verify_hash: bool = True, verified: VerifiedFiles | None = None) -> None:
    path = root / record.path
    if not path.is_file():
        raise ArtifactError(f"{path}: expected a file listed in the manifest, found none (re-run the export)")
    size = path.stat().st_size
    if size != record.bytes:
        raise ArtifactError(f"{path}: expected {record.bytes} bytes per the manifest, got {size} (re-run the export)")
    if verify_hash:
        digest = verified.sha256(path) if verified is not None else sha256_file(path)
        if digest != record.sha256:
            raise ArtifactError(
                f"{path}: expected sha256 {record.sha256} per the manifest, got {digest} "
                "(the file was modified after export; re-run the export)"
            )

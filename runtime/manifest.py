"""``manifest.json``: the contract between export and runtime.

Export writes it last, after every file it names exists; the runtime reads it first and refuses
an artifact directory whose schema, files or hashes do not match, naming both values.

It is also the one place where an artifact directory is checked for files outside it: every path
the manifest names must stay inside the directory (no absolute paths, no ``..``, no symbolic link
leading out), and so must every file a graph's tensors read their weights from (ONNX external
data), which must moreover be one of the component's files the manifest lists (so that its hash
is checked). A backend opens a graph only after :meth:`Manifest.load` passed, so a graph crafted
to make onnxruntime (or OpenVINO, or TensorRT's parser) read ``/etc/shadow`` or another user's
files as weights is refused before any of them sees it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdrt.runtime import onnx_proto
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
    # LoRA: module name (as diffusers names it) -> {"initializer", "shape", "layout"} (sdrt.runtime.lora.Target).
    lora_targets: dict[str, dict] = field(default_factory=dict)

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
            lora_targets=d.get("lora_targets", {}),
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
        data = read_versioned_json(path, SCHEMA_VERSION)
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
        """Every listed file is inside ``root`` and exists with its size; with ``verify_hashes``, its
        sha256 too (recomputed only for files changed since they last matched: see ``VerifiedFiles``).
        Then, whatever ``verify_hashes`` says, every graph's external data must be files inside
        ``root`` that the manifest lists for that component (see :func:`check_external_data`)."""
        root = Path(root)
        for info in self.tokenizers.values():
            check_inside(root, info.path, "tokenizer folder")
        check_inside(root, self.scheduler_config, "scheduler config")
        check_component_files(root, list(self.components.values()), self.all_files(), verify_hashes, "the manifest")


def check_component_files(
    root: Path,
    components: list[Component],
    records: list[FileRecord],
    verify_hashes: bool = True,
    listed_in: str = "the manifest",
    verified_at: str = VERIFIED_NAME,
) -> None:
    """Every file of ``records`` (the components' files, and whatever else the manifest lists) inside ``root``, of
    its size and, with ``verify_hashes``, its sha256 (recomputed only for files changed since they last matched,
    stamps kept at ``root / verified_at``); then every component graph's external data inside ``root`` and listed
    for that component."""
    for record in records:
        check_inside(root, record.path, f"file listed in {listed_in}")
    verified = VerifiedFiles(root / verified_at) if verify_hashes else None
    for record in records:
        check_file(root, record, verify_hashes, verified)
    if verified is not None:
        verified.save()
    for component in components:
        check_external_data(root / component.path, root, listed={f.path for f in component.files})


def read_versioned_json(path: Path, version: int) -> dict:
    """The JSON object in ``path`` (a manifest) when its ``schema_version`` is ``version``; ArtifactError otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: expected JSON, got a parse error: {e}") from e
    got = data.get("schema_version") if isinstance(data, dict) else None
    if got != version:
        raise ArtifactError(f"{path}: expected schema_version {version}, got {got!r} (re-export with this sdrt)")
    return data


# An absolute Windows path (C:\... or C:/...): refused on every platform, as artifacts travel.
_DRIVE = re.compile(r"^[A-Za-z]:")
# onnxruntime reads a tensor whose location is its marker "*/_ORT_MEM_ADDR_/*" from the memory address
# in its offset: a location starting like onnxruntime's markers is refused outright.
ORT_MARKER_PREFIX = "*/_ORT_"


def _inside(path: str, real_root: str) -> bool:
    return path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep)


def _relative_problem(rel: str) -> str | None:
    """Why ``rel`` cannot be a path relative to a folder it must stay in (None: it can)."""
    if not rel:
        return "an empty path"
    if "\0" in rel:
        return "a path with a NUL byte"
    if rel.startswith(("/", "\\")) or os.path.isabs(rel) or _DRIVE.match(rel):
        return "an absolute path"
    if "\\" in rel:
        return "a path with backslashes (Windows separators are refused; '..\\' would escape there)"
    if ".." in rel.split("/"):
        return "a path with '..'"
    return None


def check_inside(root: Path, rel: str, what: str) -> Path:
    """``root/rel``, refusing a ``rel`` that is absolute, has ``..`` or leads out of ``root`` through a
    symbolic link."""
    problem = _relative_problem(rel)
    if problem:
        raise ArtifactError(
            f"{root}/manifest.json: {what} {rel!r}: expected a relative path inside the artifact directory, "
            f"got {problem} (the manifest was tampered with; re-run the export)"
        )
    path = Path(root) / rel
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if not _inside(real, real_root):
        raise ArtifactError(
            f"{path}: {what}: expected a path inside the artifact directory {real_root}, got a symbolic link "
            f"to {real} (copy it into the directory instead of linking it)"
        )
    return path


def check_external_data(
    onnx_path: Path, root: Path, listed: Collection[str] | None = None, info: onnx_proto.OnnxInfo | None = None
) -> onnx_proto.OnnxInfo:
    """Refuse a graph whose tensors would read their data from outside ``root``; return what was read.

    The graph file itself must be inside ``root`` once symbolic links are followed. Each external
    data ``location`` (of every tensor of every graph, subgraph and function: see
    :mod:`sdrt.runtime.onnx_proto`) must be a relative path without ``..`` naming an existing file that
    stays inside ``root`` after symbolic links; with ``listed`` (paths relative to ``root``), one
    of those files too. The error names the location, the tensor and the graph holding it."""
    onnx_path, root = Path(onnx_path), Path(root)
    real_root = os.path.realpath(root)
    real_graph = os.path.realpath(onnx_path)
    if not _inside(real_graph, real_root):
        raise ArtifactError(
            f"{onnx_path}: expected a graph inside the artifact directory {real_root}, got a symbolic link to "
            f"{real_graph} (copy the graph into the directory instead of linking it)"
        )
    if info is None:
        info = onnx_proto.read(onnx_path)
    # onnxruntime resolves locations against the folder of the path it was given; onnx's tools against
    # the file's real folder. Both must stay inside.
    folders = dict.fromkeys((str(onnx_path.parent), os.path.dirname(real_graph)))
    seen = set()
    for ref in info.external:
        if ref.location in seen:
            continue
        seen.add(ref.location)
        where = f"{onnx_path}: external data of tensor {ref.tensor!r} in {ref.graph}"
        fix = "(the graph was crafted or damaged; re-export it, and never load graphs that read files outside their folder)"
        problem: str | None = _relative_problem(ref.location)
        if ref.location.startswith(ORT_MARKER_PREFIX):
            problem = "onnxruntime's in-memory address marker, which makes it read process memory"
        if problem:
            raise ArtifactError(
                f"{where}: expected a relative path inside the artifact directory {root}, "
                f"got location {ref.location!r} ({problem}) {fix}"
            )
        for folder in folders:
            target = os.path.join(folder, ref.location)
            real = os.path.realpath(target)
            if not _inside(real, real_root):
                raise ArtifactError(
                    f"{where}: expected a file inside the artifact directory {real_root}, got location "
                    f"{ref.location!r}, which resolves to {real} {fix}"
                )
            if not os.path.isfile(real):
                raise ArtifactError(
                    f"{where}: expected location {ref.location!r} to be a file, found none at {target} "
                    "(copy the graph with its data file, or re-run the export)"
                )
        if listed is not None:
            rel = Path(os.path.relpath(os.path.join(onnx_path.parent, ref.location), root)).as_posix()
            if rel not in listed:
                raise ArtifactError(
                    f"{where}: expected one of the component's files listed in the manifest "
                    f"({', '.join(sorted(listed))}), got location {ref.location!r} ({rel}, whose content no hash "
                    "covers) (re-run the export)"
                )
    return info


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

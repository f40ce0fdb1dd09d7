"""Artifacts and model folders are data, never a way in.

Runtime: a graph whose tensors read "external data" from outside the artifact directory (an absolute
path, ``..``, a symbolic link) is refused by ``Manifest.load`` (so by ``Pipeline.load``) before any
backend opens it, naming the location and the graph; the pure-Python ONNX reader that finds those
locations agrees with ``onnx.load``. Export: pickle checkpoints are read only when allowed, and a
model folder naming code of its own is refused.

Every graph here is a few bytes made with ``onnx.helper``; the test may import onnx, the runtime may not.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from sdrt.runtime import onnx_proto
from sdrt.runtime.errors import ArtifactError, ExportError
from sdrt.runtime.manifest import Component, FileRecord, Manifest, check_external_data

# -- tiny graphs ---------------------------------------------------------------------------------


def external(array: np.ndarray, name: str, location: str, data_file: Path | None = None) -> TensorProto:
    """A tensor whose data lives at ``location``; its bytes are written to ``data_file`` when given."""
    tensor = numpy_helper.from_array(array, name)
    if data_file is not None:
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    return tensor


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())  # as is: onnx.save would rewrite external tensors
    return path


def matmul_graph(folder: Path, location: str = "unet.onnx.data", data_file: Path | None = None) -> Path:
    """x[batch, 4] @ w (external, at ``location``) -> y. Writes the data file where the location points
    when ``data_file`` is None and the location is a plain name."""
    if data_file is None and "/" not in location and not os.path.isabs(location):
        data_file = folder / location
    w = external(np.eye(4, dtype=np.float32), "w", location, data_file)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "unet.onnx")


def if_graph(folder: Path, location: str, data_file: Path | None = None) -> Path:
    """An If whose then-branch holds a Constant with external data (and a function doing the same)."""
    then = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["c"], name="k", value=external(np.ones(3, np.float32), "c", location, data_file)
            )
        ],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [3])],
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["d"], value=numpy_helper.from_array(np.zeros(3, np.float32), "d"))],
        "else",
        [],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [3])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["z"], name="branch", then_branch=then, else_branch=other)],
        "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
    )
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "unet.onnx")


def assorted_graph(folder: Path) -> Path:
    """Embedded fp16 weights, a sparse initializer and a function with external data, a scalar, a
    symbolic, an unknown-size and a shapeless input, a sequence input, two opset domains."""
    (folder / "weights.bin").parent.mkdir(parents=True, exist_ok=True)
    (folder / "weights.bin").write_bytes(np.zeros(64, np.float32).tobytes())
    sparse = helper.make_sparse_tensor(
        external(np.ones(2, np.float32), "sv", "weights.bin"), numpy_helper.from_array(np.array([0, 3]), "si"), [4]
    )
    function = helper.make_function(
        "local",
        "AddConst",
        ["a"],
        ["b"],
        [
            helper.make_node("Constant", [], ["k"], value=external(np.ones(2, np.float32), "fk", "weights.bin")),
            helper.make_node("Add", ["a", "k"], ["b"]),
        ],
        [helper.make_opsetid("", 18)],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, "h", None])
    x.type.tensor_type.shape.dim[0].denotation = "DATA_BATCH"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w16"], ["y"]),
            helper.make_node("AddConst", ["t"], ["u"], domain="local"),
        ],
        "assorted",
        [
            x,
            helper.make_tensor_value_info("t", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("free", TensorProto.INT64, None),
            helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, "h", -1]),
            helper.make_tensor_value_info("u", 1, [2]),
        ],
        [
            numpy_helper.from_array(np.ones((8, 8), np.float16), "w16"),
            numpy_helper.from_array(np.ones(8, np.float32), "bias"),  # 1-D: not a weight for the precision guess
        ],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
    )
    return save(model, folder / "assorted.onnx")


# -- what onnx itself says -----------------------------------------------------------------------


def onnx_reference(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    locations: list[str] = []

    def tensor(t):
        locations.extend(e.value for e in t.external_data if e.key == "location")

    def sparse(s):
        tensor(s.values)
        tensor(s.indices)

    def attribute(a):
        for t in (*([a.t] if a.HasField("t") else []), *a.tensors):
            tensor(t)
        for s in (*([a.sparse_tensor] if a.HasField("sparse_tensor") else []), *a.sparse_tensors):
            sparse(s)
        for g in (*([a.g] if a.HasField("g") else []), *a.graphs):
            graph(g)

    def graph(g):
        for t in g.initializer:
            tensor(t)
        for s in g.sparse_initializer:
            sparse(s)
        for n in g.node:
            for a in n.attribute:
                attribute(a)

    graph(model.graph)
    for f in model.functions:
        for n in f.node:
            for a in n.attribute:
                attribute(a)

    def values(vs):
        out = []
        for v in vs:
            tt = v.type.tensor_type
            dims = None
            if tt.HasField("shape"):
                dims = tuple(
                    d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
                    for d in tt.shape.dim
                )
            out.append((v.name, tt.elem_type, dims))
        return out

    return {
        "inputs": values(model.graph.input),
        "outputs": values(model.graph.output),
        "opsets": [(o.domain, o.version) for o in model.opset_import],
        "locations": Counter(locations),
        "weights": Counter(t.data_type for t in model.graph.initializer if len(t.dims) >= 2),
    }


def reader_view(path: Path) -> dict:
    info = onnx_proto.read(path)
    return {
        "inputs": [(v.name, v.elem_type, v.dims) for v in info.inputs],
        "outputs": [(v.name, v.elem_type, v.dims) for v in info.outputs],
        "opsets": info.opset_import,
        "locations": Counter(ref.location for ref in info.external),
        "weights": Counter(info.initializer_types),
    }


@pytest.mark.parametrize("make", ["matmul", "if", "assorted"])
def test_reader_agrees_with_onnx_load(tmp_path, make):
    path = {
        "matmul": lambda: matmul_graph(tmp_path),
        "if": lambda: if_graph(tmp_path, "branch.bin", tmp_path / "branch.bin"),
        "assorted": lambda: assorted_graph(tmp_path),
    }[make]()
    want = onnx_reference(path)
    assert reader_view(path) == want
    assert sum(want["locations"].values()) >= 1


def test_reader_names_where_each_external_tensor_is(tmp_path):
    info = onnx_proto.read(if_graph(tmp_path, "branch.bin", tmp_path / "branch.bin"))
    (ref,) = info.external
    assert (ref.location, ref.tensor) == ("branch.bin", "c")
    assert (
        ref.graph
        == "graph 'main' > If node 'branch' attribute 'then_branch' > graph 'then' > Constant node 'k' attribute 'value'"
    )
    info = onnx_proto.read(assorted_graph(tmp_path))
    assert info.opset == 17 and info.inputs[1].dims == () and info.inputs[2].dims is None
    assert info.inputs[0].dtype == "float16" and info.initializer_types == {TensorProto.FLOAT16: 1}
    assert {r.graph for r in info.external} == {
        "graph 'assorted'",
        "function 'AddConst' > Constant node attribute 'value'",
    }


def test_truncated_or_foreign_files_raise_artifact_errors(tmp_path):
    whole = if_graph(tmp_path, "branch.bin", tmp_path / "branch.bin").read_bytes()
    bad = tmp_path / "bad.onnx"
    for content in (whole[: len(whole) // 2], whole[:-3], whole[:5], b"", b"\xff" * 40, b'{"not": "onnx"}'):
        bad.write_bytes(content)
        with pytest.raises(ArtifactError, match=r"bad\.onnx: expected an ONNX model"):
            onnx_proto.read(bad)
    with pytest.raises(ArtifactError, match="missing.onnx: expected a readable ONNX file"):
        onnx_proto.read(tmp_path / "missing.onnx")


# -- artifact directories ------------------------------------------------------------------------


def write_artifacts(root: Path, make_graph, unlisted: tuple[str, ...] = ()) -> Path:
    """A minimal artifact directory: one component whose graph ``make_graph(root / "onnx")`` writes, with
    the files beside it (but ``unlisted``) listed in the manifest."""
    graph = make_graph(root / "onnx")
    files = [graph] + sorted(p for p in graph.parent.iterdir() if p != graph and p.name not in unlisted)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    component = Component(
        name="unet",
        files=[FileRecord.of(root, f) for f in files],
        opset=18,
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    Manifest(
        sdrt_version="test",
        source={},
        family="sd1",
        prediction_type="epsilon",
        vae_scaling_factor=0.18215,
        vae_scale_factor=8,
        latent_channels=4,
        text_length=77,
        spatial_multiple=8,
        default_height=64,
        default_width=64,
        tokenizers={},
        scheduler_config="scheduler/scheduler_config.json",
        components={"unet": component},
    ).save(root)
    return root


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(np.eye(4, dtype=np.float32).tobytes())
    return path


def test_a_well_formed_artifact_directory_loads(tmp_path):
    root = write_artifacts(tmp_path / "art", matmul_graph)
    m = Manifest.load(root)
    assert [f.path for f in m.components["unet"].files] == ["onnx/unet.onnx", "onnx/unet.onnx.data"]


@pytest.mark.parametrize("verify_hashes", [True, False])
@pytest.mark.parametrize(
    ("where", "problem"),
    [("absolute", "an absolute path"), ("dotdot", "a path with '..'"), ("subgraph", "a path with '..'")],
)
def test_external_data_outside_the_directory_is_refused(tmp_path, secret, where, problem, verify_hashes):
    location = str(secret) if where == "absolute" else "../../outside/secret.bin"
    make = if_graph if where == "subgraph" else matmul_graph
    root = write_artifacts(tmp_path / "art", lambda folder: make(folder, location))
    with pytest.raises(ArtifactError) as e:
        Manifest.load(root, verify_hashes=verify_hashes)
    message = str(e.value)
    assert repr(location) in message and problem in message and "unet.onnx" in message
    assert ("then_branch" in message) == (where == "subgraph")


def test_pipeline_load_refuses_before_onnxruntime_opens_the_graph(tmp_path, secret, monkeypatch):
    import onnxruntime

    from sdrt.runtime import Pipeline

    def opened(*args, **kwargs):
        raise AssertionError("onnxruntime opened a graph it should never have seen")

    monkeypatch.setattr(onnxruntime, "InferenceSession", opened)
    root = write_artifacts(tmp_path / "art", lambda folder: matmul_graph(folder, "../../outside/secret.bin"))
    with pytest.raises(ArtifactError, match=r"'\.\./\.\./outside/secret\.bin'"):
        Pipeline.load(root)


def test_symbolic_links_leading_out_are_refused(tmp_path, secret):
    # The location is innocent, the data file is a link to a file elsewhere.
    root = write_artifacts(tmp_path / "art", matmul_graph)
    data = root / "onnx" / "unet.onnx.data"
    data.unlink()
    data.symlink_to(secret)
    with pytest.raises(ArtifactError, match=r"unet\.onnx\.data.*symbolic link to .*secret\.bin"):
        Manifest.load(root, verify_hashes=False)
    with pytest.raises(ArtifactError, match=r"location 'unet\.onnx\.data', which resolves to .*secret\.bin"):
        check_external_data(root / "onnx" / "unet.onnx", root)
    # The graph itself is a link to a graph outside.
    root = write_artifacts(tmp_path / "art2", matmul_graph)
    outside = matmul_graph(tmp_path / "elsewhere")
    (root / "onnx" / "unet.onnx").unlink()
    (root / "onnx" / "unet.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"unet\.onnx.*symbolic link to .*elsewhere"):
        Manifest.load(root, verify_hashes=False)
    with pytest.raises(ArtifactError, match=r"expected a graph inside the artifact directory"):
        check_external_data(root / "onnx" / "unet.onnx", root)


@pytest.mark.parametrize("path", ["../outside/secret.bin", "/etc/passwd", "onnx/../../outside/secret.bin"])
def test_manifest_paths_must_stay_inside(tmp_path, secret, path):
    root = write_artifacts(tmp_path / "art", matmul_graph)
    data = json.loads((root / "manifest.json").read_text())
    data["components"]["unet"]["files"][1]["path"] = path
    (root / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=rf"file listed in the manifest {path!r}: expected a relative path"):
        Manifest.load(root, verify_hashes=False)


def test_external_data_must_be_a_listed_file(tmp_path):
    # Inside the directory but not in the manifest: no hash covers what the graph would read.
    root = write_artifacts(tmp_path / "art", lambda folder: matmul_graph(folder, "stray.bin"), unlisted=("stray.bin",))
    with pytest.raises(ArtifactError, match=r"'stray\.bin' \(onnx/stray\.bin, whose content no hash covers\)"):
        Manifest.load(root)


def test_onnxruntime_memory_marker_is_refused(tmp_path):
    root = write_artifacts(tmp_path / "art", lambda folder: matmul_graph(folder, "*/_ORT_MEM_ADDR_/*"))
    with pytest.raises(ArtifactError, match="in-memory address marker"):
        Manifest.load(root, verify_hashes=False)


# -- optimum folders, read without onnx ----------------------------------------------------------


def write_optimum_folder(root: Path, unet_location: str | None = None) -> Path:
    configs = {
        "text_encoder": {"hidden_size": 32, "max_position_embeddings": 77, "vocab_size": 1000},
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "cross_attention_dim": 32,
            "block_out_channels": [32, 64],
            "sample_size": 8,
        },
        "vae_decoder": {"block_out_channels": [32, 64], "latent_channels": 4},
    }
    for part, config in configs.items():
        (root / part).mkdir(parents=True)
        (root / part / "config.json").write_text(json.dumps(config))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "epsilon"}')
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64

    def model(nodes, inputs, outputs, initializers=()):
        graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx", 14)])

    v = helper.make_tensor_value_info
    save(
        model(
            [helper.make_node("Cast", ["input_ids"], ["last_hidden_state"], to=f32)],
            [v("input_ids", i64, ["batch", 77])],
            [v("last_hidden_state", f32, ["batch", 77, 32]), v("pooler_output", f32, ["batch", 32])],
            [numpy_helper.from_array(np.ones((4, 4), np.float32), "w")],
        ),
        root / "text_encoder" / "model.onnx",
    )
    weight = numpy_helper.from_array(np.ones((4, 4), np.float16), "w16")
    if unet_location is not None:
        weight = external(np.ones((4, 4), np.float16), "w16", unet_location, root / "unet" / "weights.bin")
    save(
        model(
            [helper.make_node("Identity", ["sample"], ["out_sample"])],
            [
                v("sample", f32, ["b", 4, "h", "w"]),
                v("timestep", f32, []),
                v("encoder_hidden_states", f32, ["b", 77, 32]),
            ],
            [v("out_sample", f32, ["b", 4, "h", "w"])],
            [weight, numpy_helper.from_array(np.ones(4, np.float32), "bias")],
        ),
        root / "unet" / "model.onnx",
    )
    save(
        model(
            [helper.make_node("Identity", ["latent_sample"], ["sample"])],
            [v("latent_sample", f32, ["b", 4, "h", "w"])],
            [v("sample", f32, ["b", 3, "H", "W"])],
        ),
        root / "vae_decoder" / "model.onnx",
    )
    return root


def test_optimum_folder_reads_without_onnx(tmp_path):
    root = write_optimum_folder(tmp_path / "opt", unet_location="weights.bin")
    m = Manifest.load(root)
    assert m.source["format"] == "optimum" and m.family == "sd1"
    unet = m.components["unet"]
    assert unet.scalar_inputs == ["timestep"] and unet.precision == "fp16" and unet.opset == 17
    assert [f.path for f in unet.files] == ["unet/model.onnx", "unet/weights.bin"]  # what the graph reads is listed
    assert m.components["vae_decoder"].graph_names == {"latent": "latent_sample", "image": "sample"}
    assert m.components["text_encoder"].precision == "fp32" and m.components["text_encoder"].scalar_inputs == []


@pytest.mark.parametrize("location", ["../../outside/secret.bin", "ABSOLUTE"])
def test_optimum_folder_with_external_data_outside_is_refused(tmp_path, secret, location):
    location = str(secret) if location == "ABSOLUTE" else location
    root = write_optimum_folder(tmp_path / "opt", unet_location=location)
    with pytest.raises(ArtifactError, match=rf"unet/model\.onnx: external data of tensor 'w16'.*{location!r}"):
        Manifest.load(root)


# -- export: safetensors only, no code from the model folder ---------------------------------------


def write_skeleton(root: Path, index: dict | None = None) -> Path:
    """A model folder's layout without weights: enough for every check that runs before loading."""
    index = index or {
        "_class_name": "StableDiffusionPipeline",
        "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],  # as SD 1.5's: diffusers' own
        "feature_extractor": [None, None],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    for part in ("text_encoder", "tokenizer", "unet", "scheduler", "vae"):
        (root / part).mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    (root / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 32}))
    (root / "text_encoder" / "model.safetensors").write_bytes(b"")
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (root / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize(
    ("part", "files", "named"),
    [
        ("unet", {"diffusion_pytorch_model.bin": b"pickle"}, "diffusion_pytorch_model.bin"),
        ("text_encoder", {"pytorch_model.bin": b"pickle", "model.ckpt": b"pickle"}, "model.ckpt, pytorch_model.bin"),
        ("vae", {"diffusion_pytorch_model.ckpt": b"pickle"}, "diffusion_pytorch_model.ckpt"),
        (
            "unet",
            {"diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": {"a": "shard-1.bin"}})},
            "shard-1.bin",
        ),
        (  # diffusers reads the index, not the single file beside it
            "unet",
            {
                "diffusion_pytorch_model.safetensors": b"",
                "diffusion_pytorch_model.safetensors.index.json": json.dumps({"weight_map": {"a": "part-1.bin"}}),
            },
            "part-1.bin",
        ),
        (
            "text_encoder",
            {"config.json": json.dumps({"transformers_weights": "adapter_model.bin"})},
            "adapter_model.bin",
        ),
    ],
)
def test_export_refuses_pickle_weights_unless_allowed(tmp_path, part, files, named):
    from sdrt.export.modules import load_pipeline

    root = write_skeleton(tmp_path / "model")
    for weights in (root / part).glob("*.safetensors"):
        weights.unlink()
    for name, content in files.items():
        (root / part / name).write_text(content) if isinstance(content, str) else (root / part / name).write_bytes(
            content
        )
    with pytest.raises(ExportError, match=rf"{part}.*expected safetensors.*got.*{named}.*--allow-pickle"):
        load_pipeline(root)


def test_export_refuses_a_pickle_only_vae_override(tmp_path):
    from sdrt.export.modules import load_pipeline

    root = write_skeleton(tmp_path / "model")
    vae = tmp_path / "taesd"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    (vae / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(
        ExportError, match=r"taesd: vae: expected safetensors.*diffusion_pytorch_model\.bin.*--allow-pickle"
    ):
        load_pipeline(root, vae=vae)


def test_export_refuses_components_from_other_libraries(tmp_path):
    from sdrt.export.modules import load_pipeline

    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["my_unet", "MyUNet"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    root = write_skeleton(tmp_path / "model", index)
    (root / "unet" / "my_unet.py").write_text("raise SystemExit('custom code ran')\n")
    with pytest.raises(
        ExportError, match=r"component 'unet': expected a class from diffusers or transformers, got .*'my_unet'"
    ):
        load_pipeline(root)
    index = {"_class_name": ["pipeline", "MyPipeline"], "unet": ["diffusers", "UNet2DConditionModel"]}
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ExportError, match=r"component '_class_name'.*library 'pipeline'"):
        load_pipeline(root)


def test_pickle_weights_load_only_when_allowed(tiny_model, tmp_path, monkeypatch):
    """The tiny model with its UNet saved as a pickle checkpoint: refused by default; with allow_pickle,
    loaded from the .bin with the same weights; the loaders are told safetensors-only and no remote code."""
    import diffusers
    import torch
    import transformers
    from safetensors.torch import load_file

    from sdrt.export.modules import load_pipeline, source_files

    root = tmp_path / "model"
    shutil.copytree(tiny_model, root)
    weights = load_file(root / "unet" / "diffusion_pytorch_model.safetensors")
    torch.save(weights, root / "unet" / "diffusion_pytorch_model.bin")
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    calls: dict[str, dict] = {}
    for owner, name in (
        (transformers.CLIPTextModel, "CLIPTextModel"),
        (transformers.CLIPTokenizer, "CLIPTokenizer"),
        (diffusers.UNet2DConditionModel, "UNet2DConditionModel"),
        (diffusers.AutoencoderKL, "AutoencoderKL"),
    ):
        original = owner.from_pretrained.__func__

        def record(cls, *args, _name=name, _original=original, **kwargs):
            calls[_name] = kwargs
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", classmethod(record))

    with pytest.raises(ExportError, match=r"unet: expected safetensors .*diffusion_pytorch_model\.bin.*--allow-pickle"):
        load_pipeline(root)
    assert not calls  # refused before anything was loaded
    assert root / "unet" / "diffusion_pytorch_model.bin" not in source_files(root)

    pipe = load_pipeline(root, allow_pickle=True)
    for key, value in weights.items():
        torch.testing.assert_close(pipe.unet.state_dict()[key], value)
    assert calls["UNet2DConditionModel"]["use_safetensors"] is None  # prefer safetensors, fall back to pickle
    assert root / "unet" / "diffusion_pytorch_model.bin" in source_files(root, allow_pickle=True)

    calls.clear()
    load_pipeline(tiny_model)
    assert {name: kw.get("use_safetensors") for name, kw in calls.items() if name != "CLIPTokenizer"} == {
        "CLIPTextModel": True,
        "UNet2DConditionModel": True,
        "AutoencoderKL": True,
    }
    assert calls["CLIPTextModel"]["trust_remote_code"] is False and calls["CLIPTokenizer"]["trust_remote_code"] is False


def test_cli_allow_pickle_reaches_the_export_options(monkeypatch, tmp_path):
    import argparse

    from sdrt.export import build
    from sdrt.export.cli import register_export

    seen = []

    class Stop(Exception):
        pass

    def fake_export(model, out, options, **kwargs):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(build, "export_pipeline", fake_export)
    parser = argparse.ArgumentParser()
    register_export(parser.add_subparsers())
    for extra, allowed in (([], False), (["--allow-pickle"], True)):
        args = parser.parse_args(["export", "--model", "m", "--out", str(tmp_path), *extra])
        with pytest.raises(Stop):
            args.func(args)
        assert seen[-1].allow_pickle is allowed

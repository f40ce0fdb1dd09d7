"""Every bad request and damaged artifact in tests/bad_input_cases.py gets its error, from sdrt's own types,
before any component runs and without allocating more than a few MB; the process goes on serving.

``SDRT_WRITE_TABLE=docs/bad-inputs.md pytest tests/test_bad_inputs.py`` also writes the table of cases and
the message each one got (the README links it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from bad_input_cases import (
    ARTIFACT_CASES,
    CALL_CASES,
    CONTROLNET_ARTIFACT_CASES,
    HTTP_CASES,
    HTTP_KEY,
    call_kwargs,
    make_scratch,
)

from sdrt.runtime import Pipeline, validation
from sdrt.runtime.errors import SdrtError
from sdrt.runtime.manifest import MANIFEST_NAME

ALLOCATION_LIMIT = 4 * 2**20  # bytes a refused request may allocate (traced by tracemalloc, NumPy included)
RESULTS: dict[str, tuple[str, str, str]] = {}  # table rows: id -> (label, exception, message)


class CountingSession:
    """A session that counts its runs, so a test can tell a request was refused before any work."""

    def __init__(self, inner, counter: list[int]):
        self._inner, self._counter = inner, counter
        self.name, self.inputs, self.outputs = inner.name, inner.inputs, inner.outputs

    def run(self, feed):
        self._counter[0] += 1
        return self._inner.run(feed)

    def close(self) -> None:
        self._inner.close()


@pytest.fixture(scope="module")
def counted(tiny_artifacts, controlnet_artifacts, family_artifacts):
    """The tiny model without ControlNets (0) and with its ControlNet loaded once (1) and twice (2), and the tiny
    SD 3 model ("tiny-sd3"), every session (ControlNets' too) counting its runs in one counter."""
    from contextlib import ExitStack

    runs = [0]
    artifacts, _, controlnet = controlnet_artifacts("tiny")
    with ExitStack() as stack:
        pipes = {0: stack.enter_context(Pipeline.load(tiny_artifacts))}
        for n in (1, 2):
            pipes[n] = stack.enter_context(Pipeline.load(artifacts, controlnets=[controlnet] * n))
        pipes["tiny-sd3"] = stack.enter_context(Pipeline.load(family_artifacts("tiny-sd3"), backend="onnxruntime"))
        for pipe in pipes.values():
            pipe.sessions = {k: CountingSession(v, runs) for k, v in pipe.sessions.items()}
            pipe.controlnets = [CountingSession(s, runs) for s in pipe.controlnets]
            pipe.control_embeddings = [CountingSession(s, runs) for s in pipe.control_embeddings]
        yield pipes, runs


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bad-inputs")
    make_scratch(tmp)
    return tmp


@pytest.fixture(scope="module", autouse=True)
def write_table():
    yield
    out = os.environ.get("SDRT_WRITE_TABLE")
    if out and RESULTS and HTTP_RESULTS:
        Path(out).write_text(_table())


@pytest.mark.parametrize("case", CALL_CASES, ids=[c.id for c in CALL_CASES])
def test_bad_call_is_refused_before_any_work(case, counted, scratch, monkeypatch):
    pipes, runs = counted
    pipe = pipes[case.model if case.model != "tiny" else case.controlnets]
    kwargs = call_kwargs(case, scratch)
    before = runs[0]
    if case.lora_limits:
        limits = dataclasses.replace(pipe.loras.limits, **case.lora_limits)
        monkeypatch.setattr(pipe.loras, "limits", limits)
        monkeypatch.setattr(pipe.adapters, "limits", limits)
    if case.available_bytes is not None:
        monkeypatch.setattr(validation, "available_memory", lambda: case.available_bytes)
    tracemalloc.start()
    try:
        with pytest.raises(case.error) as info:
            pipe(**kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert case.says in message, message
    assert runs[0] == before, f"{case.id}: a component ran before the request was refused"
    assert peak < ALLOCATION_LIMIT, f"{case.id}: {peak / 2**20:.1f} MiB allocated before refusing"
    RESULTS[case.id] = (
        f"{case.id} (before: {case.before})" if case.before else case.id,
        type(info.value).__name__,
        message.replace(str(scratch), "<tmp>"),
    )


def test_pipeline_still_serves_after_every_refusal(counted, runtime_pipeline):
    """The same pipeline object that refused every bad call above still returns the right image."""
    pipe = counted[0][0]
    got = pipe("a photo", num_inference_steps=2, seed=3).images
    want = runtime_pipeline("a photo", num_inference_steps=2, seed=3).images
    np.testing.assert_array_equal(got, want)


# -- over HTTP --------------------------------------------------------------------------------------
HTTP_RESULTS: dict[str, tuple[str, int, str, str]] = {}  # id -> (label, status, type, message)


@pytest.fixture(scope="module")
def service(runtime_pipeline):
    from test_serve import serving

    from sdrt.serve.api import LOOPBACK_NAMES

    with serving(runtime_pipeline, ready=False, api_key=HTTP_KEY, allowed_hosts=LOOPBACK_NAMES) as (client, _, _):
        yield client


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
def test_bad_request_over_http_gets_sdrts_error(case, service):
    headers = {"Authorization": f"Bearer {HTTP_KEY}", "Host": "localhost", "Content-Type": "application/json"}
    headers.update(case.headers)
    response = service.request(case.method, case.path, content=case.body, headers=headers)
    body = response.json()
    assert response.status_code == case.status, response.text[:300]
    assert set(body) == {"error"} and body["error"]["type"] == case.type, body
    assert case.says in body["error"]["message"], body
    assert len(response.content) < 1000  # a summary, never the refused value echoed
    label = f"{case.id} (before: {case.before})" if case.before else case.id
    HTTP_RESULTS[case.id] = (label, response.status_code, case.type, body["error"]["message"])


# -- damaged artifacts ------------------------------------------------------------------------------
def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _save_manifest(root: Path, data: dict) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def _rerecord(root: Path, rel: str, new_rel: str | None = None) -> None:
    """Rewrite the manifest's record of ``rel`` to match the file now there (a crafted, consistent artifact)."""
    from sdrt.runtime.hashing import sha256_file

    data = _manifest(root)
    for component in data["components"].values():
        for record in component["files"]:
            if record["path"] == rel:
                record["path"] = new_rel or rel
                path = (root / record["path"]).resolve()
                record["sha256"], record["bytes"] = sha256_file(path), path.stat().st_size
    _save_manifest(root, data)


def _external(root: Path, location: str) -> None:
    """The text encoder's largest weight moved to external data at ``location``."""
    import onnx

    path = root / "onnx" / "text_encoder.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    if not location.startswith("/"):
        (path.parent / location).write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    _rerecord(root, "onnx/text_encoder.onnx")


def _truncate(root: Path) -> None:
    path = root / "onnx" / "unet.onnx"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _rerecord(root, "onnx/unet.onnx")


def _escape(root: Path) -> None:
    shutil.copy(root / "onnx" / "unet.onnx", root.parent / "unet.onnx")
    _rerecord(root, "onnx/unet.onnx", "../unet.onnx")


def _edit_controlnet(**dims):
    def fault(root: Path, controlnet: Path) -> None:
        path = controlnet / "controlnet.json"
        data = json.loads(path.read_text())
        changed = {k: v for k, v in dims.items() if k != "family"}
        data.update(family=dims.get("family", data["family"]), dims={**data["dims"], **changed})
        path.write_text(json.dumps(data))

    return fault


def _without_unet_control(root: Path, controlnet: Path) -> None:
    data = _manifest(root)
    del data["components"]["unet_control"]
    _save_manifest(root, data)


CONTROLNET_FAULTS = {
    "controlnet for another family (sdxl)": _edit_controlnet(family="sdxl"),
    "controlnet for other UNet blocks": _edit_controlnet(unet_block_channels=[320, 640]),
    "controlnet for another text width": _edit_controlnet(cross_attention_dim=768),
    "controlnet directory without controlnet.json": lambda root, cn: (cn / "controlnet.json").unlink(),
    "controlnet graph changed (hash)": lambda root, cn: (cn / "onnx" / "controlnet.onnx").open("r+b").write(b"\0" * 64),
    "controlnets, model exported without unet_control": _without_unet_control,
}


def _edit(**changes):
    def fault(root: Path) -> None:
        data = _manifest(root)
        data.update(changes)
        _save_manifest(root, data)

    return fault


FAULTS = {
    "no manifest.json": lambda root: (root / MANIFEST_NAME).unlink(),
    "manifest.json not JSON": lambda root: (root / MANIFEST_NAME).write_text("{not json"),
    "manifest schema newer than the runtime": _edit(schema_version=99),
    "graph file missing": lambda root: (root / "onnx" / "unet.onnx").unlink(),
    "graph file changed (hash)": lambda root: (root / "onnx" / "unet.onnx").open("r+b").write(b"\0" * 64),
    "graph file truncated, hashes not checked": _truncate,
    "file path escaping the folder (../)": _escape,
    "external data at an absolute path": lambda root: _external(root, "/etc/hostname"),
    "external data outside the folder (../)": lambda root: _external(root, "../outside.bin"),
    "unknown model family": _edit(family="sd9"),
    "scheduler config missing": lambda root: (root / "scheduler" / "scheduler_config.json").unlink(),
    "tokenizer missing": lambda root: shutil.rmtree(root / "tokenizer"),
    "backend='nope'": lambda root: None,
    "bf16 on onnxruntime's CPU provider": lambda root: None,
}


@pytest.mark.parametrize("case", ARTIFACT_CASES, ids=[c.id for c in ARTIFACT_CASES])
def test_damaged_artifacts_are_refused(case, tiny_artifacts, controlnet_artifacts, tmp_path):
    root, controlnet = tmp_path / "artifacts", tmp_path / "controlnet"
    load = dict(case.load)
    if case.id in CONTROLNET_ARTIFACT_CASES:  # the model with unet_control and its ControlNet, one of them faulted
        model, _, exported = controlnet_artifacts("tiny")
        shutil.copytree(model, root, ignore=shutil.ignore_patterns("engines"))
        shutil.copytree(exported, controlnet)
        CONTROLNET_FAULTS[case.id](root, controlnet)
        load["controlnets"] = [controlnet]
    else:
        shutil.copytree(tiny_artifacts, root, ignore=shutil.ignore_patterns("engines"))
        FAULTS[case.id](root)
    tracemalloc.start()
    try:
        with pytest.raises(SdrtError) as info:
            Pipeline.load(root, **load).close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(info.value, case.error), f"{type(info.value).__name__}: {info.value}"
    message = str(info.value).replace(str(controlnet), "<cn>").replace(str(tmp_path), "<tmp>")
    assert case.says in message, message
    assert peak < ALLOCATION_LIMIT, f"{case.id}: {peak / 2**20:.1f} MiB allocated before refusing"
    RESULTS[case.id] = (f"artifacts: {case.id}", type(info.value).__name__, message)


def test_the_table_in_docs_lists_every_case():
    table = (Path(__file__).parents[1] / "docs" / "bad-inputs.md").read_text()
    rows = {line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ")}
    ids = {row.removeprefix("artifacts: ").split(" (before: ")[0] for row in rows}
    missing = [c.id for c in (*CALL_CASES, *ARTIFACT_CASES, *HTTP_CASES) if c.id not in ids]
    assert not missing, f"docs/bad-inputs.md lacks {missing}: regenerate it (see its first lines)"


def test_every_case_has_a_fault():
    assert sorted([*FAULTS, *CONTROLNET_FAULTS]) == sorted(c.id for c in ARTIFACT_CASES)


def _table() -> str:
    lines = [
        "# Bad inputs and the errors they get",
        "",
        "Generated by `SDRT_WRITE_TABLE=docs/bad-inputs.md .venv/bin/pytest tests/test_bad_inputs.py` on the tiny",
        "model (256x256 default, sizes in multiples of 16); tests/test_bad_inputs.py checks every row: the error's",
        "type and message, that no component ran before the refusal, and that under 4 MiB was allocated.",
        "Budget figures depend on the machine's memory.",
        "",
        "| Input | Error | Message |",
        "|---|---|---|",
    ]
    order = [c.id for c in CALL_CASES] + [c.id for c in ARTIFACT_CASES]
    for case_id in order:
        if case_id in RESULTS:
            label, error, message = RESULTS[case_id]
            cell = message.replace("|", "\\|")
            lines.append(f"| {label} | `{error}` | {cell} |")
    lines += [
        "",
        "## Over HTTP (`sdrt serve`)",
        "",
        "The tiny model's service with an API key and loopback's host names; every answer is",
        '`{"error": {"type", "message"}}` (the runtime\'s refusals above answer 400 with their message).',
        "",
        "| Request | Status | Type | Message |",
        "|---|---|---|---|",
    ]
    for case in HTTP_CASES:
        if case.id in HTTP_RESULTS:
            label, status, kind, message = HTTP_RESULTS[case.id]
            label, message = label.replace("|", "\\|"), message.replace("|", "\\|")
            lines.append(f"| {label} | {status} | `{kind}` | {message} |")
    return "\n".join(lines) + "\n"


# -- NaN from a component ---------------------------------------------------------------------------
class PoisonedSession(CountingSession):
    """A session whose ``poison``-th run returns NaN in every output (an fp16 overflow, simulated)."""

    def __init__(self, inner, poison: int):
        super().__init__(inner, [0])
        self.poison = poison

    def run(self, feed):
        out = super().run(feed)
        if self._counter[0] == self.poison:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out


@pytest.mark.parametrize(
    "component, poison, says",
    [
        ("text_encoder", 1, "text_encoder: expected finite values in output"),
        ("unet", 2, "unet at step 2 of 3 (timestep"),
        ("vae_decoder", 1, "vae_decoder: expected finite values in output 'image'"),
        ("vae_encoder", 1, "vae_encoder: expected finite values"),
    ],
)
def test_nan_from_a_component_is_an_error_not_an_image(tiny_artifacts, component, poison, says):
    from sdrt.runtime.errors import NumericalError

    with Pipeline.load(tiny_artifacts) as pipe:
        pipe.sessions[component] = PoisonedSession(pipe.sessions[component], poison)
        image = np.full((64, 64, 3), 0.5, np.float32) if component == "vae_encoder" else None
        with pytest.raises(NumericalError) as info:
            pipe("a photo", image=image, num_inference_steps=3, seed=0, height=64, width=64)
        assert says in str(info.value) and "no image was returned" in str(info.value)
        assert "graph is fp32" in str(info.value)
        # the same pipeline, its session healthy again, returns an image
        pipe.sessions[component].poison = -1
        assert pipe("a photo", num_inference_steps=3, seed=0, height=64, width=64).images.shape == (1, 64, 64, 3)

"""Backend sessions: one small contract, inputs checked against the manifest before every run.

A session is ``run(feed: dict[str, ndarray]) -> dict[str, ndarray]`` plus ``close()``. Backend
libraries are imported inside the functions that need them, so importing ``sdrt.runtime`` costs
only NumPy.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from sdrt.runtime.errors import ArtifactError, BackendError, InputError
from sdrt.runtime.manifest import Component, TensorSpec

log = logging.getLogger(__name__)


class Session(Protocol):
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feed(component: str, specs: list[TensorSpec], feed: dict[str, np.ndarray]) -> dict[str, int]:
    """Check names, dtypes and shapes of ``feed``; return the size bound to each symbolic dimension."""
    expected = [s.name for s in specs]
    if sorted(feed) != sorted(expected):
        raise InputError(f"{component}: expected inputs {expected}, got {sorted(feed)}")
    bound: dict[str, int] = {}
    for spec in specs:
        value = feed[spec.name]
        if value.dtype != np.dtype(spec.dtype):
            raise InputError(f"{component} input {spec.name!r}: expected dtype {spec.dtype}, got {value.dtype}")
        ok = len(value.shape) == len(spec.shape)
        for dim, size in zip(spec.shape, value.shape):
            if isinstance(dim, int):
                ok = ok and dim == size
            else:
                ok = ok and bound.setdefault(dim, size) == size and size > 0
        if not ok:
            raise InputError(
                f"{component} input {spec.name!r}: expected shape ({', '.join(map(str, spec.shape))}), "
                f"got {tuple(value.shape)} (bound so far: {bound})"
            )
    return bound


def to_graph_feed(
    component: str, names: dict[str, str], scalars: set[str] | list[str], feed: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Our tensor names -> the graph's (for graphs exported by other tools), with per-row inputs the
    graph takes as one scalar (optimum's UNet timestep) collapsed after checking the rows agree."""
    graph_feed = {}
    for name, value in feed.items():
        if name in scalars:
            if value.size and not (value == value.flat[0]).all():
                raise InputError(
                    f"{component} input {name!r}: this graph takes one value for the whole batch, got {value}"
                )
            value = value.reshape(-1)[:1].reshape(())
        graph_feed[names.get(name, name)] = value
    return graph_feed


def check_graph_inputs(path: Path, expected: list[str], found: list[str]) -> None:
    """ArtifactError unless the graph's input names are the manifest's (in the graph's naming)."""
    if sorted(found) != sorted(expected):
        raise ArtifactError(
            f"{path}: expected graph inputs {sorted(expected)} per the manifest, got {sorted(found)} (re-run the export)"
        )


# Graphs that run in turn within each denoising step (a ControlNet, then the UNet taking its residuals): each session
# has its own intra-op thread pool, and a pool whose threads spin-wait after its run takes the cores from the next
# session's. Measured on 2 cores (SD 1.5 shapes, 256x256, batch 2): the ControlNet call ~10% faster with spinning off,
# the controlled step 3-10% faster; the plain UNet, which runs back to back, keeps spinning.
TAKING_TURNS = ("controlnet_embedding", "controlnet", "unet_control")


class OrtSession:
    """An onnxruntime ``InferenceSession`` on the given providers (the registry's backends pick them)."""

    def __init__(
        self,
        root: Path,
        component: Component,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        threads: int = 0,
        provider_options: dict[str, str] | None = None,
        use_engine: bool = False,
        weights: Mapping[str, np.ndarray] | None = None,
    ):
        """``use_engine``: load this CPU's pre-optimized graph from ``engines/`` when one matches
        (``sdrt.runtime.ort_cpu_engines``); otherwise the portable graph, optimized at load.
        ``weights``: initializer name -> values used instead of the file's (LoRA-merged weights). The session
        then starts from the engine's fused graph (``find_lora_source``; else the portable graph) and is
        optimized with those weights in place, so it runs as fast as the engine would with them built in."""
        import onnxruntime as ort

        self.name = component.name
        self.inputs, self.outputs = component.inputs, component.outputs
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendError(
                f"onnxruntime providers: expected {list(providers)}, this onnxruntime "
                f"({ort.__version__}) has {ort.get_available_providers()} (on an NVIDIA machine: pip uninstall -y "
                "onnxruntime onnxruntime-gpu && pip install 'sdrt[gpu]'; or use backend='onnxruntime' for the CPU)"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if tuple(providers) == ("CPUExecutionProvider",):
            # The CPU arena keeps every block it ever grew to, sized for the largest call seen (a 512x512
            # VAE decode), for the life of the session. Without it large tensors go back to the system
            # after each call: SD 1.5-shaped 512x512 generation peaked at 5.11 GiB instead of 5.86.
            options.enable_cpu_mem_arena = False
            if component.name in TAKING_TURNS:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path, self.engine = Path(root) / component.path, None
        if use_engine and weights:
            from sdrt.runtime.ort_cpu_engines import find_lora_source

            source, why_not = find_lora_source(root, component)
            if source is None:
                log.info("%s: adapter weights on the portable graph: %s", component.name, why_not)
            else:
                path, self.engine = source, source
        elif use_engine:
            from sdrt.runtime.ort_cpu_engines import find_engine

            engine, why_not = find_engine(root, component)
            if engine is None:
                log.info("%s: loading the portable graph: %s", component.name, why_not)
            else:  # already optimized for this CPU: optimizing again would only cost time
                path, self.engine = engine, engine
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._weights: list = []
        self.disabled_optimizers = self._replace_weights(ort, options, path, weights or {})
        chosen: list = list(providers)
        if provider_options:  # options for the first provider (TensorRT's profiles and caches)
            chosen[0] = (providers[0], provider_options)
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=chosen, disabled_optimizers=self.disabled_optimizers or None
            )
        except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
            raise ArtifactError(
                f"{path}: expected an ONNX graph onnxruntime {ort.__version__} can load, got: {e} "
                "(re-run the export if the file is damaged)"
            ) from e
        self._names = {s.name: component.graph_names.get(s.name, s.name) for s in (*self.inputs, *self.outputs)}
        self._scalars = set(component.scalar_inputs)
        check_graph_inputs(
            path, [self._names[s.name] for s in self.inputs], [i.name for i in self._session.get_inputs()]
        )
        self._output_names = [self._names[o.name] for o in self.outputs]

    def _replace_weights(self, ort, options, path: Path, weights: Mapping[str, np.ndarray]) -> list[str]:
        """Hand ``weights`` to onnxruntime in place of the graph's; return the optimizers to turn off.

        Weights the graph keeps in external data go through ``add_external_initializers``: they replace the
        graph's before any optimization, so constant folding, the NCHWc layout and weight pre-packing all see
        them. Inline ones can only go through ``add_initializer``, which replaces them after the optimizations:
        onnxruntime then neither pre-packs them nor reorders them, and its NCHWc transformer would reorder a
        convolution's weight from the graph's own values, silently ignoring the new ones (onnxruntime 1.32;
        checked by tests/test_lora.py), so a session replacing an inline 4-D weight runs without it."""
        if not weights:
            return []
        from sdrt.runtime.onnx_proto import read_initializers

        found = read_initializers(path, weights)
        external = [n for n in weights if n in found and found[n].location]
        if external:
            options.add_external_initializers(
                external, [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[n])) for n in external]
            )
        inline = [n for n in weights if n not in external]
        for name in inline:  # onnxruntime keeps pointers into these buffers: they live as long as the session
            ortvalue = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(weights[name]))
            options.add_initializer(name, ortvalue)
            self._weights.append(ortvalue)
        return ["NchwcTransformer"] if any(np.ndim(weights[n]) == 4 for n in inline) else []

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(self.name, self.inputs, feed)
        graph_feed = to_graph_feed(self.name, self._names, self._scalars, feed)
        outs = self._session.run(self._output_names, graph_feed)
        return {o.name: out for o, out in zip(self.outputs, outs)}

    def close(self) -> None:
        self._session = None

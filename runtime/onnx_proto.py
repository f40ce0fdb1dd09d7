"""What the runtime needs from an ONNX file, read from the protobuf wire format without ``onnx``.

The runtime does not depend on the ``onnx`` package, yet it must know, before any backend opens a
graph, which files the graph's tensors read their weights from (external data), and for folders
written by other tools, the graph's inputs, outputs, opset and weight precision. This module reads
exactly that from the wire format: field numbers are onnx's ``onnx.proto`` (IR version 14).

The file is memory-mapped and walked by offsets: length-delimited payloads the runtime does not
need (``raw_data``, numeric arrays, node inputs, doc strings) are skipped, never copied, so a 2 GB
graph with embedded weights costs what its structure costs, not what its weights weigh. Every
place a tensor can hide is visited: graph initializers, sparse initializers (values and indices),
tensor-valued node attributes (``t``, ``tensors``, ``sparse_tensor``, ``sparse_tensors``),
subgraphs (``g``, ``graphs``, recursively), training graphs and function bodies.

A truncated or malformed file raises :class:`ArtifactError` naming the file.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.runtime.errors import ArtifactError

# TensorProto.DataType values the runtime names.
FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, DOUBLE, BFLOAT16 = 1, 2, 3, 6, 7, 9, 10, 11, 16
DTYPE_NAMES = {
    FLOAT: "float32",
    UINT8: "uint8",
    INT8: "int8",
    4: "uint16",
    5: "int16",
    INT32: "int32",
    INT64: "int64",
    8: "string",
    BOOL: "bool",
    FLOAT16: "float16",
    DOUBLE: "float64",
    12: "uint32",
    13: "uint64",
    BFLOAT16: "bfloat16",
}
EXTERNAL = 1  # TensorProto.DataLocation

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
# Nesting of graphs in graphs (If/Loop/Scan bodies) past which the file is refused. Each level is
# three messages (graph, node, attribute): 32 levels are about protobuf's own limit of 100.
MAX_GRAPH_DEPTH = 32

Dim = int | str | None  # dim_value, dim_param, or neither (unknown)


@dataclass(frozen=True)
class ValueInfo:
    """A graph input or output. ``dims`` is None when the graph gives no shape (or no tensor type),
    ``()`` for a scalar."""

    name: str
    elem_type: int  # TensorProto.DataType; 0 when not given or not a tensor
    dims: tuple[Dim, ...] | None

    @property
    def dtype(self) -> str | None:
        return DTYPE_NAMES.get(self.elem_type)


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose data lives in another file."""

    location: str  # as written: relative to the graph file's folder
    tensor: str
    # Where the tensor is, for messages: "graph 'main'", or for a subgraph's
    # "graph 'main' > If node 'n' attribute 'then_branch' > graph 'then' > Constant node 'k' attribute 'value'"
    graph: str


@dataclass
class OnnxInfo:
    path: Path
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[ValueInfo] = field(default_factory=list)
    opset_import: list[tuple[str, int]] = field(default_factory=list)  # (domain, version) as listed
    external: list[ExternalRef] = field(default_factory=list)  # every tensor of every graph and function
    # The main graph's initializers with two or more dimensions (the weights): data type -> count.
    initializer_types: dict[int, int] = field(default_factory=dict)
    graph_name: str = ""

    @property
    def opset(self) -> int:
        """The default (ai.onnx) domain's opset version; 0 when not listed."""
        return max((v for d, v in self.opset_import if d in ("", "ai.onnx")), default=0)

    @property
    def locations(self) -> list[str]:
        """The distinct external data locations, in order of first use."""
        return list(dict.fromkeys(ref.location for ref in self.external))


def read(path: str | Path) -> OnnxInfo:
    """Read ``path``'s inputs, outputs, opsets, external data references and weight types."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return _Reader(b"", path).model()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _Reader(buf, path).model()
    except OSError as e:
        raise ArtifactError(f"{path}: expected a readable ONNX file, got {e} (re-run the export)") from e


def _str(b: bytes) -> str:
    # proto2 strings are not checked for UTF-8 by onnxruntime's parser: keep the bytes as they are
    # (surrogateescape maps them back to the same bytes for file-system calls).
    return b.decode("utf-8", "surrogateescape")


class _Reader:
    """Walks one file's bytes. ``_message`` lists the fields of one message that the caller wants,
    as (field number, wire type, a, b): for a varint its value and end, for a length-delimited field
    its payload's start and end offsets; everything else is skipped by offset."""

    def __init__(self, buf, path: Path):
        self.buf = buf
        self.path = path
        self.info = OnnxInfo(path)

    # -- wire format ---------------------------------------------------------------------------
    def _fail(self, what: str, pos: int) -> ArtifactError:
        return ArtifactError(
            f"{self.path}: expected an ONNX model (protobuf), got a truncated or malformed file "
            f"({what} at byte {pos} of {len(self.buf)}) (re-run the export, or copy the file again)"
        )

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        buf = self.buf
        result = shift = 0
        start = pos
        while pos < end:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7
            if shift > 63:
                raise self._fail("a varint longer than 10 bytes", start)
        raise self._fail("a varint running past the end of its message", start)

    def _message(self, pos: int, end: int, want: frozenset[int]) -> list[tuple[int, int, int, int]]:
        # The hot loop (every node and attribute of a graph passes here): one-byte varints, by far
        # the most common tags, lengths and values, are decoded inline.
        buf, varint, out = self.buf, self._varint, []
        while pos < end:
            tag_at = pos
            tag = buf[pos]
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == _LEN:
                if pos < end and buf[pos] < 0x80:
                    length = buf[pos]
                    pos += 1
                elif pos + 1 < end and buf[pos + 1] < 0x80:  # a node, a tensor's header
                    length = (buf[pos] & 0x7F) | (buf[pos + 1] << 7)
                    pos += 2
                else:
                    length, pos = varint(pos, end)
                stop = pos + length
                if stop > end:
                    raise self._fail(f"field {number} of {length} bytes running past the end of its message", tag_at)
                if number in want:
                    out.append((number, _LEN, pos, stop))
                pos = stop
            elif wire == _VARINT:
                if pos < end and buf[pos] < 0x80:
                    value = buf[pos]
                    pos += 1
                else:
                    value, pos = varint(pos, end)
                if number in want:
                    out.append((number, _VARINT, value, pos))
            elif wire == _I64 or wire == _I32:
                pos += 8 if wire == _I64 else 4
                if pos > end:
                    raise self._fail(f"fixed-size field {number} running past the end of its message", tag_at)
            elif wire == _SGROUP:
                pos = self._skip_group(number, pos, end)
            else:
                raise self._fail(f"wire type {wire} (field {number})", tag_at)
            if number == 0:
                raise self._fail("field number 0", tag_at)
        return out

    def _skip_group(self, number: int, pos: int, end: int) -> int:
        """Past the end-group tag matching ``number`` (groups are obsolete; a parser must still skip them)."""
        start, depth = pos, 0
        while pos < end:
            tag, pos = self._varint(pos, end)
            wire = tag & 7
            if wire == _EGROUP:
                if depth == 0:
                    if tag >> 3 != number:
                        raise self._fail("a mismatched end-group tag", pos)
                    return pos
                depth -= 1
            elif wire == _SGROUP:
                depth += 1
            elif wire == _VARINT:
                _, pos = self._varint(pos, end)
            elif wire == _LEN:
                length, pos = self._varint(pos, end)
                pos += length
            elif wire in (_I64, _I32):
                pos += 8 if wire == _I64 else 4
            else:
                raise self._fail(f"wire type {wire} in a group", pos)
        raise self._fail("a group without its end", start)

    def _text(self, start: int, end: int) -> str:
        return _str(self.buf[start:end])

    @staticmethod
    def _int64(value: int) -> int:
        return value - (1 << 64) if value >= 1 << 63 else value

    # -- messages (field numbers from onnx.proto) --------------------------------------------------
    def model(self) -> OnnxInfo:
        graphs = 0
        # ModelProto: graph = 7, opset_import = 8, training_info = 20, functions = 25
        for number, wire, a, b in self._message(0, len(self.buf), _MODEL):
            if wire != _LEN:
                continue
            if number == 7:
                self._graph(a, b, None, 0, top=True)
                graphs += 1
            elif number == 8:
                self.info.opset_import.append(self._opset(a, b))
            elif number == 20:  # TrainingInfoProto: initialization = 1, algorithm = 2
                for _, w, c, d in self._message(a, b, _TRAINING):
                    if w == _LEN:
                        self._graph(c, d, "training_info", 0, top=False)
            else:
                self._function(a, b)
        if not graphs:
            raise ArtifactError(
                f"{self.path}: expected an ONNX model with a graph, got {len(self.buf)} bytes without one "
                "(an empty, truncated or non-ONNX file; re-run the export)"
            )
        return self.info

    def _opset(self, start: int, end: int) -> tuple[str, int]:
        domain, version = "", 0  # OperatorSetIdProto: domain = 1, version = 2
        for number, wire, a, b in self._message(start, end, _OPSET):
            if number == 1 and wire == _LEN:
                domain = self._text(a, b)
            elif number == 2 and wire == _VARINT:
                version = self._int64(a)
        return domain, version

    def _graph(self, start: int, end: int, parent: str | None, depth: int, top: bool) -> None:
        # GraphProto: node = 1, name = 2, initializer = 5, input = 11, output = 12, sparse_initializer = 15
        if depth > MAX_GRAPH_DEPTH:
            raise self._fail(f"subgraphs nested more than {MAX_GRAPH_DEPTH} deep", start)
        fields = [f for f in self._message(start, end, _GRAPH if top else _SUBGRAPH) if f[1] == _LEN]
        name = next((self._text(a, b) for number, _, a, b in reversed(fields) if number == 2), "")
        label = f"graph {name!r}" if parent is None else f"{parent} graph {name!r}"
        if top:
            self.info.graph_name = name
        for number, _, a, b in fields:
            if number == 1:
                self._node(a, b, label, depth)
            elif number == 5:
                self._tensor(a, b, label, weights=top)
            elif number == 15:
                self._sparse(a, b, label)
            elif number == 11:
                self.info.inputs.append(self._value_info(a, b))
            elif number == 12:
                self.info.outputs.append(self._value_info(a, b))

    def _function(self, start: int, end: int) -> None:
        # FunctionProto: name = 1, node = 7, attribute_proto = 11 (default attribute values)
        fields = [f for f in self._message(start, end, _FUNCTION) if f[1] == _LEN]
        name = next((self._text(a, b) for number, _, a, b in reversed(fields) if number == 1), "")
        label = f"function {name!r}"
        for number, _, a, b in fields:
            if number == 7:
                self._node(a, b, label, 0)
            elif number == 11:
                self._attribute(a, b, label, "", 0)

    def _node(self, start: int, end: int, graph: str, depth: int) -> None:
        # NodeProto: name = 3, op_type = 4, attribute = 5. Most attributes hold numbers or strings:
        # an attribute whose bytes have no byte a tensor's or graph's tag can start with is skipped
        # unparsed (sound even against over-long tag encodings: see _MAY_HOLD_TENSOR).
        fields = self._message(start, end, _NODE)
        may_hold = _MAY_HOLD_TENSOR.search
        attributes = [
            (a, b) for number, wire, a, b in fields if number == 5 and wire == _LEN and may_hold(self.buf, a, b)
        ]
        if not attributes:
            return
        name = op_type = ""
        for number, wire, a, b in fields:
            if number == 3 and wire == _LEN:
                name = self._text(a, b)
            elif number == 4 and wire == _LEN:
                op_type = self._text(a, b)
        node = f"{op_type or 'a'} node {name!r}" if name else f"{op_type or 'a'} node"
        for a, b in attributes:
            self._attribute(a, b, graph, node, depth)

    def _attribute(self, start: int, end: int, graph: str, node: str, depth: int) -> None:
        # AttributeProto: name = 1, t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22,
        # sparse_tensors = 23
        fields = [f for f in self._message(start, end, _ATTRIBUTE) if f[1] == _LEN]
        if len(fields) < 2 and (not fields or fields[0][0] == 1):
            return  # a name and numbers or strings: no tensor, no graph
        name = next((self._text(a, b) for number, _, a, b in reversed(fields) if number == 1), "")
        where = f"{graph} > {node} attribute {name!r}" if node else f"{graph} attribute {name!r}"
        for number, _, a, b in fields:
            if number in (5, 10):
                self._tensor(a, b, where, weights=False)
            elif number in (6, 11):
                self._graph(a, b, f"{where} >", depth + 1, top=False)
            elif number in (22, 23):
                self._sparse(a, b, where)

    def _sparse(self, start: int, end: int, graph: str) -> None:
        # SparseTensorProto: values = 1, indices = 2
        for _, wire, a, b in self._message(start, end, _SPARSE):
            if wire == _LEN:
                self._tensor(a, b, graph, weights=False)

    def _tensor(self, start: int, end: int, graph: str, weights: bool) -> None:
        # TensorProto: dims = 1, data_type = 2, name = 8, external_data = 13 (StringStringEntryProto:
        # key = 1, value = 2), data_location = 14
        name, data_type, rank, location, locations = "", 0, 0, 0, []
        for number, wire, a, b in self._message(start, end, _TENSOR):
            if number == 1:  # repeated int64, packed or not
                if wire == _VARINT:
                    rank += 1
                elif wire == _LEN:
                    pos = a
                    while pos < b:
                        _, pos = self._varint(pos, b)
                        rank += 1
            elif number == 2 and wire == _VARINT:
                data_type = a
            elif number == 8 and wire == _LEN:
                name = self._text(a, b)
            elif number == 13 and wire == _LEN:
                key = value = None
                for n, w, c, d in self._message(a, b, _ENTRY):
                    if w == _LEN and n == 1:
                        key = self._text(c, d)
                    elif w == _LEN and n == 2:
                        value = self._text(c, d)
                if key == "location":
                    locations.append(value or "")
            elif number == 14 and wire == _VARINT:
                location = a
        if location == EXTERNAL and not locations:
            raise ArtifactError(
                f"{self.path}: tensor {name!r} in {graph}: expected external data with a 'location', got none "
                "(the graph is malformed; re-run the export)"
            )
        for loc in locations:
            self.info.external.append(ExternalRef(loc, name, graph))
        if weights and rank >= 2:
            self.info.initializer_types[data_type] = self.info.initializer_types.get(data_type, 0) + 1

    def _value_info(self, start: int, end: int) -> ValueInfo:
        # ValueInfoProto: name = 1, type = 2 (TypeProto: tensor_type = 1)
        name, elem_type, dims = "", 0, None
        for number, wire, a, b in self._message(start, end, _VALUE_INFO):
            if wire != _LEN:
                continue
            if number == 1:
                name = self._text(a, b)
            else:
                for _, w, c, d in self._message(a, b, _TYPE):
                    if w == _LEN:
                        elem_type, dims = self._tensor_type(c, d, elem_type, dims)
        return ValueInfo(name, elem_type, dims)

    def _tensor_type(self, start: int, end: int, elem_type: int, dims):
        # TypeProto.Tensor: elem_type = 1, shape = 2 (TensorShapeProto: dim = 1)
        for number, wire, a, b in self._message(start, end, _TENSOR_TYPE):
            if number == 1 and wire == _VARINT:
                elem_type = a
            elif number == 2 and wire == _LEN:
                dims = tuple(dims or ()) + tuple(
                    self._dim(c, d) for _, w, c, d in self._message(a, b, _SHAPE) if w == _LEN
                )
        return elem_type, dims

    def _dim(self, start: int, end: int) -> Dim:
        # TensorShapeProto.Dimension: dim_value = 1, dim_param = 2 (a oneof: the last one given wins)
        value: Dim = None
        for number, wire, a, b in self._message(start, end, _DIM):
            if number == 1 and wire == _VARINT:
                value = self._int64(a)
            elif number == 2 and wire == _LEN:
                value = self._text(a, b)
        return value


# The first byte of a tag is the low 7 bits of (field << 3 | wire), with the continuation bit when the
# tag takes more bytes, which an over-long (non-canonical, yet accepted) encoding can force on any
# tag. AttributeProto's t = 5, g = 6, tensors = 10, graphs = 11 (0x2A, 0x32, 0x52, 0x5A),
# sparse_tensor = 22 and sparse_tensors = 23 (0xB2, 0xBA, always continued): an attribute holding
# none of these bytes holds no tensor and no graph.
_MAY_HOLD_TENSOR = re.compile(rb"[\x2a\xaa\x32\xb2\x52\xd2\x5a\xda\xba]")

# The fields each message's reader wants; every other field is skipped by offset.
_MODEL = frozenset((7, 8, 20, 25))
_TRAINING = frozenset((1, 2))
_OPSET = frozenset((1, 2))
_GRAPH = frozenset((1, 2, 5, 11, 12, 15))
_SUBGRAPH = frozenset((1, 2, 5, 15))
_FUNCTION = frozenset((1, 7, 11))
_NODE = frozenset((3, 4, 5))
_ATTRIBUTE = frozenset((1, 5, 6, 10, 11, 22, 23))
_SPARSE = frozenset((1, 2))
_TENSOR = frozenset((1, 2, 8, 13, 14))
_ENTRY = frozenset((1, 2))
_VALUE_INFO = frozenset((1, 2))
_TYPE = frozenset((1,))
_TENSOR_TYPE = frozenset((1, 2))
_SHAPE = frozenset((1,))
_DIM = frozenset((1, 2))


# -- reading weights (LoRA merging needs the base weights the graph holds) ----------------------------
@dataclass(frozen=True)
class Initializer:
    """Where one of the main graph's initializers keeps its bytes: inline (``location`` "") at
    ``offset`` of the graph file, or at ``offset`` of the external data file ``location``."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int

    @property
    def dtype(self) -> str | None:
        return DTYPE_NAMES.get(self.data_type)


_INIT_TENSOR = frozenset((1, 2, 8, 9, 13, 14))


def read_initializers(path: str | Path, names: Collection[str]) -> dict[str, Initializer]:
    """Where the main graph's initializers ``names`` keep their bytes (names not found are absent).

    Only raw bytes are supported (``raw_data`` or external data), which is what every exporter writes
    for weights; an initializer named here in another encoding is an ArtifactError."""
    path, wanted = Path(path), set(names)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf, path)
            found: dict[str, Initializer] = {}
            for number, wire, a, b in reader._message(0, len(buf), frozenset((7,))):
                if number != 7 or wire != _LEN:
                    continue
                for n, w, c, d in reader._message(a, b, frozenset((5,))):
                    if n == 5 and w == _LEN:
                        init = _initializer(reader, c, d, wanted)
                        if init is not None:
                            found[init.name] = init
            return found
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: expected a readable ONNX file, got {e} (re-run the export)") from e


def _initializer(reader: _Reader, start: int, end: int, wanted: set[str]) -> Initializer | None:
    name, data_type, dims, raw, entries, location = "", 0, [], None, {}, 0
    for number, wire, a, b in reader._message(start, end, _INIT_TENSOR):
        if number == 8 and wire == _LEN:
            name = reader._text(a, b)
        elif number == 1:
            if wire == _VARINT:
                dims.append(reader._int64(a))
            elif wire == _LEN:
                pos = a
                while pos < b:
                    value, pos = reader._varint(pos, b)
                    dims.append(reader._int64(value))
        elif number == 2 and wire == _VARINT:
            data_type = a
        elif number == 9 and wire == _LEN:
            raw = (a, b - a)
        elif number == 13 and wire == _LEN:
            key = value = None
            for n, w, c, d in reader._message(a, b, _ENTRY):
                if w == _LEN and n == 1:
                    key = reader._text(c, d)
                elif w == _LEN and n == 2:
                    value = reader._text(c, d)
            if key is not None:
                entries[key] = value or ""
        elif number == 14 and wire == _VARINT:
            location = a
    if name not in wanted:
        return None
    if location == EXTERNAL:
        try:
            offset, length = int(entries.get("offset", "0")), int(entries["length"])
        except (KeyError, ValueError):
            raise ArtifactError(
                f"{reader.path}: initializer {name!r}: expected external data with a numeric 'length', got {entries}"
            ) from None
        return Initializer(name, data_type, tuple(dims), entries.get("location", ""), offset, length)
    if raw is None:
        raise ArtifactError(
            f"{reader.path}: initializer {name!r}: expected its values as raw bytes (raw_data or external data), "
            "got another encoding (re-export with sdrt)"
        )
    return Initializer(name, data_type, tuple(dims), "", raw[0], raw[1])

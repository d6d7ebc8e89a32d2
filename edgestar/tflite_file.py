"""Read and annotate ``.tflite`` flatbuffers without TensorFlow (schema from ai-edge-litert).

edgestar stores its preprocessing and provenance as a JSON metadata entry named
``edgestar.preprocessing`` so a board-side app can read mean/std/size from the model itself.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

METADATA_NAME = "edgestar.preprocessing"


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _op_names() -> dict[int, str]:
    ops = _schema().BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_") and isinstance(v, int)}


def op_counts(model: bytes | str | Path) -> Counter:
    """Operator histogram of subgraph 0, e.g. ``{'CONV_2D': 30, 'MUL': 16, ...}``."""
    buf = _read(model)
    schema = _schema()
    m = schema.Model.GetRootAs(buf, 0)
    names = _op_names()
    codes = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code == schema.BuiltinOperator.CUSTOM:
            codes.append(f"CUSTOM:{oc.CustomCode().decode()}")
        else:
            codes.append(names.get(code, str(code)))
    graph = m.Subgraphs(0)
    return Counter(codes[graph.Operators(i).OpcodeIndex()] for i in range(graph.OperatorsLength()))


def flex_ops(counts: Counter) -> list[str]:
    return sorted(op for op in counts if op.startswith("CUSTOM:Flex") or op.startswith("CUSTOM:"))


def read_metadata(model: bytes | str | Path, name: str = METADATA_NAME) -> dict | None:
    buf = _read(model)
    m = _schema().Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() and md.Name().decode() == name:
            data = m.Buffers(md.Buffer()).DataAsNumpy()
            return json.loads(bytes(data).decode())
    return None


def add_metadata(model: bytes, payload: dict, name: str = METADATA_NAME) -> bytes:
    """Return ``model`` with a JSON metadata entry ``name`` (replacing an existing one)."""
    import flatbuffers
    import numpy as np

    schema = _schema()
    obj = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    obj.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = [md for md in (obj.metadata or []) if _name(md) != name] + [entry]
    builder = flatbuffers.Builder(len(model) + len(data) + 1024)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _name(md) -> str:
    return md.name.decode() if isinstance(md.name, bytes) else str(md.name)


def _read(model) -> bytes:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return Path(model).read_bytes()

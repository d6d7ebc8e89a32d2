"""Read and annotate ``.tflite`` flatbuffers without TensorFlow (schema from ai-edge-litert).

edgestar stores its preprocessing and provenance as a JSON metadata entry named
``edgestar.preprocessing`` so a board-side app can read mean/std/size from the model itself.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

METADATA_NAME = "edgestar.preprocessing"


def flatbuffer_schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _op_names() -> dict[int, str]:
    ops = flatbuffer_schema().BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_") and isinstance(v, int)}


def operators(model):
    """``(schema, subgraph 0, [(op name, operator), ...])``; custom ops named ``CUSTOM:<code>``."""
    schema = flatbuffer_schema()
    m = schema.Model.GetRootAs(_read(model), 0)
    builtin = _op_names()
    names = []
    for i in range(m.OperatorCodesLength()):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())  # schema v3 keeps both fields
        names.append(f"CUSTOM:{oc.CustomCode().decode()}" if code == schema.BuiltinOperator.CUSTOM
                     else builtin.get(code, str(code)))
    graph = m.Subgraphs(0)
    ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
    return schema, graph, [(names[op.OpcodeIndex()], op) for op in ops]


def op_counts(model: bytes | str | Path) -> Counter:
    """Operator histogram of subgraph 0, e.g. ``{'CONV_2D': 30, 'MUL': 16, ...}``."""
    _, _, ops = operators(model)
    return Counter(name for name, _ in ops)


# Builtin ops with int8 kernels in TensorFlow Lite Micro (its MicroMutableOpResolver), restricted
# to ones edgestar's graphs could contain. REVERSE_V2 was run in the tflite-micro interpreter.
TFLM_INT8_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "DEQUANTIZE",
    "FULLY_CONNECTED", "HARD_SWISH", "LOGISTIC", "MAX_POOL_2D", "MEAN", "MUL", "PAD", "PADV2",
    "QUANTIZE", "RELU", "RELU6", "RESHAPE", "REVERSE_V2", "SOFTMAX", "SQUEEZE", "STRIDED_SLICE",
    "SUB", "SUM", "TRANSPOSE",
})


def flex_ops(counts: Counter) -> list[str]:
    """Flex (SELECT_TF) and other custom ops: no edge runtime edgestar targets has them."""
    return sorted(op for op in counts if op.startswith("CUSTOM:"))


def float_ops_inside(model) -> list[str]:
    """Ops of an integer model that compute in float (QUANTIZE in / DEQUANTIZE out excepted)."""
    schema, graph, ops = operators(model)
    floats = (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)
    found = []
    for name, op in ops:
        inputs = [op.Inputs(j) for j in range(op.InputsLength())]
        outputs = [op.Outputs(j) for j in range(op.OutputsLength())]
        tensors = {"QUANTIZE": outputs, "DEQUANTIZE": inputs}.get(name, inputs + outputs)
        if any(t >= 0 and graph.Tensors(t).Type() in floats for t in tensors):
            found.append(name)
    return found


def grouped_convs(model) -> int:
    """CONV_2D ops whose filter sees fewer input channels than the input has (grouped)."""
    _, graph, ops = operators(model)
    return sum(
        int(graph.Tensors(op.Inputs(1)).ShapeAsNumpy()[-1] != graph.Tensors(op.Inputs(0)).ShapeAsNumpy()[-1])
        for name, op in ops if name == "CONV_2D")


def float_region(model: bytes | str | Path, names: list[str]) -> list[str]:
    """What to hand the quantizer (``denylisted_nodes``: ops named by their output tensor)
    so that the tensors ``names`` stay float: the ops writing them and every op reading
    them. Keeping only the writer float would not help: its output would be quantized
    again, to the same int8 grid, for its int8 readers."""
    _, graph, ops = operators(model)
    all_names = tensor_names(model)
    keep = set(names)
    wanted = {i for i, n in enumerate(all_names) if n in keep}
    region: list[str] = []
    for _, op in ops:
        inputs = {op.Inputs(j) for j in range(op.InputsLength())}
        outputs = [op.Outputs(j) for j in range(op.OutputsLength())]
        if wanted & (inputs | set(outputs)):
            region += [all_names[t] for t in outputs if all_names[t] not in region]
    return region


def tensor_names(model: bytes | str | Path) -> list[str]:
    """Names of subgraph 0's tensors, by index (activation names survive quantization)."""
    graph = flatbuffer_schema().Model.GetRootAs(_read(model), 0).Subgraphs(0)
    return [graph.Tensors(i).Name().decode() for i in range(graph.TensorsLength())]


def read_metadata(model: bytes | str | Path, name: str = METADATA_NAME) -> dict | None:
    buf = _read(model)
    m = flatbuffer_schema().Model.GetRootAs(buf, 0)
    for i in range(m.MetadataLength()):
        md = m.Metadata(i)
        if md.Name() and md.Name().decode() == name:
            data = m.Buffers(md.Buffer()).DataAsNumpy()
            return json.loads(bytes(data).decode())
    return None


def add_metadata(model: bytes, payload: dict, name: str = METADATA_NAME) -> bytes:
    """Return ``model`` with a JSON metadata entry ``name`` (replacing an existing one)."""
    import numpy as np

    schema = flatbuffer_schema()
    obj = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    obj.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(obj.buffers) - 1
    obj.metadata = [md for md in (obj.metadata or []) if _name(md) != name] + [entry]
    return pack_model(obj, size_hint=len(model) + len(data))


BUFFER_ALIGNMENT = 16  # what the TFLite converter guarantees for tensor data (Buffer.data force_align)


def pack_model(obj, size_hint: int = 1 << 20) -> bytes:
    """Serialize a ``ModelT`` with buffer data 16-byte aligned and identical vectors stored once.

    The schema's own packer aligns buffer payloads to 1 byte only (unaligned int32 biases fault
    on some Cortex-M cores) and writes every vector anew: StarNet's per-channel int64 zero-point
    vectors (all zeros) then take ~10 % of an INT8 file. Tables may share a vector in a
    flatbuffer, so each distinct vector is written once and referenced from every table.
    """
    import flatbuffers
    import numpy as np

    class _Builder(flatbuffers.Builder):
        def __init__(self, size):
            super().__init__(size)
            self._vectors = {}

        def CreateNumpyVector(self, x):
            key = (x.dtype.str, x.tobytes())
            offset = self._vectors.get(key)
            if offset is None:
                if x.dtype == np.uint8:  # buffer payloads
                    self.StartVector(1, x.size, BUFFER_ALIGNMENT)
                    self.head = self.head - x.size
                    self.Bytes[self.head:self.head + x.size] = x.tobytes()
                    self.vectorNumElems = x.size
                    offset = self.EndVector()
                else:
                    offset = super().CreateNumpyVector(x)
                self._vectors[key] = offset
            return offset

    builder = _Builder(size_hint + 1024)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def buffer_offsets(model: bytes | str | Path) -> list[int]:
    """Absolute file offset of every non-empty buffer payload (for alignment checks)."""
    buf = _read(model)
    m = flatbuffer_schema().Model.GetRootAs(buf, 0)
    offsets = []
    for i in range(m.BuffersLength()):
        table = m.Buffers(i)._tab
        field = table.Offset(4)  # Buffer.data
        if field and table.VectorLen(field):
            offsets.append(table.Vector(field))
    return offsets


def _name(md) -> str:
    return md.name.decode() if isinstance(md.name, bytes) else str(md.name)


def _read(model) -> bytes:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return Path(model).read_bytes()

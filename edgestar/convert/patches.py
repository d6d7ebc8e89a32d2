"""Patch-based inference of the first layers (as MCUNetV2 does), as an exact rewrite of an INT8
``.tflite``: the same ops on horizontal strips, so the full-resolution maps never exist at once.

TFLite Micro keeps every tensor that is alive at the same time in its arena. In a StarNet the
peak is at the start: the input and the stem's output (96 px, S050: 27,648 + 73,728 B), then
the first stage's star (``ReLU6(f1(y)) * f2(y)`` at 24 x 24 with 3-4x the channels). Two
rewrites bring it down without changing a single output value:

- **stem pair**: the stem conv and the first downsampling conv (both 3 x 3, stride 2, SAME)
  become, per strip of the downsampled output, ``SLICE`` of the padded input → the stem conv
  (VALID) → ``PAD`` (right column, and the bottom row for the last strip) → the downsampling
  conv (VALID); a ``CONCATENATION`` joins the strips. The input is padded once up front, as
  SAME padding would (bottom row and right column: TFLite's SAME with stride 2 on even sizes).
  Each strip's stem rows overlap the next strip's by one row (the halo): that row is computed
  twice, the only extra MACs.
- **star chains**: ``f1``, ``f2`` (1 x 1 convs), their ``MUL`` and the ``g`` conv are
  pointwise, so they run strip by strip on slices of their input with no halo at all.

Every new tensor carries the quantization of the tensor it is a part of, every conv keeps its
weights, bias and requantization, and INT8 convs compute each output pixel from its own window
only: the rewritten model's outputs equal the original's bit for bit (``--patches`` checks
that on every run in TFLite Micro's interpreter). ``PAD`` fills with the zero point, which is
what SAME padding contributes in an INT8 conv (nothing).
"""
from __future__ import annotations

import copy

import numpy as np

from edgestar.errors import InputError


class _Graph:
    """Helpers over subgraph 0 of a ``ModelT``."""

    def __init__(self, model):
        from edgestar.convert.tflite_file import flatbuffer_schema

        self.s = flatbuffer_schema()
        self.model = model
        self.g = model.subgraphs[0]

    def code(self, op) -> int:
        c = self.model.operatorCodes[op.opcodeIndex]
        return max(c.builtinCode, c.deprecatedBuiltinCode)

    def is_op(self, op, name: str) -> bool:
        return self.code(op) == getattr(self.s.BuiltinOperator, name)

    def consumers(self, tensor: int) -> list:
        return [op for op in self.g.operators if tensor in list(op.inputs)]

    def producer(self, tensor: int):
        return next((op for op in self.g.operators if tensor in list(op.outputs)), None)

    def shape(self, tensor: int) -> list[int]:
        return [int(d) for d in self.g.tensors[tensor].shape]

    def opcode(self, name: str, version: int) -> int:
        code = getattr(self.s.BuiltinOperator, name)
        for i, c in enumerate(self.model.operatorCodes):
            if max(c.builtinCode, c.deprecatedBuiltinCode) == code:
                return i
        c = self.s.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), version
        self.model.operatorCodes.append(c)
        return len(self.model.operatorCodes) - 1

    def like(self, tensor: int, shape, name: str) -> int:
        """A new activation tensor with ``tensor``'s type and quantization."""
        t = copy.deepcopy(self.g.tensors[tensor])
        t.shape = np.array(shape, np.int32)
        t.name = name
        t.buffer = 0
        t.shapeSignature = None
        self.g.tensors.append(t)
        return len(self.g.tensors) - 1

    def const_int32(self, values, name: str) -> int:
        arr = np.asarray(values, np.int32)
        buf = self.s.BufferT()
        buf.data = np.frombuffer(arr.tobytes(), np.uint8)
        self.model.buffers.append(buf)
        t = self.s.TensorT()
        t.shape = np.array(arr.shape, np.int32)
        t.type = self.s.TensorType.INT32
        t.buffer = len(self.model.buffers) - 1
        t.name = name
        self.g.tensors.append(t)
        return len(self.g.tensors) - 1

    def op(self, name: str, version: int, inputs, outputs, options_type=0, options=None):
        op = self.s.OperatorT()
        op.opcodeIndex = self.opcode(name, version)
        op.inputs, op.outputs = list(inputs), list(outputs)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        return op

    def slice(self, source: int, begin, size, name: str) -> tuple:
        out = self.like(source, size, name)
        return self.op("SLICE", 2, [source, self.const_int32(begin, name + "/begin"),
                                    self.const_int32(size, name + "/size")], [out],
                       self.s.BuiltinOptions.SliceOptions, self.s.SliceOptionsT()), out

    def pad(self, source: int, paddings, name: str) -> tuple:
        shape = [d + a + b for d, (a, b) in zip(self.shape(source), paddings)]
        out = self.like(source, shape, name)
        return self.op("PAD", 2, [source, self.const_int32(paddings, name + "/paddings")], [out],
                       self.s.BuiltinOptions.PadOptions, self.s.PadOptionsT()), out

    def concat(self, parts, out: int, axis: int = 1):
        options = self.s.ConcatenationOptionsT()
        options.axis = axis
        return self.op("CONCATENATION", 2, parts, [out], self.s.BuiltinOptions.ConcatenationOptions, options)

    def copy_op(self, op, inputs, outputs, *, padding=None):
        new = copy.deepcopy(op)
        new.inputs, new.outputs = list(inputs), list(outputs)
        if padding is not None:
            new.builtinOptions.padding = padding
        return new

    def replace(self, old_ops: list, new_ops: list) -> None:
        """Put ``new_ops`` where the first of ``old_ops`` was; drop ``old_ops``."""
        ids = {id(o) for o in old_ops}
        at = min(i for i, o in enumerate(self.g.operators) if id(o) in ids)
        kept = [o for o in self.g.operators if id(o) not in ids]
        before = sum(1 for o in self.g.operators[:at] if id(o) not in ids)
        self.g.operators = kept[:before] + new_ops + kept[before:]


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges covering ``range(n)``, sizes differing by at most one."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _is_conv(gr: _Graph, op, *, kernel: int, stride: int) -> bool:
    if op is None or not gr.is_op(op, "CONV_2D"):
        return False
    o = op.builtinOptions
    w = gr.shape(op.inputs[1])
    return (w[1] == w[2] == kernel and o.strideH == o.strideW == stride
            and o.dilationHFactor == o.dilationWFactor == 1)


def _patch_stem_pair(gr: _Graph, strips: int) -> dict | None:
    """The first conv on the input and the conv after it, both 3x3 stride 2 SAME, in strips."""
    s = gr.s
    start = gr.g.inputs[0]
    rotate = gr.consumers(start)
    if len(rotate) == 1 and gr.is_op(rotate[0], "REVERSE_V2"):
        start = rotate[0].outputs[0]
    first = gr.consumers(start)
    if len(first) != 1 or not _is_conv(gr, first[0], kernel=3, stride=2):
        return None
    stem = first[0]
    mid = stem.outputs[0]
    after = gr.consumers(mid)
    if len(after) != 1 or not _is_conv(gr, after[0], kernel=3, stride=2):
        return None
    down = after[0]
    if stem.builtinOptions.padding != s.Padding.SAME or down.builtinOptions.padding != s.Padding.SAME:
        return None
    _, h, w, _ = gr.shape(start)
    _, h1, w1, _ = gr.shape(mid)
    _, h2, w2, _ = gr.shape(down.outputs[0])
    if h % 4 or w % 4 or (h1, w1, h2, w2) != (h // 2, w // 2, h // 4, w // 4):
        return None
    new_ops = []
    op, padded = gr.pad(start, [[0, 0], [0, 1], [0, 1], [0, 0]], "patches/input_padded")
    new_ops.append(op)
    parts, extra_rows = [], 0
    for i, (a, b) in enumerate(_bounds(h2, strips)):
        s0, s1 = 2 * a, min(2 * b + 1, h1)  # stem rows the strip's 3x3/2 window needs
        extra_rows += (2 * b + 1 <= h1 and b < h2)  # row 2b is computed again by the next strip
        op, xi = gr.slice(padded, [0, 2 * s0, 0, 0], [1, 2 * (s1 - s0) + 1, w + 1, gr.shape(start)[3]],
                          f"patches/stem_in_{i}")
        new_ops.append(op)
        si = gr.like(mid, [1, s1 - s0, w1, gr.shape(mid)[3]], f"patches/stem_{i}")
        new_ops.append(gr.copy_op(stem, [xi, *stem.inputs[1:]], [si], padding=s.Padding.VALID))
        op, sp = gr.pad(si, [[0, 0], [0, (2 * b + 1) - s1], [0, 1], [0, 0]], f"patches/stem_padded_{i}")
        new_ops.append(op)
        di = gr.like(down.outputs[0], [1, b - a, w2, gr.shape(down.outputs[0])[3]], f"patches/down_{i}")
        new_ops.append(gr.copy_op(down, [sp, *down.inputs[1:]], [di], padding=s.Padding.VALID))
        parts.append(di)
    new_ops.append(gr.concat(parts, down.outputs[0]))
    gr.replace([stem, down], new_ops)
    k = gr.shape(stem.inputs[1])
    extra_macs = extra_rows * w1 * k[0] * k[1] * k[2] * k[3]
    return {"layers": "stem + first downsampling conv", "strips": len(parts), "extra_macs": int(extra_macs)}


def _star_chains(gr: _Graph, min_rows: int) -> list:
    """(y, f1, f2, mul, g) for each ``g(ReLU6(f1(y)) * f2(y))`` whose maps have >= min_rows rows."""
    chains = []
    for mul in gr.g.operators:
        if not gr.is_op(mul, "MUL") or len(mul.inputs) != 2:
            continue
        f1, f2 = (gr.producer(t) for t in mul.inputs)
        if not all(_is_conv(gr, f, kernel=1, stride=1) for f in (f1, f2)) or f1 is f2:
            continue
        y = f1.inputs[0]
        if f2.inputs[0] != y or {id(o) for o in gr.consumers(y)} != {id(f1), id(f2)}:
            continue
        if any(len(gr.consumers(t)) != 1 for t in mul.inputs):
            continue
        after = gr.consumers(mul.outputs[0])
        if len(after) != 1 or not _is_conv(gr, after[0], kernel=1, stride=1):
            continue
        if gr.shape(y)[1] >= min_rows and all(t not in gr.g.outputs for t in (*mul.inputs, mul.outputs[0])):
            chains.append((y, f1, f2, mul, after[0]))
    return chains


def _patch_star(gr: _Graph, chain, strips: int, index: int) -> None:
    y, f1, f2, mul, g = chain
    _, h, w, c = gr.shape(y)
    new_ops, parts = [], []
    for i, (a, b) in enumerate(_bounds(h, strips)):
        name = f"patches/star{index}_{i}"
        op, yi = gr.slice(y, [0, a, 0, 0], [1, b - a, w, c], name + "/y")
        new_ops.append(op)
        outs = []
        for f in (f1, f2):
            t = gr.like(f.outputs[0], [1, b - a, w, gr.shape(f.outputs[0])[3]], name + ("/f1" if f is f1 else "/f2"))
            new_ops.append(gr.copy_op(f, [yi, *f.inputs[1:]], [t]))
            outs.append(t)
        order = [outs[0], outs[1]] if mul.inputs[0] == f1.outputs[0] else [outs[1], outs[0]]
        p = gr.like(mul.outputs[0], [1, b - a, w, gr.shape(mul.outputs[0])[3]], name + "/star")
        new_ops.append(gr.copy_op(mul, order, [p]))
        gi = gr.like(g.outputs[0], [1, b - a, w, gr.shape(g.outputs[0])[3]], name + "/g")
        new_ops.append(gr.copy_op(g, [p, *g.inputs[1:]], [gi]))
        parts.append(gi)
    new_ops.append(gr.concat(parts, g.outputs[0]))
    gr.replace([f1, f2, mul, g], new_ops)


def _drop_unused_tensors(gr: _Graph) -> None:
    used = set(gr.g.inputs) | set(gr.g.outputs)
    for op in gr.g.operators:
        used |= {i for i in list(op.inputs) + list(op.outputs) if i >= 0}
    keep = [i for i in range(len(gr.g.tensors)) if i in used]
    index = {old: new for new, old in enumerate(keep)}
    gr.g.tensors = [gr.g.tensors[i] for i in keep]
    for op in gr.g.operators:
        op.inputs = [index[i] if i >= 0 else i for i in op.inputs]
        op.outputs = [index[i] for i in op.outputs]
    gr.g.inputs = [index[i] for i in gr.g.inputs]
    gr.g.outputs = [index[i] for i in gr.g.outputs]
    for sig in gr.model.signatureDefs or []:
        for t in list(sig.inputs or []) + list(sig.outputs or []):
            t.tensorIndex = index[t.tensorIndex]


MAX_STRIPS = 10  # TFLite Micro's CONCATENATION takes at most 10 inputs (kMaxInputNum)


def patch_first_layers(data: bytes, *, strips: int = 6, star_strips: int | None = None) -> tuple[bytes, dict]:
    """``data`` with its stem pair run in ``strips`` strips and its first-stage star chains in
    ``star_strips`` (default: ``strips``; 0: leave them whole). Returns the new model and what
    was patched (layers, strips, the halo's extra MACs)."""
    from edgestar.convert.tflite_file import add_metadata, flatbuffer_schema, pack_model, read_metadata

    star_strips = strips if star_strips is None else star_strips
    if not 2 <= strips <= MAX_STRIPS or not (star_strips == 0 or 2 <= star_strips <= MAX_STRIPS):
        raise InputError(f"patch-based inference takes 2 to {MAX_STRIPS} strips (TFLite Micro's CONCATENATION "
                         f"joins at most {MAX_STRIPS}), got {strips} and {star_strips}")
    s = flatbuffer_schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(data, 0))
    if len(model.subgraphs) != 1:
        raise InputError("patch-based inference supports single-subgraph models only")
    gr = _Graph(model)
    stem = _patch_stem_pair(gr, strips)
    if stem is None:
        raise InputError("the model does not start with two 3x3 stride-2 SAME convs on an input whose sides "
                         "are multiples of 4: nothing to patch")
    first_stage_rows = gr.shape(gr.g.inputs[0])[1] // 4
    chains = _star_chains(gr, first_stage_rows) if star_strips else []
    for i, chain in enumerate(chains):
        _patch_star(gr, chain, star_strips, i)
    _drop_unused_tensors(gr)
    packed = pack_model(model, size_hint=len(data) + 65536)
    meta = read_metadata(data)
    summary = {"strips": stem["strips"], "star_strips": star_strips if chains else 0, "stem": stem,
               "star_chains": len(chains), "extra_macs": stem["extra_macs"]}
    if meta is not None:
        packed = add_metadata(packed, dict(meta, patches=summary))
    return packed, summary

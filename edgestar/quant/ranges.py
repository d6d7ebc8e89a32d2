"""INT8 activation ranges measured in PyTorch and handed to TFLite's own quantizer.

TFLite's post-training quantizer needs one ``(min, max)`` per float activation tensor of the
FP32 graph. Its built-in calibrator gets them by running the FP32 ``.tflite`` image by image
on TFLite's reference kernels, single-threaded: ~12 s for 200 images of StarNet-S1 at 224 px.
edgestar measures the same statistic on the folded PyTorch model instead (batched, on every
core, and overlapping the ONNX -> TensorFlow conversion), then writes the ranges into the FP32
flatbuffer exactly where the calibrator would (``QuantizationParameters.min/max``) and lets
TFLite's quantizer (``mlir_quantize``) do the rest. The quantized file is the one TFLite's
calibrator would produce, up to float rounding in the ranges.

Which PyTorch value is which TFLite tensor is found by value, not by name: one image runs
through both graphs, and each TFLite activation tensor is paired with the torch.fx node whose
output equals it (NHWC vs NCHW; spatially rotated by 180 degrees after edgestar's rotation
rewrite, see :mod:`edgestar.rewrite`). Fused ops need no special case: a CONV_2D with fused
ReLU6 equals the ``ReLU6`` node's output. A tensor without a match raises
:class:`UnmatchedTensors` and the caller falls back to TFLite's calibrator.

Owning the ranges is also what lets quantization-aware training train with the very ranges
the deployed model will use.
"""
from __future__ import annotations

import math

import numpy as np

MATCH_TOLERANCE = 1e-3  # max |TFLite - PyTorch| relative to the tensor's max |value|
RANGE_DIGITS = 5  # ranges are rounded outward to this many significant digits (see _round_out)


def _value_preserving():
    from torch import nn

    return (nn.Identity, nn.Dropout, nn.Flatten)


class UnmatchedTensors(RuntimeError):
    """Some TFLite activation tensors have no PyTorch counterpart (names in ``args[0]``)."""


def trace(model):
    """torch.fx graph of an eval-mode (folded) model: every intermediate value is a node."""
    import torch.fx

    return torch.fx.symbolic_trace(model.eval())


def aliases(gm) -> dict[str, str]:
    """Nodes that only pass their input on (identity, dropout, flatten modules, the graph
    output) -> the node whose value they carry; such a node is never a tensor of its own."""
    import torch.fx

    modules = dict(gm.named_modules())
    found: dict[str, str] = {}
    for node in gm.graph.nodes:
        passes_on = (node.op == "output" or node.op == "call_module"
                     and isinstance(modules.get(node.target), _value_preserving()))
        if passes_on and isinstance(node.args[0], torch.fx.Node):
            source = node.args[0].name
            found[node.name] = found.get(source, source)
    return found


def recording_interpreter(gm, on_value):
    """An fx interpreter calling ``on_value(node_name, tensor)`` for every tensor it computes."""
    import torch
    import torch.fx

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                on_value(n.name, value)
            return value

    return Recorder(gm)


def node_values(gm, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every floating-point intermediate of ``gm`` for the NCHW batch ``x``."""
    import torch

    values: dict[str, np.ndarray] = {}
    with torch.no_grad():
        recording_interpreter(gm, lambda name, v: values.__setitem__(name, v.numpy().copy())).run(
            torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return values


def node_ranges(gm, batches) -> dict[str, tuple[float, float]]:
    """Global (min, max) of every intermediate over all NCHW ``batches`` (what TFLite's
    calibrator records per tensor), rounded outward to ``RANGE_DIGITS`` significant digits."""
    import torch

    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def update(name, v):
        a, b = torch.aminmax(v)
        lo[name] = min(lo.get(name, math.inf), float(a))
        hi[name] = max(hi.get(name, -math.inf), float(b))

    recorder = recording_interpreter(gm, update)
    with torch.no_grad():
        for x in batches:
            recorder.run(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return {name: (_round_out(lo[name], math.floor), _round_out(hi[name], math.ceil)) for name in lo}


def _round_out(v: float, direction) -> float:
    """``v`` rounded away from the range's inside to RANGE_DIGITS significant digits.

    Float sums differ in their last bits with the thread count; rounding makes the ranges,
    and so the INT8 file, identical across machines in all but rare boundary cases, at a
    cost of at most 1e-5 of the range.
    """
    if v == 0.0 or not math.isfinite(v):
        return v
    step = 10.0 ** (math.floor(math.log10(abs(v))) - RANGE_DIGITS + 1)
    rounded = np.float32(direction(v / step) * step)  # the flatbuffer stores float32
    outward = np.float32(-np.inf if direction is math.floor else np.inf)
    while (rounded > v) if direction is math.floor else (rounded < v):
        rounded = np.nextafter(rounded, outward)
    return float(rounded)


# --------------------------------------------------------------------------- TFLite side

def activation_tensors(model: bytes) -> list[int]:
    """Indices of the float tensors TFLite's calibrator records: the graph inputs and every
    op output, in execution order."""
    from edgestar.convert.tflite_file import operators

    schema, graph, ops = operators(model)
    found: list[int] = []
    for t in [graph.Inputs(i) for i in range(graph.InputsLength())] + [
            op.Outputs(j) for _, op in ops for j in range(op.OutputsLength())]:
        if t >= 0 and t not in found and graph.Tensors(t).Type() == schema.TensorType.FLOAT32:
            found.append(t)
    return found


def tflite_values(model: bytes, x_nhwc: np.ndarray, tensors: list[int]) -> dict[int, np.ndarray]:
    """The values of ``tensors`` when the FP32 model runs one NHWC image (reference kernels,
    every intermediate kept)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], np.ascontiguousarray(x_nhwc, np.float32))
    interp.invoke()
    return {t: interp.get_tensor(t).copy() for t in tensors}


def nhwc_views(v: np.ndarray) -> list[np.ndarray]:
    """A PyTorch value as TFLite may hold it: NCHW -> NHWC, as is and rotated by 180 degrees."""
    if v.ndim != 4:
        return [v]
    nhwc = v.transpose(0, 2, 3, 1)
    return [nhwc, nhwc[:, ::-1, ::-1, :]]


def match_tensors(model: bytes, gm, sample: np.ndarray) -> dict[int, str]:
    """Pair every activation tensor of the FP32 TFLite ``model`` with the fx node of ``gm``
    computing the same value on ``sample`` (one NCHW image); raise UnmatchedTensors if any
    tensor has none.

    PyTorch values are compared as the fx interpreter produces them and then dropped, so only
    the TFLite side is held in memory at once (this runs while the converter works).
    """
    import torch

    tensors = activation_tensors(model)
    by_shape: dict[tuple, list[int]] = {}
    flite = tflite_values(model, sample.transpose(0, 2, 3, 1), tensors)
    for t, value in flite.items():
        by_shape.setdefault(value.shape, []).append(t)
    scale = {t: max(float(np.abs(v).max()), 1e-6) for t, v in flite.items()}
    best: dict[int, tuple[float, str]] = {}

    alias = aliases(gm)

    def compare(name, v):
        name = alias.get(name, name)
        for view in nhwc_views(v.numpy()):
            for t in by_shape.get(view.shape, ()):
                err = float(np.abs(view - flite[t]).max()) / scale[t]
                # On a tie the later node wins: a ReLU6 over a conv whose outputs all happen
                # to lie in [0, 6] is still the tensor TFLite stores (it fuses the two).
                if err <= MATCH_TOLERANCE and err <= best.get(t, (math.inf,))[0]:
                    best[t] = (err, name)

    with torch.no_grad():
        recording_interpreter(gm, compare).run(torch.from_numpy(np.ascontiguousarray(sample, np.float32)))
    unmatched = [t for t in tensors if t not in best]
    if unmatched:
        raise UnmatchedTensors(unmatched)
    return {t: name for t, (_, name) in best.items()}


def with_ranges(model: bytes, ranges: dict[int, tuple[float, float]]) -> bytes:
    """The FP32 flatbuffer with ``(min, max)`` recorded on the given tensors, as TFLite's
    calibrator records them: the input of ``mlir_quantize``."""
    from edgestar.convert.tflite_file import flatbuffer_schema, pack_model

    schema = flatbuffer_schema()
    obj = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0))
    tensors = obj.subgraphs[0].tensors
    for t, (lo, hi) in ranges.items():
        q = schema.QuantizationParametersT()
        q.min, q.max = [float(lo)], [float(hi)]
        tensors[t].quantization = q
    return pack_model(obj, size_hint=len(model))


def calibrated_model(model: bytes, gm, sample: np.ndarray,
                     ranges: dict[str, tuple[float, float]]) -> tuple[bytes, dict[int, str]]:
    """FP32 ``model`` annotated with ``ranges`` (fx node -> (min, max), see
    :func:`node_ranges`), its tensors paired to nodes on ``sample`` (one NCHW image).

    Returns the annotated model and the tensor -> node pairing. A tensor whose node has no
    range counts as unmatched.
    """
    pairs = match_tensors(model, gm, sample)
    missing = [t for t, name in pairs.items() if name not in ranges]
    if missing:
        raise UnmatchedTensors(missing)
    return with_ranges(model, {t: ranges[name] for t, name in pairs.items()}), pairs

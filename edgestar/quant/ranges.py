"""INT8 activation ranges measured in PyTorch and handed to TFLite's own quantizer.

TFLite's post-training quantizer needs one ``(min, max)`` per float activation tensor of the
FP32 graph. Its built-in calibrator gets them by running the FP32 ``.tflite`` image by image
on TFLite's reference kernels, single-threaded: ~12 s for 200 images of StarNet-S1 at 224 px.
edgestar measures the same statistic on the folded PyTorch model instead (batched, on every
core, and overlapping the ONNX -> TensorFlow conversion), then writes the ranges into the FP32
flatbuffer exactly where the calibrator would (``QuantizationParameters.min/max``) and lets
TFLite's quantizer (``mlir_quantize``) do the rest. The quantized file is the one TFLite's
calibrator would produce, up to float rounding in the ranges.

Which PyTorch value is which TFLite tensor is found by value, not by name: a few images
(``MATCH_IMAGES``) run through both graphs, and each TFLite activation tensor is paired with
the torch.fx node whose output equals it on every one of them (NHWC vs NCHW; spatially
rotated by 180 degrees after edgestar's rotation rewrite, see :mod:`edgestar.export.rewrite`).
Fused ops need no special case: a CONV_2D with fused ReLU6 equals the ``ReLU6`` node's
output. A tensor without a match raises :class:`UnmatchedTensors`, one that matches several
nodes of different ranges :class:`AmbiguousTensors` (a subclass), and the caller falls back
to TFLite's calibrator. Several images are needed because on one image a tensor can equal a
wrong node by accident (an all-zero ReLU output equals every other all-zero one).

Owning the ranges is also what lets quantization-aware training train with the very ranges
the deployed model will use.
"""
from __future__ import annotations

import math

import numpy as np

from edgestar.models.anatomy import value_preserving_modules

MATCH_TOLERANCE = 1e-3  # max |TFLite - PyTorch| relative to the tensor's max |value|, per image
# Images the tensor pairing compares on: on one image an all-zero tensor, or two nodes whose
# values happen to coincide there, can match the wrong node; each further image must agree too.
MATCH_IMAGES = 4
RANGE_DIGITS = 5  # ranges are rounded outward to this many significant digits (see _round_out)


class UnmatchedTensors(RuntimeError):
    """Some TFLite activation tensors have no PyTorch counterpart (indices in ``args[0]``)."""


class AmbiguousTensors(UnmatchedTensors):
    """Some TFLite activation tensors match several fx nodes whose ranges differ, on every
    image compared: ``args[0]`` the tensor indices, ``ties`` tensor -> the tied nodes (in
    execution order). Which range is right is unknown, so none is picked."""

    @property
    def ties(self) -> dict[int, list[str]]:
        return self.args[1]


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
                     and isinstance(modules.get(node.target), value_preserving_modules()))
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
    """The values of ``tensors`` when the FP32 model runs the NHWC batch ``x_nhwc`` (reference
    kernels, every intermediate kept), one image at a time; the images' values are
    concatenated on the batch axis."""
    per_image = list(_tflite_runs(model, x_nhwc, tensors))
    return {t: np.concatenate([np.atleast_1d(values[t]) for values in per_image]) for t in tensors}


def _tflite_runs(model: bytes, x_nhwc: np.ndarray, tensors: list[int]):
    """For each image of the NHWC batch ``x_nhwc``: ``{tensor: value}`` of the FP32 model on
    it. One interpreter serves all images; only one image's values are held at a time."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=model, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    index = interp.get_input_details()[0]["index"]
    for i in range(len(x_nhwc)):
        interp.set_tensor(index, np.ascontiguousarray(x_nhwc[i:i + 1], np.float32))
        interp.invoke()
        yield {t: interp.get_tensor(t).copy() for t in tensors}


def nhwc_views(v: np.ndarray) -> list[np.ndarray]:
    """A PyTorch value as TFLite may hold it: NCHW -> NHWC, as is and rotated by 180 degrees."""
    if v.ndim != 4:
        return [v]
    nhwc = v.transpose(0, 2, 3, 1)
    return [nhwc, nhwc[:, ::-1, ::-1, :]]


class TensorPairing:
    """Which fx node computes each TFLite activation tensor, decided image by image.

    For every image: :meth:`start_image` with the TFLite values on it, :meth:`offer` with
    every PyTorch value on the same image (NCHW), in execution order, then :meth:`end_image`
    (which drops the image's values). A node (in one orientation, see :func:`nhwc_views`)
    stays a candidate for a tensor only while it matches within ``MATCH_TOLERANCE`` on every
    image so far: the candidates after N images are exactly the nodes each image alone would
    have accepted. :meth:`result` then decides. Pure numpy: nothing here runs a model.
    """

    def __init__(self, tensors: list[int]):
        self.tensors = list(tensors)
        self.images = 0
        # tensor -> {(node, view): worst relative error so far}; None before the first image
        self._candidates: dict[int, dict[tuple[str, int], float]] | None = None
        self._matched: dict[int, dict[tuple[str, int], float]] | None = None  # this image's
        self._order: dict[str, int] = {}  # node -> position in execution order

    def start_image(self, flite: dict[int, np.ndarray]) -> None:
        """Begin an image: ``flite`` holds the TFLite value of every tensor on it."""
        self.end_image()
        self._flite = flite
        # relative to the tensor's largest |value| on this image, so the floor only matters
        # for a tensor that is all zero here (then only a node that is all zero matches)
        self._scale = {t: max(float(np.abs(flite[t]).max(initial=0.0)), 1e-6) for t in self.tensors}
        self._by_shape: dict[tuple, list[int]] = {}
        for t in self.tensors:
            self._by_shape.setdefault(flite[t].shape, []).append(t)
        self._matched = {t: {} for t in self.tensors}

    def offer(self, node: str, value: np.ndarray) -> None:
        """Compare the PyTorch value of ``node`` on the current image with every tensor still
        open to it; the value is not kept."""
        self._order.setdefault(node, len(self._order))
        for view_index, view in enumerate(nhwc_views(value)):
            key = (node, view_index)
            for t in self._by_shape.get(view.shape, ()):
                earlier = 0.0
                if self._candidates is not None:  # later images only confirm earlier matches
                    if key not in self._candidates[t]:
                        continue
                    earlier = self._candidates[t][key]
                err = float(np.abs(view - self._flite[t]).max()) / self._scale[t]
                if err <= MATCH_TOLERANCE:
                    self._matched[t][key] = max(err, earlier, self._matched[t].get(key, 0.0))

    def end_image(self) -> None:
        """Close the current image (if any): only what matched on it stays a candidate."""
        if self._matched is not None:
            self._candidates, self._matched = self._matched, None
            self._flite = self._scale = self._by_shape = None
            self.images += 1

    def candidates(self, t: int) -> dict[str, float]:
        """Node -> its smallest worst-image error over orientations, for tensor ``t``."""
        self.end_image()
        found: dict[str, float] = {}
        for (node, _), err in (self._candidates or {}).get(t, {}).items():
            found[node] = min(err, found.get(node, math.inf))
        return found

    def result(self, ranges: dict[str, tuple[float, float]] | None = None) -> dict[int, str]:
        """Tensor -> fx node; raise :class:`UnmatchedTensors` if some tensor has no candidate.

        Of several candidates the one with the smallest error wins, on a tie the later node:
        a ReLU6 over a conv whose outputs all happen to lie in [0, 6] is still the tensor
        TFLite stores (it fuses the two). With ``ranges`` (node -> (min, max)) only nodes
        that have a range are candidates (the caller's ranges name the nodes TFLite stores:
        QAT's leave out conv outputs fused with their activation), and a tensor whose
        candidates have different ranges raises :class:`AmbiguousTensors`: picking one would
        set a range that may be the wrong node's.
        """
        self.end_image()
        if self.images == 0:
            raise ValueError("no image was compared")
        pairs: dict[int, str] = {}
        unmatched: list[int] = []
        ties: dict[int, list[str]] = {}
        for t in self.tensors:
            found = self.candidates(t)
            if ranges is not None:
                found = {node: err for node, err in found.items() if node in ranges}
            if not found:
                unmatched.append(t)
                continue
            if ranges is not None and len({tuple(ranges[node]) for node in found}) > 1:
                ties[t] = sorted(found, key=self._order.__getitem__)
            pairs[t] = max(found, key=lambda node: (-found[node], self._order[node]))
        if unmatched:
            raise UnmatchedTensors(unmatched)
        if ties:
            raise AmbiguousTensors(sorted(ties), ties)
        return pairs


def pair_tensors(images, ranges: dict[str, tuple[float, float]] | None = None) -> dict[int, str]:
    """The pairing decision alone (see :class:`TensorPairing`), over arrays: ``images`` yields,
    per image, ``(tflite, node_values)``: the TFLite values ``{tensor: array}`` and the
    PyTorch ``(node, array)`` pairs on that image, in execution order."""
    pairing = None
    for flite, node_values in images:
        if pairing is None:
            pairing = TensorPairing(list(flite))
        pairing.start_image(flite)
        for node, value in node_values:
            pairing.offer(node, value)
        pairing.end_image()
    if pairing is None:
        raise ValueError("no image was compared")
    return pairing.result(ranges)


def match_tensors(model: bytes, gm, samples: np.ndarray,
                  ranges: dict[str, tuple[float, float]] | None = None) -> dict[int, str]:
    """Pair every activation tensor of the FP32 TFLite ``model`` with the fx node of ``gm``
    computing the same value on each image of ``samples`` (an NCHW batch of N >= 1 images;
    ``MATCH_IMAGES`` is a good N); raise :class:`UnmatchedTensors` if some tensor has none,
    and with ``ranges`` :class:`AmbiguousTensors` if some tensor matches nodes of different
    ranges (see :meth:`TensorPairing.result`).

    The graphs run one image at a time, and PyTorch values are compared as the fx
    interpreter produces them and then dropped, so only one image's TFLite values are held
    in memory at once (this runs while the converter works).
    """
    import torch

    samples = np.asarray(samples)
    if samples.ndim != 4 or len(samples) == 0:
        raise ValueError(f"samples must be an NCHW batch of at least one image, not shape {samples.shape}")
    tensors = activation_tensors(model)
    pairing = TensorPairing(tensors)
    alias = aliases(gm)
    recorder = recording_interpreter(gm, lambda name, v: pairing.offer(alias.get(name, name), v.numpy()))
    nhwc = samples.transpose(0, 2, 3, 1)
    with torch.no_grad():
        for i, flite in enumerate(_tflite_runs(model, nhwc, tensors)):
            pairing.start_image(flite)
            del flite  # held by the pairing until end_image: one image's values at a time
            recorder.run(torch.from_numpy(np.ascontiguousarray(samples[i:i + 1], np.float32)))
            pairing.end_image()
    return pairing.result(ranges)


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


def calibrated_model(model: bytes, gm, samples: np.ndarray,
                     ranges: dict[str, tuple[float, float]]) -> tuple[bytes, dict[int, str]]:
    """FP32 ``model`` annotated with ``ranges`` (fx node -> (min, max), see
    :func:`node_ranges`), its tensors paired to nodes on ``samples`` (an NCHW batch of
    N >= 1 images, see :func:`match_tensors`; pass ``MATCH_IMAGES`` of them).

    Returns the annotated model and the tensor -> node pairing. Raises
    :class:`UnmatchedTensors` when a tensor has no node with a range, and its subclass
    :class:`AmbiguousTensors` when a tensor matches nodes whose ranges differ.
    """
    pairs = match_tensors(model, gm, samples, ranges)
    return with_ranges(model, {t: ranges[name] for t, name in pairs.items()}), pairs

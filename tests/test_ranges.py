"""Pairing TFLite activation tensors with torch.fx nodes by value (no TensorFlow: the pairing
decision is tested on arrays, the whole match on a hand-built one-op TFLite model run by
ai-edge-litert)."""

import numpy as np
import pytest
import torch
from torch import nn

from edgestar.quant import ranges
from edgestar.quant.ranges import AmbiguousTensors, UnmatchedTensors, pair_tensors

T = 7  # a TFLite tensor index


def nchw(*values):
    """A 1x2x1x1 NCHW value (its NHWC view is 1x1x1x2)."""
    return np.asarray(values, np.float32).reshape(1, 2, 1, 1)


def nhwc(*values):
    return np.asarray(values, np.float32).reshape(1, 1, 1, 2)


# --------------------------------------------------------------------------- the decision, on arrays

def test_all_zero_tensor_on_one_image_pairs_by_the_other_images():
    # On image 0 the tensor and both nodes are all zero (a ReLU of negative values): on that
    # image alone the later node wins, whatever it is. Image 1 tells them apart.
    image0 = ({T: nhwc(0, 0)}, [("relu", nchw(0, 0)), ("other_relu", nchw(0, 0))])
    image1 = ({T: nhwc(1, 2)}, [("relu", nchw(1, 2)), ("other_relu", nchw(3, 0))])
    assert pair_tensors([image0]) == {T: "other_relu"}  # why one image is not enough
    assert pair_tensors([image0, image1]) == {T: "relu"}
    assert pair_tensors([image1, image0]) == {T: "relu"}  # the order of the images is no matter


def test_a_node_must_match_on_every_image():
    image0 = ({T: nhwc(1, 2)}, [("a", nchw(1, 2))])
    image1 = ({T: nhwc(1, 2)}, [("a", nchw(1, 2.5))])
    with pytest.raises(UnmatchedTensors) as err:
        pair_tensors([image0, image1])
    assert err.value.args[0] == [T] and not isinstance(err.value, AmbiguousTensors)


def test_a_tie_between_nodes_of_different_ranges_raises():
    images = [({T: nhwc(1, 2)}, [("conv", nchw(1, 2)), ("relu6", nchw(1, 2))]),
              ({T: nhwc(3, 4)}, [("conv", nchw(3, 4)), ("relu6", nchw(3, 4))])]
    node_ranges = {"conv": (-2.0, 9.0), "relu6": (0.0, 6.0)}
    with pytest.raises(AmbiguousTensors) as err:
        pair_tensors(images, node_ranges)
    assert isinstance(err.value, UnmatchedTensors)  # callers that fall back catch this
    assert err.value.args[0] == [T] and err.value.ties == {T: ["conv", "relu6"]}
    # without ranges the pairing cannot tell, and keeps its deterministic pick
    assert pair_tensors(images) == {T: "relu6"}


def test_a_tie_between_nodes_of_identical_ranges_picks_the_later_node():
    images = [({T: nhwc(1, 2)}, [("mean", nchw(1, 2)), ("flatten", nchw(1, 2))])]
    assert pair_tensors(images, {"mean": (0.0, 5.0), "flatten": (0.0, 5.0)}) == {T: "flatten"}


def test_nodes_without_a_range_are_no_candidates():
    # QAT's ranges leave out conv outputs TFLite fuses with their ReLU6
    images = [({T: nhwc(1, 2)}, [("conv", nchw(1, 2)), ("relu6", nchw(1, 2))])]
    assert pair_tensors(images, {"relu6": (0.0, 6.0)}) == {T: "relu6"}
    with pytest.raises(UnmatchedTensors) as err:
        pair_tensors(images, {"elsewhere": (0.0, 1.0)})
    assert err.value.args[0] == [T] and not isinstance(err.value, AmbiguousTensors)


def test_the_smallest_error_beats_a_later_node():
    images = [({T: nhwc(1, 2)}, [("exact", nchw(1, 2)), ("close", nchw(1, 2.0005))])]
    assert pair_tensors(images) == {T: "exact"}


def test_one_orientation_on_all_images():
    """A rotated tensor matches the node's rotated view; a node that matches as is on one
    image and rotated on another matches neither way."""
    def value(a):  # NCHW 1x1x2x1: the rotation swaps the two rows
        return np.asarray(a, np.float32).reshape(1, 1, 2, 1)

    rotated = [({T: value([2, 1]).transpose(0, 2, 3, 1)}, [("a", value([1, 2]))]),
               ({T: value([5, 3]).transpose(0, 2, 3, 1)}, [("a", value([3, 5]))])]
    assert pair_tensors(rotated) == {T: "a"}
    flipping = [({T: value([2, 1]).transpose(0, 2, 3, 1)}, [("a", value([1, 2]))]),
                ({T: value([3, 5]).transpose(0, 2, 3, 1)}, [("a", value([3, 5]))])]
    with pytest.raises(UnmatchedTensors):
        pair_tensors(flipping)


# --------------------------------------------------------------------------- the whole match

def _relu_tflite(shape=(1, 2, 2, 3)) -> bytes:
    """An FP32 TFLite model: input -> RELU, built with the flatbuffer schema alone."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RELU
    code.version = 1
    tensors = []
    for name in (b"input", b"relu"):
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = list(shape), schema.TensorType.FLOAT32, 0, name
        tensors.append(t)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [1], [op]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [schema.BufferT()]  # buffer 0: the empty one every tensor without data uses
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


class TwoRelus(nn.Module):
    """relu(x), then a second ReLU of another value: both all zero on an image <= 0."""

    def forward(self, x):
        a = torch.relu(x)
        b = torch.relu(2 * x + 1)
        return a * b


def test_match_tensors_needs_every_image_to_agree():
    model = _relu_tflite()
    gm = ranges.trace(TwoRelus())
    rng = np.random.default_rng(0)
    negative = -1 - rng.random((1, 3, 2, 2), dtype=np.float32)  # every ReLU here is all zero
    mixed = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    relu, input_t = 1, 0
    # one all-negative image: the RELU tensor pairs with the last all-zero node
    assert ranges.match_tensors(model, gm, negative)[relu] == "mul_1"
    samples = np.concatenate([negative, mixed])
    assert ranges.match_tensors(model, gm, samples) == {input_t: "x", relu: "relu"}
    # with the ranges, the one-image tie between nodes of different ranges is refused
    node_range = ranges.node_ranges(gm, [samples])
    with pytest.raises(AmbiguousTensors) as err:
        ranges.calibrated_model(model, gm, negative, node_range)
    assert err.value.ties[relu] == ["relu", "relu_1", "mul_1"]
    annotated, pairs = ranges.calibrated_model(model, gm, samples, node_range)
    assert pairs[relu] == "relu"
    from edgestar.convert.tflite_file import flatbuffer_schema

    stored = flatbuffer_schema().Model.GetRootAs(annotated, 0).Subgraphs(0).Tensors(relu).Quantization()
    assert (stored.Min(0), stored.Max(0)) == pytest.approx(node_range["relu"])
    # tflite_values runs image by image and stacks on the batch axis
    values = ranges.tflite_values(model, samples.transpose(0, 2, 3, 1), [relu])
    np.testing.assert_array_equal(values[relu], np.maximum(samples, 0).transpose(0, 2, 3, 1))

"""The rotate-180 rewrite is exact: checked with ONNX Runtime against PyTorch (no TensorFlow)."""
import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgestar.evaluate.runners import OnnxRunner
from edgestar.export.onnx_export import export_onnx
from edgestar.export.rewrite import ROTATION_NODE, flip_for_same_padding, strip_input_rotation
from edgestar.models.starnet import create_model, fold_batchnorms

# the TorchScript exporter (what edgestar uses) warns that it is deprecated
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _to_onnx(module, size):
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.zeros(1, 3, size, size),), buf, opset_version=17,
                      dynamo=False, input_names=["input"], output_names=["out"])
    return onnx.load_from_string(buf.getvalue())


def _run(proto, x):
    path = io.BytesIO()
    onnx.save(proto, path)
    import onnxruntime as ort

    sess = ort.InferenceSession(path.getvalue(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


class Pooled(nn.Module):
    """Convs of many shapes, star-style product, residual add, global mean, linear."""

    def __init__(self, kernel, stride, padding):
        super().__init__()
        self.a = nn.Conv2d(3, 8, kernel, stride, padding)
        self.b = nn.Conv2d(8, 8, 7, 1, 3, groups=8)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.a(x)
        y = y + torch.clamp(self.b(y), 0, 6) * self.c(y)
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 2, 1, 32), (3, 2, 1, 64), (3, 1, 1, 33), (5, 2, 2, 40), (4, 2, 1, 32), (3, 2, 0, 35), (7, 3, 3, 45),
])
def test_rotation_is_exact_for_conv_shapes(kernel, stride, padding, size):
    torch.manual_seed(0)
    module = Pooled(kernel, stride, padding)
    proto, applied = flip_for_same_padding(_to_onnx(module, size))
    assert applied
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_run(proto, x), ref, atol=1e-5, rtol=0)


def test_stride2_3x3_pad1_becomes_tflite_same_padding():
    proto, _ = flip_for_same_padding(_to_onnx(Pooled(3, 2, 1), 32))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    pads = next(list(a.ints) for a in conv.attribute if a.name == "pads")
    assert pads == [0, 0, 1, 1]  # TFLite SAME for an even input: nothing before, one after


@pytest.mark.parametrize("size", [32, 96])
def test_starnet_rotation_exact_and_strippable(tmp_path, size):
    torch.manual_seed(0)
    model = fold_batchnorms(create_model("s050", num_classes=7))
    info = export_onnx(model, size, tmp_path / "m.onnx")
    assert info["rotated_for_same_padding"]
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxRunner(tmp_path / "m.onnx")(x), ref, atol=1e-5, rtol=0)
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.graph.node[0].name == ROTATION_NODE
    assert strip_input_rotation(proto) and not any(n.name == ROTATION_NODE for n in proto.graph.node)
    # without the input rotation, the graph computes the model on the rotated image
    rotated = np.ascontiguousarray(x[:, :, ::-1, ::-1])
    np.testing.assert_allclose(_run(proto, rotated[:1]), ref[:1], atol=1e-5, rtol=0)


class NotEquivariant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):  # flattening keeps positions: a rotation changes the output
        return self.fc(torch.flatten(self.conv(x), 1))


def test_graphs_that_are_not_rotation_safe_are_left_alone():
    proto = _to_onnx(NotEquivariant(), 8)
    before = proto.SerializeToString()
    proto, applied = flip_for_same_padding(proto)
    assert not applied and proto.SerializeToString() == before


def test_rotation_is_exact_for_split_depthwise_starnet(tmp_path):
    """Dilated convs (the split 7x7 depthwise ones) rotate exactly too."""
    from edgestar.models.starnet import split_large_depthwise

    torch.manual_seed(0)
    model, count = split_large_depthwise(fold_batchnorms(create_model("s050", num_classes=4)), 64)
    assert count > 0
    info = export_onnx(model, 64, tmp_path / "m.onnx")
    assert info["rotated_for_same_padding"]
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxRunner(tmp_path / "m.onnx")(x), ref, atol=1e-5, rtol=0)


class PositionAdded(nn.Module):
    """Conv, a learned constant added (e.g. a positional embedding), ReLU, mean, linear. (Without
    the ReLU the mean would average the constant away, and a wrong rotation would not show.)"""

    def __init__(self, pos_shape):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.pos = nn.Parameter(torch.randn(pos_shape))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x) + self.pos).mean(dim=(2, 3)))


def _export_and_compare(module, size, path):
    """Export ``module`` as edgestar does; return whether it was rotated, after checking ONNX
    Runtime against PyTorch."""
    info = export_onnx(module.eval(), size, path)
    x = np.random.default_rng(3).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxRunner(path)(x), ref, atol=1e-5, rtol=0)
    return info["rotated_for_same_padding"]


# the conv's output is 4 x 8 x 8 on a 16 px image
@pytest.mark.parametrize("pos_shape", [(1, 4, 8, 8), (1, 1, 8, 8), (1, 4, 8, 1), (8,)])
def test_a_constant_that_varies_per_position_stops_the_rotation(tmp_path, pos_shape):
    torch.manual_seed(0)
    assert not _export_and_compare(PositionAdded(pos_shape), 16, tmp_path / "m.onnx")


@pytest.mark.parametrize("pos_shape", [(1, 4, 1, 1), (4, 1, 1), (1,)])
def test_a_constant_per_channel_is_still_rotated(tmp_path, pos_shape):
    torch.manual_seed(0)
    assert _export_and_compare(PositionAdded(pos_shape), 16, tmp_path / "m.onnx")


def _initializer_as_constant_node(proto, name):
    """The graph with initializer ``name`` replaced by a Constant node computing it."""
    from onnx import helper

    init = next(t for t in proto.graph.initializer if t.name == name)
    proto.graph.initializer.remove(init)
    proto.graph.node.insert(0, helper.make_node("Constant", [], [name], value=init))
    return proto


@pytest.mark.parametrize("pos_shape,safe", [((1, 4, 8, 8), False), ((1, 4, 1, 1), True)])
def test_constant_nodes_are_checked_like_initializers(pos_shape, safe):
    torch.manual_seed(0)
    module = PositionAdded(pos_shape)
    proto = _to_onnx(module, 16)
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    constant = next(i for i in add.input if i in {t.name for t in proto.graph.initializer})
    proto, applied = flip_for_same_padding(_initializer_as_constant_node(proto, constant))
    assert applied == safe
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(_run(proto, x), module(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=0)

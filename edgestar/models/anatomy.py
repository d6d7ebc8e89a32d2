"""What edgestar knows about StarNet's structure, in one place.

Several stages reason about the same facts: which activations TFLite fuses into the conv
before them (so the activation's output is the tensor TFLite stores: range measurement, QAT),
which modules pass their input on unchanged (no tensor of their own), which ONNX ops commute
with a 180-degree rotation of the feature maps (the no-PAD rewrite), and what the parts of a
block are called (the PTQ rescalings, the error table's labels). A new architecture, or a new
op in StarNet, changes this file.

PyTorch is imported inside the functions: the ONNX-side facts are read by the converter
subprocess, which never loads PyTorch.
"""
from __future__ import annotations

# A StarNet block, in the order it computes (names as in the official implementation):
BLOCK_ROLES = {
    "dwconv": "7x7 depthwise conv + BN",
    "f1": "1x1 conv, then ReLU6: the bounded branch of the star product",
    "f2": "1x1 conv, unbounded: the other branch (the product is heavy-tailed)",
    "g": "1x1 conv + BN after the star product ReLU6(f1) * f2",
    "dwconv2": "7x7 depthwise conv, then the residual add",
}

# ONNX ops through which a 180-degree rotation of NCHW feature maps commutes, as StarNet
# uses them (elementwise, or convs whose kernels are rotated with the image).
ROTATION_EQUIVARIANT_ONNX_OPS = frozenset({
    "Conv", "Clip", "Relu", "Mul", "Add", "Sub", "Identity", "BatchNormalization", "Sigmoid",
    "HardSigmoid", "HardSwish", "Div"})
# Spatial reductions: everything after them no longer sees the rotation.
SPATIAL_REDUCTION_ONNX_OPS = frozenset({"ReduceMean", "GlobalAveragePool"})


def fusable_activations() -> tuple:
    """Activation modules TFLite fuses into the conv/linear before them."""
    from torch import nn

    return (nn.ReLU6, nn.ReLU)


def value_preserving_modules() -> tuple:
    """Modules that pass their input on unchanged in eval mode (no tensor of their own)."""
    from torch import nn

    return (nn.Identity, nn.Dropout, nn.Flatten)


def blocks(model) -> list:
    """The StarNet blocks of ``model``, in order."""
    from edgestar.models.starnet import Block

    return [m for m in model.modules() if isinstance(m, Block)]

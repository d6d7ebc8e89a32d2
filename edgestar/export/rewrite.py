"""Exact ONNX graph rewrites that make the TFLite graph leaner. Outputs never change.

``flip_for_same_padding``: PyTorch pads a stride-2 3x3 conv by 1 on every side (it reads
rows 2i-1..2i+1); TFLite's SAME padding pads 0 before and 1 after (rows 2i..2i+2), so a direct
conversion needs an explicit PAD before each of StarNet's five stride-2 convs. A PAD costs a
copy of the feature map and, on a microcontroller, keeps both copies alive in the arena.

Rotating the image by 180 degrees and every kernel with it changes nothing for a network whose
stride-1 convs are padded symmetrically and which ends in a global average pool: each feature
map is the rotated original. For a conv with stride s, kernel K and pads (pb, pe) on an input
of size H with output size Ho, the rotated conv needs pads (s*(Ho-1) + K - H - pb, pb) (K the
kernel's extent, dilation included); for
3x3 stride 2 pad 1 on an even H that is (0, 1), exactly TFLite's SAME padding. One reverse of
the input image (a few KB) replaces five PADs of feature maps, with no extra weights or MACs.
The rewrite applies only when every op of the graph is one it knows to be rotation-equivariant;
the ONNX Runtime parity check after export verifies it numerically.
"""
from __future__ import annotations

import numpy as np

from edgestar.models.anatomy import ROTATION_EQUIVARIANT_ONNX_OPS, SPATIAL_REDUCTION_ONNX_OPS

# Ops through which a 180-degree rotation of NCHW feature maps commutes, as StarNet uses them.
_BROADCASTING = {"Mul", "Add", "Sub", "Div"}  # elementwise ops whose other operand may be a constant
ROTATION_NODE = "edgestar_rotate_input_180"


def flip_for_same_padding(model):
    """Return ``(model, applied)``; ``model`` is rewritten in place when ``applied``."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    if len(graph.input) != 1:
        return model, False
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    if not _rotation_safe(graph, shapes):
        return model, False

    inits = {t.name: t for t in graph.initializer}
    flipped = set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if node.input[1] not in flipped:  # a weight shared by two convs is flipped once
            flipped.add(node.input[1])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(weight[:, :, ::-1, ::-1]), node.input[1]))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        dilations = list(attrs.get("dilations", [1, 1]))
        kernel = [d * (k - 1) + 1 for d, k in zip(dilations, weight.shape[2:])]  # extent
        strides = list(attrs.get("strides", [1, 1]))
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        in_hw, out_hw = shapes[node.input[0]][2:], shapes[node.output[0]][2:]
        begin = [s * (o - 1) + k - h - pb
                 for s, o, k, h, pb in zip(strides, out_hw, kernel, in_hw, pads[:2])]
        new_pads = begin + pads[:2]
        for attr in list(node.attribute):
            if attr.name == "pads":
                node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("pads", new_pads))

    # Rotate the input image: a reversing Slice on H and W as the first op.
    source = graph.input[0].name
    rotated = f"{source}_rot180"
    consts = {
        "rot180_starts": [-1, -1], "rot180_ends": [np.iinfo(np.int64).min] * 2,
        "rot180_axes": [2, 3], "rot180_steps": [-1, -1],
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == source:
                node.input[i] = rotated
    graph.node.insert(0, helper.make_node("Slice", [source, *consts], [rotated], name=ROTATION_NODE))
    return model, True


def strip_input_rotation(model) -> bool:
    """Remove the input-reversing Slice added by :func:`flip_for_same_padding`, in place.

    onnx2tf 1.29.24 drops a Slice with negative steps on the input without a word (the model
    converts, and is wrong); the converter re-adds the rotation as ``tf.reverse`` instead.
    Returns whether the model had it.
    """
    graph = model.graph
    node = next((n for n in graph.node if n.name == ROTATION_NODE), None)
    if node is None:
        return False
    source, rotated = node.input[0], node.output[0]
    graph.node.remove(node)
    for other in graph.node:
        for i, name in enumerate(other.input):
            if name == rotated:
                other.input[i] = source
    return True


def _rotation_safe(graph, shapes) -> bool:
    """Every op before the spatial reduction commutes with rotation; all shapes are known.

    ``shapes`` holds the inferred shapes of the graph's values; constants (initializers,
    ``Constant`` nodes) are read from the graph itself, as shape inference leaves them out.
    """
    from onnx import helper

    inits = {t.name for t in graph.initializer}
    known_shapes = {**shapes, **_constant_shapes(graph)}
    from_input = _computed_from_input(graph)
    for node in graph.node:
        if node.op_type in SPATIAL_REDUCTION_ONNX_OPS:
            if node.op_type == "ReduceMean":
                axes = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"),
                            None)
                if axes is None or sorted(int(a) % 4 for a in axes) != [2, 3]:
                    return False
            continue
        if node.op_type == "Conv":
            if node.input[1] not in inits:
                return False
            if not shapes.get(node.input[0]) or len(shapes[node.input[0]]) != 4:
                return False
            if not all(shapes[node.input[0]]) or not all(shapes.get(node.output[0], [0])):
                return False
            continue
        if node.op_type in ROTATION_EQUIVARIANT_ONNX_OPS:
            # A broadcast constant must be the same at every position (per channel at most):
            # rotating the feature map under a constant that varies per position (say, a
            # positional embedding) changes which value meets which pixel.
            if (node.op_type in _BROADCASTING
                    and any(_varies_per_position(known_shapes.get(name))
                            for name in node.input if name and name not in from_input)
                    and not _after_reduction(graph, node)):
                return False
            continue
        if _after_reduction(graph, node):
            continue
        return False
    return True


def _varies_per_position(shape) -> bool:
    """Whether a constant of ``shape`` broadcast onto an NCHW map differs along H or W
    (an unknown shape counts as varying). A 1-D constant broadcasts along W."""
    return shape is None or any(d != 1 for d in shape[-2:])


def _constant_shapes(graph) -> dict[str, list[int]]:
    """Shapes of the graph's initializers and ``Constant`` node outputs."""
    from onnx import helper

    found = {t.name: list(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Constant" or len(node.attribute) != 1:  # a valid one has one value
            continue
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        if attr.name == "value":
            found[node.output[0]] = list(value.dims)
        elif attr.name in ("value_float", "value_int"):
            found[node.output[0]] = []
        elif attr.name in ("value_floats", "value_ints"):
            found[node.output[0]] = [len(value)]
        # any other kind (sparse, strings) stays unknown, and so counts as varying
    return found


def _computed_from_input(graph) -> set[str]:
    """Names of the values that depend on a graph input (the rest are constants)."""
    found = {i.name for i in graph.input}
    for node in graph.node:  # ONNX nodes are in topological order
        if any(name in found for name in node.input):
            found.update(node.output)
    return found


def _after_reduction(graph, node) -> bool:
    """True when ``node`` only sees tensors downstream of a spatial reduction."""
    producers = {out: n for n in graph.node for out in n.output}
    stack, seen = list(node.input), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        prod = producers.get(name)
        if prod is None:
            if name in {i.name for i in graph.input}:
                return False
            continue
        if prod.op_type in SPATIAL_REDUCTION_ONNX_OPS:
            continue
        stack.extend(prod.input)
    return True

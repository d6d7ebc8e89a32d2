"""Is a ``.tflite`` file something an edge runtime can run as built? Checked on every model
``quantize`` writes, so a graph that would fail (or silently run in float) on the device fails
the run instead."""
from __future__ import annotations

from pathlib import Path

from edgestar.errors import StageError


def check_deployable(path: Path, kind: str) -> None:
    """Raise StageError if the model at ``path`` cannot run as ``kind`` promises.

    ``float``: no Flex/custom ops. ``int8``: also no float compute between its input and
    output, and only ops TFLite Micro has int8 kernels for. ``mixed`` (an INT8 model with some
    tensors deliberately kept float): no Flex ops, and only ops TFLite Micro has kernels for.
    """
    from edgestar.convert.tflite_file import TFLM_INT8_OPS, flex_ops, float_ops_inside, op_counts

    path = Path(path)
    ops = op_counts(path)
    if flex_ops(ops):
        raise StageError(f"{path.name} contains ops TFLite builtins cannot run: {flex_ops(ops)}")
    if kind == "float":
        return
    if kind == "int8":
        floats = float_ops_inside(path)
        if floats:
            raise StageError(f"{path.name} computes in float inside the INT8 graph: {sorted(set(floats))}")
    missing = sorted(set(ops) - TFLM_INT8_OPS)
    if missing:
        raise StageError(f"{path.name} uses ops TFLite Micro has no int8 kernel for: {missing}")

"""PyTorch -> ONNX, checked with ``onnx.checker`` and against PyTorch in ONNX Runtime."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from edgestar.errors import StageError
from edgestar.files import temp_path_for

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model: torch.nn.Module, img_size: int, path: Path, *, rotate: bool = True) -> dict:
    """Export ``model`` (eval mode, BN folded) with a static 1x3xSxS input to ``path``.

    The TorchScript exporter at opset 17 gives the plainest graph for StarNet (Conv, Clip, Mul,
    Add, ReduceMean, Gemm), which is what onnx2tf maps best; batch 1 is what edge runtimes run.
    With ``rotate`` the graph is rewritten so that no PAD is needed in TFLite
    (:func:`edgestar.rewrite.flip_for_same_padding`). Returns what was done.
    """
    import onnx

    from edgestar.export.rewrite import flip_for_same_padding

    path = Path(path)
    dummy = torch.zeros(1, 3, img_size, img_size)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (dummy,), buf, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    rotated = False
    if rotate:
        proto, rotated = flip_for_same_padding(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise StageError(f"exported ONNX model failed onnx.checker: {str(exc).splitlines()[0]}") from None
    tmp = temp_path_for(path)
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return {"path": path, "rotated_for_same_padding": rotated}


def onnx_op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

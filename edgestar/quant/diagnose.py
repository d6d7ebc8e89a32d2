"""Where INT8 loses accuracy: a per-tensor error table of the deployed model against FP32.

Every activation tensor the INT8 TFLite model stores is compared, over a few evaluation images,
with the value the float PyTorch model computes there (the pairing is the one calibration
found, see :mod:`edgestar.calibrate`). Two signal-to-quantization-noise ratios per tensor,
``10 log10(sum(ref^2) / sum(err^2))`` in dB (higher is better; each bit is ~6 dB):

- ``sqnr_db``: the INT8 model's tensor (dequantized) against FP32. This is the error
  accumulated from the input up to here, so it tends to fall with depth.
- ``own_sqnr_db``: the FP32 value rounded to this tensor's own int8 grid (its scale, zero
  point and saturation). This is the error the tensor's own quantization adds, whatever came
  before: a heavy-tailed tensor whose range wastes the 256 levels shows up here.

Rows are sorted by ``own_sqnr_db``, worst first: the top rows are the tensors to rescale, to
give more calibration data, or to keep in higher precision (``--fallback``). ``clipped`` is
the fraction of FP32 values outside the tensor's range (evaluation data beyond calibration's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DIAGNOSE_PIXELS = 32 * 64 * 64  # input pixels the table is measured on: 32 images up to 64 px
DIAGNOSE_MIN_IMAGES = 4  # ... and never fewer images than this (at 224 px: 4, ~5x less time)
LAYER_ERRORS_FILE = "layer_errors.json"


@dataclass
class _Acc:
    signal: float = 0.0
    error: float = 0.0
    own_error: float = 0.0
    clipped: int = 0
    count: int = 0
    view: int | None = None  # which NHWC view of the PyTorch value TFLite holds (see calibrate)


def layer_errors(int8_model, gm, pairs: dict[str, str], images: np.ndarray, *,
                 chunk: int = 32) -> list[dict]:
    """The error table (see module docstring) of the INT8 ``.tflite`` at ``int8_model``.

    ``gm`` is the fx graph of the float model the INT8 model was built from, ``pairs`` maps
    TFLite tensor names to its nodes (``int8_ranges.json``), ``images`` is a float32 NCHW
    batch, run through PyTorch ``chunk`` images at a time (TFLite's int8 values of a chunk
    are held meanwhile). Tensors that are not int8 in the model (float fallback, float I/O)
    are left out.
    """
    import torch

    from edgestar.convert.tflite_file import operators
    from edgestar.evaluate.runners import quantize
    from edgestar.evaluate.validate import sqnr_db
    from edgestar.quant.ranges import nhwc_views, recording_interpreter

    interp = _interpreter_keeping_tensors(int8_model)
    details = {d["name"]: d for d in interp.get_tensor_details()}
    producer = _producers(operators(int8_model))
    grid = {}  # tensor name -> (index, scale, zero point)
    for name in pairs:
        d = details.get(name)
        if d is not None and d["dtype"] == np.int8 and d["quantization"][0] > 0:
            grid[name] = (d["index"], *d["quantization"])
    by_node: dict[str, list[str]] = {}
    for name in grid:
        by_node.setdefault(pairs[name], []).append(name)
    acc = {name: _Acc() for name in grid}
    inp = interp.get_input_details()[0]

    for start in range(0, len(images), chunk):
        x = np.ascontiguousarray(images[start:start + chunk], np.float32)
        held: dict[str, list] = {name: [] for name in grid}  # int8 values, image by image
        for i in range(len(x)):
            interp.set_tensor(inp["index"], quantize(x[i:i + 1].transpose(0, 2, 3, 1), inp))
            interp.invoke()
            for name, (index, _, _) in grid.items():
                held[name].append(interp.get_tensor(index).copy())

        def compare(node, value):
            for name in by_node.get(node, ()):
                _, scale, zero = grid[name]
                deq = (np.concatenate(held.pop(name)).astype(np.float32) - zero) * np.float32(scale)
                a = acc[name]
                views = nhwc_views(value.numpy())
                if a.view is None:  # the orientation that matches, decided on the first chunk
                    a.view = min((k for k, v in enumerate(views) if v.shape == deq.shape),
                                 key=lambda k: float(np.abs(views[k] - deq).max()))
                ref = views[a.view]
                q = np.round(ref / np.float32(scale)) + zero
                own = (np.clip(q, -128, 127) - zero) * np.float32(scale)
                a.signal += _sum_of_squares(ref)
                a.error += _sum_of_squares(deq - ref)
                a.own_error += _sum_of_squares(own - ref)
                a.clipped += int(((q < -128) | (q > 127)).sum())
                a.count += ref.size

        with torch.no_grad():
            recording_interpreter(gm, compare).run(torch.from_numpy(x))

    labels = node_labels(gm)
    rows = []
    for name, a in acc.items():
        if a.count == 0:
            continue
        index, scale, zero = grid[name]
        rows.append({"tensor": name, "node": pairs[name], "where": labels.get(pairs[name], pairs[name]),
                     "op": producer.get(index, "input"),
                     "shape": [int(s) for s in details[name]["shape"]],
                     "scale": float(scale), "zero_point": int(zero),
                     "own_sqnr_db": sqnr_db(a.signal, a.own_error), "sqnr_db": sqnr_db(a.signal, a.error),
                     "clipped": a.clipped / a.count})
    rows.sort(key=lambda r: (_or_inf(r["own_sqnr_db"]), _or_inf(r["sqnr_db"])))
    return rows


def diagnose_images(img_size: int) -> int:
    """How many evaluation images the table uses at this resolution (a pixel budget: the
    statistics need pixels, not images, and the cost grows with both)."""
    return max(DIAGNOSE_MIN_IMAGES, min(32, DIAGNOSE_PIXELS // (img_size * img_size)))


def _sum_of_squares(x: np.ndarray) -> float:
    return float(np.square(x, dtype=np.float32).sum(dtype=np.float64))


def spread(samples: list, n: int) -> list:
    """``n`` items evenly spaced over ``samples`` (image folders are sorted by class)."""
    if len(samples) <= n:
        return list(samples)
    if n <= 1:
        return list(samples[:n])
    return [samples[round(i * (len(samples) - 1) / (n - 1))] for i in range(n)]


def format_rows(rows: list[dict], limit: int = 5) -> list[str]:
    """The worst ``limit`` rows as aligned text lines (for the run summary)."""
    lines = [f"{'own SQNR':>9} {'SQNR':>7}  {'op':<17} where"]
    for r in rows[:limit]:
        own, acc = (f"{_or_inf(r[k]):.1f}" for k in ("own_sqnr_db", "sqnr_db"))
        lines.append(f"{own:>7}dB {acc:>5}dB  {r['op']:<17} {r.get('where', r['node'])}")
    return lines


def node_labels(gm) -> dict[str, str]:
    """A readable name for each fx node: a module's dotted path (``stages.2.8.g.conv``); for
    a function, its name and the module it follows (``mul after stages.0.1.f2.conv``, the
    star product; ``add after stages.0.1.dwconv2.conv``, a residual add)."""
    import torch.fx

    labels: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            labels[node.name] = str(node.target)
        elif node.op in ("call_function", "call_method"):
            what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.name)
            inputs = [labels[a.name] for a in node.args if isinstance(a, torch.fx.Node) and a.name in labels]
            labels[node.name] = f"{what} after {inputs[-1]}" if inputs else str(what)
        else:
            labels[node.name] = node.name
    return labels


def _or_inf(db: float | None) -> float:
    return math.inf if db is None else db


def _interpreter_keeping_tensors(model):
    """The INT8 model on TFLite's builtin kernels with every intermediate kept readable."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_path=str(model), experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    return interp


def _producers(operators) -> dict[int, str]:
    """Tensor index -> name of the op that writes it."""
    _, _, ops = operators
    return {op.Outputs(j): name for name, op in ops for j in range(op.OutputsLength())}

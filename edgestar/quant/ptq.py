"""Post-training quantization beyond plain min/max: exact rescalings, bias correction, MSE ranges.

TFLite quantizes every activation tensor with one scale (per tensor) and every weight with one
scale per output channel. A StarNet block has tensors whose channels span very different
ranges, above all the star product ``ReLU6(f1(y)) * f2(y)`` (f2 is unbounded): a few wide
channels set the tensor's scale and the narrow ones get a handful of int8 levels. Each
technique below is switchable (:data:`TECHNIQUES`, ``quantize --ptq``):

``scale-star``  f2 -> g, through the product. ``ReLU6(f1) * (s f2) = s (ReLU6(f1) * f2)``, so
                scaling f2's output channel c by s_c (its weights and bias: per-channel
                quantized, unaffected) scales product channel c by s_c; dividing g's input
                column c by s_c restores g's output exactly.
``scale-dw``    dwconv -> f1, f2: dwconv's output channel c times t_c (depthwise weights are
                per-channel: unaffected), f1's and f2's input column c divided by t_c.
``scale-g``     g -> dwconv2: g's output channel c times u_c, dwconv2's channel c (depthwise,
                linear) divided by u_c; its bias and output are unchanged.
``bias-correct``  each conv/linear bias minus the mean output shift its int8 weight rounding
                causes on the calibration data (``E[conv(x, Wq - W)]``, per channel).
``mse-ranges``  the star products' and residual adds' ranges clipped to the width that
                minimises the int8 quantization error of their calibration values (histogram
                search with TFLite's scale/zero-point rule) instead of their min/max.

The rescalings change no output in float (checked by the pipeline). A rescaling moves range
from an activation, quantized per tensor, into a weight's input columns, which share the
per-output-channel scale of their row: equalising only the activation would blow up the
weights' error, so for the 1x1 convs the factor balances both, ``sqrt(w_c / a_c)`` (a_c: the
channel's activation range, w_c: the column's largest weight; the SmoothQuant/cross-layer
equalization balance point). Across g -> dwconv2 nothing is shared (depthwise, per-channel),
so g's channels are equalised fully.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgestar.models.anatomy import blocks
from edgestar.quant import EXACT

MIN_CHANNEL_RANGE = 1e-2  # channels narrower than this fraction of the widest are not blown up
MAX_FACTOR = 64.0  # largest rescaling factor either way
MSE_BINS = 4096
MSE_CANDIDATES = np.geomspace(0.02, 1.0, 100)  # fractions of the min/max range tried


@dataclass
class _ChannelStats:
    """max |value| per channel of the block tensors the rescalings act on."""

    dw: torch.Tensor | None = None
    f2: torch.Tensor | None = None
    product: torch.Tensor | None = None
    g: torch.Tensor | None = None

    def update(self, key: str, value: torch.Tensor) -> None:
        m = value.detach().abs().amax(dim=(0, 2, 3))
        old = getattr(self, key)
        setattr(self, key, m if old is None else torch.maximum(old, m))


@torch.no_grad()
def channel_stats(model: nn.Module, batches) -> dict[nn.Module, _ChannelStats]:
    """Per-channel max |value| of each block's dwconv, f2, product and g outputs."""
    stats = {b: _ChannelStats() for b in blocks(model)}
    hooks = []
    for block, s in stats.items():
        hooks += [
            block.dwconv.register_forward_hook(lambda m, a, out, s=s: s.update("dw", out)),
            block.f2.register_forward_hook(lambda m, a, out, s=s: s.update("f2", out)),
            block.g.register_forward_pre_hook(lambda m, args, s=s: s.update("product", args[0])),
            block.g.register_forward_hook(lambda m, a, out, s=s: s.update("g", out)),
        ]
    try:
        model.eval()
        for x in batches:
            model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    finally:
        for h in hooks:
            h.remove()
    return stats


def _balance(act: torch.Tensor, weight_cols: torch.Tensor) -> torch.Tensor:
    """Factors f (activation channel * f, weight column / f) meeting at sqrt(act * weight);
    normalised to geometric mean 1."""
    a = act.clamp(min=MIN_CHANNEL_RANGE * float(act.max()), max=None)
    w = weight_cols.clamp(min=1e-12)
    f = torch.sqrt(w / a)
    return _normalised(f)


def _normalised(f: torch.Tensor) -> torch.Tensor:
    f = f / torch.exp(torch.log(f).mean())
    return f.clamp(1.0 / MAX_FACTOR, MAX_FACTOR)


@torch.no_grad()
def rescale(model: nn.Module, batches, techniques=EXACT) -> tuple[nn.Module, dict]:
    """A copy of the folded ``model`` with the exact rescalings in ``techniques`` applied,
    statistics measured on ``batches`` (NCHW float32); returns it and a summary per
    technique (how far the per-channel ranges were evened: max/median before -> after)."""
    model = copy.deepcopy(model).eval()
    todo = [t for t in techniques if t in EXACT]
    if not todo:
        return model, {}
    stats = channel_stats(model, batches)
    summary = {t: {"blocks": 0, "spread_before": [], "spread_after": []} for t in todo}

    def record(t, before, after):
        summary[t]["blocks"] += 1
        summary[t]["spread_before"].append(_spread(before))
        summary[t]["spread_after"].append(_spread(after))

    for block, s in stats.items():
        dw, f1, f2, g, dw2 = (block.dwconv.conv, block.f1.conv, block.f2.conv, block.g.conv,
                              block.dwconv2.conv)
        if "scale-dw" in todo:
            cols = torch.maximum(_column_max(f1.weight), _column_max(f2.weight))
            t = _balance(s.dw, cols)
            _scale_out(dw, t)
            _scale_in(f1, 1.0 / t)
            _scale_in(f2, 1.0 / t)
            record("scale-dw", s.dw, s.dw * t)
        if "scale-star" in todo:
            sc = _balance(s.product, _column_max(g.weight))
            _scale_out(f2, sc)
            _scale_in(g, 1.0 / sc)
            record("scale-star", s.product, s.product * sc)
        if "scale-g" in todo:
            a = s.g.clamp(min=MIN_CHANNEL_RANGE * float(s.g.max()))
            u = _normalised(float(s.g.max()) / a)
            _scale_out(g, u)
            _scale_out(dw2, 1.0 / u, bias=False)
            record("scale-g", s.g, s.g * u)
    for t in summary.values():
        for key in ("spread_before", "spread_after"):
            t[key] = round(float(np.median(t[key])), 2) if t[key] else None
    return model, summary


def _spread(r: torch.Tensor) -> float:
    """How uneven a tensor's channels are: widest channel range / median channel range."""
    return float(r.max() / r.median().clamp(min=1e-12))


def _column_max(w: torch.Tensor) -> torch.Tensor:
    """max |w| per input channel of a 1x1 conv weight (out, in, 1, 1)."""
    return w.abs().amax(dim=(0, 2, 3))


def _scale_out(conv: nn.Conv2d, f: torch.Tensor, *, bias: bool = True) -> None:
    conv.weight.mul_(f.reshape(-1, 1, 1, 1))
    if bias and conv.bias is not None:
        conv.bias.mul_(f)


def _scale_in(conv: nn.Conv2d, f: torch.Tensor) -> None:
    conv.weight.mul_(f.reshape(1, -1, 1, 1))


# --------------------------------------------------------------------------- bias correction

@torch.no_grad()
def correct_biases(model: nn.Module, batches) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose conv/linear biases absorb the mean output shift that int8
    weight rounding (per-channel symmetric, as TFLite) causes on ``batches``; float inputs
    are used for the expectation. A :class:`~edgestar.models.DilatedSplitConv`'s parts share
    one bias (the first part's). Returns the model and the largest shift relative to the
    layer's output scale."""
    from edgestar.models.starnet import DilatedSplitConv
    from edgestar.quant.qat import fake_quant_weight

    model = copy.deepcopy(model).eval()
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    owner = {}  # layer -> the layer holding the bias its correction goes to
    for m in model.modules():
        if isinstance(m, DilatedSplitConv):
            for part in m.parts:
                owner[part] = m.parts[0]
    shift = {m: None for m in layers}
    scale = {m: 0.0 for m in layers}
    err = {m: fake_quant_weight(m.weight) - m.weight for m in layers}

    def hook(m, args, out):
        x = args[0]
        if isinstance(m, nn.Conv2d):
            d = nn.functional.conv2d(x, err[m], None, m.stride, m.padding, m.dilation, m.groups)
            d = d.mean(dim=(0, 2, 3)) * len(x)
        else:
            d = (x @ err[m].t()).sum(dim=0)
        shift[m] = d if shift[m] is None else shift[m] + d
        scale[m] = max(scale[m], float(out.abs().max()))

    hooks = [m.register_forward_hook(hook) for m in layers]
    count = 0
    try:
        for x in batches:
            model(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            count += len(x)
    finally:
        for h in hooks:
            h.remove()
    largest = 0.0
    for m in layers:
        if shift[m] is None:
            continue
        mean = shift[m] / max(count, 1)
        target = owner.get(m, m)
        if target.bias is None:
            continue
        target.bias.sub_(mean)
        largest = max(largest, float(mean.abs().max()) / max(scale[m], 1e-12))
    return model, {"layers": len(layers), "largest_shift_vs_output_range": largest}


# --------------------------------------------------------------------------- MSE ranges

def range_nodes(gm) -> list[str]:
    """The fx nodes whose ranges ``mse-ranges`` sets: products and sums (the star products,
    residual adds and a split conv's partial sums)."""
    return [n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (operator.mul, operator.add, torch.mul, torch.add)]


@torch.no_grad()
def mse_ranges(gm, batches, ranges: dict[str, tuple[float, float]], nodes: list[str]) -> dict:
    """``ranges`` with each of ``nodes`` narrowed to the clip range minimising the int8
    quantization error of its values over ``batches`` (a second pass; histograms of
    MSE_BINS bins over the min/max range, candidates MSE_CANDIDATES times that range)."""
    from edgestar.quant.ranges import recording_interpreter

    hist = {n: torch.zeros(MSE_BINS, dtype=torch.float64) for n in nodes if n in ranges}

    def collect(name, v):
        if name in hist:
            lo, hi = ranges[name]
            hist[name] += torch.histc(v.double().flatten(), MSE_BINS, lo, hi)

    recorder = recording_interpreter(gm, collect)
    for x in batches:
        recorder.run(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    out = dict(ranges)
    for name, h in hist.items():
        out[name] = best_clip(h.numpy(), *ranges[name])
    return out


def best_clip(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The ``(lo, hi) * f`` (f in MSE_CANDIDATES) with the least expected int8 quantization
    error for values distributed as ``hist`` over [lo, hi], under TFLite's scale/zero-point
    rule: rounding costs ``scale^2 / 12`` per value inside the representable range (values
    spread evenly within a step), clipping ``(v - bound)^2`` per value outside it."""
    from edgestar.quant.qat import tflite_qparams

    edges = np.linspace(lo, hi, len(hist) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_err = (lo, hi), np.inf
    for f in MSE_CANDIDATES:
        c_lo, c_hi = lo * f, hi * f
        s, z = (float(v) for v in tflite_qparams(torch.tensor(c_lo), torch.tensor(c_hi)))
        low, high = (-128 - z) * s, (127 - z) * s  # what the int8 grid can represent
        clipped = np.square(np.maximum(centers - high, 0) + np.maximum(low - centers, 0))
        inside = hist[(centers >= low) & (centers <= high)].sum()
        err = float((clipped * hist).sum() + inside * s * s / 12)
        if err < best_err:
            best, best_err = (float(c_lo), float(c_hi)), err
    return best


def calibration_ranges(gm, batches_fn, *, mse: bool) -> dict[str, tuple[float, float]]:
    """Each node's (min, max) over ``batches_fn()`` (NCHW batches); with ``mse`` the star
    products and sums are then narrowed to their int8-error minimum (a second pass)."""
    from edgestar.quant.ranges import node_ranges

    ranges = node_ranges(gm, batches_fn())
    return mse_ranges(gm, batches_fn(), ranges, range_nodes(gm)) if mse else ranges

"""The PyTorch side of INT8 range measurement (no TensorFlow)."""
import math

import numpy as np
import torch

from edgestar.data.images import batches
from edgestar.models.starnet import create_model, fold_batchnorms
from edgestar.quant import ranges as calibrate


def test_node_ranges_are_global_min_max_rounded_outward():
    torch.manual_seed(0)
    model = fold_batchnorms(create_model("s050", num_classes=3))
    gm = calibrate.trace(model)
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    ranges = calibrate.node_ranges(gm, batches(x, 3))  # batches of 3, 3, 3, 1
    values = calibrate.node_values(gm, x)
    assert set(ranges) == set(values)
    for name, (lo, hi) in ranges.items():
        true_lo, true_hi = float(values[name].min()), float(values[name].max())
        assert lo <= true_lo and hi >= true_hi  # outward
        tol = 1e-4 * max(abs(true_lo), abs(true_hi), 1e-30)
        assert true_lo - lo <= tol and hi - true_hi <= tol
    # the ReLU6 stem output is [0, 6]-bounded; the input range is the data's
    assert ranges["stem_1"][0] == 0.0 and ranges["stem_1"][1] <= 6.0
    assert ranges["x"][0] <= x.min() and ranges["x"][1] >= x.max()


def test_round_out_is_outward_and_stable():
    for v in (3.14159265, -2.7182818, 1.2345678e-7, -123456.789):  # none on the grid
        up, down = calibrate._round_out(v, math.ceil), calibrate._round_out(v, math.floor)
        assert down <= v <= up and (up - down) <= 2e-4 * abs(v)
        assert calibrate._round_out(v * (1 + 1e-9), math.ceil) == up  # float noise: same range
    assert calibrate._round_out(0.0, math.ceil) == 0.0

"""The statistics every run reports: counts of flipped images and their 95 % intervals."""
import math

import numpy as np
import pytest

from edgestar.evaluate.validate import EngineStats, drop_interval, proportion_interval


def _logits(classes):
    out = np.zeros((len(classes), 3), np.float32)
    out[np.arange(len(classes)), classes] = 1.0
    return out


def test_lost_and_gained_are_counted_against_the_reference():
    labels = np.array([0, 1, 2, 0])
    ref = _logits([0, 1, 0, 1])  # right, right, wrong, wrong
    run = _logits([0, 2, 2, 1])  # right, wrong, right, wrong
    stats = EngineStats()
    stats.update(run, labels, ref, k=1)
    s = stats.summary()
    assert (s["lost_top1"], s["gained_top1"]) == (1, 1)
    assert s["top1"] == 0.5 and s["agreement_top1"] == 0.5


def test_proportion_interval_matches_wilson_and_stays_in_range():
    lo, hi = proportion_interval(990, 1000)
    assert lo < 0.99 < hi
    assert lo == pytest.approx(0.98166, abs=1e-4) and hi == pytest.approx(0.99458, abs=1e-4)
    lo, hi = proportion_interval(1000, 1000)
    assert hi == 1.0 and 0.995 < lo < 1.0  # not the degenerate [1, 1]
    assert proportion_interval(0, 0) == (0.0, 1.0)


def test_drop_interval_is_paired_and_shrinks_with_more_images():
    lo, hi = drop_interval(6, 4, 1000)  # drop 0.2 pt from 10 flipped images
    assert lo < 0.002 < hi and lo < 0.0
    half = (hi - lo) / 2
    assert half == pytest.approx(1.96 * math.sqrt((10 / 1000 - 0.002 ** 2) / 1000), rel=1e-3)
    lo10, hi10 = drop_interval(60, 40, 10_000)  # same rates, ten times the images
    assert (hi10 - lo10) < (hi - lo) / 3
    lo0, hi0 = drop_interval(0, 0, 1000)  # no flips: still an honest, non-zero width
    assert lo0 < 0.0 < hi0

"""The "what would fit" estimates: StarNet's parameter and per-channel counts are exact (against
the PyTorch model), the activation proxy is the input + stem peak the issue measured, and the
suggestion picks the largest fitting variant, measured candidates apart from estimates."""
import pytest

from edgestar.deploy.boards import get_board
from edgestar.deploy.fit import activation_peak, estimate, params, per_channel_outputs, suggest
from edgestar.models.registry import VARIANTS

S050_96 = dict(variant="s050", img_size=96, model_bytes=472928, head=101376, tail=40368, num_classes=10,
               rotated=True)  # measured: bench/RESULTS.md, firmware table


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_and_channel_counts_are_the_folded_models(variant):
    import torch

    from edgestar.models.starnet import count_params, create_model, fold_batchnorms

    model = fold_batchnorms(create_model(variant, num_classes=10).eval())
    channels = sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) + 10
    assert params(VARIANTS[variant], 10) == count_params(model)
    assert per_channel_outputs(VARIANTS[variant], 10) == channels


def test_the_activation_peak_of_s050_at_96_is_input_plus_stem():
    assert activation_peak(VARIANTS["s050"], 96, rotated=False) == 96 * 96 * 3 + 48 * 48 * 32 == 101376


def test_an_estimate_of_the_base_itself_is_its_measurement():
    e = estimate(VARIANTS["s050"], 96, 10, base=S050_96)
    assert e["model_bytes"] == S050_96["model_bytes"] and e["arena_bytes"] == 101376 + 40368


def test_suggestion_prefers_the_largest_fitting_variant_and_keeps_measured_apart():
    board = get_board("nano33ble")  # 983,040 B usable flash, 196,608 B for the arena
    measured = [{"variant": "s050", "img_size": 64, "model": "a", "model_bytes": 480_000, "arena_bytes": 90_000},
                {"variant": "s050", "img_size": 96, "model": "b", "model_bytes": 480_000, "arena_bytes": 300_000},
                {"variant": "s1", "img_size": 32, "model": "c", "model_bytes": 2_900_000, "arena_bytes": 180_000}]
    s = suggest(board, base=S050_96, measured=measured)
    assert s["measured"]["model"] == "a"  # b's arena and c's flash do not fit
    e = s["estimated"]
    assert e["variant"] in ("s050", "s100") and e["model_bytes"] + 102400 <= 983040
    assert s["estimated_same_variant"]["variant"] == "s050" and "not measured" in s["method"]
    assert suggest(get_board("pico"), base=S050_96, measured=[])["measured"] is None

"""Post-training techniques of edgestar.ptq (no TensorFlow; the INT8 models are in test_e2e)."""
import numpy as np
import pytest
import torch

from edgestar import quant
from edgestar.data.images import batches
from edgestar.errors import InputError
from edgestar.models.starnet import fold_batchnorms, split_large_depthwise
from edgestar.quant import ptq
from edgestar.quant.qat import fake_quant_weight, tflite_qparams
from edgestar.quant.ranges import node_ranges, node_values, trace


@pytest.fixture
def folded_and_data(tiny_model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, 64, 64, generator=g).numpy()
    return fold_batchnorms(tiny_model), x


def _logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _uneven(model):
    """Make the blocks' channels span very different ranges, as trained StarNets do."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for block in ptq.blocks(model):
            for conv in (block.f2.conv, block.g.conv, block.dwconv.conv):
                conv.weight.mul_(torch.exp(2 * torch.rand(conv.out_channels, generator=g)).reshape(-1, 1, 1, 1))
    return model


def test_rescalings_change_no_output_and_even_out_channels(folded_and_data):
    folded, x = folded_and_data
    folded = _uneven(folded)
    ref = _logits(folded, x)
    scaled, summary = ptq.rescale(folded, batches(x, 8), ptq.EXACT)
    out = _logits(scaled, x)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    assert set(summary) == set(ptq.EXACT)
    for name in ptq.EXACT:
        assert summary[name]["blocks"] == 6
        assert summary[name]["spread_after"] < summary[name]["spread_before"]
    assert summary["scale-g"]["spread_after"] == pytest.approx(1.0, abs=0.05)  # fully equalised
    assert _logits(folded, x) == pytest.approx(ref)  # the input model is left alone


def test_star_rescaling_narrows_the_product_range(folded_and_data):
    folded, x = folded_and_data
    folded = _uneven(folded)
    before = ptq.channel_stats(folded, batches(x, 8))
    scaled, _ = ptq.rescale(folded, batches(x, 8), ("scale-star",))
    after = ptq.channel_stats(scaled, batches(x, 8))
    for b0, b1 in zip(before.values(), after.values()):
        # the widest product channel shrinks relative to the typical one
        assert b1.product.max() / b1.product.median() < b0.product.max() / b0.product.median()


def test_bias_correction_removes_the_mean_shift_of_weight_rounding(folded_and_data):
    folded, x = folded_and_data
    x = np.abs(x)  # inputs with a mean: weight rounding then shifts the output mean
    folded, _ = split_large_depthwise(folded, 64)  # split parts share one bias
    corrected, info = ptq.correct_biases(folded, batches(x, 8))
    assert info["layers"] > 0 and info["largest_shift_vs_output_range"] > 0
    stem, stem_c = folded.stem[0].conv, corrected.stem[0].conv
    inp = torch.from_numpy(x)
    with torch.no_grad():
        float_mean = stem(inp).mean(dim=(0, 2, 3))
        def quantized_mean(conv):
            return torch.nn.functional.conv2d(inp, fake_quant_weight(conv.weight), conv.bias,
                                              conv.stride, conv.padding).mean(dim=(0, 2, 3))
        shift_before = (quantized_mean(stem) - float_mean).abs().max()
        shift_after = (quantized_mean(stem_c) - float_mean).abs().max()
    assert shift_before > 1e-5
    assert shift_after < 1e-3 * shift_before + 1e-7


def test_best_clip_beats_min_max_on_heavy_tails_and_keeps_uniform_ranges():
    rng = np.random.default_rng(0)

    def sqnr(x, lo, hi):
        s, z = (float(v) for v in tflite_qparams(torch.tensor(lo), torch.tensor(hi)))
        q = (np.clip(np.round(x / s) + z, -128, 127) - z) * s
        return 10 * np.log10((x ** 2).sum() / ((q - x) ** 2).sum())

    heavy = rng.standard_t(3, size=100_000)
    hist, _ = np.histogram(heavy, ptq.MSE_BINS, (heavy.min(), heavy.max()))
    lo, hi = ptq.best_clip(hist.astype(float), heavy.min(), heavy.max())
    assert hi < heavy.max() and lo > heavy.min()
    assert sqnr(heavy, lo, hi) > sqnr(heavy, heavy.min(), heavy.max()) + 0.5

    flat = rng.uniform(-1, 1, size=100_000)
    hist, _ = np.histogram(flat, ptq.MSE_BINS, (flat.min(), flat.max()))
    lo, hi = ptq.best_clip(hist.astype(float), flat.min(), flat.max())
    assert hi == pytest.approx(flat.max(), rel=0.03)


def test_mse_ranges_touch_only_products_and_sums(folded_and_data):
    folded, x = folded_and_data
    gm = trace(folded)
    ranges = node_ranges(gm, batches(x, 8))
    narrowed = ptq.mse_ranges(gm, batches(x, 8), ranges, ptq.range_nodes(gm))
    nodes = set(ptq.range_nodes(gm))
    assert nodes and all(n.startswith(("mul", "add")) for n in nodes)
    changed = {n for n in ranges if narrowed[n] != ranges[n]}
    assert changed and changed <= nodes
    for n in changed:
        assert ranges[n][0] <= narrowed[n][0] <= 0 <= narrowed[n][1] <= ranges[n][1]
    values = node_values(gm, x[:2])
    assert set(values) >= nodes


def test_parse_techniques():
    assert quant.parse_techniques("all") == tuple(quant.TECHNIQUES)
    assert quant.parse_techniques("none") == () == quant.parse_techniques("")
    assert quant.parse_techniques("mse-ranges,scale-star") == ("scale-star", "mse-ranges")
    assert quant.parse_techniques(("scale-g",)) == ("scale-g",)
    with pytest.raises(InputError, match="unknown --ptq technique 'scale-x'"):
        quant.parse_techniques("scale-star,scale-x")

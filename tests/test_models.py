import pytest
import torch

from edgestar.errors import InputError
from edgestar.models.registry import VARIANTS, check_img_size
from edgestar.models.starnet import count_batchnorms, count_params, create_model, fold_batchnorms

# Parameter counts of the paper's code for 1000 classes.
PAPER_PARAMS = {"s050": 542_728, "s100": 1_043_280, "s150": 1_560_616, "s1": 2_869_168,
                "s2": 3_682_024, "s3": 5_750_792, "s4": 7_482_728}


@pytest.mark.parametrize("variant", list(PAPER_PARAMS))
def test_param_counts_match_the_paper(variant):
    assert count_params(create_model(variant)) == PAPER_PARAMS[variant]


def test_registry_has_the_seven_published_variants():
    assert list(VARIANTS) == ["s050", "s100", "s150", "s1", "s2", "s3", "s4"]
    assert [v for v, spec in VARIANTS.items() if spec.official_url] == ["s1", "s2", "s3", "s4"]


def test_unknown_variant_is_an_input_error():
    with pytest.raises(InputError, match="unknown variant 's9'.*s050"):
        create_model("s9")


@pytest.mark.parametrize("size", [32, 64, 224, 256])
def test_valid_image_sizes(size):
    assert check_img_size(size) == size


@pytest.mark.parametrize("size", [0, 16, 33, 100, 223])
def test_invalid_image_sizes(size):
    with pytest.raises(InputError, match="multiple of 32"):
        check_img_size(size)


def test_official_module_names():
    keys = create_model("s1").state_dict().keys()
    for key in ("stem.0.conv.weight", "stem.0.bn.running_var", "stages.0.0.conv.weight",
                "stages.0.0.bn.weight", "stages.2.7.dwconv.conv.weight", "stages.2.7.dwconv.bn.bias",
                "stages.2.7.f1.conv.weight", "stages.2.7.f2.conv.bias", "stages.2.7.g.bn.weight",
                "stages.2.7.dwconv2.conv.weight", "norm.weight", "head.weight"):
        assert key in keys


@pytest.mark.parametrize("size", [32, 96])
def test_bn_folding_is_exact(tiny_model, size):
    x = torch.randn(3, 3, size, size)
    folded = fold_batchnorms(tiny_model)
    assert count_batchnorms(tiny_model) > 0 and count_batchnorms(folded) == 0
    with torch.no_grad():
        ref, out = tiny_model(x), folded(x)
    assert ref.abs().max() > 0.01  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5)
    # the original is untouched
    assert count_batchnorms(tiny_model) > 0


def test_fold_preserves_train_mode_of_original(tiny_model):
    tiny_model.train()
    fold_batchnorms(tiny_model)
    assert tiny_model.training


def test_drop_path_only_in_training():
    model = create_model("s050", num_classes=4, drop_path_rate=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("kernel", [7, 9])
def test_split_depthwise_is_exact_and_each_part_fits_one_xnnpack_pass(kernel):
    from edgestar.models.starnet import DilatedSplitConv, split_large_depthwise

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1),
                                torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6),
                                torch.nn.Conv2d(6, 6, 5, padding=2, groups=6))  # 25 taps: kept
    split, count = split_large_depthwise(model, 15)  # a 15x15 map
    assert count == 1 and isinstance(split[1], DilatedSplitConv) and isinstance(split[2], torch.nn.Conv2d)
    parts = split[1].parts
    assert sum(p.weight[0, 0].numel() for p in parts) == kernel * kernel  # no tap lost or repeated
    if kernel == 7:
        assert all(p.weight[0, 0].numel() <= 25 for p in parts)
    x = torch.randn(2, 3, 15, 11)
    with torch.no_grad():
        assert (split(x) - model(x)).abs().max() < 1e-5


def test_split_depthwise_only_on_large_feature_maps():
    from edgestar.models.starnet import split_large_depthwise

    model = fold_batchnorms(create_model("s050", num_classes=3))  # depths 1, 1, 3, 1
    counts = {size: split_large_depthwise(model, size)[1] for size in (32, 64, 224)}
    # stage maps are size/4, /8, /16, /32: split from 14 px up
    assert counts == {32: 0, 64: 2 * 1, 224: 2 * (1 + 1 + 3)}

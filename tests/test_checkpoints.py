import argparse
import urllib.error

import pytest
import torch

from edgestar.data.images import Preprocessing
from edgestar.errors import CheckpointError, InputError
from edgestar.models import checkpoints
from edgestar.models.checkpoints import (build_model, build_model_for_finetuning, read_checkpoint,
                                         resolve_weights, save_checkpoint)
from edgestar.models.starnet import create_model


class NotAllowed:
    """A class weights-only unpickling must refuse."""

    def __init__(self):
        self.x = 1


def _timm_style(model):
    # What timm's CheckpointSaver writes (the official release files were made by it).
    return {"epoch": 299, "arch": "starnet_s050", "state_dict": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []}, "version": 2,
            "args": argparse.Namespace(model="starnet_s050", lr=3e-3, epochs=300, aa=None),
            "metric": 55.1}


def test_official_timm_style_checkpoint_loads_exactly(tmp_path, tiny_model):
    path = tmp_path / "starnet_s050.pth.tar"
    torch.save(_timm_style(tiny_model), path)
    model, ckpt = build_model("s050", str(path))
    assert ckpt.meta["arch"] == "starnet_s050"
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_bare_and_ddp_prefixed_state_dicts(tmp_path, tiny_model):
    bare = tmp_path / "bare.pt"
    torch.save(tiny_model.state_dict(), bare)
    ddp = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in tiny_model.state_dict().items()}}, ddp)
    for path in (bare, ddp):
        model, _ = build_model("s050", str(path))
        assert torch.equal(model.head.weight, tiny_model.head.weight)


def test_num_classes_inferred_and_mismatch_reported(tmp_path, tiny_model):
    path = tmp_path / "m.pt"
    torch.save(tiny_model.state_dict(), path)
    model, _ = build_model("s050", str(path))
    assert model.num_classes == 10
    with pytest.raises(CheckpointError, match="--num-classes 5 does not match .* 10 classes"):
        build_model("s050", str(path), num_classes=5)


def test_edgestar_checkpoint_roundtrip_half(tmp_path, tiny_model):
    path = tmp_path / "e.pt"
    pre = Preprocessing(64, crop_pct=1.0)
    save_checkpoint(path, tiny_model, variant="s050", preprocessing=pre, class_names=list("abcdefghij"),
                    half=True)
    ckpt = read_checkpoint(path)
    assert ckpt.variant == "s050" and ckpt.preprocessing == pre
    assert ckpt.class_names == list("abcdefghij")
    assert all(v.dtype != torch.float16 for v in ckpt.state_dict.values())
    assert not list(tmp_path.glob("*.tmp"))


def test_wrong_variant_names_variant_and_keys(tmp_path, tiny_model):
    path = tmp_path / "s050.pt"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        build_model("s1", str(path))
    msg = str(info.value)
    assert "StarNet-s1" in msg and "missing: " in msg and "shape mismatch" in msg
    assert "\n" not in msg


def test_unexpected_keys_are_listed(tmp_path, tiny_model):
    state = dict(tiny_model.state_dict())
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "x.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected: extra.weight"):
        build_model("s050", str(path))


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or not a PyTorch file"):
        read_checkpoint(path)


def test_truncated_checkpoint(tmp_path, tiny_model):
    path = tmp_path / "cut.pth"
    torch.save(tiny_model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)


def test_pickled_code_refused_unless_explicitly_allowed(tmp_path, tiny_model):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model.state_dict(), "obj": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="--unsafe-allow-pickle"):
        read_checkpoint(path)
    assert read_checkpoint(path, allow_pickle=True).state_dict


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_checkpoint(path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.pt"), "s1")


def test_variants_without_official_weights():
    with pytest.raises(InputError, match="s050 has no official weights"):
        resolve_weights("official", "s050")


def test_no_demo_weights_for_other_variants():
    with pytest.raises(InputError, match="no demo weights for variant s4"):
        resolve_weights("demo", "s4")


def test_official_download_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTAR_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", offline)
    with pytest.raises(InputError) as info:
        resolve_weights("official", "s1")
    msg = str(info.value)
    assert "--weights PATH" in msg and "--weights demo" in msg and "\n" not in msg
    assert not any((tmp_path / "cache").iterdir())  # no partial download left behind


def test_official_weights_come_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESTAR_CACHE", str(tmp_path))
    cached = tmp_path / "starnet_s1.pth.tar"
    torch.save(create_model("s1").state_dict(), cached)
    monkeypatch.setattr(checkpoints.urllib.request, "urlopen",
                        lambda *a, **k: pytest.fail("must not download a cached file"))
    assert resolve_weights("official", "s1") == cached
    model, _ = build_model("s1", "official")
    assert model.num_classes == 1000


# --------------------------------------------------------------------------- malformed edgestar files

_DROP = object()  # a field to leave out


def _edgestar_dict(model, **changes):
    obj = {"format": "edgestar", "variant": "s050", "num_classes": model.num_classes,
           "class_names": [f"c{i}" for i in range(model.num_classes)],
           "preprocessing": Preprocessing(32, crop_pct=1.0).to_dict(),
           "state_dict": model.state_dict()}
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not _DROP}



@pytest.mark.parametrize("changes,fragment", [
    ({"state_dict": _DROP}, "has no state_dict"),
    ({"state_dict": [1, 2]}, "state_dict that is not"),
    ({"state_dict": {}}, "state_dict that is not"),
    ({"state_dict": {"head.weight": "not a tensor"}}, "state_dict that is not"),
    ({"num_classes": "10"}, "num_classes '10'"),
    ({"num_classes": 10.0}, "num_classes 10.0"),
    ({"num_classes": 7}, "num_classes 7 but its classifier has 10"),
    ({"class_names": "abcdefghij"}, "class_names that are not a list of strings"),
    ({"class_names": list(range(10))}, "class_names that are not a list of strings"),
    ({"class_names": ["a", "b"]}, "2 class_names for 10 classes"),
    ({"variant": 1}, "variant 1"),
])
def test_malformed_edgestar_checkpoint_is_one_clear_line(tmp_path, tiny_model, changes, fragment):
    path = tmp_path / "damaged.pt"
    torch.save(_edgestar_dict(tiny_model, **changes), path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("pre,fragment", [
    ({"mean": [0.5] * 3, "std": [0.5] * 3}, "no img_size"),
    ({"img_size": "32"}, "img_size '32' is not a positive integer"),
    ({"img_size": 32.5}, "img_size 32.5"),
    ({"img_size": -32}, "img_size -32"),
    ({"img_size": 100}, "img_size 100, not a multiple of 32"),
    ({"img_size": 32, "mean": [0.5, 0.5]}, "mean [0.5, 0.5] is not 3 numbers"),
    ({"img_size": 32, "std": [0.2, 0.2, 0.2, 0.2]}, "std [0.2, 0.2, 0.2, 0.2] is not 3 numbers"),
    ({"img_size": 32, "std": [0.2, 0.0, 0.2]}, "std [0.2, 0.0, 0.2] has a value that is not positive"),
    ({"img_size": 32, "crop_pct": 0}, "crop_pct 0"),
    ({"img_size": 32, "interpolation": "cubic-ish"}, "interpolation 'cubic-ish'"),
    ("224", "preprocessing is a str"),
])
def test_bad_preprocessing_names_the_checkpoint(tmp_path, tiny_model, pre, fragment):
    path = tmp_path / "badpre.pt"
    torch.save(_edgestar_dict(tiny_model, preprocessing=pre), path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg


def test_preprocessing_from_dict_roundtrip_and_defaults():
    pre = Preprocessing(64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
                        interpolation="bilinear")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert Preprocessing.from_dict({"img_size": 224}) == Preprocessing(224)


# --------------------------------------------------------------------------- fine-tuning

def _non_head(state):
    return {k: v for k, v in state.items() if k not in ("head.weight", "head.bias")}


def test_finetuning_replaces_a_head_with_another_class_count(tmp_path, tiny_model):
    path = tmp_path / "ten.pt"
    torch.save(tiny_model.state_dict(), path)
    model, ckpt, head_replaced = build_model_for_finetuning("s050", str(path), 3)
    assert head_replaced and ckpt.source == str(path)
    assert model.num_classes == 3 and model.head.weight.shape == (3, tiny_model.num_features)
    for k, v in _non_head(tiny_model.state_dict()).items():
        assert torch.equal(model.state_dict()[k], v), k


def test_finetuning_loads_everything_when_class_counts_match(tmp_path, tiny_model):
    path = tmp_path / "ten.pt"
    torch.save(tiny_model.state_dict(), path)
    model, _, head_replaced = build_model_for_finetuning("s050", str(path), 10)
    assert not head_replaced
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_finetuning_from_a_checkpoint_without_classifier(tmp_path, tiny_model):
    path = tmp_path / "backbone.pt"
    torch.save(_non_head(tiny_model.state_dict()), path)
    model, _, head_replaced = build_model_for_finetuning("s050", str(path), 4)
    assert head_replaced and model.num_classes == 4


def test_finetuning_still_refuses_another_variant(tmp_path, tiny_model):
    path = tmp_path / "s050.pt"
    torch.save(tiny_model.state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit StarNet-s1.*missing"):
        build_model_for_finetuning("s1", str(path), 3)


@pytest.mark.parametrize("weights", ["none", "file"])
def test_finetuning_model_gets_the_drop_path_rate(tmp_path, tiny_model, weights):
    if weights == "file":
        weights = str(tmp_path / "ten.pt")
        torch.save(tiny_model.state_dict(), weights)
    model, _, _ = build_model_for_finetuning("s050", weights, 10, drop_path_rate=0.2)
    rates = [block.drop_path_rate for stage in model.stages for block in list(stage)[1:]]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)


def test_build_model_passes_drop_path_rate(tmp_path, tiny_model):
    path = tmp_path / "ten.pt"
    torch.save(tiny_model.state_dict(), path)
    model, _ = build_model("s050", str(path), drop_path_rate=0.1)
    assert model.stages[-1][-1].drop_path_rate == pytest.approx(0.1)

"""The training loop's start: which weights it fine-tunes from, what it logs."""
import re

import pytest
import torch

from edgestar.models import checkpoints
from edgestar.models.checkpoints import read_checkpoint
from edgestar.models.starnet import create_model
from edgestar.pipeline import train as train_module
from edgestar.pipeline.train import TrainConfig, train


def _fast_config(**kw):
    return TrainConfig(variant="s050", img_size=32, epochs=1, batch_size=4, max_steps=1, **kw)


@pytest.fixture
def ten_class_ckpt(tmp_path, tiny_model):
    path = tmp_path / "ten.pt"
    torch.save(tiny_model.state_dict(), path)
    return path


@pytest.fixture
def saved_models(monkeypatch):
    """Records the model each training run writes (the model that was trained)."""
    seen = []

    def recording(path, model, **kwargs):
        seen.append(model)
        return checkpoints.save_checkpoint(path, model, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    return seen


def test_finetuning_uses_the_requested_drop_path(tmp_path, image_folder, saved_models):
    start = tmp_path / "two.pt"  # as many classes as image_folder: the whole model is loaded
    torch.save(create_model("s050", num_classes=2).state_dict(), start)
    train(_fast_config(drop_path_rate=0.3), data=str(image_folder), out=tmp_path / "m.pt",
          weights=str(start), log=lambda msg: None)
    (model,) = saved_models
    assert model.stages[-1][-1].drop_path_rate == pytest.approx(0.3)


def test_finetuning_other_class_count_replaces_head_and_says_so(tmp_path, image_folder, ten_class_ckpt):
    lines = []
    train(_fast_config(), data=str(image_folder), out=tmp_path / "m.pt",
          weights=str(ten_class_ckpt), log=lines.append)
    assert "head replaced: checkpoint has 10 classes, data has 2" in lines
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt.num_classes == 2 and ckpt.class_names == ["a", "b"]


def test_epoch_log_prints_held_out_top1_as_percent(tmp_path, image_folder):
    lines = []
    summary = train(_fast_config(), data=str(image_folder), val=str(image_folder),
                    out=tmp_path / "m.pt", log=lines.append)
    epoch_lines = [l for l in lines if l.startswith("epoch 1:")]
    assert len(epoch_lines) == 1
    match = re.search(r"held-out top-1 (\d+\.\d\d)%$", epoch_lines[0])
    assert match, epoch_lines[0]
    assert float(match.group(1)) == pytest.approx(summary["val_top1"] * 100, abs=0.005)
    assert 0.0 <= summary["val_top1"] <= 1.0  # the summary keeps the fraction

"""``train`` saves its state after every epoch and the same call resumes from it (issue 15):
the finished checkpoint has exactly the weights of an uninterrupted run, whether the run was
stopped in-process or killed with SIGKILL from outside."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgestar.checkpointing import load_state
from edgestar.errors import InputError
from edgestar.models.checkpoints import read_checkpoint
from edgestar.pipeline.train import TrainConfig, state_path_for, train


@pytest.fixture
def eight_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _config(**kw):
    # drop path draws from the global generator: resuming must restore it too
    return TrainConfig(**{"variant": "s050", "img_size": 32, "epochs": 3, "batch_size": 4, "drop_path_rate": 0.2,
                          **kw})


class Stop(KeyboardInterrupt):
    pass


def _stopping_at(text):
    def log(msg):
        if msg.startswith(text):
            raise Stop()
    return log


def _weights(path):
    return read_checkpoint(path).state_dict


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, eight_images):
    whole = train(_config(), data=str(eight_images), out=tmp_path / "whole.pt", log=lambda m: None)
    out = tmp_path / "cut.pt"
    with pytest.raises(Stop):  # stopped while logging epoch 3: the state of epoch 2 was saved
        train(_config(), data=str(eight_images), out=out, log=_stopping_at("epoch 3:"))
    assert not out.exists() and load_state(state_path_for(out))["epoch"] == 2
    lines = []
    resumed = train(_config(), data=str(eight_images), out=out, log=lines.append)
    assert f"resuming from {state_path_for(out)}: epoch 2 of 3 done" in lines
    assert [l for l in lines if l.startswith("epoch")] == [l for l in lines if l.startswith("epoch 3")]
    a, b = _weights(tmp_path / "whole.pt"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == whole["history"] and resumed["resumed_from_epoch"] == 2
    assert not state_path_for(out).exists()  # nothing left to resume once the checkpoint is written


def test_the_state_of_another_job_is_refused_or_discarded_with_restart(tmp_path, eight_images):
    out = tmp_path / "m.pt"
    with pytest.raises(Stop):
        train(_config(), data=str(eight_images), out=out, log=_stopping_at("epoch 2:"))
    with pytest.raises(InputError, match=r"m\.pt\.state holds the state of a train run with other settings"):
        train(_config(lr=1e-3), data=str(eight_images), out=out, log=lambda m: None)
    (eight_images / "dog" / "0.png").unlink()  # other data: also another job
    with pytest.raises(InputError, match="other settings, data or starting weights"):
        train(_config(), data=str(eight_images), out=out, log=lambda m: None)
    lines = []
    train(_config(epochs=1), data=str(eight_images), out=out, restart=True, log=lines.append)
    assert f"discarded the training state {state_path_for(out)}" in lines and out.exists()


def test_checkpoint_every_zero_saves_nothing_and_a_corrupt_state_is_one_line(tmp_path, eight_images):
    out = tmp_path / "m.pt"
    with pytest.raises(Stop):
        train(_config(checkpoint_every=0), data=str(eight_images), out=out, log=_stopping_at("epoch 3:"))
    assert not state_path_for(out).exists()
    state_path_for(out).write_bytes(b"not a torch file")
    with pytest.raises(InputError, match=r"training state .*m\.pt\.state cannot be read .*delete it"):
        train(_config(), data=str(eight_images), out=out, log=lambda m: None)


@pytest.mark.e2e
def test_train_killed_with_sigkill_resumes_to_the_same_checkpoint(tmp_path, eight_images):
    """The real thing: the CLI killed from outside mid-epoch, then the same command."""
    args = [sys.executable, "-m", "edgestar", "train", "--variant", "s050", "--data", str(eight_images),
            "--img-size", "64", "--epochs", "6", "--batch-size", "2", "--drop-path", "0.1"]
    ref = subprocess.run([*args, "--out", str(tmp_path / "ref.pt"), "-q"], capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed.pt"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state_path_for(out).exists():  # the first epoch's state is written: kill it in epoch 2+
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    saved = load_state(state_path_for(out))["epoch"]
    assert 1 <= saved < 6
    again = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {state_path_for(out)}: epoch {saved} of 6 done" in again.stderr
    a, b = _weights(tmp_path / "ref.pt"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not state_path_for(out).exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # no half-written state left


@pytest.mark.e2e
def test_sigterm_during_train_names_the_state_to_resume_from(tmp_path, eight_images):
    out = tmp_path / "m.pt"
    proc = subprocess.Popen([sys.executable, "-m", "edgestar", "train", "--variant", "s050", "--data",
                             str(eight_images), "--img-size", "64", "--epochs", "50", "--batch-size", "2",
                             "--out", str(out), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state_path_for(out).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    epoch = load_state(state_path_for(out))["epoch"]
    assert err.strip().splitlines()[-1] == (
        f"Error: interrupted by SIGTERM; the training state after epoch {epoch} is in {state_path_for(out)}; "
        f"the same command with --out {out} resumes from it")
    assert "Traceback" not in err and not out.exists()

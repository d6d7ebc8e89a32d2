"""QAT simulation and its data-parallel training (no TensorFlow; the TFLite match is in test_e2e)."""
import operator
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from processes import descendants

from edgestar.data.images import Preprocessing, batches, qat_images
from edgestar.models.starnet import Block, fold_batchnorms
from edgestar.quant import qat
from edgestar.quant.ranges import node_ranges, trace

HERE = Path(__file__).resolve().parent


def test_tflite_qparams_make_zero_exact():
    scale, zp = qat.tflite_qparams(torch.tensor(-1.0), torch.tensor(3.0))
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == round(-128 + 1.0 / (4.0 / 255))
    # a range not containing 0 is widened to it: ReLU6 outputs get zero point -128
    scale, zp = qat.tflite_qparams(torch.tensor(0.5), torch.tensor(6.0))
    assert zp.item() == -128 and scale.item() == pytest.approx(6.0 / 255)
    scale, zp = qat.tflite_qparams(torch.tensor(-4.0), torch.tensor(-1.0))
    assert zp.item() == 127


def test_weights_are_rounded_per_output_channel():
    w = torch.tensor([[1.0, -0.5, 0.26], [0.01, 0.02, -0.03]])
    q = qat.fake_quant_weight(w)
    for row_w, row_q in zip(w, q):
        step = row_w.abs().max() / 127
        assert torch.allclose(row_q, torch.round(row_w / step) * step)


def test_quantized_nodes_follow_tflite_fusion(tiny_model):
    gm = trace(fold_batchnorms(tiny_model))
    modules = dict(gm.named_modules())
    names = set(qat.quantized_nodes(gm))
    nodes = {n.name: n for n in gm.graph.nodes}
    assert "x" in names and "head" in names and "mean" in names
    for name in names:  # no conv output that feeds a ReLU6 (TFLite fuses the two)
        node = nodes[name]
        if node.op == "call_module" and isinstance(modules[node.target], torch.nn.Conv2d):
            assert not any(isinstance(modules.get(u.target), torch.nn.ReLU6) for u in node.users)
    assert "norm" not in names  # the folded head BN is an identity: no tensor of its own
    blocks = sum(isinstance(m, Block) for m in tiny_model.modules())
    kinds = [nodes[n].target for n in names if nodes[n].op == "call_function"]
    assert kinds.count(operator.mul) == blocks and kinds.count(operator.add) == blocks  # star, residual


def test_simulation_tracks_then_freezes_ranges_and_trains(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    folded = fold_batchnorms(tiny_model)
    pre = Preprocessing(32)
    x = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    start = node_ranges(trace(folded), batches(x, 4))
    before = {k: v.clone() for k, v in folded.state_dict().items()}
    result = qat.finetune(folded, qat_images(str(tmp_path)), pre, start,
                          config=qat.QATConfig(batch_size=4, max_steps=2, lr=1e-3))
    assert all(torch.equal(before[k], v) for k, v in folded.state_dict().items())  # input untouched
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed, "QAT did not update any weight"
    assert set(result.ranges) == set(qat.quantized_nodes(trace(result.model)))
    assert result.ranges != {k: start[k] for k in result.ranges}  # tracked during the first step
    # the simulation computes with the trained weights, and differs from float only by rounding
    with torch.no_grad():
        xin = torch.from_numpy(x[:2])
        sim, flt = result.simulated(xin), result.model(xin)
    assert not torch.equal(sim, flt)
    assert (sim - flt).abs().max() < 0.5 * flt.abs().max() + 1e-3


def _image_dir(root: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _torchrun_command(nproc: int, images: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(HERE / "qat_ddp_job.py"), str(images), str(out), *map(str, extra)]


def _torchrun(nproc: int, images: Path, out: Path, *extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = _torchrun_command(nproc, images, out, *extra)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """gloo DDP on 2 CPU processes: each takes half of every batch; averaged gradients and
    all-reduced range statistics must give the single-process result."""
    images = _image_dir(tmp_path / "imgs", 16)
    one = _torchrun(1, images, tmp_path / "one.pt")
    two = _torchrun(2, images, tmp_path / "two.pt")
    assert one["world_size"] == 1 and two["world_size"] == 2
    lr, steps = one["lr"], one["steps"]
    moved = max((one["weights"][k] - one["start"][k]).abs().max().item() for k in one["weights"])
    assert moved > lr / 2  # training happened
    for k in one["weights"]:
        diff = (one["weights"][k] - two["weights"][k]).abs()
        # Adam's first steps are +-lr per weight, so float noise in a near-zero gradient can
        # flip one; anything systematic (unaveraged gradients, other data) moves most weights.
        assert diff.max().item() <= 2 * steps * lr + 1e-7, k
        assert (diff > 1e-6).float().mean().item() < 0.01, k
    for name, (lo, hi) in one["ranges"].items():
        assert two["ranges"][name] == pytest.approx((lo, hi), rel=1e-5, abs=1e-6)


class _StopAt(KeyboardInterrupt):
    pass


def _bar_stopping_at(step):
    class Bar:
        def __init__(self):
            self.n = 0

        def update(self, k):
            self.n += k
            if self.n == step:
                raise _StopAt()

        def close(self):
            pass
    return lambda total, desc: Bar()


def test_qat_interrupted_mid_epoch_resumes_to_exactly_the_uninterrupted_result(tmp_path, tiny_model):
    images = qat_images(str(_image_dir(tmp_path / "imgs", 12)))
    folded = fold_batchnorms(tiny_model)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    start = node_ranges(trace(folded), batches(x, 4))
    config = qat.QATConfig(batch_size=4, epochs=2, lr=1e-3, range_tracking=0.5, checkpoint_minutes=0)
    whole = qat.finetune(folded, images, Preprocessing(32), start, config=config)
    state = tmp_path / "qat-state.pt"
    with pytest.raises(_StopAt):  # stopped during step 5 of 6 (epoch 2): state of step 4 saved
        qat.finetune(folded, images, Preprocessing(32), start, config=config, state_path=state,
                     progress_factory=_bar_stopping_at(5))
    lines = []
    resumed = qat.finetune(folded, images, Preprocessing(32), start, config=config, state_path=state,
                           log=lines.append)
    assert f"QAT resumed from {state}: step 4 of 6 done" in lines and resumed.resumed_from_step == 4
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.ranges == whole.ranges and resumed.history == whole.history
    other = qat.QATConfig(batch_size=4, epochs=2, lr=2e-3, checkpoint_minutes=0)  # another job: starts over
    lines.clear()
    again = qat.finetune(folded, images, Preprocessing(32), start, config=other, state_path=state, log=lines.append)
    assert again.resumed_from_step is None and any("QAT starts over" in l for l in lines)


def test_ddp_qat_killed_mid_run_resumes_under_torchrun_to_the_uninterrupted_result(tmp_path):
    """Two gloo processes under torchrun, SIGKILLed (the whole process group) once a state
    is saved; the same torchrun command resumes and ends with the uninterrupted weights."""
    import signal
    import time

    from edgestar.checkpointing import load_state

    images = _image_dir(tmp_path / "imgs", 16)  # 2 steps an epoch at the global batch of 8
    whole = _torchrun(2, images, tmp_path / "whole.pt", tmp_path / "unused-state.pt", 8)
    state = tmp_path / "state.pt"
    proc = subprocess.Popen(_torchrun_command(2, images, tmp_path / "cut.pt", state, 8),
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both workers (own sessions)
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (tmp_path / "cut.pt").exists()
    saved = load_state(state)["step"]
    resumed = _torchrun(2, images, tmp_path / "cut.pt", state, 8)
    assert resumed["resumed_from_step"] == saved and 1 <= saved < whole["steps"]
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])
    assert resumed["ranges"] == whole["ranges"]

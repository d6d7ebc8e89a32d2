"""Data-free calibration inputs distilled from BatchNorm statistics (no TensorFlow)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgestar.data.distill import bn_layers, distilled_inputs
from edgestar.errors import InputError
from edgestar.models.starnet import create_model, fold_batchnorms

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
STEPS = 20


def _normalize(img):
    return (img - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convs gain nothing from threads, and on a busy machine OpenMP barriers waiting
    for a descheduled thread made these tests 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_model():
    """A tiny StarNet whose BN running statistics are those of a known 'training set' (smooth,
    colour-shifted images), so that matching them is possible, and far from what noise gives."""
    torch.manual_seed(0)
    model = create_model("s050", num_classes=10)
    g = torch.Generator().manual_seed(0)
    tint = torch.tensor([0.3, 0.1, 0.2]).reshape(1, 3, 1, 1)
    low = torch.rand(64, 3, 4, 4, generator=g) * 0.6 + tint
    images = _normalize(F.interpolate(low, size=32, mode="bilinear").clamp(0, 1))
    for bn in bn_layers(model):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: the running stats become the batch's
        bn.weight.data.uniform_(0.5, 1.5, generator=g)
        bn.bias.data.uniform_(-0.2, 0.2, generator=g)
    model.train()
    with torch.no_grad():
        model(images)
    for bn in bn_layers(model):
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def model(one_thread):
    return reference_model()


def bn_loss(model, x: np.ndarray) -> float:
    """The distillation objective, computed independently of edgestar.distill."""
    stats = []
    hooks = [bn.register_forward_pre_hook(lambda m, a: stats.append((m, a[0])))
             for bn in bn_layers(model)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    total = 0.0
    for bn, a in stats:
        mu, var = a.mean(dim=(0, 2, 3)), a.var(dim=(0, 2, 3), unbiased=False)
        total += float((mu - bn.running_mean).norm())
        total += float((torch.sqrt(var + bn.eps) - torch.sqrt(bn.running_var + bn.eps)).norm())
    return total


class Progress:
    def __init__(self):
        self.calls = []

    def update(self, k):
        self.calls.append(k)


def test_shape_dtype_box_batches_and_info(model):
    progress = Progress()
    x, info = distilled_inputs(model, 10, 32, MEAN, STD, steps=3, batch_size=4, progress=progress)
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    lo = (0 - np.array(MEAN)) / np.array(STD)
    hi = (1 - np.array(MEAN)) / np.array(STD)
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
    assert (per_channel.min(1) >= lo - 1e-6).all() and (per_channel.max(1) <= hi + 1e-6).all()
    # the box is reached (N(0,1) init clamps), so the bounds really bind
    assert np.allclose(per_channel.min(1), lo, atol=1e-5)
    assert progress.calls == [4, 3, 3]  # 10 split into equal batches of at most 4
    assert info["source"] == "distilled" and info["count"] == 10
    assert info["steps"] == 3 and info["batches"] == 3
    assert info["bn_layers"] == len(bn_layers(model))
    assert info["bn_loss"] > 0 and info["seconds"] >= 0


def test_deterministic_for_a_seed_even_under_no_grad(model):
    a, info_a = distilled_inputs(model, 6, 32, MEAN, STD, steps=5, seed=3)
    with torch.no_grad():  # the caller's no_grad must not stop the optimisation
        b, info_b = distilled_inputs(model, 6, 32, MEAN, STD, steps=5, seed=3)
    c, _ = distilled_inputs(model, 6, 32, MEAN, STD, steps=5, seed=4)
    np.testing.assert_array_equal(a, b)
    assert info_a["bn_loss"] == info_b["bn_loss"]
    assert not np.allclose(a, c)


def test_bn_loss_falls_far_below_noise(model):
    x, info = distilled_inputs(model, 8, 32, MEAN, STD, steps=STEPS, batch_size=8, seed=0)
    final = bn_loss(model, x)
    assert final == pytest.approx(info["bn_loss"], rel=1e-4)  # the reported loss is the real one
    assert final < 0.3 * info["initial_bn_loss"]  # ~0.09 measured
    noise, _ = distilled_inputs(model, 8, 32, MEAN, STD, steps=0, batch_size=8, seed=0)
    assert bn_loss(model, noise) == pytest.approx(info["initial_bn_loss"], rel=1e-4)
    # the colour statistics of the 'training set' are recovered through the first BN alone:
    # its red channel was brighter than its green one
    red, green = (x[:, c] * STD[c] + MEAN[c] for c in (0, 1))
    assert red.mean() > green.mean() + 0.1


def test_model_is_left_exactly_as_it_was(one_thread):
    model = reference_model().train()  # a fresh model: this one is changed before the call
    model.head.eval()
    model.head.weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert len(set(modes.values())) == 2 and len(set(flags.values())) == 2
    distilled_inputs(model, 4, 32, MEAN, STD, steps=2)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_unusable_models_and_options_are_input_errors(model):
    with pytest.raises(InputError, match="no BatchNorm2d"):
        distilled_inputs(fold_batchnorms(model), 4, 32, MEAN, STD, steps=1)
    with pytest.raises(InputError, match="at least 1 image"):
        distilled_inputs(model, 0, 32, MEAN, STD, steps=1)
    with pytest.raises(InputError, match="batch size"):
        distilled_inputs(model, 4, 32, MEAN, STD, batch_size=0)

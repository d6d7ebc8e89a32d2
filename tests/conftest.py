import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgestar.models.starnet import create_model


def randomize_batchnorms(model, seed=0):
    """Give every BatchNorm non-trivial statistics so folding is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_batchnorms(create_model("s050", num_classes=10)).eval()


@pytest.fixture
def image_folder(tmp_path):
    """A small real-looking image folder: 2 classes x 3 JPEGs of noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.jpg")
    return root


@pytest.fixture(autouse=True)
def no_tensorflow_in_unit_tests(request):
    """Unit tests must not import TensorFlow (it costs seconds and GBs)."""
    yield
    if "e2e" not in request.keywords:
        assert "tensorflow" not in sys.modules, "a unit test imported TensorFlow"


# --------------------------------------------------------------------------- no network

GUARD = textwrap.dedent('''
    import os, socket
    _log = os.environ["EDGESTAR_NET_LOG"]

    def _blocked(what, detail):
        with open(_log, "a") as f:
            f.write(f"{what} {detail!r}\\n")
        raise OSError(f"network disabled by test guard: {what} {detail!r}")

    _connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _blocked("connect", address)
        return _connect(self, address)
    socket.socket.connect = connect
    socket.socket.connect_ex = connect
    socket.getaddrinfo = lambda host, *a, **k: _blocked("getaddrinfo", host)
    socket.create_connection = lambda address, *a, **k: _blocked("create_connection", address)
''')


@pytest.fixture(scope="session")
def offline_env(tmp_path_factory):
    guard_dir = tmp_path_factory.mktemp("netguard")
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    log = guard_dir / "attempts.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(guard_dir), env.get("PYTHONPATH", "")])
    env["EDGESTAR_NET_LOG"] = str(log)
    env["EDGESTAR_CACHE"] = str(guard_dir / "cache")
    return env, log


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """``fake_python(body)`` makes ``sys.executable`` a shell script running ``body``, so that a
    child process edgestar starts (converter, re-quantizer, TFLite Micro) does that instead:
    hangs, crashes, prints an error."""
    def install(body: str) -> None:
        script = tmp_path / "fake-python"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(script))
    return install

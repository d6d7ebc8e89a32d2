"""What `pip install edgestar` (from a wheel, not editable) gets: the code, the demo weights and the
demo images with their provenance, enough to run the README's main job.

The wheel is built once per session from a clean copy of the repository: building in the
repository itself would leave build/ and *.egg-info there, and a stale build/ can carry files
that the source no longer has into the wheel.
"""
import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgestar.data import images
from edgestar.errors import InputError

REPO = Path(__file__).resolve().parents[1]
DEMO_IN_WHEEL = "edgestar/_demo_data/"
CLASSES = 10
PER_CLASS = {"calib": 50, "eval": 100}
# What the build must not copy: version control, build outputs, caches, environments, runs.
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".venv", "venv", "runs")


def clean_env() -> dict:
    """The environment minus PYTHONPATH: the development shell points it at a source tree."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    missing = [m for m in ("setuptools", "wheel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"cannot build a wheel offline without {', '.join(missing)} installed")
    src = tmp_path_factory.mktemp("source") / "edgestar"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(out), str(src)],
                         env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = out.glob("edgestar-*.whl")
    return whl


def jpgs_per_class(names, prefix: str) -> dict:
    counts = {}
    for name in names:
        if name.startswith(prefix) and name.endswith(".jpg"):
            cls = name[len(prefix):].split("/")[0]
            counts[cls] = counts.get(cls, 0) + 1
    return counts


# --------------------------------------------------------------------------- fast checks

def test_setup_cfg_lists_every_edgestar_package():
    """setup.cfg lists the packages (find: cannot add the demo data's package): a new
    subpackage missing from the list would be missing from every wheel."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    in_tree = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "edgestar").rglob("__init__.py")}
    assert in_tree - listed == set(), "add these packages to setup.cfg [options] packages"
    assert {"edgestar._demo_data", "edgestar._firmware_assets"} <= listed


@pytest.mark.parametrize("split", ["calib", "eval"])
def test_demo_splits_hold_the_documented_images(split):
    folder = images.demo_split(split)
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in folder.iterdir() if d.is_dir()}
    assert len(counts) == CLASSES and set(counts.values()) == {PER_CLASS[split]}


def test_missing_demo_set_is_an_input_error(monkeypatch):
    monkeypatch.setattr(images, "DEMO_DIR", None)
    with pytest.raises(InputError, match="demo data set is missing"):
        images.demo_split("calib")


def test_wheel_ships_code_weights_demo_images_and_provenance(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "edgestar").rglob("*.py")}
    assert code - names == set(), "source modules missing from the wheel"
    assert "edgestar/models/weights/starnet_s1_cifar10_demo.pt" in names
    for split, per_class in PER_CLASS.items():
        counts = jpgs_per_class(names, f"{DEMO_IN_WHEEL}cifar10_demo/{split}/")
        assert len(counts) == CLASSES and set(counts.values()) == {per_class}, (split, counts)
    assert {f"{DEMO_IN_WHEEL}README.md", f"{DEMO_IN_WHEEL}cifar10_demo/FILES.txt"} <= names
    readme = zipfile.ZipFile(wheel).read(f"{DEMO_IN_WHEEL}README.md").decode()
    assert "**Provenance.**" in readme and "**License.**" in readme
    assert "edgestar/_firmware_assets/boards.toml" in names, "the board table is missing"
    stray = ("calib/", "firmware_assets/", "tests/")
    assert not any(n.startswith(stray) for n in names), "stray top-level folders"


# --------------------------------------------------------------------------- installed wheel

@pytest.fixture(scope="session")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh environment holding the wheel; torch and TensorFlow come from the system's
    site-packages, which may also hold an editable install of some checkout."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=120)
    # pip from the system site-packages installs into the venv; --ignore-installed so that it
    # never uninstalls the edgestar that the system site-packages may hold.
    res = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
                          "--ignore-installed", "-q", wheel],
                         env=clean_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return venv


def from_venv(venv: Path, path: str) -> bool:
    return Path(path).resolve().is_relative_to(venv.resolve())


def test_installed_wheel_finds_its_own_demo_set(venv, tmp_path):
    probe = ("import json, edgestar, edgestar.data.images as i\n"
             "splits = {s: str(i.demo_split(s)) for s in ('calib', 'eval')}\n"
             "print(json.dumps({'package': edgestar.__file__, 'splits': splits}))")
    res = subprocess.run([venv / "bin" / "python", "-c", probe], env=clean_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    # An editable install's finder in the system site-packages must not win over the wheel.
    assert from_venv(venv, found["package"]), f"edgestar imported from {found['package']}"
    for split, folder in found["splits"].items():
        assert from_venv(venv, folder), f"demo {split} split read from {folder}"
        counts = {d.name: len(list(d.glob("*.jpg"))) for d in Path(folder).iterdir()}
        assert len(counts) == CLASSES and set(counts.values()) == {PER_CLASS[split]}


def test_installed_wheel_finds_its_board_table(venv, tmp_path):
    probe = ("import json, edgestar.deploy.boards as b\n"
             "print(json.dumps({'table': str(b._default_table()), 'boards': sorted(b.load_boards())}))")
    res = subprocess.run([venv / "bin" / "python", "-c", probe], env=clean_env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    found = json.loads(res.stdout)
    assert from_venv(venv, found["table"]), f"board table read from {found['table']}"
    assert {"nano33ble", "pico", "corstone-300"} <= set(found["boards"])


@pytest.mark.e2e
def test_main_job_runs_from_an_installed_wheel(venv, offline_env, tmp_path):
    """`edgestar quantize --variant s1 --weights demo` run by the installed wheel, outside the
    repository, with the network blocked."""
    env, log = offline_env
    # Keep only the network guard's folder (it holds sitecustomize.py), not the source tree.
    guard = [p for p in env["PYTHONPATH"].split(os.pathsep) if p and (Path(p) / "sitecustomize.py").is_file()]
    assert guard, "the network guard is not on offline_env's PYTHONPATH"
    env = {**env, "PYTHONPATH": os.pathsep.join(guard)}
    out = tmp_path / "run"
    # Fewer images than the defaults keep this near a minute; all of them come from the wheel.
    res = subprocess.run([venv / "bin" / "python", "-m", "edgestar", "quantize", "--variant", "s1",
                          "--weights", "demo", "--calib-samples", "100", "--eval-samples", "200",
                          "--out", out, "-q", "--json"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"network was touched: {log.read_text()}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["metrics"]["tflite_int8"]["top1"] >= 0.5  # the trained demo S1; chance is 0.1
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    for used in (inputs["weights"]["path"], inputs["calibration"]["source"], inputs["evaluation"]["source"]):
        assert from_venv(venv, used), f"{used} is not from the wheel"

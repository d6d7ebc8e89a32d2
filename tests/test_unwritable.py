"""Unwritable places (issue 15): an ``--out`` on a read-only file system or in a folder without
write permission, a read-only run directory, a read-only cache. Every command refuses with one
line and exit code 2 before doing any work, and creates nothing; what only reads (bench
``--no-save``, report of a read-only run, firmware into another folder) still works.

As root (CI) the read-only place is a real read-only tmpfs mounted by the test: permissions
do not stop root, a read-only file system does. Otherwise it is a folder with mode 0o555."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TFLM_TREE = Path(__file__).resolve().parents[2] / "shared" / "third_party" / "tflm"


def edgestar(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgestar", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("unwritable")
    res = edgestar("quantize", "--variant", "s050", "--weights", "demo", "--calib-samples", 16, "--eval-samples",
                   20, "--out", work / "run", "-q", cwd=work)
    assert res.returncode == 0, res.stderr
    return work / "run"


@pytest.fixture
def read_only(tmp_path, demo_run):
    """A read-only folder holding a copy of ``demo_run`` (``run``) and an empty folder (``empty``)."""
    place = tmp_path / "ro"
    place.mkdir()
    mounted = False
    if os.geteuid() == 0:
        if shutil.which("mount") is None:
            pytest.skip("as root a read-only place needs mount(8) (permissions do not stop root)")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(place)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted = True
    shutil.copytree(demo_run, place / "run")
    (place / "empty").mkdir()
    try:
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
        else:
            for folder in (place / "run", place / "empty", place):
                folder.chmod(0o555)
        yield place
    finally:
        if mounted:
            subprocess.run(["umount", str(place)], check=False)
        else:
            for folder in (place, place / "run", place / "empty"):
                folder.chmod(0o755)


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def edgestar_here(*args, cwd):
    """The CLI in this process (these commands refuse before importing anything heavy)."""
    from click.testing import CliRunner

    from edgestar.cli import cli

    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)
    return _Result(res.exit_code, res.output)


def _one_line_refusal(res, *words):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and "Traceback" not in res.stderr, res.stderr
    assert any(w in lines[-1] for w in words), lines[-1]
    return lines[-1]


@pytest.mark.e2e
def test_every_command_refuses_an_unwritable_output_before_any_work(read_only, demo_run, tmp_path):
    before = sorted(p.name for p in read_only.rglob("*"))
    cases = {
        "quantize": ["quantize", "--variant", "s050", "--weights", "demo", "--out", read_only / "new-run"],
        "quantize into an existing folder": ["quantize", "--variant", "s050", "--weights", "demo",
                                             "--out", read_only / "empty"],
        "train": ["train", "--variant", "s050", "--data", "demo", "--epochs", "1", "--out", read_only / "m.pt"],
        "sweep": ["sweep", "--variants", "s050", "--out", read_only / "sweep"],
        "report": ["report", demo_run, "--out", read_only / "report"],
        "firmware --out": ["firmware", demo_run, "--board", "nano33ble", "--out", read_only / "fw"],
        "firmware into its read-only run": ["firmware", read_only / "run", "--board", "nano33ble"],
        "bench saving into its read-only run": ["bench", read_only / "run", "--runs", "2", "-q"],
    }
    for what, args in cases.items():
        run = edgestar if args[0] in ("firmware", "bench") else edgestar_here
        res = run(*args, cwd=tmp_path)
        line = _one_line_refusal(res, "not writable", "Read-only file system")
        assert "measuring" not in res.stderr and "decoded" not in res.stderr, (what, res.stderr)  # no work done
        assert "--no-save" in line if what.startswith("bench") else True
    assert sorted(p.name for p in read_only.rglob("*")) == before  # nothing was created anywhere


@pytest.mark.e2e
def test_a_read_only_cache_is_one_line_naming_it_and_the_variable(read_only, demo_run, tmp_path):
    env = dict(os.environ, EDGESTAR_CACHE=str(read_only / "cache"))
    res = edgestar("quantize", "--variant", "s1", "--weights", "official", "--out", tmp_path / "run", env=env)
    _one_line_refusal(res, f"cannot create the weights cache {read_only / 'cache'}")
    if not (TFLM_TREE / "Makefile").is_file() or shutil.which("arm-none-eabi-gcc") is None:
        return  # the firmware build cache needs the TFLite Micro tree and the cross compiler
    res = edgestar("firmware", demo_run, "--board", "corstone-300", "--build", "--tflm-root", TFLM_TREE,
                   "--out", tmp_path / "fw", env=env)
    line = _one_line_refusal(res, "TFLite Micro build cache")
    assert line.endswith("set $EDGESTAR_CACHE to a writable folder") and not (tmp_path / "fw").exists()


@pytest.mark.e2e
def test_what_only_reads_a_read_only_run_still_works(read_only, tmp_path):
    run = read_only / "run"
    res = edgestar("bench", run, "--runs", "2", "--warmup", "0", "--threads", "1", "--no-save", "-q")
    assert res.returncode == 0, res.stderr
    res = edgestar("report", run, "--out", tmp_path / "report", "--format", "md")
    assert res.returncode == 0 and (tmp_path / "report" / "report.md").is_file(), res.stderr
    res = edgestar("firmware", run, "--board", "nano33ble", "--out", tmp_path / "fw", "--json")
    assert res.returncode == 0, res.stderr
    assert f"{run} is read-only: the result is not recorded in its manifest" in res.stderr
    assert json.loads(res.stdout)["recorded_in"] is None and (tmp_path / "fw").is_dir()

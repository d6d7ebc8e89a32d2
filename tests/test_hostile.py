"""Hostile files never run code (issue 15): checkpoints crafted to run code when unpickled, in
plain pickle and in torch's zip format, are refused by every command that reads a checkpoint,
and the payload's marker file never appears. With ``--unsafe-allow-pickle`` the same file does
run its payload: the payload is real, and the protection is what stops it. ``.npy`` arrays are
read without pickle. And the source never hands data to a shell, ``eval`` or ``exec``."""
import ast
import builtins
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgestar.cli import cli

PACKAGE = Path(__file__).resolve().parents[1] / "edgestar"


class Payload:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def hostile_checkpoints(tmp_path):
    marker = tmp_path / "PWNED"
    plain = tmp_path / "plain pickle.pt"  # a space in the name, too
    plain.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(marker)}))
    zipped = tmp_path / "torch-zip.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}, zipped)
    assert not marker.exists()
    return marker, {"plain": plain, "zip": zipped}


COMMANDS = {
    "quantize": lambda ckpt, out: ["quantize", "--variant", "s050", "--weights", ckpt, "--out", out],
    "train": lambda ckpt, out: ["train", "--variant", "s050", "--data", "demo", "--weights", ckpt,
                                "--out", f"{out}/m.pt"],
    "sweep": lambda ckpt, out: ["sweep", "--variants", "s050", "--weights", ckpt, "--out", out],
}


@pytest.mark.parametrize("fmt", ["plain", "zip"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_code_running_checkpoint_is_refused_without_running(tmp_path, command, fmt):
    marker, files = hostile_checkpoints(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, COMMANDS[command](str(files[fmt]), str(out)))
    assert not marker.exists(), "the checkpoint's payload ran"
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "--unsafe-allow-pickle" in last and "Traceback" not in result.output


@pytest.mark.parametrize("fmt", ["plain", "zip"])
def test_the_payload_is_real(tmp_path, fmt):
    """Control: reading the file with pickle allowed runs the payload (why it is refused)."""
    from edgestar.errors import EdgestarError
    from edgestar.models.checkpoints import read_checkpoint

    marker, files = hostile_checkpoints(tmp_path)
    try:
        read_checkpoint(files[fmt], allow_pickle=True)
    except EdgestarError:
        pass  # the payload's result is no state dict: refused afterwards, but it has run
    assert marker.exists()


def test_npy_inputs_are_read_without_pickle(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "calib.npy"
    np.save(evil, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    result = CliRunner().invoke(cli, ["quantize", "--variant", "s050", "--weights", "none", "--calib", str(evil),
                                      "--out", str(tmp_path / "out")])
    assert not marker.exists()
    assert result.exit_code == 2 and "Traceback" not in result.output


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            yield name, node


def test_no_shell_eval_or_exec_in_the_package():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name, node in _calls(tree):
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            receiver = getattr(getattr(node.func, "value", None), "id", None)
            if isinstance(node.func, ast.Name) and name in ("eval", "exec") or \
                    (receiver, name) in {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                                         ("subprocess", "getstatusoutput")}:
                found.append(f"{where} {name}()")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where} shell=")
            if name in ("run", "Popen", "check_output", "check_call", "call") and node.args and \
                    (isinstance(node.args[0], (ast.JoinedStr, ast.BinOp))
                     or isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.append(f"{where} {name}() with a command string")
            if name in ("load", "loads") and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("pickle", "marshal", "dill"):
                found.append(f"{where} {node.func.value.id}.{name}()")
    assert found == []


def test_a_manifest_cannot_turn_on_unpickling(tmp_path):
    """--from-manifest never takes allow_pickle from the file: a downloaded manifest naming a
    hostile checkpoint is refused like the checkpoint itself."""
    import json

    marker, files = hostile_checkpoints(tmp_path)
    run = tmp_path / "recorded"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "manifest_version": 1, "tool": "edgestar quantize",
        "config": {"variant": "s050", "weights": str(files["zip"]), "allow_pickle": True}}))
    result = CliRunner().invoke(cli, ["quantize", "--from-manifest", str(run / "manifest.json"),
                                      "--out", str(tmp_path / "out")])
    assert not marker.exists()
    assert result.exit_code == 2 and "--unsafe-allow-pickle" in result.output.strip().splitlines()[-1]

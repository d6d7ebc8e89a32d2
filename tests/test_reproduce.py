"""``quantize --from-manifest`` (issue 15): a recorded run re-run from its manifest gives
byte-identical .tflite files and says so; what differs is named; bad uses are one-line errors."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgestar.cli import cli
from edgestar.pipeline.reproduce import compare


def test_compare_names_what_differs():
    recorded = {"inputs": {"weights": {"sha256": "a" * 64}, "evaluation": {"sha256": "e"}},
                "versions": {"torch": "2.13.0", "edgestar": "0.1.0"},
                "artifacts": {"tflite_fp32": {"sha256": "f"}, "tflite_int8": {"sha256": "i"}, "onnx": {"sha256": "o"}},
                "metrics": {"tflite_int8": {"top1": 0.8}}}
    assert compare(recorded, recorded) == ["byte-identical to the recorded run: fp32, int8 .tflite"]
    new = json.loads(json.dumps(recorded))
    new["inputs"]["weights"]["sha256"] = "b" * 64
    new["versions"]["torch"] = "2.14.0"
    new["artifacts"]["tflite_int8"]["sha256"] = "j"
    new["metrics"]["tflite_int8"]["top1"] = 0.79
    lines = compare(recorded, new)
    assert lines == ["DIFFERENT input: weights (sha256 aaaaaaaaaaaa recorded, bbbbbbbbbbbb now)",
                     "DIFFERENT tools: torch 2.13.0 -> 2.14.0",
                     "byte-identical to the recorded run: fp32 .tflite",
                     "DIFFERENT from the recorded run: int8 .tflite",
                     "DIFFERENT top-1 of int8: 0.8 recorded, 0.79 now"]


@pytest.mark.parametrize("args, message", [
    (["--from-manifest", "MANIFEST", "--variant", "s1"], "--variant cannot be added"),
    (["--from-manifest", "MISSING"], "is not an edgestar run directory"),
    (["--from-manifest", "OTHER"], "not the manifest of an edgestar quantize run"),
    (["--weights", "demo"], "Missing option '--variant'"),
])
def test_from_manifest_errors(tmp_path, args, message):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"manifest_version": 1, "tool": "edgestar sweep"}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"manifest_version": 1, "tool": "edgestar quantize",
                                                                 "config": {"variant": "s1"}}))
    paths = {"MANIFEST": str(tmp_path / "run" / "manifest.json"), "MISSING": str(tmp_path / "nope" / "manifest.json"),
             "OTHER": str(other / "manifest.json")}
    result = CliRunner().invoke(cli, ["quantize", *[paths.get(a, a) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output.strip().splitlines()[-1]


@pytest.mark.e2e
def test_a_recorded_run_reproduces_byte_for_byte(tmp_path):
    def edgestar(*args):
        return subprocess.run([sys.executable, "-m", "edgestar", *map(str, args)], capture_output=True, text=True,
                              timeout=600, cwd=tmp_path)

    first = edgestar("quantize", "--variant", "s050", "--weights", "demo", "--calib-samples", "16",
                     "--eval-samples", "50", "--formats", "dynamic", "--out", tmp_path / "a", "-q")
    assert first.returncode == 0, first.stderr
    again = edgestar("quantize", "--from-manifest", tmp_path / "a" / "manifest.json", "--out", tmp_path / "b")
    assert again.returncode == 0, again.stderr
    notes = [line for line in again.stdout.splitlines() if "reproduction of" in line]
    assert notes == [f"note: reproduction of {tmp_path / 'a' / 'manifest.json'}: byte-identical to the recorded "
                     "run: fp32, int8, dynamic .tflite"], again.stdout
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["config"]["formats"] == ["dynamic"]
    for name in ("model.onnx", "starnet_s050_32_int8.tflite"):  # the same inputs give the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

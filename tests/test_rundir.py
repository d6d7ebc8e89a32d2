import json
import os

import pytest
from privileges import ran_without_override

from edgestar.errors import InputError, StageError
from edgestar.files import atomic_write_json, ensure_writable_dir
from edgestar.pipeline.rundir import RunDir, load_manifest
from edgestar.report.summary import summary_table


def test_manifest_records_stages(tmp_path):
    run = RunDir.create(tmp_path / "run", tool="test")
    with run.stage("one") as rec:
        rec["value"] = 3
    with pytest.raises(StageError):
        with run.stage("two"):
            raise StageError("conversion broke")
    m = load_manifest(tmp_path / "run")
    assert m["stages"]["one"]["status"] == "ok" and m["stages"]["one"]["value"] == 3
    assert m["stages"]["two"] == {"status": "failed", "error": "conversion broke",
                                  "seconds": m["stages"]["two"]["seconds"]}
    assert m["status"] == "failed" and set(m["timings_s"]) == {"one", "two"}


def test_non_empty_output_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(InputError, match="not empty"):
        RunDir.create(tmp_path / "x")


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("1")
    with pytest.raises(InputError, match="exists and is not a directory|cannot create"):
        ensure_writable_dir(tmp_path / "f")


def test_unwritable_output_folder(tmp_path, request):
    if ran_without_override(request):  # as root: in a child that file modes stop
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(InputError, match="not writable|cannot create"):
        ensure_writable_dir(ro / "sub")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_summary_table_from_manifest():
    manifest = {
        "artifacts": {"onnx": {"path": "model.onnx", "bytes": 1000},
                      "tflite_fp32": {"path": "a.tflite", "bytes": 2000},
                      "tflite_int8": {"path": "b.tflite", "bytes": 600}},
        "metrics": {"torch_fp32": {"top1": 0.80, "top5": 0.99},
                    "tflite_fp32": {"top1": 0.80, "agreement": 1.0},
                    "tflite_int8": {"top1": 0.795, "agreement": 0.98},
                    "fp32_parity_max_abs": 1.5e-6, "eval_images": 1000, "eval_labelled": True,
                    "int8_top1_drop_ci95_pt": [-0.1, 1.1], "int8_agreement_ci95": [0.97, 0.99]},
    }
    table = summary_table(manifest, "runs/x")
    assert "tflite int8" in table and "79.50%" in table and "+0.50" in table and "98.00%" in table
    assert "1.50e-06" in table and "runs/x" in table
    assert "drop -0.10 to +1.10 pt" in table and "agreement 97.00% to 99.00%" in table


def test_failed_run_artifacts_are_quarantined(tmp_path):
    """A file a failed run wrote never appears under its final name; logs keep theirs."""
    run = RunDir.create(tmp_path / "run")
    model = run.staged("m.tflite")
    model.write_bytes(b"complete but wrong")
    run.add_artifact("tflite_int8", model)
    run.staged("convert.log").write_text("the converter's log")
    assert not run.path("m.tflite").exists()  # in progress: only the staged copy exists
    run.fail()
    assert not run.path("m.tflite").exists() and run.path("m.tflite.failed").exists()
    assert run.path("convert.log").exists() and not run.path(".incomplete").exists()
    m = load_manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["artifacts"]["tflite_int8"]["path"] == "m.tflite.failed"


def test_failed_run_renames_models_not_yet_registered(tmp_path):
    """The converter writes models into the run before they are checked and registered: a
    failure in between must not leave them under their final names."""
    run = RunDir.create(tmp_path / "run")
    run.staged("m_fp32.tflite").write_bytes(b"converted, never checked")
    run.fail()
    assert sorted(p.name for p in run.root.iterdir()) == ["m_fp32.tflite.failed", "manifest.json"]


def test_finished_run_moves_artifacts_to_final_names(tmp_path):
    run = RunDir.create(tmp_path / "run")
    model = run.staged("m.tflite")
    model.write_bytes(b"model")
    run.add_artifact("tflite_int8", model)
    run.staged(".m.tflite.123.tmp").write_bytes(b"half")  # a write that never finished
    run.finish()
    assert run.path("m.tflite").read_bytes() == b"model"
    assert sorted(p.name for p in run.root.iterdir()) == ["m.tflite", "manifest.json"]
    assert load_manifest(run.root)["artifacts"]["tflite_int8"]["path"] == "m.tflite"


def test_written_files_get_default_permissions(tmp_path):
    """Manifests and tables are as readable as the models beside them (not mkstemp's 0600)."""
    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "manifest.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644


def test_scratch_folders_of_killed_processes_are_removed_by_the_next(tmp_path, monkeypatch):
    import subprocess
    import sys
    import tempfile

    from edgestar.files import scratch_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid belongs to nobody now
    orphan = tmp_path / f"edgestar-convert-{gone.pid}-abcd1234"
    alive = tmp_path / f"edgestar-convert-{os.getpid()}-efgh5678"
    other = tmp_path / f"edgestar-{gone.pid}"  # not a scratch folder's name: never touched
    for folder in (orphan, alive, other):
        (folder / "sub").mkdir(parents=True)
    with scratch_dir("bench") as tmp:
        assert os.path.basename(tmp).startswith(f"edgestar-bench-{os.getpid()}-")
        assert not orphan.exists() and alive.is_dir() and other.is_dir()
    assert not os.path.exists(tmp)

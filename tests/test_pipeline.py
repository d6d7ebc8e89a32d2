"""The quantize pipeline's policies, without TensorFlow: which labels are trusted, the gate
and its fallback, the overlap's shutdown, sanity warnings and what the summary says."""
import threading
import time
from pathlib import Path

import pytest

from edgestar.data.images import demo_split
from edgestar.errors import InputError, StageError
from edgestar.pipeline import overlap
from edgestar.pipeline.config import QuantizeConfig
from edgestar.pipeline.gate import gate
from edgestar.pipeline.quantize import calibration_data
from edgestar.pipeline.run import Run
from edgestar.pipeline.rundir import RunDir, default_out
from edgestar.pipeline.scoring import evaluation_images, sanity_warnings
from edgestar.report.summary import summary_table

DEMO_CLASSES = sorted(p.name for p in demo_split("eval").iterdir())


def config(**kw):
    return QuantizeConfig(variant="s050", **{"eval_samples": 20, **kw})


# --------------------------------------------------------------------------- labels

def test_ten_classes_without_names_are_not_scored_against_demo_labels():
    """A bare 10-class state dict has no class names: the demo labels may not be its labels."""
    ev = evaluation_images(config(), 10, None, demo_model=False)
    assert not ev.labelled and "no class names" in ev.why
    assert ev.demo_for_another_model  # the summary must say the images are not the user's


def test_max_drop_without_trusted_labels_is_an_input_error():
    with pytest.raises(InputError, match="--max-drop needs accuracy.*no class names"):
        evaluation_images(config(max_drop=1.0), 10, None, demo_model=False)


def test_matching_class_names_are_scored():
    ev = evaluation_images(config(), 10, DEMO_CLASSES, demo_model=True)
    assert ev.labelled and not ev.demo_for_another_model


def test_explicit_eval_is_scored_and_its_classes_recorded():
    ev = evaluation_images(config(eval="demo"), 10, None, demo_model=False)
    assert ev.labelled and "--eval was given" in ev.why
    assert ev.folder.classes == DEMO_CLASSES


def test_explicit_eval_with_other_class_names_is_refused():
    with pytest.raises(InputError, match="labels would be misread"):
        evaluation_images(config(eval="demo"), 10, [f"c{i}" for i in range(10)], demo_model=False)


def test_flat_folder_with_index_label_file_is_scored(tmp_path):
    """ImageNet-style: images in one folder, one class index per line in sorted name order."""
    from PIL import Image

    flat = tmp_path / "val"
    flat.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"img_{i}.png")
    (tmp_path / "gt.txt").write_text("0\n3\n1\n3\n")
    ev = evaluation_images(config(eval=str(flat), labels=str(tmp_path / "gt.txt"), eval_samples=None),
                           10, DEMO_CLASSES, demo_model=False)
    assert ev.labelled and "label file" in ev.why
    assert [label for _, label in ev.folder.samples] == [0, 3, 1, 3]


def test_labels_without_eval_is_an_input_error():
    from edgestar.pipeline.config import check_config

    with pytest.raises(InputError, match="--labels .* --eval"):
        check_config(config(labels="gt.txt"))


# --------------------------------------------------------------------------- gate and fallback

def fake_run(tmp_path, cfg, **fields) -> Run:
    run_dir = RunDir.create(tmp_path / "run", inputs={})
    run = Run(cfg, run_dir, tmp_path, lambda msg: None, None)
    for k, v in fields.items():
        setattr(run, k, v)
    return run


def test_fallback_that_cannot_run_says_why(tmp_path):
    cfg = config(max_drop=0.5, fallback="float")
    run = fake_run(tmp_path, cfg, error_rows=None)
    run.manifest["metrics"]["int8_top1_drop_pt"] = 3.0
    run.manifest["stages"]["diagnose"] = {"skipped": "some TFLite tensors have no PyTorch counterpart"}
    assert gate(run) is False
    assert run.manifest["metrics"]["fallback"] == {
        "ran": False, "why": "there is no error table to rank tensors by (some TFLite tensors have "
                             "no PyTorch counterpart)"}
    assert any("--fallback float did not run" in n for n in run.notes)
    assert run.manifest["gate"]["passed"] is False


def test_gate_passes_within_max_drop(tmp_path):
    run = fake_run(tmp_path, config(max_drop=0.5))
    run.manifest["metrics"]["int8_top1_drop_pt"] = 0.4
    assert gate(run) is True and run.manifest["gate"]["artifact"] == "tflite_int8"


# --------------------------------------------------------------------------- the overlap

class StuckConversion:
    """A converter that never produces the FP32 graph until it is cancelled."""

    def __init__(self, log_path):
        self.float_model = Path(log_path).with_name("fp32.tflite")
        self._ended = threading.Event()

    def wait_for(self, path, poll_s=0.01):
        self._ended.wait()
        return False

    def cancel(self):
        self._ended.set()

    running = property(lambda self: not self._ended.is_set())


def test_cancel_ends_the_ranges_thread_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(overlap, "Conversion", StuckConversion)
    job = overlap.OverlappedConversion(tmp_path / "convert.log")
    ranges_file = tmp_path / "int8_ranges.json"
    job.send_ranges((None, {}), None, ranges_file, strict=False, notes=[])
    time.sleep(0.05)
    assert job._thread.is_alive()
    job.cancel()
    assert not job._thread.is_alive() and not ranges_file.exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = RunDir.pending(inputs={}), RunDir.pending(inputs={})
    first.open_new(default_out("s1"))
    second.open_new(default_out("s1"))  # the same name: the folder exists by now
    assert first.root != second.root and second.root.name.endswith("-2")
    assert (first.root / "manifest.json").exists() and (second.root / "manifest.json").exists()


def test_an_error_in_the_ranges_thread_is_one_line(tmp_path, monkeypatch):
    """A bug or I/O error while handing the ranges over is a StageError, not a traceback."""
    class ReadyConversion(StuckConversion):
        def wait_for(self, path, poll_s=0.01):
            return True  # "the FP32 graph exists" -- but the file is not there

    monkeypatch.setattr(overlap, "Conversion", ReadyConversion)
    job = overlap.OverlappedConversion(tmp_path / "convert.log")
    job.send_ranges((None, {}), None, tmp_path / "r.json", strict=False, notes=[])
    with pytest.raises(StageError, match="handing the INT8 ranges to the converter failed: "
                                         "FileNotFoundError"):
        job.ranges_sent()


# --------------------------------------------------------------------------- loud results

def test_wrecked_int8_model_is_flagged():
    """What an all-zero calibration array once produced: agreement 9.5 %, exit 0, no word."""
    warnings = sanity_warnings({"int8_agreement": 0.095, "int8_logit_sqnr_db": 1.2})
    assert len(warnings) == 2 and "probably broken" in warnings[0]
    assert sanity_warnings({"int8_agreement": 0.991, "int8_logit_sqnr_db": 26.6}) == []


def minimal_manifest(**extra):
    m = {"artifacts": {"tflite_int8": {"path": "m.tflite", "bytes": 10}},
         "metrics": {"torch_fp32": {"top1": None}, "tflite_int8": {"top1": None, "agreement": 0.5},
                     "eval_images": 20, "eval_labelled": False}}
    for k, v in extra.items():
        m.setdefault(k, {}).update(v) if isinstance(v, dict) else m.__setitem__(k, v)
    return m


def test_summary_shouts_warnings_and_names_the_evaluation_images():
    table = summary_table(minimal_manifest(warnings=["the INT8 model is broken"],
                                           metrics={"eval_demo_images_for_another_model": True},
                                           inputs={"weights": {"spec": "none"}}))
    lines = table.splitlines()
    assert "WARNING: the INT8 model is broken" in lines
    assert any("random weights" in line for line in lines)
    assert any("CIFAR-10 demo set, not your data" in line and "no accuracy" in line for line in lines)


def test_mixed_fallback_model_has_its_own_row():
    m = minimal_manifest(artifacts={"tflite_mixed": {"path": "m_mixed.tflite", "bytes": 12}})
    assert any(line.startswith("tflite int8+float") for line in summary_table(m).splitlines())


def test_distillation_that_barely_moved_warns(tmp_path, monkeypatch):
    import numpy as np

    from edgestar.pipeline import quantize as pipeline

    info = {"source": "distilled", "count": 4, "bn_loss": 9.0, "initial_bn_loss": 10.0}
    monkeypatch.setattr(pipeline, "calibration_set", lambda *a: (np.zeros((4, 3, 32, 32), np.float32), info))
    run = fake_run(tmp_path, config(calib="distilled"), model=None, pre=None)
    calibration_data(run)
    assert any("barely matched the BatchNorm statistics" in w for w in run.warnings)


def test_no_error_table_from_an_ambiguous_pairing(tmp_path):
    """When some tensors matched several PyTorch values, a per-tensor table would guess which
    value each row compares against: it is skipped, and says why."""
    from edgestar.pipeline.quantize import diagnose

    run = fake_run(tmp_path, config())
    run.manifest["stages"]["convert"] = {"calibration": {"calibrator": "tflite", "ambiguous_tensors": ["t"]}}
    diagnose(run)
    assert run.error_rows is None and "match several PyTorch values" in run.manifest["stages"]["diagnose"]["skipped"]

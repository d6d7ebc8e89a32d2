"""Report rows from run manifests and the Pareto front. The manifests are written by the
pipeline's own writer (RunDir, EngineStats, engine_metrics) from synthetic logits, so they
cannot drift from the real schema."""
import json

import numpy as np
import pytest

from edgestar.errors import InputError, StageError
from edgestar.evaluate.validate import EngineStats
from edgestar.pipeline.rundir import RunDir
from edgestar.pipeline.scoring import engine_metrics
from edgestar.report.runs import dominated, find_runs, pareto_front, read_manifest, rows_of


def write_run(root, *, variant="s050", img_size=32, qat=False, flip=0.1, seed=0, fail_at=None):
    """A finished (or failed) run folder: manifest, two .tflite artifacts, metrics from logits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 200)
    ref = rng.normal(size=(200, 10)).astype(np.float32)
    ref[np.arange(200), labels] += 1.5  # the reference is right on most images
    int8 = ref + rng.normal(scale=flip, size=ref.shape).astype(np.float32)
    engines = {}
    for name, logits in (("torch_fp32", ref), ("tflite_fp32", ref + 1e-6), ("tflite_int8", int8)):
        stats = EngineStats()
        stats.update(logits, labels, ref, 5)
        engines[name] = stats.summary()
    run = RunDir.create(root, tool="edgestar quantize",
                        config={"variant": variant, "img_size": img_size, "qat": qat, "target": "cpu",
                                "weights": "demo"})
    run.manifest["model"] = {"variant": variant, "num_classes": 10, "img_size": img_size, "params": 412746}
    with run.stage("convert"):
        for fmt, size in (("fp32", 4000), ("int8", 1000)):
            path = run.staged(f"m_{fmt}.tflite")
            path.write_bytes(b"\0" * size)
            run.add_artifact(f"tflite_{fmt}", path)
    if fail_at:
        with pytest.raises(StageError):
            with run.stage(fail_at):
                raise StageError("the FP32 TFLite model disagrees with PyTorch")
        run.fail()
        return root
    with run.stage("validate"):
        run.manifest["metrics"].update(engine_metrics(engines, 200, True))
    run.finish()
    return root


def test_rows_carry_size_accuracy_intervals_and_drop(tmp_path):
    run = write_run(tmp_path / "a")
    manifest = read_manifest(run)
    rows = {r["precision"]: r for r in rows_of(run, manifest)}
    assert set(rows) == {"fp32", "int8"}
    r = rows["int8"]
    assert r["bytes"] == 1000 and rows["fp32"]["bytes"] == 4000
    # s050 at 32 px, 10 classes; edgestar.deploy.fit.macs equals multiply_accumulates() of the
    # real .tflite (1,988,352 with 1000 classes, checked on a converted model)
    assert r["macs"] == 1861632 and r["params"] == 412746
    low, high = r["top1_ci95"]
    assert low < r["top1"] < high and r["images"] == 200
    fp32 = manifest["metrics"]["torch_fp32"]["top1"]
    assert r["drop_pt"] == pytest.approx((fp32 - r["top1"]) * 100, abs=1e-3)
    assert r["drop_ci95_pt"] == manifest["metrics"]["int8_top1_drop_ci95_pt"]
    assert rows["fp32"]["drop_ci95_pt"] is None  # only measured for INT8
    assert r["host_latency_ms"] is None and r["device_latency_ms"] == []  # never bench'ed: not 0


def test_a_qat_run_is_int8_qat_and_a_failed_run_keeps_its_row(tmp_path):
    rows = rows_of(tmp_path / "q", read_manifest(write_run(tmp_path / "q", qat=True)))
    assert {r["precision"] for r in rows} == {"fp32-qat", "int8-qat"}  # fp32-qat: the fine-tuned float model
    failed = rows_of(tmp_path / "f", read_manifest(write_run(tmp_path / "f", fail_at="validate")))
    assert len(failed) == 1 and failed[0]["status"] == "failed"
    assert failed[0]["failed_stage"] == "validate" and "disagrees" in failed[0]["error"]
    assert failed[0]["precision"] is None and "top1" not in failed[0]


def test_find_runs_below_a_folder_skips_hidden_ones(tmp_path):
    write_run(tmp_path / "sweep" / "s050-32-int8")
    write_run(tmp_path / "sweep" / "nested" / "s1-32")
    hidden = tmp_path / "sweep" / ".incomplete" / "x"
    hidden.mkdir(parents=True)
    (hidden / "manifest.json").write_text("{}")
    found = find_runs([tmp_path / "sweep", tmp_path / "sweep" / "s050-32-int8"])
    assert sorted(p.name for p in found) == ["s050-32-int8", "s1-32"]
    assert all(".incomplete" not in str(p) for p in found)
    with pytest.raises(InputError, match="does not exist"):
        find_runs([tmp_path / "nope"])


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ("[1]", "not a manifest"),
                                           ('{"manifest_version": 7}', "manifest_version 7")])
def test_bad_manifests_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(InputError, match=message):
        read_manifest(tmp_path)


def test_pareto_front_with_ties_and_missing_points():
    #          cost, accuracy
    points = [(1.0, 0.50),   # 0 cheapest: on the front
              (2.0, 0.70),   # 1 on the front
              (2.0, 0.70),   # 2 identical to 1: both on it
              (2.0, 0.60),   # 3 same cost, less accurate: dominated by 1
              (3.0, 0.70),   # 4 costlier, no better: dominated
              (4.0, 0.90),   # 5 on the front
              (None, 0.99),  # 6 unknown cost: never on it
              (5.0, None)]   # 7 unknown accuracy
    assert pareto_front(points) == [0, 1, 2, 5]
    assert dominated((2.0, 0.6), (2.0, 0.7)) and not dominated((2.0, 0.7), (2.0, 0.7))
    assert pareto_front([]) == []


def test_latency_comes_from_what_bench_stored(tmp_path):
    from edgestar.deploy.bench import summary_entry
    from edgestar.files import atomic_write_json

    run = write_run(tmp_path / "a")
    manifest = read_manifest(run)

    def share(device, rows):
        return {"device": device, "measured": True, "estimate": False, "system": {}, "runtime": "litert",
                "rows": rows, "evaluation": []}

    rows = [{"model": "tflite int8", "format": "int8", "kernels": "xnnpack", "threads": 2, "median_ms": 3.0},
            {"model": "tflite int8", "format": "int8", "kernels": "xnnpack", "threads": 1, "median_ms": 5.0},
            {"model": "onnx fp32", "format": "fp32", "kernels": "onnxruntime", "threads": 1, "median_ms": 9.0}]
    manifest["device_latency"] = {"local": summary_entry(share("local", rows)),
                                  "ssh://pi@board": summary_entry(share("ssh://pi@board", rows[1:2]))}
    atomic_write_json(run / "manifest.json", manifest)
    got = {r["precision"]: r for r in rows_of(run, read_manifest(run))}
    assert got["int8"]["host_latency_ms"] == 5.0  # one thread
    assert got["int8"]["device_latency_ms"] == [("ssh://pi@board", 5.0, "xnnpack")]
    assert got["fp32"]["host_latency_ms"] is None  # the ONNX Runtime row is not the .tflite's

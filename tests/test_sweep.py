"""``edgestar sweep``: the plan, resuming (complete runs kept, interrupted and failed ones redone,
changed inputs redone), failed combinations recorded while the sweep goes on, the CLI's errors,
and one real end-to-end sweep (quantize, bench, firmware, report, then resumed)."""
import json
import os
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import edgestar.pipeline.quantize as quantize_module
from edgestar.cli import cli
from edgestar.errors import InputError, StageError
from edgestar.pipeline.sweep import SweepConfig, plan, source_digest, sweep, weights_for
from edgestar.report.runs import read_manifest
from test_report_runs import write_run


@pytest.fixture
def fake_quantize(monkeypatch):
    """quantize() replaced by one that writes a run with the pipeline's RunDir (write_run), so the
    sweep's own logic is tested in milliseconds. ``calls`` lists the runs made; ``fail`` maps a
    run name to the error it raises (a StageError after recording the failed run, as quantize does;
    an InputError before making the folder)."""
    state = SimpleNamespace(calls=[], fail={})

    def quantize(config, progress_factory=None, log=None):
        name = config.out.name
        state.calls.append(name)
        error = state.fail.get(name)
        if isinstance(error, InputError):
            raise error
        write_run(config.out, variant=config.variant, img_size=config.img_size, qat=config.qat,
                  fail_at="convert" if error else None)
        if error:
            raise error
        return SimpleNamespace(out=config.out, manifest=read_manifest(config.out))

    monkeypatch.setattr(quantize_module, "quantize", quantize)
    return state


def config(tmp_path, **kw):
    kw.setdefault("variants", ("s050", "s1"))
    kw.setdefault("precisions", ("fp32", "int8", "int8-qat"))
    kw.setdefault("report_formats", ("md", "json"))
    return SweepConfig(out=tmp_path / "sweep", **kw)


def test_plan_one_run_per_variant_size_and_training():
    combos = plan(SweepConfig(variants=("s050", "s1"), img_sizes=(32, 64), out="x"))
    assert [c.name for c in combos] == ["s050-32px", "s050-32px-qat", "s050-64px", "s050-64px-qat",
                                        "s1-32px", "s1-32px-qat", "s1-64px", "s1-64px-qat"]
    assert combos[0].formats == ("fp16", "dynamic") and combos[1].qat and combos[1].formats == ()
    only_qat = plan(SweepConfig(variants=("s1",), precisions=("int8-qat",), out="x"))
    assert [c.name for c in only_qat] == ["s1-32px-qat"]


def test_a_half_finished_sweep_is_completed_without_redoing_finished_runs(tmp_path, fake_quantize):
    first = sweep(config(tmp_path))
    order = ["s050-32px", "s050-32px-qat", "s1-32px", "s1-32px-qat"]
    assert fake_quantize.calls == order and not first.failed
    assert sorted(p.name for p in first.out.iterdir()) == sorted(order + ["sweep.json", "report.md", "report.json"])
    stamp = {n: os.stat(first.out / n / "manifest.json").st_mtime_ns for n in order}

    fake_quantize.calls.clear()
    again = sweep(config(tmp_path))
    assert fake_quantize.calls == [] and all(c["reused"] for c in again.combinations)

    # a run killed mid-way (its manifest still says running) and a run whose folder is gone
    killed = first.out / "s1-32px" / "manifest.json"
    manifest = json.loads(killed.read_text())
    manifest["status"] = "running"
    killed.write_text(json.dumps(manifest))
    (first.out / "s1-32px" / ".incomplete").mkdir()
    (first.out / "s1-32px" / ".incomplete" / "model.onnx").write_bytes(b"half")
    import shutil
    shutil.rmtree(first.out / "s050-32px-qat")
    resumed = sweep(config(tmp_path))
    assert fake_quantize.calls == ["s050-32px-qat", "s1-32px"]
    assert not (first.out / "s1-32px" / ".incomplete").exists()
    for name in ("s050-32px", "s1-32px-qat"):  # untouched
        assert os.stat(first.out / name / "manifest.json").st_mtime_ns == stamp[name]
    record = json.loads((first.out / "sweep.json").read_text())
    assert [c["reused"] for c in record["combinations"]] == [True, False, False, True]
    assert record["saved_by_resume_s"] >= 0 and {c["status"] for c in resumed.combinations} == {"ok"}


def test_other_inputs_redo_the_runs(tmp_path, fake_quantize):
    sweep(config(tmp_path, variants=("s050",), precisions=("int8",)))
    fake_quantize.calls.clear()
    sweep(config(tmp_path, variants=("s050",), precisions=("int8",), calib_samples=64))
    assert fake_quantize.calls == ["s050-32px"]  # another configuration: redone


def test_folder_fingerprints_follow_the_files(tmp_path):
    folder = tmp_path / "calib" / "cat"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"1")
    before = source_digest(str(tmp_path / "calib"))
    assert source_digest(str(tmp_path / "calib")) == before
    (folder / "b.jpg").write_bytes(b"2")
    assert source_digest(str(tmp_path / "calib")) != before
    assert source_digest("demo") == source_digest("demo") and source_digest(None) is None


def test_a_failed_combination_is_recorded_and_the_sweep_goes_on(tmp_path, fake_quantize):
    fake_quantize.fail = {"s050-32px": StageError("onnx2tf failed"),
                          "s1-32px-qat": InputError("--qat trains on a folder of images")}
    result = sweep(config(tmp_path))
    assert fake_quantize.calls == ["s050-32px", "s050-32px-qat", "s1-32px", "s1-32px-qat"]
    assert {c["name"]: c.get("failed_stage") for c in result.failed} == {"s050-32px": "convert",
                                                                           "s1-32px-qat": "inputs"}
    md = (result.out / "report.md").read_text()
    assert "FAILED at convert: the FP32 TFLite model disagrees" in md and "FAILED at inputs: --qat trains on a folder" in md
    fake_quantize.fail = {}
    fake_quantize.calls.clear()
    retried = sweep(config(tmp_path))
    assert fake_quantize.calls == ["s050-32px", "s1-32px-qat"] and not retried.failed


def test_weights_folder_matches_variant_words(tmp_path):
    for name in ("starnet_s1_cifar10.pt", "starnet_s100_cifar10.pt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert weights_for(str(tmp_path), "s1", many=True).endswith("starnet_s1_cifar10.pt")
    assert weights_for(str(tmp_path), "s100", many=True).endswith("starnet_s100_cifar10.pt")
    with pytest.raises(InputError, match="no checkpoint named for variant s050"):
        weights_for(str(tmp_path), "s050", many=True)
    with pytest.raises(InputError, match="one checkpoint but the sweep has several variants"):
        weights_for(str(tmp_path / "starnet_s1_cifar10.pt"), "s1", many=True)


def test_a_folder_the_sweep_did_not_make_is_never_deleted(tmp_path, fake_quantize):
    mine = tmp_path / "sweep" / "s050-32px"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match="not an edgestar run directory"):
        sweep(config(tmp_path))
    assert (mine / "thesis.tex").read_text() == "precious" and fake_quantize.calls == []


@pytest.mark.parametrize("args, message", [
    (["--variants", "s9"], "unknown value 's9'"),
    (["--variants", "s1", "--img-size", "33"], "33 is not a positive multiple of 32"),
    (["--variants", "s1", "--precisions", "int4"], "unknown value 'int4'"),
    (["--variants", "s1", "--firmware", "nosuchboard"], "nosuchboard"),
    (["--variants", "s2", "--weights", "demo"], "no demo weights for variant s2"),
    (["--variants", "s1", "--bench", "vela:ethos-u55-128"], "sweep --bench takes local or ssh"),
    (["--variants", "s1", "--calib", "no/such/folder"], "--calib no/such/folder does not exist"),
])
def test_sweep_cli_errors(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["sweep", *args, "--out", str(tmp_path / "s")])
    assert result.exit_code == 2, result.output
    assert message in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "s").exists()  # refused before anything was made


@pytest.mark.e2e
def test_a_real_sweep_then_resumed(tmp_path):
    pytest.importorskip("tflite_micro")
    args = ["sweep", "--variants", "s050", "--precisions", "fp32,int8,int8-qat", "--qat-steps", "1",
            "--eval-samples", "100", "--calib-samples", "32", "--bench", "local", "--bench-runs", "3",
            "--firmware", "corstone-300", "--out", str(tmp_path / "sw"), "-q"]
    first = CliRunner().invoke(cli, args + ["--json"])
    assert first.exit_code == 0, first.output
    data = json.loads(first.output.strip().splitlines()[-1])
    assert [c["reused"] for c in data["combinations"]] == [False, False]
    report = json.loads((tmp_path / "sw" / "report.json").read_text())
    rows = {r["precision"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "int8", "int8-qat"}  # the QAT run's fp32 was not asked for
    for r in rows.values():
        assert r["top1"] > 0.5 and r["host_latency_ms"] > 0 and r["macs"] == 1861632
    assert rows["int8"]["arena_bytes"] > 0 and rows["int8"]["boards"] == {"corstone-300": True}
    chosen = next(b for b in report["which_model_for_which_board"] if b["board"] == "corstone-300")
    assert chosen["choice"]["precision"] in ("int8", "int8-qat")
    again = CliRunner().invoke(cli, args + ["--json"])
    data = json.loads(again.output.strip().splitlines()[-1])
    assert [c["reused"] for c in data["combinations"]] == [True, True]
    assert data["bench"]["reused"] and all(f["reused"] for f in data["firmware"])


def test_the_report_of_a_sweep_folder_is_its_last_plan(tmp_path, fake_quantize):
    sweep(config(tmp_path))
    narrower = sweep(config(tmp_path, variants=("s050",), precisions=("int8",)))
    assert fake_quantize.calls == ["s050-32px", "s050-32px-qat", "s1-32px", "s1-32px-qat"]  # nothing redone
    rows = json.loads((narrower.out / "report.json").read_text())["rows"]
    assert [(r["variant"], r["precision"]) for r in rows] == [("s050", "int8")]
    assert (narrower.out / "s1-32px" / "manifest.json").is_file()  # older runs stay on disk

"""CLI wiring: exit codes and one-line errors. None of these reach the TensorFlow stage."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import edgestar as pipeline  # the library API the CLI calls
from edgestar.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments, code=2):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(
        result.exception, SystemExit)
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    error_lines = [l for l in lines if l.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0 and "quantize" in result.output and "train" in result.output


@pytest.fixture
def s050_ckpt(tmp_path, tiny_model):
    path = tmp_path / "s050.pt"
    torch.save(tiny_model.state_dict(), path)
    return path


def quantize(tmp_path, *args):
    return run("quantize", "--out", tmp_path / "run", *args)


def test_unknown_variant(tmp_path):
    assert_one_line_error(quantize(tmp_path, "--variant", "s9"), "s9")


@pytest.mark.parametrize("size", ["100", "abc", "0"])
def test_bad_img_size(tmp_path, size):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--img-size", size), "--img-size")


def test_unknown_format(tmp_path):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--formats", "fp16,int4"), "int4")


def test_unknown_io(tmp_path):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--io", "int16"), "int16")


@pytest.mark.parametrize("option,value", [("--target", "gpu"), ("--calibrator", "kl")])
def test_unknown_target_or_calibrator(tmp_path, option, value):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", option, value), value)


@pytest.mark.parametrize("field,value", [("target", "gpu"), ("calibrator", "kl")])
def test_library_rejects_unknown_target_or_calibrator(tmp_path, field, value):
    from edgestar.errors import InputError

    config = pipeline.QuantizeConfig(variant="s050", out=tmp_path / "run", **{field: value})
    with pytest.raises(InputError, match=value):
        pipeline.quantize(config)


@pytest.mark.parametrize("args,fragment", [
    (["--qat", "--train", "nowhere"], "nowhere"),
    (["--qat", "--calib", "x.npy"], "x.npy"),
    (["--qat", "--train", "demo", "--qat-steps", "0"], "--qat-steps"),
    (["--qat", "--train", "demo", "--qat-lr", "0"], "--qat-lr"),
])
def test_bad_qat_options(tmp_path, args, fragment):
    result = quantize(tmp_path, "--variant", "s050", "--weights", "none", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,fragment", [
    (["--ptq", "scale-star,bogus"], "'bogus'"),
    (["--ptq", "mse-ranges", "--calibrator", "tflite"], "--calibrator tflite"),
    (["--fallback", "float"], "--fallback needs --max-drop"),
    (["--fallback", "int4", "--max-drop", "1"], "int4"),
    (["--calib", "distilled", "--qat"], "pass --train DIR"),
])
def test_bad_ptq_fallback_and_distilled_options(tmp_path, args, fragment):
    result = quantize(tmp_path, "--variant", "s050", "--weights", "none", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "run").exists()


def test_missing_checkpoint(tmp_path):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", tmp_path / "no.pt"),
                          "does not exist")
    assert not (tmp_path / "run" / "model.onnx").exists()


def test_checkpoint_for_another_variant(tmp_path, s050_ckpt):
    assert_one_line_error(quantize(tmp_path, "--variant", "s1", "--weights", s050_ckpt),
                          "does not fit StarNet-s1", "missing")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"\x80\x02garbage")
    assert_one_line_error(quantize(tmp_path, "--variant", "s1", "--weights", bad), "corrupt")


def test_num_classes_mismatch(tmp_path, s050_ckpt):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt,
                                   "--num-classes", "7"), "--num-classes 7")


def test_official_weights_unavailable_for_s050(tmp_path):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050"), "no official weights")


def test_offline_official_download(tmp_path, monkeypatch):
    import urllib.error

    from edgestar.models import checkpoints

    monkeypatch.setenv("EDGESTAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoints.urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    assert_one_line_error(quantize(tmp_path, "--variant", "s2"), "--weights demo", "--weights PATH")


def test_missing_calibration_folder(tmp_path, s050_ckpt):
    result = quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt, "--img-size", 32,
                      "--calib", tmp_path / "nothing")
    assert_one_line_error(result, "calibration folder", "does not exist")
    assert not (tmp_path / "run").exists()  # inputs are checked before the run folder exists


def test_input_error_leaves_no_default_run_folder(tmp_path, s050_ckpt, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("quantize", "--variant", "s050", "--weights", s050_ckpt, "--img-size", 32,
                 "--calib", tmp_path / "nothing")
    assert_one_line_error(result, "does not exist")
    assert not (tmp_path / "runs").exists()


def test_empty_calibration_folder(tmp_path, s050_ckpt):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt,
                                   "--img-size", 32, "--calib", tmp_path / "empty"), "no image files")


def test_corrupt_calibration_image_is_named(tmp_path, s050_ckpt, image_folder):
    broken = image_folder / "a" / "broken.jpg"
    Image.new("RGB", (64, 64)).save(broken)
    broken.write_bytes(broken.read_bytes()[:100])
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt,
                                   "--img-size", 32, "--calib", image_folder), "broken.jpg")


def test_eval_folder_with_wrong_class_count(tmp_path, s050_ckpt, image_folder):
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt,
                                   "--img-size", 32, "--eval", image_folder), "2 classes", "model has 10")


def test_unwritable_output_folder(s050_ckpt):
    result = run("quantize", "--variant", "s050", "--weights", s050_ckpt,
                 "--out", "/proc/edgestar-cannot-write-here")
    assert_one_line_error(result, "/proc/edgestar-cannot-write-here")


def test_non_empty_output_folder(tmp_path, s050_ckpt):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert_one_line_error(quantize(tmp_path, "--variant", "s050", "--weights", s050_ckpt),
                          "not empty")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_max_drop_gate_exit_code_and_report(tmp_path, monkeypatch):
    """The gate's policy: report written, exit code 1 (the pipeline itself is faked here)."""
    manifest = {"status": "failed_gate", "model": {"img_size": 32, "num_classes": 10},
                "artifacts": {}, "metrics": {"torch_fp32": {"top1": 0.8}}, "timings_s": {},
                "gate": {"max_drop_pt": 0.5, "int8_top1_drop_pt": 2.0, "passed": False}}
    config_seen = {}

    def fake_quantize(config, **kw):
        config_seen["config"] = config
        return pipeline.QuantizeResult(config, tmp_path, manifest, passed=False)

    monkeypatch.setattr(pipeline, "quantize", fake_quantize)
    result = run("quantize", "--variant", "s1", "--weights", "demo", "--max-drop", "0.5",
                 "--formats", "fp16", "--io", "float", "--json", "-q")
    assert result.exit_code == 1
    assert "exceeds --max-drop 0.5" in result.output
    cfg = config_seen["config"]
    assert cfg.max_drop == 0.5 and cfg.formats == ("fp16",) and cfg.io_type == "float"


def test_train_rejects_missing_data(tmp_path):
    assert_one_line_error(run("train", "--variant", "s050", "--data", tmp_path / "none",
                              "--out", tmp_path / "m.pt"), "does not exist")


def test_train_smoke_on_demo(tmp_path):
    result = run("train", "--variant", "s050", "--data", "demo", "--epochs", "1", "--max-steps", "2",
                 "--batch-size", "16", "--out", tmp_path / "m.pt", "-q")
    assert result.exit_code == 0, result.output
    from edgestar.models.checkpoints import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt.variant == "s050" and ckpt.num_classes == 10 and len(ckpt.class_names) == 10
    assert ckpt.preprocessing.img_size == 32


def test_torchrun_without_qat_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = quantize(tmp_path, "--variant", "s050", "--weights", "none")
    assert_one_line_error(result, "--qat")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,fragment", [("qat_lr", 0.0, "--qat-lr"), ("qat_epochs", 0, "--qat-epochs"),
                                                  ("qat_steps", 0, "--qat-steps")])
def test_library_rejects_bad_qat_options(tmp_path, field, value, fragment):
    from edgestar.errors import InputError

    config = pipeline.QuantizeConfig(variant="s050", weights="none", qat=True, train="demo",
                                     out=tmp_path / "run", **{field: value})
    with pytest.raises(InputError, match=fragment):
        pipeline.quantize(config)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- train: fine-tuning, --out, output

FAST_TRAIN = ("--variant", "s050", "--data", "demo", "--epochs", "1", "--max-steps", "2",
              "--batch-size", "16")


def train_cli(*args):
    return run("train", *FAST_TRAIN, *args)


def _edgestar_ckpt(path, num_classes):
    from edgestar.data.images import Preprocessing
    from edgestar.models.checkpoints import save_checkpoint
    from edgestar.models.starnet import create_model

    torch.manual_seed(1)
    save_checkpoint(path, create_model("s050", num_classes=num_classes), variant="s050",
                    preprocessing=Preprocessing(32, crop_pct=1.0))
    return path


def _trainable_backbone(state_or_model):
    """Parameters outside the classifier (BatchNorm running statistics move in any training)."""
    from edgestar.models.starnet import create_model

    names = {n for n, _ in create_model("s050").named_parameters() if not n.startswith("head.")}
    state = state_or_model if isinstance(state_or_model, dict) else state_or_model.state_dict()
    return {k: v.float() for k, v in state.items() if k in names}


def test_train_finetunes_weights_with_another_class_count(tmp_path):
    start = _edgestar_ckpt(tmp_path / "imagenet.pt", 1000)
    # A negligible learning rate: the written backbone must still be the checkpoint's.
    result = train_cli("--weights", start, "--lr", "1e-9", "--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    assert "head replaced: checkpoint has 1000 classes, data has 10" in result.output
    assert "--num-classes" not in result.output
    from edgestar.models.checkpoints import read_checkpoint

    tuned, original = read_checkpoint(tmp_path / "m.pt"), read_checkpoint(start)
    assert tuned.num_classes == 10 and tuned.state_dict["head.weight"].shape[0] == 10
    before, after = _trainable_backbone(original.state_dict), _trainable_backbone(tuned.state_dict)
    assert before.keys() == after.keys() and len(before) > 10
    for k in before:
        assert torch.allclose(before[k], after[k], atol=1e-5), k


def test_train_same_class_count_loads_the_head_too(tmp_path):
    start = _edgestar_ckpt(tmp_path / "ten.pt", 10)
    result = train_cli("--weights", start, "--lr", "1e-9", "--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    assert "head replaced" not in result.output
    from edgestar.models.checkpoints import read_checkpoint

    tuned, original = read_checkpoint(tmp_path / "m.pt"), read_checkpoint(start)
    assert torch.allclose(tuned.state_dict["head.weight"], original.state_dict["head.weight"], atol=1e-5)


def test_train_finetuning_keeps_drop_path(tmp_path, monkeypatch):
    from edgestar.models import checkpoints
    from edgestar.pipeline import train as train_module

    trained = []  # the model train() writes

    def recording(path, model, **kwargs):
        trained.append(model)
        return checkpoints.save_checkpoint(path, model, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", recording)
    start = _edgestar_ckpt(tmp_path / "ten.pt", 10)
    result = train_cli("--weights", start, "--drop-path", "0.2", "--out", tmp_path / "m.pt", "-q")
    assert result.exit_code == 0, result.output
    (model,) = trained
    assert model.stages[-1][-1].drop_path_rate == pytest.approx(0.2)


def test_train_with_damaged_edgestar_checkpoint(tmp_path):
    bad = tmp_path / "damaged.pt"
    torch.save({"format": "edgestar", "variant": "s050", "num_classes": 10}, bad)
    assert_one_line_error(train_cli("--weights", bad, "--out", tmp_path / "m.pt"),
                          str(bad), "has no state_dict")


def test_train_refuses_to_overwrite_out_before_training(tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"my earlier model")
    from edgestar.pipeline import train as training

    monkeypatch.setattr(training, "scan_image_folder", lambda *a, **k: pytest.fail("training started"))
    assert_one_line_error(train_cli("--out", out), str(out), "already exists", "--force")
    assert out.read_bytes() == b"my earlier model"


def test_train_input_error_leaves_no_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run("train", "--variant", "s050", "--data", tmp_path / "none"), "does not exist")
    assert not (tmp_path / "runs").exists()


def test_train_force_overwrites_out(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"my earlier model")
    result = train_cli("--out", out, "--force", "-q")
    assert result.exit_code == 0, result.output
    from edgestar.models.checkpoints import read_checkpoint

    assert read_checkpoint(out).num_classes == 10


def test_train_prints_held_out_top1_as_percent_like_quantize(tmp_path):
    import re

    result = train_cli("--out", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    # (the progress bar shares lines with the log through carriage returns)
    assert re.search(r"epoch 1: loss \d+\.\d{4}, held-out top-1 \d+\.\d\d%\s", result.output), \
        result.output
    assert re.search(r"wrote \S*m\.pt \(held-out top-1 \d+\.\d\d%\)\s", result.output), result.output

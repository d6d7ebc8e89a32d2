"""Real conversions of small StarNets on the shipped real images, with networking disabled.

Each command runs as a subprocess whose Python (and the converter subprocess it starts) has
socket connects and DNS look-ups replaced by a guard that records the attempt and fails.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgestar.errors import StageError

pytestmark = pytest.mark.e2e

# find_spec, not importorskip: importing onnx2tf at collection would load TensorFlow for
# every test session, including unit-only ones.
_missing = [m for m in ("onnx2tf", "tensorflow", "ai_edge_litert") if importlib.util.find_spec(m) is None]
if _missing:
    pytest.skip(f"conversion tools not installed: {', '.join(_missing)}", allow_module_level=True)

def edgestar(env, *args, cwd=None):
    cmd = [sys.executable, "-m", "edgestar.cli", *[str(a) for a in args]]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def test_network_guard_is_active(offline_env):
    env, log = offline_env
    probe = subprocess.run([sys.executable, "-c", "import urllib.request as u; u.urlopen('http://example.com', timeout=2)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "network disabled by test guard" in probe.stderr
    assert log.exists()
    log.unlink()


@pytest.fixture(scope="module")
def trained_s050(offline_env, tmp_path_factory):
    env, _ = offline_env
    out = tmp_path_factory.mktemp("train") / "s050.pt"
    res = edgestar(env, "train", "--variant", "s050", "--data", "demo", "--epochs", 6,
                   "--batch-size", 32, "--lr", 3e-3, "--out", out, "-q")
    assert res.returncode == 0, res.stderr
    return out


def test_quantize_tiny_model_end_to_end(offline_env, trained_s050, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from edgestar.convert.tflite_file import op_counts, read_metadata

    env, log = offline_env
    out = tmp_path / "run"
    res = edgestar(env, "quantize", "--variant", "s050", "--weights", trained_s050,
                   "--calib", "demo", "--calib-samples", 100, "--eval", "demo", "--eval-samples", 300,
                   "--formats", "fp16,dynamic", "--out", out, "--json", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"network was touched: {log.read_text()}"
    assert "INFO: Created TensorFlow Lite" not in res.stderr  # -q: LiteRT's log line too
    report = json.loads(res.stdout.strip().splitlines()[-1])

    assert report["variant"] == "s050" and report["img_size"] == 32 and report["num_classes"] == 10
    metrics = report["metrics"]
    assert metrics["fp32_parity_max_abs"] <= 1e-4
    assert metrics["int8_agreement"] >= 0.90
    for engine in ("torch_fp32", "tflite_fp32", "tflite_int8"):
        assert 0.0 <= metrics[engine]["top1"] <= metrics[engine]["top5"] <= 1.0
    assert metrics["torch_fp32"]["top1"] > 0.15  # genuinely trained: chance is 0.10
    assert abs(metrics["int8_top1_drop_pt"]
               - 100 * (metrics["torch_fp32"]["top1"] - metrics["tflite_int8"]["top1"])) < 1e-9
    lo, hi = metrics["int8_agreement_ci95"]
    assert lo <= metrics["int8_agreement"] <= hi and hi - lo < 0.1  # 300 images
    lo, hi = metrics["int8_top1_drop_ci95_pt"]
    assert lo <= metrics["int8_top1_drop_pt"] <= hi
    assert set(report["artifacts"]) == {"onnx", "tflite_fp32", "tflite_int8", "tflite_fp16",
                                        "tflite_dynamic", "layer_errors", "int8_ranges"}

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert all(s["status"] == "ok" for s in manifest["stages"].values())
    assert len(manifest["inputs"]["weights"]["sha256"]) == 64
    assert manifest["versions"]["onnx2tf"] == "1.29.24" and manifest["versions"]["torch"]
    assert manifest["preprocessing"]["img_size"] == 32
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial files

    int8_path = Path(report["artifacts"]["tflite_int8"])
    interp = Interpreter(model_path=str(int8_path))
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    assert list(inp["shape"]) == [1, 32, 32, 3] and inp["dtype"] == np.int8
    assert list(outp["shape"]) == [1, 10] and outp["dtype"] == np.int8
    meta = read_metadata(int8_path)
    assert meta["preprocessing"]["mean"] == manifest["preprocessing"]["mean"]
    assert meta["variant"] == "s050" and meta["format"] == "int8" and len(meta["class_names"]) == 10
    split = manifest["stages"]["fold"]["split_depthwise_convs"]
    assert split == 0  # at 32 px no feature map is 14 px wide
    assert_deployment_graph(int8_path, blocks=6, split=split)
    assert_ranges_from_pytorch(manifest, int8_path, report["artifacts"]["tflite_fp32"])
    assert "QUANTIZE" not in op_counts(int8_path) and "DEQUANTIZE" not in op_counts(int8_path)
    assert_layer_errors(manifest, out)
    assert_deployment_graph(report["artifacts"]["tflite_fp32"], blocks=6, split=split, integer=False)
    for key in ("tflite_fp32", "tflite_fp16", "tflite_dynamic"):
        Interpreter(model_path=report["artifacts"][key]).allocate_tensors()


def assert_deployment_graph(path, *, blocks, split=0, integer=True):
    """The graph properties edgestar promises (issue 3), on any StarNet it converts;
    ``split``: how many 7x7 depthwise convs ``--target cpu`` split into three parts."""
    from edgestar.convert.tflite_file import (BUFFER_ALIGNMENT, TFLM_INT8_OPS, buffer_offsets,
                                              float_ops_inside, grouped_convs, op_counts)

    ops = op_counts(path)
    assert ops["DEPTHWISE_CONV_2D"] == 2 * blocks + 2 * split  # every depthwise conv is one
    assert grouped_convs(path) == 0
    assert "PAD" not in ops and "TRANSPOSE" not in ops and "RESHAPE" not in ops
    assert ops["MUL"] == blocks  # head BatchNorm folded into the classifier: no MUL/ADD for it
    assert ops["ADD"] == blocks + 2 * split
    assert ops["REVERSE_V2"] == 1  # the rotation that replaces the stride-2 PADs
    assert not [op for op in ops if op.startswith("CUSTOM")]  # no Flex / custom ops
    assert all(offset % BUFFER_ALIGNMENT == 0 for offset in buffer_offsets(path))
    if integer:
        assert float_ops_inside(path) == []
        assert set(ops) <= TFLM_INT8_OPS


def assert_ranges_from_pytorch(manifest, int8_path, fp32_path):
    """Every activation got its range from PyTorch, and each ReLU6-fused conv output is
    quantized over [0, <=6] (zero point -128). TFLite's own calibrator records the star
    product's range on the ReLU6 branch instead (15 of 16 in the demo model), which would fail
    this check."""
    from edgestar.convert.tflite_file import operators
    from edgestar.quant.ranges import activation_tensors

    calibration = manifest["stages"]["convert"]["calibration"]
    assert calibration == {"calibrator": "edgestar", "ranges_file": "int8_ranges.json",
                           "tensors": len(activation_tensors(Path(fp32_path).read_bytes())),
                           "paired_on_images": 4}
    ranges = json.loads((Path(fp32_path).parent / "int8_ranges.json").read_text())
    assert ranges["source"] == "calibration" and len(ranges["tensors"]) == calibration["tensors"]
    schema, graph, ops = operators(int8_path)
    relu6 = schema.ActivationFunctionType.RELU6
    checked = 0
    for name, op in ops:
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            continue
        options = (schema.Conv2DOptions if name == "CONV_2D" else schema.DepthwiseConv2DOptions)()
        table = op.BuiltinOptions()
        options.Init(table.Bytes, table.Pos)
        if options.FusedActivationFunction() == relu6:
            q = graph.Tensors(op.Outputs(0)).Quantization()
            assert q.ZeroPoint(0) == -128 and q.Scale(0) <= 6.0 / 255 + 1e-9
            checked += 1
    assert checked >= 2  # the stem and every f1 branch


def assert_layer_errors(manifest, out):
    """The per-tensor error table covers every INT8 activation, worst first, with plausible
    int8 SQNRs; at the input, where nothing came before, accumulated error = own error."""
    table = json.loads((out / "layer_errors.json").read_text())
    rows = table["tensors"]
    assert len(rows) == manifest["stages"]["convert"]["calibration"]["tensors"]
    own = [r["own_sqnr_db"] for r in rows]
    assert own == sorted(own)
    assert all(8.0 < db < 60.0 for db in own)  # 8 bits: ~48 dB for a uniform tensor
    first = next(r for r in rows if r["op"] == "input")
    assert abs(first["sqnr_db"] - first["own_sqnr_db"]) < 0.05
    assert {r["op"] for r in rows} >= {"MUL", "ADD", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}
    worst = manifest["metrics"]["worst_int8_tensors"]
    assert [w["node"] for w in worst] == [r["node"] for r in rows[:len(worst)]]


@pytest.mark.skipif(importlib.util.find_spec("tflite_micro") is None,
                    reason="tflite-micro not installed (pip install --pre tflite-micro)")
def test_int8_model_runs_in_tflite_micro(offline_env, trained_s050, tmp_path):
    """The INT8 model runs on TFLite Micro's reference kernels and agrees with ai-edge-litert."""
    from edgestar.data.images import Preprocessing, calibration_inputs
    from edgestar.evaluate.runners import MicroRunner, TFLiteRunner

    env, _ = offline_env
    res = edgestar(env, "quantize", "--variant", "s050", "--weights", trained_s050, "--target", "micro",
                   "--calib-samples", 50, "--eval-samples", 20, "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    model = tmp_path / "run" / "starnet_s050_32_int8.tflite"
    assert_deployment_graph(model, blocks=6, split=0)  # micro: 7x7 depthwise convs kept whole
    x, _ = calibration_inputs("demo", Preprocessing(32, crop_pct=1.0), samples=40, seed=3)
    litert = TFLiteRunner(model)
    micro = MicroRunner(model)(x)
    reference = litert(x)
    scale = litert.out["quantization"][0]
    assert (micro.argmax(1) == reference.argmax(1)).mean() >= 0.95
    assert np.abs(micro - reference).max() <= 4 * scale + 1e-6  # a few output LSBs of rounding
    # quantize itself ran the INT8 model on TFLite Micro and reported it beside LiteRT
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    tflm = manifest["metrics"]["tflm_int8"]
    assert tflm["images"] == 20 and tflm["of_images"] == 20 and tflm["agreement_with_tflite_int8"] >= 0.9
    assert "tflm int8 (20/20 img)" in res.stdout and "TFLite Micro vs LiteRT INT8" in res.stdout


def test_float_io_and_other_resolution(offline_env, tmp_path):
    """Random weights at 64 px, float I/O: QUANTIZE/DEQUANTIZE only at the edges."""
    from edgestar.convert.tflite_file import op_counts

    env, log = offline_env
    out = tmp_path / "run"
    res = edgestar(env, "quantize", "--variant", "s100", "--weights", "none", "--num-classes", 3,
                   "--img-size", 64, "--calib-samples", 32, "--eval-samples", 50, "--io", "float",
                   "--out", out, "--json", "-q")
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"network was touched: {log.read_text()}"
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["metrics"]["fp32_parity_max_abs"] <= 1e-4
    # demo images have 10 classes, the model 3: parity and agreement without accuracy
    assert report["metrics"]["tflite_int8"]["top1"] is None
    assert report["metrics"]["int8_top1_drop_pt"] is None
    ops = op_counts(report["artifacts"]["tflite_int8"])
    assert ops["QUANTIZE"] == 1 and ops["DEQUANTIZE"] == 1
    # s100: depths 1,2,4,1; at 64 px only the first stage's maps (16x16) get split convs
    assert_deployment_graph(report["artifacts"]["tflite_int8"], blocks=8, split=2)
    # Random weights leave the late blocks' residual branches near zero, where several PyTorch
    # values match one TFLite tensor with different ranges: TFLite's calibrator is used then.
    manifest = json.loads((out / "manifest.json").read_text())
    ranges_from = manifest["stages"]["convert"]["calibration"]["calibrator"]
    assert ranges_from == "edgestar" or manifest["stages"]["convert"]["calibration"]["ambiguous_tensors"]
    # ... and no error table, which would have to guess the same pairing
    expected = {"onnx", "tflite_fp32", "tflite_int8"}
    assert set(report["artifacts"]) == expected | ({"int8_ranges", "layer_errors"} if ranges_from == "edgestar"
                                                   else set())


def test_demo_main_job(offline_env, tmp_path):
    """The README's main job: the shipped demo S1 on the 1,000 held-out demo images."""
    env, log = offline_env
    res = edgestar(env, "quantize", "--variant", "s1", "--weights", "demo", "--out", tmp_path / "run",
                   "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not log.exists(), f"network was touched: {log.read_text()}"
    assert "tflite int8" in res.stderr  # the summary table goes to stderr with --json
    report = json.loads(res.stdout.strip().splitlines()[-1])
    metrics = report["metrics"]
    assert metrics["eval_images"] == 1000 and metrics["eval_labelled"]
    assert metrics["torch_fp32"]["top1"] >= 0.70  # genuinely trained (README states the figure)
    assert metrics["fp32_parity_max_abs"] <= 1e-4
    assert metrics["int8_top1_drop_pt"] <= 1.0
    assert metrics["int8_agreement"] >= 0.95


def test_qat_deploys_as_trained(offline_env, trained_s050, tmp_path):
    """QAT on the tiny model: every INT8 activation has exactly the scale and zero point the
    QAT simulation used, and the INT8 model agrees with the simulation on real images."""
    import torch
    from ai_edge_litert import schema_py_generated as schema

    from edgestar.quant.qat import tflite_qparams

    env, _ = offline_env
    run = tmp_path / "qat"
    res = edgestar(env, "quantize", "--variant", "s050", "--weights", trained_s050, "--qat",
                   "--train", "demo", "--qat-steps", 6, "--qat-batch", 32, "--qat-lr", 5e-5,
                   "--calib-samples", 100, "--eval", "demo", "--eval-samples", 300,
                   "--out", run, "--json", "-q")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    stage = manifest["stages"]["qat"]
    assert stage["history"][-1]["steps"] == 6 and stage["world_size"] == 1
    assert manifest["stages"]["convert"]["calibration"]["calibrator"] == "edgestar"
    ranges = json.loads((run / "int8_ranges.json").read_text())
    assert ranges["source"] == "qat" and len(ranges["tensors"]) == stage["tensors"] + 1  # + the rotated input
    int8 = run / manifest["artifacts"]["tflite_int8"]["path"]
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(int8.read_bytes(), 0))
    tensors = {t.name.decode(): t for t in model.subgraphs[0].tensors}
    for name, r in ranges["tensors"].items():
        scale, zero_point = tflite_qparams(torch.tensor(r["min"]), torch.tensor(r["max"]))
        q = tensors[name].quantization
        assert q.scale[0] == pytest.approx(scale.item(), rel=1e-6), name
        assert q.zeroPoint[0] == zero_point.item(), name
    m = manifest["metrics"]
    assert m["qat_sim_agreement"] >= 0.99, m
    assert m["fp32_parity_max_abs"] <= 1e-4


def test_float_fallback_meets_max_drop(offline_env, tmp_path):
    """Calibrated on one image, the demo model loses several points in INT8; --fallback float
    keeps the worst tensors float (1, 2, 4, ...) until the drop is within --max-drop, in a
    model of its own that says what it is (name, table row, op list, metadata)."""
    from edgestar.convert.tflite_file import float_ops_inside, op_counts, read_metadata

    env, _ = offline_env
    run = tmp_path / "run"
    res = edgestar(env, "quantize", "--variant", "s1", "--weights", "demo", "--calib-samples", 1,
                   "--eval-samples", 200, "--max-drop", 1, "--fallback", "float", "--out", run,
                   "--json")
    assert res.returncode == 0, res.stderr
    assert "tflite int8+float" in res.stderr  # its own row in the summary
    manifest = json.loads((run / "manifest.json").read_text())
    pure = manifest["stages"]["validate"]["engines"]
    assert (pure["torch_fp32"]["top1"] - pure["tflite_int8"]["top1"]) * 100 > 1  # why it ran
    tried = manifest["stages"]["fallback"]["tried"]
    assert [t["float_tensors"] for t in tried] == [2 ** i for i in range(len(tried))]
    assert all(t["drop_pt"] > 1 for t in tried[:-1]) and tried[-1]["drop_pt"] <= 1
    assert manifest["gate"]["passed"] and manifest["status"] == "ok"
    assert manifest["gate"]["artifact"] == "tflite_mixed"
    m = manifest["metrics"]
    assert m["mixed_top1_drop_pt"] == pytest.approx(tried[-1]["drop_pt"])
    assert m["int8_top1_drop_pt"] > 1  # the all-INT8 figures stay what they were
    fallback = m["fallback"]
    assert len(fallback["float_tensors"]) == tried[-1]["float_tensors"]
    assert fallback["bytes"]["ratio"] > 1 and fallback["latency_ms"]["mixed"] > 0
    int8 = run / manifest["artifacts"]["tflite_int8"]["path"]
    mixed = run / manifest["artifacts"]["tflite_mixed"]["path"]
    assert mixed.name == "starnet_s1_32_mixed.tflite" and mixed.stat().st_size == fallback["bytes"]["mixed"]
    assert float_ops_inside(int8) == []  # the INT8 model is still all-integer
    assert "MUL" in float_ops_inside(mixed)  # the star products it kept float
    assert manifest["stages"]["fallback"]["ops"] == dict(sorted(op_counts(mixed).items()))
    meta = read_metadata(mixed)
    assert meta["format"] == "mixed" and len(meta["float_tensors"]) == len(fallback["float_tensors"])


def test_converter_failure_is_a_stage_error_with_its_cause(tmp_path):
    """onnx2tf failing must end the run with the converter's own reason, not a RuntimeError
    about ranges that were never sent (the thread waiting for the FP32 graph gives up)."""
    from edgestar.errors import StageError
    from edgestar.pipeline.overlap import OverlappedConversion

    onnx = tmp_path / "broken.onnx"
    onnx.write_bytes(b"this is not an ONNX file")
    job = OverlappedConversion(tmp_path / "convert.log")
    outputs = {"fp32": tmp_path / "m_fp32.tflite", "int8": tmp_path / "m_int8.tflite"}
    job.submit(onnx, outputs, calibration=np.zeros((2, 3, 32, 32), np.float32), io_type="int8",
               metadata={}, mean=(0.5,) * 3, std=(0.5,) * 3)
    job.send_ranges((None, {}), np.zeros((1, 3, 32, 32), np.float32), tmp_path / "r.json",
                    strict=False, notes=[])
    with pytest.raises(StageError) as err:
        job.finish()
    message = str(err.value)
    assert message.startswith("TFLite conversion failed:") and "\n" not in message
    assert "protobuf" in message.lower() or "parse" in message.lower() or "onnx" in message.lower(), message
    assert not any(p.exists() for p in outputs.values())


def _break_diagnose(monkeypatch):
    from edgestar.pipeline import quantize as pipeline

    monkeypatch.setattr(pipeline, "diagnose", lambda run: (_ for _ in ()).throw(StageError("it broke")))


def _break_deployability_check(monkeypatch):
    """Fails inside the convert stage, after the converter wrote the models, before they are
    registered as artifacts."""
    from edgestar.convert import deployable

    monkeypatch.setattr(deployable, "check_deployable", lambda *a: (_ for _ in ()).throw(StageError("it broke")))


@pytest.mark.parametrize("breaks", [_break_diagnose, _break_deployability_check])
def test_failed_run_leaves_no_finished_looking_model(tmp_path, monkeypatch, breaks):
    """A failure after conversion must not leave a loadable .tflite under its final name, nor
    anything still running or writing into the run."""
    import threading

    from edgestar import QuantizeConfig, quantize

    breaks(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(StageError, match="it broke"):
        quantize(QuantizeConfig(variant="s050", weights="none", num_classes=10, img_size=32,
                                calib_samples=8, eval_samples=16, out=run))
    names = sorted(p.name for p in run.iterdir())
    assert [n for n in names if not n.endswith(".failed")] == ["convert.log", "manifest.json"], names
    assert "starnet_s050_32_int8.tflite.failed" in names and "starnet_s050_32_fp32.tflite.failed" in names
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert not [t for t in threading.enumerate() if t.name == "edgestar-send-ranges"]


def test_distilled_calibration_needs_no_images(offline_env, trained_s050, tmp_path):
    env, _ = offline_env
    run = tmp_path / "run"
    res = edgestar(env, "quantize", "--variant", "s050", "--weights", trained_s050, "--calib",
                   "distilled", "--calib-samples", 32, "--eval-samples", 200, "--out", run,
                   "--json", "-q")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    calib = manifest["inputs"]["calibration"]
    assert calib["kind"] == "distilled" and calib["count"] == 32
    assert calib["bn_loss"] < 0.5 * calib["initial_bn_loss"]
    m = manifest["metrics"]
    assert m["fp32_parity_max_abs"] <= 1e-4
    assert m["int8_agreement"] >= 0.6  # a usable INT8 model without a single real image


def test_bad_evaluation_image_found_mid_run_leaves_no_folder(tmp_path):
    """Evaluation images are decoded only while the run works; an unreadable one is still the
    user's input error (exit 2), and the folder the run had made goes with it."""
    from PIL import Image

    from edgestar import InputError, QuantizeConfig, quantize

    evald = tmp_path / "eval"
    for c in range(10):
        (evald / f"c{c}").mkdir(parents=True)
        Image.new("RGB", (32, 32), (c * 20, 0, 0)).save(evald / f"c{c}" / "ok.png")
    Image.effect_noise((64, 64), 60).convert("RGB").save(evald / "c9" / "zz_broken.png")
    whole = (evald / "c9" / "zz_broken.png").read_bytes()  # a valid header, the pixels cut off
    (evald / "c9" / "zz_broken.png").write_bytes(whole[: len(whole) // 2])
    run = tmp_path / "run"
    with pytest.raises(InputError, match="zz_broken.png"):
        quantize(QuantizeConfig(variant="s050", weights="none", num_classes=10, img_size=32,
                                calib_samples=8, eval=str(evald), out=run))
    assert not run.exists()

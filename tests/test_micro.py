"""A real ``--target micro`` INT8 model on TensorFlow Lite Micro's interpreter."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                           for m in ("onnx2tf", "tensorflow", "ai_edge_litert", "tflite_micro")),
                       reason="needs the conversion tools and tflite-micro (x86-64 only)"),
]


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """The shipped demo StarNet-S1 (trained on CIFAR-10, 32 px) quantized for a Cortex-M55
    (``--profile cortex-m55``: ``--target micro``, int8 I/O).
    Random weights would do for the kernels, but their near-flat logits make every runtime
    agree on top-1 trivially."""
    work = tmp_path_factory.mktemp("micro")
    cmd = [sys.executable, "-m", "edgestar.cli", "quantize", "--variant", "s1", "--weights", "demo",
           "--img-size", "32", "--profile", "cortex-m55", "--calib", "demo",
           "--calib-samples", "32", "--eval-samples", "16", "--out", str(work / "run"), "-q"]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    config = json.loads((work / "run" / "manifest.json").read_text())["config"]
    assert (config["target"], config["io_type"], config["profile"]) == ("micro", "int8", "cortex-m55")
    return work / "run"


def reference_kernels(int8_path: Path, out: Path):
    """LiteRT on its reference kernels (BUILTIN_REF), which TFLM's should match. ai-edge-litert
    2.1's BUILTIN_REF registers REVERSE_V2 only up to version 2; for int8 versions 2 and 3 do
    the same, so a copy declares version 2."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgestar.convert.tflite_file import flatbuffer_schema, pack_model
    from edgestar.evaluate.runners import TFLiteRunner

    s = flatbuffer_schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(int8_path.read_bytes(), 0))
    for code in model.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == s.BuiltinOperator.REVERSE_V2:
            code.version = min(code.version, 2)
    out.write_bytes(pack_model(model))
    runner = TFLiteRunner(out)
    runner.interpreter = Interpreter(model_path=str(out),
                                     experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    runner.interpreter.allocate_tensors()
    return runner


def test_evaluate_on_micro_matches_reference_kernels(micro_run, tmp_path):
    from edgestar.data.images import Preprocessing, evaluation_set, load_batch
    from edgestar.evaluate.micro import evaluate_on_micro
    from edgestar.evaluate.runners import TFLiteRunner

    int8_path = micro_run / "starnet_s1_32_int8.tflite"
    manifest = json.loads((micro_run / "manifest.json").read_text())
    pre = Preprocessing.from_dict(manifest["preprocessing"])
    folder = evaluation_set("demo", samples=48, seed=1)
    x = load_batch([p for p, _ in folder.samples], pre)
    fp32 = TFLiteRunner(micro_run / "starnet_s1_32_fp32.tflite")(x)  # = PyTorch to ~1e-5
    litert = TFLiteRunner(int8_path)
    host = litert(x)

    result = evaluate_on_micro(int8_path, folder, pre, fp32, samples=40, host_logits=host)
    assert "skipped" not in result
    assert result["images"] == 40 and result["of_images"] == 48
    vs = result["vs"]["tflite_int8"]
    # XNNPACK rounds differently: on 464 demo images up to 18 output LSB, 97.8 % agreement
    assert vs["agreement_top1"] >= 0.85
    assert 0 < vs["max_lsb_diff"] <= 40
    assert result["agreement_top1"] >= 0.85 and result["logit_sqnr_db"] > 15
    assert result["top1"] > 0.4  # the demo model is trained (72 %); chance is 10 %

    # TFLM's kernels against LiteRT's reference kernels on the same 40 images: (nearly) exact
    from edgestar.data.images import subsample
    from edgestar.evaluate.runners import MicroRunner

    rows = subsample(list(range(len(folder))), 40, 0)
    micro = MicroRunner(int8_path).quantized(x[rows])
    scale, zero = litert.out["quantization"]
    ref = np.round(reference_kernels(int8_path, tmp_path / "ref.tflite")(x[rows]) / scale) + zero
    assert np.abs(micro.astype(int) - ref.astype(int)).max() <= 1
    assert (micro.argmax(1) == ref.argmax(1)).mean() >= 0.95

    # Without host logits it computes LiteRT's itself, on the same images: same numbers
    again = evaluate_on_micro(int8_path, folder, pre, fp32, samples=40)
    assert again["vs"] == result["vs"] and again["top1"] == result["top1"]

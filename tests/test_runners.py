"""TFLite Micro runs in a child process: its time-out, its failure messages, and
``evaluate_on_micro`` on a tiny hand-built model (no TensorFlow in this process)."""
import importlib.util
import os
import re
import time

import numpy as np
import pytest

from edgestar.errors import StageError
from edgestar.evaluate.runners import MicroRunner

needs_micro = pytest.mark.skipif(importlib.util.find_spec("tflite_micro") is None,
                                 reason="tflite-micro not installed (x86-64 wheels only)")
needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="ai-edge-litert not installed")

SIZE = 2  # image side of the tiny model
# wide enough for ImageNet-normalized pixels (-2.1 to 2.7) without clipping
IN_SCALE, IN_ZERO = 0.025, -3
OUT_SCALE, OUT_ZERO = 0.025, -3


def reshape_model(path, *, out_scale=OUT_SCALE, out_zero=OUT_ZERO):
    """A valid int8 ``.tflite`` built with the flatbuffer schema (TensorFlow not needed): one
    RESHAPE from a [1, SIZE, SIZE, 3] image to [1, SIZE * SIZE * 3] "logits"."""
    from edgestar.convert.tflite_file import flatbuffer_schema, pack_model

    s = flatbuffer_schema()
    classes = SIZE * SIZE * 3

    def tensor(name, shape, dtype, buffer, scale=None, zero=None):
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), np.array(shape, np.int32), dtype, buffer
        if scale is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = [scale], [zero]
        return t

    shape_buffer = s.BufferT()
    shape_buffer.data = np.frombuffer(np.array([1, classes], np.int32).tobytes(), np.uint8)
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.RESHAPE
    code.version = 1
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    graph = s.SubGraphT()
    graph.tensors = [tensor("image", [1, SIZE, SIZE, 3], s.TensorType.INT8, 0, IN_SCALE, IN_ZERO),
                     tensor("shape", [2], s.TensorType.INT32, 1),
                     tensor("logits", [1, classes], s.TensorType.INT8, 0, out_scale, out_zero)]
    graph.inputs, graph.outputs, graph.operators = [0], [2], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [s.BufferT(), shape_buffer]
    path.write_bytes(pack_model(model))
    return path


def images(n=3, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


# ---------------------------------------------------------------------------- the child process

@needs_micro
@needs_litert
def test_micro_runner_runs_tflm_in_a_child(tmp_path):
    model = reshape_model(tmp_path / "tiny.tflite")
    x = images()
    runner = MicroRunner(model)
    raw = runner.quantized(x)
    expected = np.clip(np.round(x.transpose(0, 2, 3, 1) / IN_SCALE) + IN_ZERO, -128, 127)
    assert raw.dtype == np.int8
    np.testing.assert_array_equal(raw, expected.reshape(len(x), -1))
    np.testing.assert_allclose(runner(x), (expected.reshape(len(x), -1) - OUT_ZERO) * OUT_SCALE, atol=1e-6)


@needs_micro
@needs_litert
def test_micro_runner_times_out_and_kills_a_hung_child(tmp_path, fake_python):
    model = reshape_model(tmp_path / "tiny.tflite")
    pid_file = tmp_path / "child.pid"
    fake_python(f"echo $$ > {pid_file}\nexec sleep 60")
    runner = MicroRunner(model, timeout_s=1.5)
    t0 = time.monotonic()
    with pytest.raises(StageError) as info:
        runner(images())
    assert time.monotonic() - t0 < 30
    message = str(info.value)
    assert "TFLite Micro" in message and "time-out of 1.5 s" in message and "tiny.tflite" in message
    assert "\n" not in message
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(int(pid_file.read_text()), 0)


@needs_micro
@needs_litert
def test_default_time_out_scales_with_images_and_model(tmp_path, monkeypatch):
    from edgestar.evaluate import runners

    model = reshape_model(tmp_path / "tiny.tflite")
    seen = []
    monkeypatch.setattr(runners, "run_micro", lambda path, x, *, arena_size, timeout_s:
                        seen.append(timeout_s) or np.zeros((len(x), 12), np.int8))
    runner = MicroRunner(model)
    runner(images(1))
    runner(images(50))
    assert seen[0] >= runners.MICRO_TIMEOUT_BASE_S
    monkeypatch.setattr(runners, "micro_seconds_per_image", lambda path: 0.1)
    runner(images(50))
    assert seen[2] == pytest.approx(seen[0] + 50 * runners.MICRO_TIMEOUT_MARGIN * 0.1, rel=1e-3)


@needs_micro
@needs_litert
def test_a_signal_is_reported_in_one_line(tmp_path, fake_python):
    model = reshape_model(tmp_path / "tiny.tflite")
    fake_python("echo 'micro_interpreter.cc:42 something went wrong' >&2\nkill -ABRT $$")
    with pytest.raises(StageError) as info:
        MicroRunner(model, timeout_s=30)(images())
    message = str(info.value)
    assert "\n" not in message
    assert "killed by SIGABRT" in message
    assert message.endswith("micro_interpreter.cc:42 something went wrong")
    assert "tiny.tflite" in message


@needs_micro
@needs_litert
def test_tflm_own_error_is_the_message(tmp_path):
    """A real TFLM failure, an arena far too small, ends in TFLM's own last error line (this
    TFLM build then dies of SIGSEGV: "Failed to allocate tail memory. Requested: ...")."""
    model = reshape_model(tmp_path / "tiny.tflite")
    with pytest.raises(StageError) as info:
        MicroRunner(model, arena_size=16, timeout_s=60)(images())
    message = str(info.value)
    assert "\n" not in message and "tiny.tflite" in message
    assert re.search(r"\((exit \d+|killed by SIG[A-Z]+)\): ", message), message
    assert "allocate" in message.rsplit("): ", 1)[1]


def test_last_line_skips_blank_lines_and_is_shortened():
    from edgestar.evaluate.runners import _exit_status, _last_line

    assert _last_line("a\nlast one\n\n  \n", "stdout") == "last one"
    assert _last_line("", "from stdout\n") == "from stdout"
    assert _last_line(None, "") == "no error output"
    assert len(_last_line("x" * 1000)) == 300
    assert _exit_status(1) == "exit 1" and _exit_status(-9) == "killed by SIGKILL"


# ---------------------------------------------------------------------------- evaluate_on_micro

def test_evaluate_on_micro_says_when_tflm_is_missing(monkeypatch, image_folder):
    from edgestar.data.images import Preprocessing, scan_image_folder
    from edgestar.evaluate import micro

    monkeypatch.setattr(micro, "micro_available", lambda: False)
    folder = scan_image_folder(image_folder)
    result = micro.evaluate_on_micro("missing.tflite", folder, Preprocessing(SIZE),
                                     np.zeros((len(folder), 12), np.float32))
    assert result["images"] == 0 and "tflite-micro is not installed" in result["skipped"]


@needs_micro
@needs_litert
def test_evaluate_on_micro_on_an_identity_model(tmp_path, image_folder):
    from edgestar.data.images import Preprocessing, load_batch, scan_image_folder
    from edgestar.evaluate.micro import evaluate_on_micro

    model = reshape_model(tmp_path / "tiny.tflite")
    folder = scan_image_folder(image_folder)
    pre = Preprocessing(SIZE)
    x = load_batch([p for p, _ in folder.samples], pre)
    reference = x.transpose(0, 2, 3, 1).reshape(len(x), -1)  # the float "model"
    result = evaluate_on_micro(model, folder, pre, reference, samples=4)
    assert result["images"] == 4 and result["of_images"] == len(folder) == 6
    assert result["vs"]["tflite_int8"]["max_lsb_diff"] == 0  # a reshape: both runtimes exact
    assert result["vs"]["tflite_int8"]["agreement_top1"] == 1.0
    assert 0 < result["max_abs_logit_diff"] <= IN_SCALE / 2 + 1e-6  # input rounding only
    assert result["runtime"].startswith("tflite-micro ")
    for key in ("top1", "top5", "agreement_top1", "logit_sqnr_db"):
        assert key in result
    assert set(result["tflite_int8_same_images"]) == {"top1", "top5", "agreement_top1"}
    with pytest.raises(ValueError, match="6 evaluation images"):
        evaluate_on_micro(model, folder, pre, reference[:5])


@needs_micro
@needs_litert
def test_default_sample_count_fits_the_budget(tmp_path, monkeypatch):
    from edgestar.evaluate import micro

    model = reshape_model(tmp_path / "tiny.tflite")
    assert micro.default_micro_samples(model, 1000) == 1000  # no MACs at all: everything
    monkeypatch.setattr(micro, "micro_seconds_per_image", lambda path: 0.02)
    assert micro.default_micro_samples(model, 1000) == int(micro.MICRO_BUDGET_S / 0.02)
    monkeypatch.setattr(micro, "micro_seconds_per_image", lambda path: 5.0)
    assert micro.default_micro_samples(model, 1000) == micro.MICRO_MIN_IMAGES


def test_evaluate_keeps_the_logits_it_is_asked_for(image_folder):
    """So that the pipeline can hand LiteRT's INT8 logits to evaluate_on_micro for free."""
    from edgestar.data.images import Preprocessing, scan_image_folder
    from edgestar.evaluate.validate import evaluate

    folder = scan_image_folder(image_folder)
    pre = Preprocessing(SIZE)
    runners = {"a": lambda x: x.reshape(len(x), -1)[:, :4], "b": lambda x: -x.reshape(len(x), -1)[:, :4]}
    reference = np.zeros((len(folder), 4), np.float32)
    result = evaluate(runners, folder, pre, reference=reference, chunk=4, keep_logits=("b",))
    assert set(result.logits) == {"b"} and result.logits["b"].shape == (len(folder), 4)
    assert evaluate(runners, folder, pre, reference=reference).logits == {}

"""The ``vela:CONFIG`` device: Arm's real Vela compiler on a tiny hand-built INT8 model (no
TensorFlow here) and, end to end, on a real StarNet-S050 INT8 model; its error paths."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgestar.deploy import vela
from edgestar.deploy.vela import ACCELERATORS, system_config_for, vela_available, vela_estimate
from edgestar.errors import InputError, StageError

needs_vela = pytest.mark.skipif(importlib.util.find_spec("ethosu") is None,
                                reason='ethos-u-vela not installed (pip install "edgestar[npu]")')
needs_litert = pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None,
                                  reason="ai-edge-litert (the .tflite schema) not installed")


def reverse_conv_model(path, *, float_model=False):
    """A tiny ``.tflite`` shaped like the start of edgestar's graphs, built with the flatbuffer
    schema: REVERSE_V2 of a [1, 8, 8, 3] image over height and width (the rotate-180 that
    replaces PADs), then a 3x3 CONV_2D to 8 channels with a fused RELU. INT8 with per-channel
    weights, or all FLOAT32 with ``float_model``."""
    from edgestar.convert.tflite_file import flatbuffer_schema, pack_model

    s = flatbuffer_schema()
    act = s.TensorType.FLOAT32 if float_model else s.TensorType.INT8
    buffers = [s.BufferT()]

    def buffer(array):
        b = s.BufferT()
        b.data = np.frombuffer(array.tobytes(), np.uint8)
        buffers.append(b)
        return len(buffers) - 1

    def tensor(name, shape, dtype, data=None, scales=None, zero=0):
        t = s.TensorT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, np.int32), dtype
        t.buffer = 0 if data is None else buffer(data)
        if scales is not None and not float_model:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = list(scales), [zero] * len(scales)
        return t

    def code(op):
        c = s.OperatorCodeT()
        c.builtinCode = c.deprecatedBuiltinCode = op
        c.version = 1
        return c

    rng = np.random.default_rng(0)
    if float_model:
        weights, bias = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), np.zeros(8, np.float32)
    else:
        weights, bias = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8), np.zeros(8, np.int32)
    wtype = s.TensorType.FLOAT32 if float_model else s.TensorType.INT8
    btype = s.TensorType.FLOAT32 if float_model else s.TensorType.INT32
    tensors = [
        tensor("image", [1, 8, 8, 3], act, scales=[0.02], zero=-1),
        tensor("axes", [2], s.TensorType.INT32, data=np.array([1, 2], np.int32)),
        tensor("rotated", [1, 8, 8, 3], act, scales=[0.02], zero=-1),
        tensor("weights", [8, 3, 3, 3], wtype, data=weights, scales=[0.01] * 8),
        tensor("bias", [8], btype, data=bias, scales=[0.0002] * 8),
        tensor("features", [1, 8, 8, 8], act, scales=[0.05], zero=-128),
    ]
    reverse = s.OperatorT()
    reverse.opcodeIndex, reverse.inputs, reverse.outputs = 0, [0, 1], [2]
    conv = s.OperatorT()
    conv.opcodeIndex, conv.inputs, conv.outputs = 1, [2, 3, 4], [5]
    conv.builtinOptionsType = s.BuiltinOptions.Conv2DOptions
    conv.builtinOptions = s.Conv2DOptionsT()
    conv.builtinOptions.padding = s.Padding.SAME
    conv.builtinOptions.strideW = conv.builtinOptions.strideH = 1
    conv.builtinOptions.fusedActivationFunction = s.ActivationFunctionType.RELU
    graph = s.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [5], [reverse, conv]
    model = s.ModelT()
    model.version, model.subgraphs, model.buffers = 3, [graph], buffers
    model.operatorCodes = [code(s.BuiltinOperator.REVERSE_V2), code(s.BuiltinOperator.CONV_2D)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pack_model(model))
    return path


# ---------------------------------------------------------------------------- the real Vela

@needs_vela
@needs_litert
def test_estimate_of_a_tiny_int8_model(tmp_path):
    """Ethos-U55 runs the conv but not the two-axis REVERSE_V2 (Vela 5.2: "Unsupported reverse
    mask"), which stays a CPU operator in front of the one ethos-u operator. The path has a
    space and shell syntax: Vela is started without a shell."""
    from edgestar.convert.tflite_file import op_counts

    model = reverse_conv_model(tmp_path / "my models $(touch pwned)" / "tiny net.tflite")
    keep = tmp_path / "kept"
    result = vela_estimate(model, accelerator="ethos-u55-128", keep_dir=keep)

    assert result["device"] == "vela:ethos-u55-128" and result["estimate"] is True
    assert (result["system_config"], result["memory_mode"]) == ("Ethos_U55_High_End_Embedded", "Shared_Sram")
    assert result["vela_version"] == importlib.metadata.version("ethos-u-vela")
    assert result["input_ops"] == 2 and result["npu_ops"] == 1 and result["cpu_ops"] == 1
    assert result["cpu_op_types"] == {"REVERSE_V2": 1} and result["npu_segments"] == 1
    assert result["inference_ms_estimate"] > 0
    assert result["inferences_per_s_estimate"] == pytest.approx(1000 / result["inference_ms_estimate"])
    seconds = result["cycles_total"] / result["npu_clock_hz"]
    assert result["inference_ms_estimate"] == pytest.approx(seconds * 1e3)
    assert result["nn_macs"] == 8 * 8 * 8 * 3 * 3 * 3  # output pixels x channels x 3x3x3 taps
    assert result["sram_bytes"] > 0 and result["flash_bytes"] > 0 and result["dram_bytes"] == 0
    assert result["weights_in"] == "Off-chip Flash" and result["feature_maps_in"] == "SRAM"
    assert result["model_bytes"] == model.stat().st_size
    json.dumps(result)  # JSON-able as it is

    kept = keep / "tiny net_vela.tflite"
    assert result["vela_model"] == str(kept) and kept.stat().st_size == result["vela_model_bytes"]
    assert op_counts(kept) == {"CUSTOM:ethos-u": 1, "REVERSE_V2": 1}
    assert (keep / "tiny net_summary_Ethos_U55_High_End_Embedded.csv").is_file()
    assert not list(model.parent.parent.glob("pwned")) and not list(tmp_path.glob("pwned"))
    assert sorted(p.name for p in model.parent.iterdir()) == ["tiny net.tflite"]  # nothing written beside it


@needs_vela
@needs_litert
def test_ethos_u85_runs_the_reverse_on_the_npu(tmp_path):
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    result = vela_estimate(model, accelerator="ethos-u85-256")
    assert result["system_config"] == "Ethos_U85_SYS_DRAM_Low"
    assert result["memory_mode"] == "Dedicated_Sram_384KB"
    assert result["cpu_ops"] == 0 and result["cpu_op_types"] == {} and result["npu_ops"] == 2
    assert result["dram_bytes"] > 0 and result["flash_bytes"] == 0  # weights and arena in DRAM


@needs_vela
def test_accelerators_and_defaults_are_vela_s_own():
    from ethosu.vela.architecture_features import Accelerator

    assert set(ACCELERATORS) == {a.value for a in Accelerator}
    systems, modes = vela._config_names()
    for accelerator in ACCELERATORS:
        system, mode = system_config_for(accelerator)
        assert system in systems and mode in modes
        assert system.startswith("Ethos_" + accelerator.split("-")[1].upper())
    assert system_config_for("ethos-u65-512") == ("Ethos_U65_High_End", "Dedicated_Sram_384KB")


# ---------------------------------------------------------------------------- error paths

@needs_vela
@needs_litert
def test_a_float_model_is_refused_before_vela_runs(tmp_path, fake_python):
    """Vela itself would "compile" an FP32 model without error, all on the CPU."""
    fake_python("echo vela must not run >&2; exit 3")
    model = reverse_conv_model(tmp_path / "fp32.tflite", float_model=True)
    with pytest.raises(InputError, match=r"fp32.tflite is not an INT8 model \(2 of its 2 operators compute "
                                         r"in float: CONV_2D, REVERSE_V2\); Vela compiles only quantized"):
        vela_estimate(model)


@needs_vela
@pytest.mark.parametrize("name", ["missing.tflite", "notes.txt"])
def test_a_missing_or_foreign_file_is_an_input_error(tmp_path, name):
    (tmp_path / "notes.txt").write_text("not a model at all")
    with pytest.raises(InputError, match="no such model file|is not a .tflite model"):
        vela_estimate(tmp_path / name)


def test_unknown_accelerator_lists_the_choices(tmp_path):
    with pytest.raises(InputError) as info:
        vela_estimate(tmp_path / "m.tflite", accelerator="ethos-u55-100")
    assert "unknown Ethos-U accelerator 'ethos-u55-100'" in str(info.value)
    assert "ethos-u55-128" in str(info.value) and "ethos-u65-256" in str(info.value)
    with pytest.raises(InputError):
        system_config_for("cortex-m55")


@needs_vela
@needs_litert
def test_unknown_system_config_or_memory_mode(tmp_path):
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    with pytest.raises(InputError, match="unknown Vela system config 'Fast'.*Ethos_U55_High_End_Embedded"):
        vela_estimate(model, system_config="Fast")
    with pytest.raises(InputError, match="unknown Vela memory mode 'Big'.*Shared_Sram"):
        vela_estimate(model, memory_mode="Big")
    # both names exist, but Vela rejects the pair: the U55 system has flash where the arena would go
    with pytest.raises(InputError, match="Vela rejected system config .* Dedicated_Sram .*arena_mem_area"):
        vela_estimate(model, memory_mode="Dedicated_Sram")


def test_vela_not_installed_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ethosu", None)  # what import finds for a missing package
    monkeypatch.setitem(sys.modules, "ethosu.vela", None)
    assert not vela_available()
    with pytest.raises(InputError) as info:
        vela_estimate(tmp_path / "m.tflite", accelerator="ethos-u65-256")
    message = str(info.value)
    assert "ethos-u-vela" in message and 'pip install "edgestar[npu]"' in message and "\n" not in message


@needs_vela
@needs_litert
def test_vela_failing_gives_its_own_error_line(tmp_path, fake_python):
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    fake_python("echo 'Network summary for tiny'\n"
                "echo 'Traceback (most recent call last):' >&2\n"
                "echo 'ethosu.vela.errors.VelaError: Error: the scheduler ran out of road' >&2\n"
                "echo '' >&2\nexit 1")
    with pytest.raises(StageError) as info:
        vela_estimate(model)
    message = str(info.value)
    assert message == (f"Vela failed on {model} for ethos-u55-128 (exit 1): "
                       "ethosu.vela.errors.VelaError: Error: the scheduler ran out of road")


@needs_vela
@needs_litert
def test_vela_succeeding_without_outputs_is_a_stage_error(tmp_path, fake_python):
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    fake_python("exit 0")
    with pytest.raises(StageError, match="Vela finished on .* but wrote no compiled model"):
        vela_estimate(model)


@needs_vela
@needs_litert
def test_vela_hanging_is_killed_at_the_time_out(tmp_path, fake_python):
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    pid_file = tmp_path / "child.pid"
    fake_python(f"echo $$ > {pid_file}\nexec sleep 60")
    t0 = time.monotonic()
    with pytest.raises(StageError) as info:
        vela_estimate(model, timeout_s=1.5)
    assert time.monotonic() - t0 < 30
    assert str(info.value) == (f"Vela did not finish compiling {model} for ethos-u55-128 within its "
                               "time-out of 1.5 s; the child process was killed")
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(int(pid_file.read_text()), 0)


def test_the_child_is_vela_in_this_python(tmp_path):
    command = vela._vela_command(tmp_path / "m.tflite", tmp_path / "out", "ethos-u55-64",
                                 "Ethos_U55_High_End_Embedded", "Shared_Sram")
    assert command[:3] == [sys.executable, "-m", "edgestar.deploy.vela"]
    assert command[-1] == str((tmp_path / "m.tflite").resolve())  # absolute: never read as an option


@needs_vela
@needs_litert
def test_the_child_knows_its_parent(tmp_path, fake_python):
    """The child gets edgestar's child environment, whose parent pid lets it die with us."""
    model = reverse_conv_model(tmp_path / "tiny.tflite")
    seen = tmp_path / "env.txt"
    fake_python(f'echo "$EDGESTAR_PARENT_PID $CUDA_VISIBLE_DEVICES" > {seen}\nexit 1')
    with pytest.raises(StageError):
        vela_estimate(model)
    assert seen.read_text().split() == [str(os.getpid()), "-1"]


# ---------------------------------------------------------------------------- end to end

@pytest.mark.e2e
@needs_vela
@pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                        for m in ("onnx2tf", "tensorflow", "ai_edge_litert")),
                    reason="needs the conversion tools")
def test_real_starnet_s050_int8(tmp_path):
    """A real edgestar INT8 model (random weights: Vela's estimate does not depend on them).
    Vela 5.2 puts every operator on the Ethos-U55 except edgestar's one REVERSE_V2 of the
    input image (two axes; Vela supports no reverse on U55/U65), and all of them on U85."""
    from edgestar.convert.tflite_file import op_counts

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgestar.cli", "quantize", "--variant", "s050", "--weights", "none",
           "--img-size", "32", "--target", "micro", "--calib", "demo", "--calib-samples", "16",
           "--eval-samples", "16", "--out", str(run), "-q"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    model = run / "starnet_s050_32_int8.tflite"
    ops = op_counts(model)
    assert ops["REVERSE_V2"] == 1  # the PAD-free graph (README: "No PAD")

    u55 = vela_estimate(model, accelerator="ethos-u55-128", keep_dir=tmp_path / "u55")
    assert u55["input_ops"] == sum(ops.values())
    assert u55["cpu_op_types"] == {"REVERSE_V2": 1} and u55["npu_ops"] == u55["input_ops"] - 1
    assert u55["npu_segments"] == 1
    assert op_counts(u55["vela_model"]) == {"REVERSE_V2": 1, "CUSTOM:ethos-u": 1}
    assert u55["inference_ms_estimate"] > 0 and u55["sram_bytes"] > 0 and u55["flash_bytes"] > 0
    # weights and command stream go to flash: roughly the INT8 model's size
    assert 0.5 * u55["model_bytes"] < u55["flash_bytes"] < 1.5 * u55["model_bytes"]

    u65 = vela_estimate(model, accelerator="ethos-u65-256")
    assert u65["cpu_op_types"] == {"REVERSE_V2": 1}
    assert u65["sram_bytes"] <= 384 * 1024 and u65["dram_bytes"] > 0 and u65["flash_bytes"] == 0
    assert u65["nn_macs"] == u55["nn_macs"] > 0

    u85 = vela_estimate(model, accelerator="ethos-u85-256")
    assert u85["cpu_ops"] == 0 and u85["npu_ops"] == u85["input_ops"]

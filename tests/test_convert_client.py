"""The converter client's failure paths, without TensorFlow: a re-quantizer that hangs or dies
must end in a one-line StageError, never a wait that lasts forever."""
import time

import pytest

from edgestar.convert.client import Requantizer, last_error_line
from edgestar.errors import StageError


def test_requantizer_that_hangs_is_killed_after_its_time_out(tmp_path, fake_python):
    fake_python("exec sleep 60")
    requantize = Requantizer(tmp_path / "calibrated.tflite", "int8", tmp_path / "convert.log", timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(StageError, match="did not finish within 1 s"):
        requantize(["some_tensor"])
    assert time.monotonic() - t0 < 10
    assert requantize.proc.poll() is not None  # killed, not left running
    requantize.close()


def test_requantizer_that_dies_reports_its_last_error(tmp_path, fake_python):
    fake_python("cat > /dev/null & echo 'ValueError: no such tensor' >&2; exit 3")
    requantize = Requantizer(tmp_path / "calibrated.tflite", "int8", tmp_path / "convert.log")
    with pytest.raises(StageError) as err:
        requantize(["some_tensor"])
    message = str(err.value)
    assert "exit code 3" in message and "ValueError: no such tensor" in message and "\n" not in message
    requantize.close()


def test_requantizer_that_died_before_reading_reports_its_last_error(tmp_path, fake_python):
    """A worker gone before the request is written: the broken pipe is no traceback (found by CI
    on a loaded machine, where the worker of the test above exited before the write)."""
    import time

    fake_python("echo 'ValueError: no such tensor' >&2; exit 3")
    requantize = Requantizer(tmp_path / "calibrated.tflite", "int8", tmp_path / "convert.log")
    time.sleep(1.0)  # it has exited: writing the request raises BrokenPipeError
    with pytest.raises(StageError, match="exit code 3.*ValueError: no such tensor"):
        requantize(["some_tensor"])
    requantize.close()


def test_last_error_line_skips_colour_and_traceback_lines(tmp_path):
    log = tmp_path / "convert.log"
    log.write_text("INFO: fine\n\x1b[31mERROR:\x1b[0m The trace log is below.\nTraceback (most recent call last):\n"
                   '  File "x.py", line 1\nonnx.onnx_cpp2py_export.checker.ValidationError: bad node\n\n')
    assert last_error_line(log) == "onnx.onnx_cpp2py_export.checker.ValidationError: bad node"
    assert last_error_line(tmp_path / "missing.log") is None

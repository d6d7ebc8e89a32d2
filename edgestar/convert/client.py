"""ONNX -> TFLite (float32, full-integer INT8, optionally float16 and dynamic-range).

Route: onnx2tf builds the Keras graph (NHWC) from the ONNX file, then TensorFlow's TFLite
converter writes each requested format, with builtin ops only, so an op TFLite cannot lower
fails the conversion instead of silently becoming a Flex op. INT8 comes from TFLite's
quantizer applied to the FP32 graph with activation ranges the parent measured in PyTorch
(:mod:`edgestar.calibrate`); TFLite's own calibrator over our calibration inputs is the
fallback. (onnx2tf would drop QDQ scales anyway.)

TensorFlow runs in a subprocess (``python -m edgestar.convert --serve WORKDIR``, see
:class:`Conversion`): onnx2tf exits with ``sys.exit``, logs heavily and holds ~1 GB; none of
that should reach the caller. The worker runs in a private working directory holding
``calibration_image_sample_data_20x128x128x3_float32.npy`` made from our images, because
onnx2tf otherwise downloads that file on every conversion, and on a private copy of the ONNX
file, because onnx2tf rewrites its input in place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgestar.children import child_env
from edgestar.convert import FORMATS, IO_TYPES
from edgestar.data.images import save_nhwc
from edgestar.errors import StageError
from edgestar.files import atomic_write_bytes, scratch_dir

ONNX2TF_SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SPEC_FILE = "spec.json"
CALIBRATION_FILE = "calibration.npy"
FLOAT_MODEL = "fp32.tflite"  # worker -> parent: the FP32 graph, written before INT8 starts
RANGES_MODEL = "ranges.tflite"  # parent -> worker: that graph with activation ranges recorded
CALIBRATE_HERE = "calibrate_here"  # parent -> worker: no ranges, run TFLite's calibrator


def convert(onnx_path: Path, outputs: dict[str, Path], *, log_path: Path, **options) -> dict:
    """Build every format in ``outputs`` (format -> final path) from ``onnx_path`` and wait;
    INT8 is calibrated by TFLite's calibrator on ``calibration``.

    See :meth:`Conversion.submit` for the options. Returns per-format details (seconds).
    """
    job = Conversion(log_path).submit(onnx_path, outputs, **options)
    job.calibrate_in_worker()
    return job.wait()


class Conversion:
    """The TensorFlow worker subprocess; started at construction so that importing TensorFlow
    and onnx2tf (seconds) overlaps whatever the caller does before :meth:`submit`.

    The worker is mostly single-threaded (imports, onnx2tf, calibration), so after submitting
    the caller can work meanwhile (the pipeline evaluates PyTorch) and then ``wait()``.
    """

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.outputs: dict[str, Path] = {}
        self._tmp = scratch_dir("convert")
        self.work = Path(self._tmp.name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgestar.convert.worker", "--serve", str(self.work)],
                                     cwd=self.work, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=child_env())

    def submit(self, onnx_path: Path, outputs: dict[str, Path], *, calibration: np.ndarray,
               io_type: str, metadata: dict, mean, std,
               keep_calibrated: Path | None = None) -> "Conversion":
        """Hand the worker its job. ``calibration`` holds float32 NCHW preprocessed inputs; it
        drives INT8 calibration and provides onnx2tf's sample images (``mean``/``std`` undo
        the normalisation for those). ``keep_calibrated``: where to leave the FP32 graph with
        its INT8 ranges recorded, for a :class:`Requantizer`."""
        unknown = set(outputs) - set(FORMATS)
        if unknown:
            raise ValueError(f"unknown formats {sorted(unknown)}")
        if io_type not in IO_TYPES:
            raise ValueError(f"unknown io type {io_type}")
        work = self.work
        self.outputs = outputs
        shutil.copyfile(onnx_path, work / "model.onnx")
        save_nhwc(self.calibration_file, calibration)
        pixels = calibration[:20].transpose(0, 2, 3, 1) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
        np.save(work / ONNX2TF_SAMPLE, np.clip(pixels, 0.0, 1.0).astype(np.float32))
        spec = {
            "onnx": str(work / "model.onnx"),
            "calibration": str(self.calibration_file),
            "outputs": {fmt: str(Path(p).resolve()) for fmt, p in outputs.items()},
            "io_type": io_type,
            "metadata": metadata,
            "result": str(work / "result.json"),
            "keep_calibrated": str(Path(keep_calibrated).resolve()) if keep_calibrated else None,
        }
        (work / "spec.json.tmp").write_text(json.dumps(spec))
        os.replace(work / "spec.json.tmp", work / SPEC_FILE)  # the worker starts on this rename
        return self

    @property
    def calibration_file(self) -> Path:
        """The calibration inputs as float32 NHWC ``.npy``, written by :meth:`submit`; the
        caller can stream them back (:func:`edgestar.data.read_batches`) instead of keeping
        its own copy."""
        return self.work / CALIBRATION_FILE

    @property
    def float_model(self) -> Path:
        """Where the worker puts the FP32 graph (without metadata) before it quantizes."""
        return self.work / FLOAT_MODEL

    def quantize_with(self, ranges_model: bytes) -> None:
        """Let the worker quantize the FP32 graph with these recorded activation ranges
        (see :mod:`edgestar.calibrate`)."""
        atomic_write_bytes(self.work / RANGES_MODEL, ranges_model)

    def calibrate_in_worker(self) -> None:
        """Let the worker measure the ranges itself with TFLite's calibrator."""
        (self.work / CALIBRATE_HERE).touch()

    def wait_for(self, path: Path, poll_s: float = 0.05) -> bool:
        """Block until ``path`` is written (outputs are renamed into place when complete) or
        the worker has ended; return whether the file exists."""
        path = Path(path)
        while not path.exists() and self.proc.poll() is None:
            time.sleep(poll_s)
        return path.exists()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close()

    def wait(self) -> dict:
        """Wait for the worker; raise StageError carrying the converter's own last error unless
        every output exists. An INT8 job whose caller sent no ranges must have been told to
        calibrate itself (or the worker would wait forever)."""
        if self.running and "int8" in self.outputs and not any(
                (self.work / f).exists() for f in (RANGES_MODEL, CALIBRATE_HERE)):
            raise RuntimeError("INT8 requested: call quantize_with() or calibrate_in_worker() first")
        try:
            returncode = self.proc.wait()
            result_file = self.work / "result.json"
            result = json.loads(result_file.read_text()) if result_file.exists() else None
        finally:
            self._close()
        if returncode != 0 or result is None or result.get("error"):
            reason = (result or {}).get("error") or f"the converter exited with code {returncode}"
            cause = last_error_line(self.log_path)
            if cause and cause not in reason:
                reason += f": {cause}"
            raise StageError(f"TFLite conversion failed: {reason} (log: {self.log_path.name})")
        missing = [fmt for fmt, p in self.outputs.items() if not Path(p).is_file()]
        if missing:
            raise StageError(f"TFLite conversion did not produce {', '.join(missing)} "
                             f"(log: {self.log_path.name})")
        return result["formats"]

    def _close(self) -> None:
        self._log.close()
        self._tmp.cleanup()


class Requantizer:
    """A TensorFlow subprocess that re-quantizes one calibrated FP32 graph (see
    ``Conversion.submit(keep_calibrated=...)``) with chosen tensors kept float, as often as
    asked: the float fallback of ``quantize --fallback`` tries a few sets in a row and pays
    the TensorFlow import once. Requests go through stdin, models come back as files."""

    def __init__(self, calibrated: Path, io_type: str, log_path: Path, *, timeout_s: float = 600.0):
        if io_type not in IO_TYPES:
            raise ValueError(f"unknown io type {io_type}")
        self._tmp = scratch_dir("requantize")
        self.work = Path(self._tmp.name)
        self._count = 0
        self.timeout_s = timeout_s  # per request; one takes seconds even at 224 px
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgestar.convert.worker", "--requantize", str(calibrated), io_type],
            cwd=self.work, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT,
            env=child_env())

    def __call__(self, keep_float: list[str]) -> bytes:
        """The INT8 model with the ops writing ``keep_float`` (tensor names) in float."""
        self._count += 1
        out = self.work / f"model{self._count}.tflite"
        try:
            self.proc.stdin.write((json.dumps({"keep_float": keep_float, "out": str(out)}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # it died before reading the request (BrokenPipeError): its exit says why
            self.proc.wait()
        deadline = time.monotonic() + self.timeout_s
        while not out.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not out.exists():
            if self.proc.poll() is None:  # hung: it will not answer any more requests either
                self.proc.kill()
                self.proc.wait()
                raise StageError(f"re-quantization did not finish within {self.timeout_s:.0f} s "
                                 f"(log: {Path(self._log.name).name})")
            cause = last_error_line(Path(self._log.name))
            raise StageError(f"re-quantization failed (exit code {self.proc.returncode})"
                             + (f": {cause}" if cause else "") + f" (log: {Path(self._log.name).name})")
        data = out.read_bytes()
        out.unlink()
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ERROR_WORDS = ("error", "exception", "failed", "invalid", "not supported", "unsupported")


def last_error_line(log_path: Path, limit: int = 240) -> str | None:
    """The last line of the converter's log that reads like an error (onnx2tf prints its
    reasons in colour before it exits), without colour codes; None if there is none."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        text = _ANSI.sub("", line).strip()
        if text and not text.startswith(("File \"", "Traceback", "^")) and any(
                w in text.lower() for w in _ERROR_WORDS):
            return text[:limit]
    return None

"""The TFLite conversion running beside the PyTorch work of ``quantize``.

The converter (a TensorFlow subprocess, :class:`edgestar.convert.client.Conversion`) is mostly
single-threaded and takes seconds, so ``quantize`` hands it the ONNX file and goes on: it
measures the INT8 activation ranges in PyTorch and evaluates the PyTorch reference meanwhile.
The ranges can only be written into the FP32 graph once the converter has produced it, so a
thread waits for that graph and sends them. :class:`OverlappedConversion` owns all three
moving parts (the subprocess, the thread, what crosses between them) and ends them together:
after :meth:`~OverlappedConversion.cancel` nothing of a failed run is still running or writing.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from edgestar.convert.client import Conversion
from edgestar.errors import EdgestarError, StageError
from edgestar.files import atomic_write_json
from edgestar.memory import release_freed_memory


class OverlappedConversion:
    """A :class:`Conversion` plus the thread that sends it INT8 ranges."""

    def __init__(self, log_path: Path):
        self.job = Conversion(log_path)  # imports TensorFlow now, while PyTorch stages run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sent: dict | None = None
        self._error: BaseException | None = None

    def submit(self, onnx_path: Path, outputs: dict[str, Path], **options) -> None:
        """Start converting (see :meth:`Conversion.submit` for the options)."""
        self.job.submit(onnx_path, outputs, **options)

    @property
    def calibration_file(self) -> Path:
        return self.job.calibration_file

    def send_ranges(self, ranges, samples: np.ndarray, ranges_file: Path, *, strict: bool,
                    notes: list[str]) -> None:
        """In a thread: wait for the FP32 graph, pair its tensors with PyTorch's on ``samples``
        (NCHW images) and send the converter ``ranges`` (``(fx graph, node -> (min, max))``),
        or, for ``ranges=None``, let it run TFLite's own calibrator. The ranges used are
        written to ``ranges_file``. ``strict`` (QAT: the ranges are the trained ones) refuses
        TFLite's calibrator as a fallback when some tensor has no PyTorch range."""
        def run():
            try:
                self._sent = self._send(ranges, samples, ranges_file, strict, notes)
            except BaseException as exc:  # re-raised in the caller's thread by ranges_sent()
                self._error = exc

        self._thread = threading.Thread(target=run, name="edgestar-send-ranges", daemon=True)
        self._thread.start()

    def ranges_sent(self) -> dict:
        """Wait for the thread; what it did, for the manifest (its error is raised here)."""
        self._thread.join()
        error = self._error
        if isinstance(error, EdgestarError) or (error is not None and not isinstance(error, Exception)):
            raise error
        if error is not None:  # a bug or an I/O error in the hand-over: one line, cause chained
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise StageError(f"handing the INT8 ranges to the converter failed: "
                             f"{type(error).__name__}: {first}") from error
        return self._sent

    def fp32_ready(self, path: Path) -> bool:
        """Wait until the FP32 ``.tflite`` is written while the converter still runs (the
        caller can then evaluate it while INT8 is being built); False once it has ended."""
        return self.job.running and self.job.wait_for(path)

    @property
    def running(self) -> bool:
        return self.job.running

    def finish(self) -> dict:
        """Wait for the converter; per-format details, or StageError with its own reason."""
        if self._thread is not None:
            self.ranges_sent()
        return self.job.wait()

    def cancel(self) -> None:
        """End the converter and the thread; after this nothing writes into the run."""
        self._stop.set()
        self.job.cancel()  # the thread's wait for the FP32 graph ends with the process
        if self._thread is not None:
            self._thread.join()

    def _send(self, ranges, samples, ranges_file: Path, strict: bool, notes: list[str]) -> dict:
        from edgestar.convert.tflite_file import tensor_names
        from edgestar.quant.ranges import AmbiguousTensors, UnmatchedTensors, calibrated_model

        job = self.job
        if ranges is None:
            job.calibrate_in_worker()
            return {"calibrator": "tflite"}
        if not job.wait_for(job.float_model) or self._stop.is_set():
            # The converter failed before the FP32 graph; finish() reports its reason.
            return {"calibrator": "edgestar", "error": "the converter stopped before the FP32 graph"}
        gm, node_range = ranges
        try:
            model, pairs = calibrated_model(job.float_model.read_bytes(), gm, samples, node_range)
        except UnmatchedTensors as exc:
            tensors, names = exc.args[0], tensor_names(job.float_model)
            if isinstance(exc, AmbiguousTensors):
                why = (f"{len(tensors)} TFLite tensors match several PyTorch values with different "
                       f"ranges (e.g. {names[tensors[0]]}: {', '.join(exc.ties[tensors[0]])})")
            else:
                why = (f"{len(tensors)} TFLite tensors have no PyTorch counterpart with a range "
                       f"(e.g. {names[tensors[0]]})")
            if strict:
                raise StageError(f"{why}; the INT8 model would not compute as QAT trained it") from None
            job.calibrate_in_worker()
            notes.append(f"{why}; INT8 ranges came from TFLite's calibrator instead")
            key = "ambiguous_tensors" if isinstance(exc, AmbiguousTensors) else "unmatched_tensors"
            return {"calibrator": "tflite", key: [names[t] for t in tensors]}
        if self._stop.is_set():
            return {"calibrator": "edgestar", "error": "cancelled"}
        job.quantize_with(model)
        del model
        release_freed_memory()  # both graphs' intermediates, while the converter still runs
        names = tensor_names(job.float_model)
        table = {names[t]: {"node": name, "min": node_range[name][0], "max": node_range[name][1]}
                 for t, name in sorted(pairs.items())}
        atomic_write_json(ranges_file, {"source": "qat" if strict else "calibration", "tensors": table})
        return {"calibrator": "edgestar", "tensors": len(pairs), "ranges_file": ranges_file.name,
                "paired_on_images": len(samples)}

"""``quantize``: checkpoint -> folded model -> ONNX -> TFLite FP32/INT8 -> validated run directory.

Stages: load, evaluation_data, calibration_data (images, or inputs distilled from BatchNorm
statistics), fold (plus the exact PTQ rescalings of :mod:`edgestar.ptq`), bias_correction and
qat when asked, export, convert, validate, diagnose (the per-tensor INT8 error table of
:mod:`edgestar.diagnose`) and, when ``max_drop`` fails with ``fallback="float"``, fallback.
Stages run in order and each records its status, timing and measurements in the run's
``manifest.json``. The accuracy gate (``max_drop``) is part of the API: the report is always
written, and ``QuantizeResult.passed`` says whether the gate held.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from edgestar import __version__
from edgestar.data.images import Preprocessing, batches, calibration_inputs, evaluation_set, read_batches
from edgestar.errors import InputError, StageError
from edgestar.evaluate.runners import OnnxRunner, TorchRunner
from edgestar.export.onnx_export import export_onnx, max_abs_diff, onnx_op_counts
from edgestar.files import atomic_write_json
from edgestar.memory import peak_rss_mb, release_freed_memory
from edgestar.models.checkpoints import build_model, sha256_file
from edgestar.models.starnet import count_batchnorms, count_params, fold_batchnorms, split_large_depthwise
from edgestar.pipeline.config import (DISTILLED, QuantizeConfig, check_config, config_dict, ptq_techniques,
                                      qat_options)
from edgestar.pipeline.rundir import RunDir
from edgestar.quant.diagnose import LAYER_ERRORS_FILE, diagnose_images, layer_errors, spread
from edgestar.quant.ptq import EXACT as EXACT_RESCALINGS
from edgestar.quant.ptq import correct_biases, rescale

DEMO_CLASSES = 10
RANGES_FILE = "int8_ranges.json"  # the activation ranges the INT8 model was built with
FOLD_TOLERANCE = 1e-4  # relative to the logit scale; folding is exact up to float rounding
ONNX_PARITY_IMAGES = 64
WORST_SHOWN = 5  # tensors of the error table copied into the manifest's metrics
PARITY_TOLERANCE = 1e-3  # FP32 TFLite / ONNX vs PyTorch, absolute logits: beyond it the model is wrong

TOOL_PACKAGES = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime", "ai-edge-litert", "numpy")


@dataclass
class QuantizeResult:
    config: QuantizeConfig
    out: Path
    manifest: dict
    passed: bool = True
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        m = self.manifest
        return {
            "variant": self.config.variant,
            "img_size": m["model"]["img_size"],
            "num_classes": m["model"]["num_classes"],
            "out": str(self.out),
            "status": m["status"],
            "artifacts": {k: str(self.out / v["path"]) for k, v in m["artifacts"].items()},
            "metrics": m["metrics"],
            "timings_s": m["timings_s"],
        }


def tool_versions() -> dict:
    versions = {"edgestar": __version__, "python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def files_digest(paths, root: Path) -> str:
    """sha256 over (relative path, file sha256) of every file used, in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).relative_to(root)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def default_out(variant: str) -> Path:
    return Path("runs") / f"{variant}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def quantize(config: QuantizeConfig, *, progress_factory=None, log=None) -> QuantizeResult | None:
    """Run the whole pipeline; see the module docstring. Input errors raise InputError
    before any heavy work; stage failures raise StageError after recording them. Under
    torchrun with ``qat``, only rank 0 returns a result (the others return None after QAT)."""
    log = log or (lambda msg: None)
    check_config(config)
    if config.qat and _qat_rank() != 0:
        _qat_follower(config)
        return None
    t_start = time.perf_counter()
    out = Path(config.out) if config.out else default_out(config.variant)
    run = RunDir.create(out, tool="edgestar quantize", created=datetime.now(timezone.utc).isoformat(
        timespec="seconds"), config=config_dict(config), versions=tool_versions(), inputs={})
    from edgestar.convert.client import Conversion

    job = Conversion(run.path("convert.log"))  # imports TensorFlow while PyTorch stages run
    try:
        with tempfile.TemporaryDirectory(prefix="edgestar-scratch-") as scratch:
            return _run_stages(run, job, config, t_start, progress_factory, log, Path(scratch))
    except BaseException:
        job.cancel()
        # A model from a failed run must not look like a finished one.
        run.quarantine_artifacts()
        raise


def _run_stages(run: RunDir, job, config: QuantizeConfig, t_start: float, progress_factory, log,
                scratch: Path):
    m = run.manifest
    notes: list[str] = []

    with run.stage("load"):
        model, ckpt = build_model(config.variant, config.weights, num_classes=config.num_classes,
                                  allow_pickle=config.allow_pickle)
        pre = preprocessing_for(config, ckpt)
        class_names = ckpt.class_names if ckpt else None
        m["inputs"]["weights"] = (
            {"spec": config.weights, "path": ckpt.source, "sha256": sha256_file(ckpt.source)}
            if ckpt else {"spec": "none", "note": "random initialisation"})
        m["model"] = {"variant": config.variant, "num_classes": model.num_classes,
                      "img_size": pre.img_size, "params": count_params(model),
                      "class_names": class_names}
        m["preprocessing"] = {**pre.to_dict(), "layout_torch": "NCHW", "layout_tflite": "NHWC",
                              "input_range": "RGB scaled to [0, 1], then (x - mean) / std"}
    log(f"loaded StarNet-{config.variant}: {model.num_classes} classes, {pre.img_size} px")

    with run.stage("evaluation_data") as rec:
        folder, labelled = _evaluation_folder(config, model.num_classes, class_names)
        rec.update(source=str(folder.root), images=len(folder), labelled=labelled)
        m["inputs"]["evaluation"] = {"source": str(folder.root.resolve()), "count": len(folder),
                                     "labelled": labelled,
                                     "sha256": files_digest([p for p, _ in folder.samples], folder.root)}

    with run.stage("calibration_data"):
        calib, calib_info = _calibration(model, pre, config, progress_factory)
        if config.calib == DISTILLED:
            notes.append("calibrated on inputs distilled from the BatchNorm statistics (no "
                         "images); real images like the deployment data calibrate better")
        m["inputs"]["calibration"] = calib_info | {"sha256": hashlib.sha256(calib.tobytes()).hexdigest()}
        if config.calib == "demo" and not _is_demo_model(config, model):
            notes.append("calibrated on the CIFAR-10 demo images; pass --calib DIR with images "
                         "like your deployment data for the best INT8 accuracy")

    techniques = ptq_techniques(config)
    m["ptq"] = list(techniques)
    with run.stage("fold") as rec:
        folded = fold_for_target(model, calib, pre, config.target, techniques, rec)
        probe = calib[: min(len(calib), 16)]
        ref_probe = _logits(TorchRunner(model), probe)
        diff = max_abs_diff(_logits(TorchRunner(folded), probe), ref_probe)
        rec.update(batchnorms_before=count_batchnorms(model), batchnorms_after=count_batchnorms(folded),
                   max_abs_logit_diff=diff)
        if diff > FOLD_TOLERANCE * max(1.0, float(np.abs(ref_probe).max())):
            raise StageError(f"BatchNorm folding changed the logits by {diff:.3g}")

    if "bias-correct" in techniques:
        with run.stage("bias_correction") as rec:
            folded, info = correct_biases(folded, batches(calib, batch_size_for(pre.img_size)))
            rec.update(info, max_abs_logit_change=max_abs_diff(_logits(TorchRunner(folded), probe),
                                                               ref_probe))

    qat = None
    if config.qat:
        with run.stage("qat") as rec:
            qat = _finetune(folded, calib, pre, config, techniques, progress_factory, log)
            folded = qat.model
            rec.update(images=qat.images, world_size=qat.world_size, seconds=qat.seconds,
                       history=qat.history, options=qat.config, tensors=len(qat.ranges))

    with run.stage("export") as rec:
        exported = export_onnx(folded, pre.img_size, run.path("model.onnx"))
        onnx_path = exported["path"]
        rec["rotated_for_same_padding"] = exported["rotated_for_same_padding"]
        probe = calib[:ONNX_PARITY_IMAGES]  # TFLite FP32 is then checked on every eval image
        parity = max_abs_diff(_logits(OnnxRunner(onnx_path), probe), _logits(TorchRunner(folded), probe))
        rec.update(ops=onnx_op_counts(onnx_path), onnxruntime_max_abs_logit_diff=parity,
                   parity_images=len(probe))
        m["metrics"]["onnx_parity_max_abs"] = parity
        run.add_artifact("onnx", onnx_path)
        if parity > PARITY_TOLERANCE:
            raise StageError(f"ONNX Runtime disagrees with PyTorch by {parity:.3g} (max |logit diff|)")
    log(f"exported ONNX (ONNX Runtime vs PyTorch max |dlogit| {parity:.2e})")

    formats = ("fp32", "int8") + tuple(f for f in config.formats if f not in ("fp32", "int8"))
    paths = {fmt: run.path(_artifact_name(config.variant, pre.img_size, fmt)) for fmt in formats}
    with run.stage("convert") as rec:
        from edgestar.convert.tflite_file import op_counts
        from edgestar.quant.ranges import trace

        tflite_meta = {"edgestar_version": __version__, "variant": config.variant,
                       "num_classes": model.num_classes, "class_names": class_names,
                       "preprocessing": m["preprocessing"]}
        calibrated = scratch / "calibrated.tflite"  # kept for a float fallback
        job.submit(onnx_path, paths, calibration=calib, io_type=config.io_type,
                   metadata=tflite_meta, mean=pre.mean, std=pre.std,
                   keep_calibrated=calibrated if config.fallback == "float" else None)
        # The converter is mostly single-threaded: meanwhile measure the INT8 ranges, hand
        # them over as soon as the FP32 graph exists (a thread waits for it) and evaluate
        # PyTorch. On any error the caller cancels the job, which also ends the thread.
        # Memory: the calibration inputs are streamed back from the worker's copy (~120 MB
        # at 224 px), so this process holds one batch at a time from here on.
        sample = calib[:1].copy()
        del calib, probe
        release_freed_memory()
        t0 = time.perf_counter()
        ranges = ((trace(folded), qat.ranges) if qat else
                  _measure_ranges(folded, job.calibration_file, config.calibrator, pre.img_size,
                                  mse="mse-ranges" in techniques))
        rec["range_seconds"] = round(time.perf_counter() - t0, 3)
        pool = ThreadPoolExecutor(max_workers=1)
        sent = pool.submit(_send_ranges, job, ranges, sample, notes, run.path(RANGES_FILE),
                           strict=qat is not None)
        pool.shutdown(wait=False)
        release_freed_memory()
        t0 = time.perf_counter()
        torch_models = {"torch_fp32": model}
        if qat:
            torch_models.update(torch_qat_fp32=qat.model, torch_qat_int8sim=qat.simulated)
        elif "bias-correct" in techniques:  # the exported model is not the user's exactly
            torch_models.update(torch_exported_fp32=folded)
        others = _reference_logits(torch_models, folder, pre, progress_factory)
        reference = others.pop("torch_fp32")
        rec["pytorch_reference_seconds"] = round(time.perf_counter() - t0, 3)
        release_freed_memory()
        rec["calibration"] = sent.result()
        early = {}
        if job.running and job.wait_for(paths["fp32"]):  # else: evaluate all formats in one pass
            early = _evaluate_tflite({"fp32": paths["fp32"]}, reference, others, pre, folder,
                                     progress_factory, spare_core=job.running)
        details = job.wait()
        for fmt, path in paths.items():
            details[fmt]["ops"] = dict(sorted(op_counts(path).items()))
            run.add_artifact(_artifact_key(fmt), path, io_type=config.io_type if fmt == "int8" else "float")
        rec["formats"] = details
        check_deployable(paths)
    log("converted " + ", ".join(f"{p.name}" for p in paths.values()))

    with run.stage("validate") as rec:
        rest = {fmt: path for fmt, path in paths.items() if _artifact_key(fmt) not in early}
        engines = {**early, **_evaluate_tflite(rest, reference, others, pre, folder, progress_factory)}
        rec.update(engines=engines, images=len(folder), labelled=labelled, source=str(folder.root))
        m["metrics"].update(_metrics(engines, len(folder), labelled))
        parity = m["metrics"]["fp32_parity_max_abs"]
        if parity > PARITY_TOLERANCE:
            raise StageError(f"the FP32 TFLite model disagrees with PyTorch by {parity:.3g} "
                             "(max |logit diff|): the conversion is wrong")

    with run.stage("diagnose") as rec:
        rows = _layer_errors(run, folded, paths, folder, pre)
        if rows is None:
            rec["skipped"] = "some TFLite tensors have no PyTorch counterpart"
        else:
            atomic_write_json(run.path(LAYER_ERRORS_FILE), {
                "images": min(diagnose_images(pre.img_size), len(folder)), "sorted_by": "own_sqnr_db",
                "tensors": rows})
            run.add_artifact("layer_errors", run.path(LAYER_ERRORS_FILE))
            rec["tensors"] = len(rows)
            m["metrics"]["worst_int8_tensors"] = [
                {k: r[k] for k in ("node", "where", "op", "own_sqnr_db", "sqnr_db")} for r in rows[:WORST_SHOWN]]

    passed = True
    if config.max_drop is not None:
        passed = _gate(config, m, engines, rows, paths, calibrated, reference, pre, folder,
                       labelled, {**tflite_meta, "format": "int8", "io_type": config.io_type},
                       run, notes)
    m["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
    m["peak_rss_mb"] = peak_rss_mb()
    m["notes"] = notes
    run.finish("ok" if passed else "failed_gate")
    return QuantizeResult(config, run.root, m, passed, notes)


# --------------------------------------------------------------------------- helpers

def _measure_ranges(folded, calibration_file: Path, calibrator: str, img_size: int, *, mse: bool):
    """(fx graph, fx node -> (min, max)) for the edgestar calibrator, measured on all cores
    but the converter's over the NHWC calibration file; None for TFLite's calibrator."""
    if calibrator != "edgestar":
        return None
    import torch

    from edgestar.quant.ranges import trace

    gm = trace(folded)

    def nchw():
        return (b.transpose(0, 3, 1, 2) for b in read_batches(calibration_file, batch_size_for(img_size)))

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    try:
        return gm, calibration_ranges(gm, nchw, mse=mse)
    finally:
        torch.set_num_threads(threads)


def calibration_ranges(gm, batches_fn, *, mse: bool) -> dict[str, tuple[float, float]]:
    """Each node's (min, max) over ``batches_fn()`` (NCHW batches); with ``mse`` the star
    products and sums are then narrowed to their int8-error minimum (a second pass)."""
    from edgestar.quant.ptq import mse_ranges, range_nodes
    from edgestar.quant.ranges import node_ranges

    ranges = node_ranges(gm, batches_fn())
    return mse_ranges(gm, batches_fn(), ranges, range_nodes(gm)) if mse else ranges


def _send_ranges(job, ranges, sample: np.ndarray, notes: list[str], ranges_file: Path, *,
                 strict: bool = False) -> dict:
    """Give the converter its INT8 ranges once the FP32 graph exists, or let it calibrate
    itself; return what was done, for the manifest. The ranges used are written to
    ``ranges_file`` (TFLite tensor name -> fx node, min, max). ``strict`` (QAT: the ranges
    are the trained ones) refuses TFLite's calibrator as a fallback."""
    from edgestar.convert.tflite_file import tensor_names
    from edgestar.quant.ranges import UnmatchedTensors, calibrated_model

    if ranges is None:
        job.calibrate_in_worker()
        return {"calibrator": "tflite"}
    if not job.wait_for(job.float_model):
        return {"calibrator": "edgestar", "error": "the converter stopped before the FP32 graph"}
    gm, node_range = ranges
    try:
        model, pairs = calibrated_model(job.float_model.read_bytes(), gm, sample, node_range)
    except UnmatchedTensors as exc:
        if strict:
            names = tensor_names(job.float_model)
            raise StageError(f"{len(exc.args[0])} TFLite tensors have no range from QAT (e.g. "
                             f"{[names[t] for t in exc.args[0][:3]]}); the INT8 model would not "
                             "compute as trained") from None
        job.calibrate_in_worker()
        notes.append(f"{len(exc.args[0])} TFLite tensors had no PyTorch counterpart; INT8 ranges "
                     "came from TFLite's calibrator instead")
        return {"calibrator": "tflite", "unmatched_tensors": exc.args[0]}
    job.quantize_with(model)
    del model
    release_freed_memory()  # both graphs' intermediates, while the converter still runs
    names = tensor_names(job.float_model)
    table = {names[t]: {"node": name, "min": node_range[name][0], "max": node_range[name][1]}
             for t, name in sorted(pairs.items())}
    atomic_write_json(ranges_file, {"source": "qat" if strict else "calibration", "tensors": table})
    return {"calibrator": "edgestar", "tensors": len(pairs), "ranges_file": ranges_file.name}


def _layer_errors(run: RunDir, folded, paths: dict, folder, pre) -> list[dict] | None:
    """The per-tensor INT8 error table (:mod:`edgestar.diagnose`) on a spread of evaluation
    images; None when some tensor has no PyTorch counterpart (TFLite's calibrator ran)."""
    from edgestar.convert.tflite_file import tensor_names
    from edgestar.data.images import load_batch
    from edgestar.quant.ranges import UnmatchedTensors, match_tensors, trace

    gm = trace(folded)
    images = load_batch([p for p, _ in spread(folder.samples, diagnose_images(pre.img_size))], pre)
    ranges_file = run.path(RANGES_FILE)
    if ranges_file.exists():
        table = json.loads(ranges_file.read_text())["tensors"]
        pairs = {name: entry["node"] for name, entry in table.items()}
    else:
        try:
            by_index = match_tensors(paths["fp32"].read_bytes(), gm, images[:1])
        except UnmatchedTensors:
            return None
        names = tensor_names(paths["fp32"])
        pairs = {names[t]: node for t, node in by_index.items()}
    return layer_errors(paths["int8"], gm, pairs, images, chunk=batch_size_for(pre.img_size))


def _gate(config: QuantizeConfig, m: dict, engines: dict, rows, paths: dict, calibrated: Path,
          reference: np.ndarray, pre, folder, labelled: bool, metadata: dict, run: RunDir,
          notes: list[str]) -> bool:
    """The ``max_drop`` gate, recorded in the manifest; with ``fallback`` float, a drop beyond
    it first tries keeping the worst tensors float (:func:`_float_fallback`)."""
    drop = m["metrics"].get("int8_top1_drop_pt")
    if drop is not None and drop > config.max_drop and config.fallback == "float" and rows:
        with run.stage("fallback") as rec:
            found = _float_fallback(config, paths["int8"], calibrated, rows, reference,
                                    engines["torch_fp32"]["top1"], pre, folder, metadata, run, rec)
        if found is not None:
            engines = {**engines, "tflite_int8": found}  # the validate record keeps pure INT8
            m["metrics"].update(_metrics(engines, len(folder), labelled))
            m["metrics"]["fallback"] = {k: rec[k] for k in ("float_tensors", "bytes", "latency_ms")}
            run.add_artifact("tflite_int8", paths["int8"], io_type=config.io_type)
            drop = m["metrics"]["int8_top1_drop_pt"]
            notes.append(f"--fallback float kept {len(rec['float_tensors'])} tensor(s) in float to "
                         f"meet --max-drop: INT8 size x{rec['bytes']['ratio']:.3f}, latency "
                         f"x{rec['latency_ms']['ratio']:.2f} on this machine")
        else:
            notes.append("--fallback float could not meet --max-drop even with every tensor "
                         "float; the INT8 model is left all-integer")
    passed = drop is not None and drop <= config.max_drop
    m["gate"] = {"max_drop_pt": config.max_drop, "int8_top1_drop_pt": drop, "passed": passed}
    return passed


def _float_fallback(config: QuantizeConfig, int8_path: Path, calibrated: Path, rows: list[dict],
                    reference: np.ndarray, ref_top1: float, pre, folder, metadata: dict,
                    run: RunDir, rec: dict):
    """Re-quantize with the worst tensors of the error table kept float (1, 2, 4, ... of them,
    worst own SQNR first, ending with all) until the top-1 drop is within ``max_drop``; on success the INT8
    artifact is replaced and its evaluation returned, with the size and latency it cost in
    ``rec``. Returns None (the artifact untouched) when no tried set is enough."""
    from edgestar.convert.client import Requantizer
    from edgestar.convert.tflite_file import add_metadata, float_region
    from edgestar.evaluate.runners import compare_latency
    from edgestar.files import atomic_write_bytes

    candidates = [r["tensor"] for r in rows]
    rec["tried"] = []
    trial = calibrated.with_name("fallback.tflite")
    with Requantizer(calibrated, config.io_type, run.path("convert.log")) as requantize:
        counts = [2 ** i for i in range(len(candidates).bit_length()) if 2 ** i < len(candidates)]
        for count in counts + [len(candidates)]:
            keep = candidates[:count]
            model = requantize(float_region(calibrated, keep))
            trial.write_bytes(add_metadata(model, {**metadata, "float_tensors": keep}))
            stats = _evaluate_tflite({"int8": trial}, reference, {}, pre, folder, None)["tflite_int8"]
            drop = (ref_top1 - stats["top1"]) * 100.0
            rec["tried"].append({"float_tensors": len(keep), "top1": stats["top1"], "drop_pt": drop,
                                 "agreement": stats["agreement_top1"],
                                 "logit_sqnr_db": stats["logit_sqnr_db"]})
            if drop <= config.max_drop:
                break
    if drop > config.max_drop:
        return None
    before, after = int8_path.stat().st_size, trial.stat().st_size
    latency = compare_latency({"int8": int8_path, "fallback": trial})
    rec["float_tensors"] = [next(r["where"] for r in rows if r["tensor"] == t) for t in keep]
    rec["bytes"] = {"int8": before, "fallback": after, "ratio": after / before}
    rec["latency_ms"] = {**latency, "ratio": latency["fallback"] / latency["int8"],
                         "how": "median of 30 interleaved single-image runs, XNNPACK, 1 thread"}
    atomic_write_bytes(int8_path, trial.read_bytes())
    return stats


def check_deployable(paths: dict) -> None:
    """Refuse graphs an edge runtime cannot run as built: Flex ops anywhere; in the INT8 model,
    float compute inside the graph or an op TFLite Micro has no int8 kernel for."""
    from edgestar.convert.tflite_file import TFLM_INT8_OPS, flex_ops, float_ops_inside, op_counts

    for fmt, path in paths.items():
        ops = op_counts(path)
        if flex_ops(ops):
            raise StageError(f"{path.name} contains ops TFLite builtins cannot run: {flex_ops(ops)}")
        if fmt != "int8":
            continue
        floats = float_ops_inside(path)
        if floats:
            raise StageError(f"{path.name} computes in float inside the INT8 graph: {sorted(set(floats))}")
        missing = sorted(set(ops) - TFLM_INT8_OPS)
        if missing:
            raise StageError(f"{path.name} uses ops TFLite Micro has no int8 kernel for: {missing}")


def preprocessing_for(config: QuantizeConfig, ckpt) -> Preprocessing:
    pre = ckpt.preprocessing if ckpt and ckpt.preprocessing else Preprocessing(224)
    return pre.with_size(config.img_size) if config.img_size else pre


def _is_demo_model(config: QuantizeConfig, model) -> bool:
    return config.weights == "demo" or model.num_classes == DEMO_CLASSES


def batch_size_for(img_size: int) -> int:
    """Images per PyTorch batch: 8 at 224 px, more at lower resolutions (activation memory
    grows with the pixel count: S1's stem output alone is 1.6 MB per 224 px image)."""
    return int(max(4, min(256, 8 * (224 / img_size) ** 2)))


def _logits(runner, x: np.ndarray) -> np.ndarray:
    """``runner`` over ``x`` in batches (activations, not weights, dominate memory at 224 px)."""
    batch = batch_size_for(x.shape[-1])
    return np.concatenate([runner(x[i:i + batch]) for i in range(0, len(x), batch)])


def _artifact_name(variant: str, img_size: int, fmt: str) -> str:
    return f"starnet_{variant}_{img_size}_{fmt}.tflite"


def _artifact_key(fmt: str) -> str:
    return f"tflite_{fmt}"


def _evaluation_folder(config: QuantizeConfig, num_classes: int, class_names):
    """The evaluation images, and whether their labels can be scored against this model.

    Without --eval the demo set is used; when its 10 classes are not the model's, the run
    still measures parity and INT8 agreement on those real images, without accuracy.
    """
    explicit = config.eval is not None
    folder = evaluation_set(config.eval if explicit else "demo", samples=config.eval_samples,
                            seed=config.seed)
    labelled = len(folder.classes) == num_classes
    if explicit and not labelled:
        raise InputError(f"evaluation folder {folder.root} has {len(folder.classes)} class "
                         f"folders but the model has {num_classes} classes")
    if labelled and class_names and list(class_names) != folder.classes:
        raise InputError(f"evaluation folder {folder.root} names its classes {folder.classes[:3]}..., "
                         f"the checkpoint {list(class_names)[:3]}...; labels would be misread")
    if config.max_drop is not None and not labelled:
        raise InputError("--max-drop needs a labelled evaluation set (--eval DIR) whose "
                         f"classes match the model's {num_classes}")
    return folder, labelled


def _reference_logits(models: dict, folder, pre, progress_factory) -> dict[str, np.ndarray]:
    """PyTorch logits of each model (name -> model) on the evaluation set, on all cores but
    one (the converter's)."""
    import torch

    from edgestar.evaluate.validate import predict

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    bar = progress_factory(len(folder), "PyTorch reference") if progress_factory else None
    try:
        return predict({name: TorchRunner(m) for name, m in models.items()}, folder, pre,
                       chunk=batch_size_for(pre.img_size), progress=bar)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def _qat_rank() -> int:
    """This process's rank when torchrun started several (QAT is data-parallel), else 0."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    from edgestar.quant.qat import distributed_context

    return distributed_context()[0]


def _qat_follower(config: QuantizeConfig) -> None:
    """A torchrun process other than rank 0: the same model and data, its share of every QAT
    batch, nothing written. Rank 0 runs everything else."""
    model, ckpt = build_model(config.variant, config.weights, num_classes=config.num_classes,
                              allow_pickle=config.allow_pickle)
    pre = preprocessing_for(config, ckpt)
    calib, _ = _calibration(model, pre, config, None)
    techniques = ptq_techniques(config)
    folded = fold_for_target(model, calib, pre, config.target, techniques, {})
    if "bias-correct" in techniques:
        folded, _ = correct_biases(folded, batches(calib, batch_size_for(pre.img_size)))
    _finetune(folded, calib, pre, config, techniques, None, None)


def _calibration(model, pre, config: QuantizeConfig, progress_factory):
    """The calibration inputs (NCHW float32) and their manifest entry: images from
    ``config.calib``, or, for ``distilled``, inputs synthesized from the model's BatchNorm
    statistics (:mod:`edgestar.distill`)."""
    if config.calib != DISTILLED:
        return calibration_inputs(config.calib, pre, samples=config.calib_samples,
                                  seed=config.seed, progress_factory=progress_factory)
    from edgestar.data.distill import distilled_inputs

    bar = progress_factory(config.calib_samples, "distilled calibration images") if progress_factory else None
    try:
        return distilled_inputs(model, config.calib_samples, pre.img_size, pre.mean, pre.std,
                                seed=config.seed, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def fold_for_target(model, calib: np.ndarray, pre, target: str, techniques, rec: dict):
    """The model as it will be converted, exactly equal in float: BatchNorm folded, the exact
    rescalings of ``techniques`` applied, large depthwise convs split for ``target`` cpu.
    What was done goes into ``rec``."""
    folded = fold_batchnorms(model)
    if set(techniques) & set(EXACT_RESCALINGS):
        folded, rec["rescaled"] = rescale(folded, batches(calib, batch_size_for(pre.img_size)),
                                          techniques)
    if target == "cpu":
        folded, rec["split_depthwise_convs"] = split_large_depthwise(folded, pre.img_size)
    return folded


def _finetune(folded, calib: np.ndarray, pre, config: QuantizeConfig, techniques, progress_factory, log):
    """QAT of the folded model, its quantizers starting from the calibration ranges."""
    from edgestar.data.images import qat_images
    from edgestar.quant.qat import finetune
    from edgestar.quant.ranges import trace

    images = qat_images(config.train or config.calib)
    start = calibration_ranges(trace(folded), lambda: batches(calib, batch_size_for(pre.img_size)),
                               mse="mse-ranges" in techniques)
    return finetune(folded, images, pre, start, config=qat_options(config),
                    progress_factory=progress_factory, log=log)


def _evaluate_tflite(paths: dict, reference, others: dict, pre, folder, progress_factory, *,
                     spare_core: bool = False) -> dict:
    """Accuracy, agreement and logit error of each TFLite artifact against ``reference``;
    ``spare_core`` leaves one core to the converter while it still runs."""
    from edgestar.evaluate.runners import TFLiteRunner
    from edgestar.evaluate.validate import evaluate

    if not paths:
        return {}
    threads = os.cpu_count() or 1
    threads = max(1, threads - 1) if spare_core else threads
    runners = {_artifact_key(fmt): TFLiteRunner(path, num_threads=threads) for fmt, path in paths.items()}
    names = ", ".join(f.upper() for f in paths)
    bar = progress_factory(len(folder), f"evaluation images ({names})") if progress_factory else None
    try:
        result = evaluate(runners, folder, pre, reference=reference, reference_name="torch_fp32",
                          others=others,
                          progress=bar, chunk=batch_size_for(pre.img_size))
    finally:
        if bar is not None:
            bar.close()
    return result.engines


def _metrics(engines: dict, images: int, labelled: bool) -> dict:
    """The manifest/JSON metrics from per-engine statistics.

    With QAT, ``torch_fp32`` is still the user's model (the drop and agreement are measured
    against it); FP32 parity is against the fine-tuned float model that was exported (or the
    bias-corrected one, ``torch_exported_fp32``), and ``qat_sim_agreement`` is the INT8
    model's top-1 agreement with the QAT simulation.
    """
    qat = "torch_qat_fp32" in engines
    exported = next((k for k in ("torch_qat_fp32", "torch_exported_fp32") if k in engines), None)
    metrics: dict = {}
    for name, stats in engines.items():
        metrics[name] = ({"top1": stats["top1"], "top5": stats["top5"]} if labelled
                         else {"top1": None, "top5": None})
        if name != "torch_fp32":
            metrics[name]["agreement"] = stats["agreement_top1"]
            metrics[name]["max_abs_logit_diff"] = stats["max_abs_logit_diff"]
            metrics[name]["logit_sqnr_db"] = stats["logit_sqnr_db"]
    int8, ref = engines["tflite_int8"], engines["torch_fp32"]
    metrics["int8_top1_drop_pt"] = (ref["top1"] - int8["top1"]) * 100.0 if labelled else None
    metrics["int8_agreement"] = int8["agreement_top1"]
    # 1,000 images resolve a drop to about +-0.5 pt; the intervals say how far to trust them
    metrics["int8_agreement_ci95"] = [round(v, 5) for v in int8["agreement_ci95"]]
    metrics["int8_top1_drop_ci95_pt"] = [round(100.0 * v, 3) for v in int8["top1_drop_ci95"]] if labelled else None
    metrics["int8_logit_sqnr_db"] = int8["logit_sqnr_db"]
    fp32 = engines["tflite_fp32"]
    metrics["fp32_parity_max_abs"] = (fp32["vs"][exported]["max_abs_logit_diff"] if exported
                                      else fp32["max_abs_logit_diff"])
    if qat:
        metrics["qat_sim_agreement"] = int8["vs"]["torch_qat_int8sim"]["agreement_top1"]
    metrics["eval_images"] = images
    metrics["eval_labelled"] = labelled
    return metrics

"""``quantize``: checkpoint -> folded model -> ONNX -> TFLite FP32/INT8 -> validated run directory.

One function per stage, in the order they run, each over the :class:`Run` context:

  load, evaluation_data, calibration_data   the inputs, all read before the run directory is
                                            created (a bad input leaves nothing behind)
  fold (+ bias_correction, qat when asked)  the model as it will be converted, equal in float
  export                                    ONNX, checked in ONNX Runtime
  convert                                   TFLite, while PyTorch measures the INT8 ranges and
                                            the reference (:mod:`edgestar.pipeline.overlap`)
  validate                                  every artifact on the evaluation images
  diagnose                                  the per-tensor INT8 error table
  gate (+ fallback)                         ``max_drop``, when asked

Beside this file: ``run`` (the context), ``torch_work`` (calibration inputs, folding, QAT,
range measurement), ``scoring`` (labels, evaluation, metrics, sanity checks), ``gate`` and
``rundir`` (the run directory and its manifest).

Each stage records its status, timing and measurements in the run's ``manifest.json``. Files
are written to the run's staging folder and get their final names only when the run ends
well (:class:`edgestar.pipeline.rundir.RunDir`). The accuracy gate is part of the API: the
report is always written, and ``QuantizeResult.passed`` says whether the gate held.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgestar import __version__
from edgestar.data.images import batches
from edgestar.errors import InputError, StageError, interrupt_name
from edgestar.evaluate.runners import OnnxRunner, TorchRunner
from edgestar.export.onnx_export import export_onnx, max_abs_diff, onnx_op_counts
from edgestar.files import atomic_write_json, scratch_dir
from edgestar.memory import peak_rss_mb, release_freed_memory
from edgestar.models.checkpoints import build_model, sha256_file
from edgestar.models.starnet import count_batchnorms, count_params
from edgestar.pipeline.config import DISTILLED, QuantizeConfig, check_config, config_dict, ptq_techniques
from edgestar.pipeline.gate import gate
from edgestar.pipeline.run import CONVERT_LOG, Run
from edgestar.pipeline.rundir import QAT_STATE, RunDir, default_out, files_digest, tool_versions
from edgestar.pipeline.scoring import (engine_metrics, evaluate_tflite, evaluation_images, micro_metrics,
                                       reference_logits, sanity_warnings)
from edgestar.pipeline.torch_work import (calibration_set, fold_for_target, logits_of, measure_ranges,
                                          preprocessing_for, qat_finetune, qat_follower, qat_rank)
from edgestar.quant.diagnose import LAYER_ERRORS_FILE, diagnose_images, layer_errors, spread
from edgestar.quant.ptq import correct_biases
from edgestar.quant.ranges import MATCH_IMAGES

RANGES_FILE = "int8_ranges.json"  # the activation ranges the INT8 model was built with
FOLD_TOLERANCE = 1e-4  # relative to the logit scale; folding is exact up to float rounding
ONNX_PARITY_IMAGES = 64
WORST_SHOWN = 5  # tensors of the error table copied into the manifest's metrics
PARITY_TOLERANCE = 1e-3  # FP32 TFLite / ONNX vs PyTorch, absolute logits: beyond it the model is wrong



@dataclass
class QuantizeResult:
    config: QuantizeConfig
    out: Path
    manifest: dict
    passed: bool = True
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
            "warnings": self.warnings,
            "notes": self.notes,  # with -q --json there is no table: the notes travel here
            "timings_s": m["timings_s"],
        }


def quantize(config: QuantizeConfig, *, progress_factory=None, log=None) -> QuantizeResult | None:
    """Run the whole pipeline; see the module docstring. Input errors raise InputError
    before the run directory exists; stage failures raise StageError after recording them.
    Under torchrun with ``qat``, only rank 0 returns a result (the others return None)."""
    log = log or (lambda msg: None)
    check_config(config)
    if config.qat and qat_rank() != 0:
        qat_follower(config)
        return None
    t_start = time.perf_counter()
    out = Path(config.out) if config.out else None
    if out is not None:
        RunDir.check_new(out)
    run_dir = RunDir.pending(tool="edgestar quantize", created=datetime.now(timezone.utc).isoformat(
        timespec="seconds"), config=config_dict(config), versions=tool_versions(), inputs={})
    with scratch_dir("scratch") as scratch:
        from edgestar.pipeline.overlap import OverlappedConversion

        run = Run(config, run_dir, Path(scratch), log, progress_factory)
        conversion = OverlappedConversion(run.scratch / CONVERT_LOG)  # TensorFlow loads meanwhile
        created = False  # whether this run made its folder (then an input error removes it)
        try:
            load(run)
            evaluation_data(run)
            calibration_data(run)
            created = run_dir.open(out) if out is not None else run_dir.open_new(default_out(config.variant))
            _run_stages(run, conversion)
            passed = gate(run)
        except BaseException as exc:
            _end_failed(run, conversion, exc, created_folder=created)
            raise
        m = run.manifest
        m["timings_s"]["total"] = round(time.perf_counter() - t_start, 3)
        m["peak_rss_mb"] = peak_rss_mb()
        m["notes"], m["warnings"] = run.notes, run.warnings
        _keep_log(run)
        run_dir.finish("ok" if passed else "failed_gate")
    return QuantizeResult(config, run_dir.root, m, passed, run.notes, run.warnings)


def _end_failed(run: Run, conversion, exc: BaseException, *, created_folder: bool) -> None:
    """After any failure: end the converter and the ranges thread first (nothing may write into
    the run afterwards), then leave the run folder honest. An input error removes the folder
    this run created (a bad input leaves nothing behind); any other failure keeps its record,
    models renamed ``*.failed``. A second interrupt during this still ends the run folder."""
    try:
        conversion.cancel()
    finally:
        run_dir = run.dir
        if run_dir.root is not None:
            if isinstance(exc, InputError) and created_folder:
                shutil.rmtree(run_dir.root, ignore_errors=True)
            else:
                run.manifest["notes"], run.manifest["warnings"] = run.notes, run.warnings
                _keep_log(run)
                run_dir.fail("interrupted" if interrupt_name(exc) else "failed")
                if interrupt_name(exc):
                    exc.run_dir = run_dir.root  # the CLI names it in its one line


def _run_stages(run: Run, conversion) -> None:
    fold(run)
    if "bias-correct" in run.techniques:
        bias_correction(run)
    if run.config.qat:
        qat(run)
    export(run)
    convert(run, conversion)
    validate(run)
    diagnose(run)


# --------------------------------------------------------------------------- the inputs

def load(run: Run) -> None:
    config, m = run.config, run.manifest
    with run.dir.stage("load"):
        run.model, run.ckpt = build_model(config.variant, config.weights, num_classes=config.num_classes,
                                          allow_pickle=config.allow_pickle)
        run.pre = preprocessing_for(config, run.ckpt)
        ckpt, model, pre = run.ckpt, run.model, run.pre
        m["inputs"]["weights"] = (
            {"spec": config.weights, "path": ckpt.source, "sha256": sha256_file(ckpt.source)}
            if ckpt else {"spec": "none", "note": "random initialisation"})
        m["model"] = {"variant": config.variant, "num_classes": model.num_classes,
                      "img_size": pre.img_size, "params": count_params(model),
                      "class_names": ckpt.class_names if ckpt else None}
        m["preprocessing"] = {**pre.to_dict(), "layout_torch": "NCHW", "layout_tflite": "NHWC",
                              "input_range": "RGB scaled to [0, 1], then (x - mean) / std"}
    run.log(f"loaded StarNet-{config.variant}: {model.num_classes} classes, {pre.img_size} px")


def evaluation_data(run: Run) -> None:
    with run.dir.stage("evaluation_data") as rec:
        ev = run.eval = evaluation_images(run.config, run.model.num_classes,
                                          run.ckpt.class_names if run.ckpt else None,
                                          demo_model=_is_demo_model(run))
        folder = ev.folder
        rec.update(source=str(folder.root), images=len(folder), labelled=ev.labelled, labels=ev.why)
        run.manifest["inputs"]["evaluation"] = {
            "source": str(folder.root.resolve()), "count": len(folder), "labelled": ev.labelled,
            "labels": ev.why, "labels_source": folder.labels_source,
            "label_file": str(folder.label_file) if folder.label_file else None, "classes": list(folder.classes), "demo_images_for_another_model": ev.demo_for_another_model,
            "sha256": files_digest([p for p, _ in folder.samples], folder.root)}
    run.log(f"evaluation images: {len(folder)} from {folder.root} ({folder.labels_source}); "
            + ("accuracy is reported: " if ev.labelled else "no accuracy: ") + ev.why)
    run.notes.extend(folder.notes)
    if not ev.labelled:
        run.notes.append(f"no accuracy is reported: {ev.why}; pass --eval DIR with labelled "
                         "images of the model's classes")
    if ev.demo_for_another_model:
        run.notes.append("agreement and parity were measured on the CIFAR-10 demo images "
                         f"(resized to {run.pre.img_size} px), not on your data; pass --eval DIR")


def calibration_data(run: Run) -> None:
    config = run.config
    with run.dir.stage("calibration_data"):
        run.calib, info = calibration_set(run.model, run.pre, config, run.progress)
        run.manifest["inputs"]["calibration"] = info | {"sha256": hashlib.sha256(run.calib.tobytes()).hexdigest()}
    run.notes.extend(info.get("notes", []))
    if config.calib == DISTILLED:
        run.notes.append("calibrated on inputs distilled from the BatchNorm statistics (no "
                         "images); real images like the deployment data calibrate better")
        if info["bn_loss"] > 0.5 * info["initial_bn_loss"]:
            run.warnings.append(f"distilling calibration inputs barely matched the BatchNorm "
                                f"statistics (loss {info['initial_bn_loss']:.3g} -> {info['bn_loss']:.3g}); "
                                "the INT8 ranges may be poor: calibrate on real images")
    elif config.calib == "demo" and not _is_demo_model(run):
        run.notes.append("calibrated on the CIFAR-10 demo images; pass --calib DIR with images "
                         "like your deployment data for the best INT8 accuracy")


# --------------------------------------------------------------------------- the model

def fold(run: Run) -> None:
    run.techniques = ptq_techniques(run.config)
    run.manifest["ptq"] = list(run.techniques)
    with run.dir.stage("fold") as rec:
        run.folded = fold_for_target(run.model, run.calib, run.pre, run.config.target, run.techniques, rec)
        probe = run.calib[: min(len(run.calib), 16)]
        ref_probe = logits_of(TorchRunner(run.model), probe)
        diff = max_abs_diff(logits_of(TorchRunner(run.folded), probe), ref_probe)
        rec.update(batchnorms_before=count_batchnorms(run.model),
                   batchnorms_after=count_batchnorms(run.folded), max_abs_logit_diff=diff)
        if diff > FOLD_TOLERANCE * max(1.0, float(np.abs(ref_probe).max())):
            raise StageError(f"BatchNorm folding changed the logits by {diff:.3g}")


def bias_correction(run: Run) -> None:
    with run.dir.stage("bias_correction") as rec:
        probe = run.calib[: min(len(run.calib), 16)]
        run.folded, info = correct_biases(run.folded, batches(run.calib, run.batch))
        rec.update(info, max_abs_logit_change=max_abs_diff(logits_of(TorchRunner(run.folded), probe),
                                                           logits_of(TorchRunner(run.model), probe)))


def qat(run: Run) -> None:
    with run.dir.stage("qat") as rec:
        result = run.qat = qat_finetune(run.folded, run.calib, run.pre, run.config, run.techniques,
                                     run.progress, run.log, state_path=run.dir.staged(QAT_STATE))
        run.folded = result.model
        rec.update(images=result.images, world_size=result.world_size, seconds=result.seconds,
                   history=result.history, options=result.config, tensors=len(result.ranges),
                   resumed_from_step=result.resumed_from_step)


def export(run: Run) -> None:
    with run.dir.stage("export") as rec:
        exported = export_onnx(run.folded, run.pre.img_size, run.dir.staged("model.onnx"))
        run.onnx = exported["path"]
        rec["rotated_for_same_padding"] = exported["rotated_for_same_padding"]
        probe = run.calib[:ONNX_PARITY_IMAGES]  # TFLite FP32 is then checked on every eval image
        parity = max_abs_diff(logits_of(OnnxRunner(run.onnx), probe), logits_of(TorchRunner(run.folded), probe))
        rec.update(ops=onnx_op_counts(run.onnx), onnxruntime_max_abs_logit_diff=parity,
                   parity_images=len(probe))
        run.manifest["metrics"]["onnx_parity_max_abs"] = parity
        run.dir.add_artifact("onnx", run.onnx)
        if parity > PARITY_TOLERANCE:
            raise StageError(f"ONNX Runtime disagrees with PyTorch by {parity:.3g} (max |logit diff|)")
    run.log(f"exported ONNX (ONNX Runtime vs PyTorch max |dlogit| {parity:.2e})")


# --------------------------------------------------------------------------- TFLite

def convert(run: Run, conversion) -> None:
    """ONNX -> TFLite in the converter subprocess while this process measures the INT8 ranges,
    hands them over and computes the PyTorch reference (see :mod:`edgestar.pipeline.overlap`)."""
    from edgestar.quant.ranges import trace

    config, m = run.config, run.manifest
    formats = ("fp32", "int8") + tuple(f for f in config.formats if f not in ("fp32", "int8"))
    run.paths = {fmt: run.dir.staged(run.artifact_name(fmt)) for fmt in formats}
    with run.dir.stage("convert") as rec:
        tflite_meta = {"edgestar_version": __version__, "variant": config.variant,
                       "num_classes": run.model.num_classes, "class_names": m["model"]["class_names"],
                       "preprocessing": m["preprocessing"]}
        run.calibrated = run.scratch / "calibrated.tflite" if config.fallback == "float" else None
        conversion.submit(run.onnx, run.paths, calibration=run.calib, io_type=config.io_type,
                          metadata=tflite_meta, mean=run.pre.mean, std=run.pre.std,
                          keep_calibrated=run.calibrated)
        run.log(f"converting to TFLite ({', '.join(f.upper() for f in formats)}): onnx2tf, then "
                "TFLite's converter; INT8 ranges are measured meanwhile")
        # Memory: the calibration inputs are streamed back from the converter's copy (~120 MB
        # at 224 px), so this process holds one batch at a time from here on.
        samples = run.calib[:MATCH_IMAGES].copy()
        run.calib = None
        release_freed_memory()
        t0 = time.perf_counter()
        ranges = ((trace(run.folded), run.qat.ranges) if run.qat else
                  measure_ranges(run.folded, conversion.calibration_file, config.calibrator,
                                  run.pre.img_size, mse="mse-ranges" in run.techniques))
        rec["range_seconds"] = round(time.perf_counter() - t0, 3)
        conversion.send_ranges(ranges, samples, run.dir.staged(RANGES_FILE), strict=run.qat is not None,
                               notes=run.notes)
        release_freed_memory()
        t0 = time.perf_counter()
        models = {"torch_fp32": run.model}
        if run.qat:
            models.update(torch_qat_fp32=run.qat.model, torch_qat_int8sim=run.qat.simulated)
        elif "bias-correct" in run.techniques:  # the exported model is not the user's exactly
            models.update(torch_exported_fp32=run.folded)
        run.others = reference_logits(models, run.eval.folder, run.pre, run.progress, run.batch)
        run.reference = run.others.pop("torch_fp32")
        rec["pytorch_reference_seconds"] = round(time.perf_counter() - t0, 3)
        release_freed_memory()
        rec["calibration"] = conversion.ranges_sent()
        if conversion.fp32_ready(run.paths["fp32"]):  # evaluate FP32 while INT8 is built
            run.engines = evaluate_tflite({"tflite_fp32": run.paths["fp32"]}, run.reference, run.others,
                                          run.pre, run.eval.folder, run.progress, run.batch,
                                          spare_core=conversion.running)
        details = conversion.finish()
        _register_tflite(run, details)
        rec["formats"] = details
    run.log("converted " + ", ".join(p.name for p in run.paths.values()))


def _register_tflite(run: Run, details: dict) -> None:
    from edgestar.convert.deployable import check_deployable
    from edgestar.convert.tflite_file import op_counts

    if run.dir.staged(RANGES_FILE).exists():
        run.dir.add_artifact("int8_ranges", run.dir.staged(RANGES_FILE))
    for fmt, path in run.paths.items():
        check_deployable(path, "int8" if fmt == "int8" else "float")
        details[fmt]["ops"] = dict(sorted(op_counts(path).items()))
        run.dir.add_artifact(f"tflite_{fmt}", path,
                             io_type=run.config.io_type if fmt == "int8" else "float")


def validate(run: Run) -> None:
    with run.dir.stage("validate") as rec:
        rest = {f"tflite_{fmt}": path for fmt, path in run.paths.items() if f"tflite_{fmt}" not in run.engines}
        logits: dict = {}
        run.engines = {**run.engines, **evaluate_tflite(rest, run.reference, run.others, run.pre,
                                                        run.eval.folder, run.progress, run.batch, logits=logits)}
        folder = run.eval.folder
        rec.update(engines=run.engines, images=len(folder), labelled=run.eval.labelled, source=str(folder.root))
        metrics = run.manifest["metrics"]
        metrics.update(engine_metrics(run.engines, len(folder), run.eval.labelled))
        metrics["eval_source"] = str(folder.root)
        metrics["eval_demo_images_for_another_model"] = run.eval.demo_for_another_model
        parity = metrics["fp32_parity_max_abs"]
        if parity > PARITY_TOLERANCE:
            raise StageError(f"the FP32 TFLite model disagrees with PyTorch by {parity:.3g} "
                             "(max |logit diff|): the conversion is wrong")
        if run.config.target == "micro":
            _evaluate_on_micro(run, logits["tflite_int8"], rec)
        run.warnings.extend(sanity_warnings(metrics))
        rec["warnings"] = list(run.warnings)


def _evaluate_on_micro(run: Run, int8_logits: np.ndarray, rec: dict) -> None:
    """``--target micro``: the INT8 model also on TensorFlow Lite Micro, the runtime it is for
    (its kernels differ from XNNPACK's by several LSB), on a sample sized to take ~10 s."""
    from edgestar.evaluate.micro import evaluate_on_micro

    micro = rec["tflm_int8"] = evaluate_on_micro(run.paths["int8"], run.eval.folder, run.pre, run.reference,
                                                 host_logits=int8_logits, seed=run.config.seed)
    if "skipped" in micro:
        run.notes.append(f"the INT8 model was not run on TensorFlow Lite Micro: {micro['skipped']}")
        return
    run.manifest["metrics"]["tflm_int8"] = micro_metrics(micro, run.eval.labelled)
    run.log(f"TFLite Micro: {micro['images']} of {micro['of_images']} images, top-1 agreement with "
            f"LiteRT INT8 {micro['vs']['tflite_int8']['agreement_top1']:.1%}")


def diagnose(run: Run) -> None:
    with run.dir.stage("diagnose") as rec:
        if run.manifest["stages"]["convert"]["calibration"].get("ambiguous_tensors"):
            rec["skipped"] = "some TFLite tensors match several PyTorch values: the table would guess"
            return
        rows = run.error_rows = _layer_errors(run)
        if rows is None:
            rec["skipped"] = "some TFLite tensors have no PyTorch counterpart"
            return
        table = run.dir.staged(LAYER_ERRORS_FILE)
        atomic_write_json(table, {"images": min(diagnose_images(run.pre.img_size), len(run.eval.folder)),
                                  "sorted_by": "own_sqnr_db", "tensors": rows})
        run.dir.add_artifact("layer_errors", table)
        rec["tensors"] = len(rows)
        run.manifest["metrics"]["worst_int8_tensors"] = [
            {k: r[k] for k in ("node", "where", "op", "own_sqnr_db", "sqnr_db")} for r in rows[:WORST_SHOWN]]


def _layer_errors(run: Run) -> list[dict] | None:
    """The per-tensor INT8 error table (:mod:`edgestar.quant.diagnose`) on a spread of evaluation
    images; None when some tensor has no PyTorch counterpart (TFLite's calibrator ran)."""
    from edgestar.convert.tflite_file import tensor_names
    from edgestar.data.images import load_batch
    from edgestar.quant.ranges import UnmatchedTensors, match_tensors, trace

    gm = trace(run.folded)
    folder = run.eval.folder
    images = load_batch([p for p, _ in spread(folder.samples, diagnose_images(run.pre.img_size))], run.pre)
    ranges_file = run.dir.staged(RANGES_FILE)
    if ranges_file.exists():
        table = json.loads(ranges_file.read_text())["tensors"]
        pairs = {name: entry["node"] for name, entry in table.items()}
    else:
        try:
            by_index = match_tensors(run.paths["fp32"].read_bytes(), gm, images[:MATCH_IMAGES])
        except UnmatchedTensors:
            return None
        names = tensor_names(run.paths["fp32"])
        pairs = {names[t]: node for t, node in by_index.items()}
    return layer_errors(run.paths["int8"], gm, pairs, images, chunk=run.batch)


# --------------------------------------------------------------------------- helpers

def _keep_log(run: Run) -> None:
    """The converter's log into the run (best effort: a failure here must not hide another)."""
    log = run.scratch / CONVERT_LOG
    if log.exists() and run.dir.root is not None:
        try:
            shutil.copyfile(log, run.dir.staged(CONVERT_LOG))
        except OSError:
            pass


def _is_demo_model(run: Run) -> bool:
    """The shipped demo checkpoint, or one whose class names are the demo set's."""
    from edgestar.data.images import demo_split

    names = run.ckpt.class_names if run.ckpt else None
    if run.config.weights == "demo":
        return True
    return bool(names) and list(names) == sorted(
        p.name for p in demo_split("eval").iterdir() if p.is_dir())



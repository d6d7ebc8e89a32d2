"""How ``quantize`` scores what it built: which evaluation images, whether their labels may be
trusted, the PyTorch reference, every TFLite artifact against it, the manifest's metrics and
the sanity checks that make a wrecked INT8 model loud even without ``--max-drop``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgestar.data.images import ImageFolder, evaluation_set
from edgestar.errors import InputError
from edgestar.evaluate.runners import TorchRunner

# A working INT8 StarNet agrees with its FP32 top-1 on ~98-99 % of images with a logit SQNR
# of 26-30 dB (bench/RESULTS.md). Far below either, the model is broken, not just noisy.
SANE_AGREEMENT = 0.80
SANE_LOGIT_SQNR_DB = 12.0


@dataclass
class EvaluationImages:
    folder: ImageFolder
    labelled: bool  # may accuracy be reported against these labels?
    why: str  # how that was decided, for the log and the manifest
    demo_for_another_model: bool  # the shipped CIFAR-10 demo images scoring a model they are not for


def evaluation_images(config, num_classes: int, class_names, *, demo_model: bool) -> EvaluationImages:
    """The evaluation images, and whether their labels are the model's.

    Accuracy is only reported when that is known: the checkpoint's class names equal the
    folder's, or the user passed ``--eval`` (then the folder's classes must at least number
    the model's, and its class names are recorded). Without ``--eval`` the demo images still
    measure parity and INT8 agreement, which need no labels.
    """
    explicit = config.eval is not None
    source = config.eval if explicit else "demo"
    folder = evaluation_set(source, labels=config.labels, samples=config.eval_samples, seed=config.seed)
    demo = source == "demo"
    names_match = bool(class_names) and list(class_names) == list(folder.classes)
    if explicit:
        # Class indices from a label file need not use every class; names must match in full.
        fits = (len(folder.classes) <= num_classes if folder.indexed_labels
                else len(folder.classes) == num_classes)
        if not fits:
            raise InputError(f"evaluation set {folder.root} has {len(folder.classes)} classes "
                             f"({folder.labels_source}) but the model has {num_classes}")
        if class_names and not names_match and not folder.indexed_labels:
            raise InputError(f"evaluation set {folder.root} names its classes {folder.classes[:3]}..., "
                             f"the checkpoint {list(class_names)[:3]}...; labels would be misread")
        labelled = True
        why = ("the checkpoint's class names match the evaluation set's" if names_match else
               f"--eval was given: its classes ({folder.labels_source}) are taken to be the model's")
    elif names_match:
        labelled, why = True, "the checkpoint's class names are the demo set's"
    else:
        labelled = False
        why = ("the checkpoint has no class names, so the demo labels may not be its labels"
               if not class_names else "the model's classes are not the demo set's")
    if config.max_drop is not None and not labelled:
        raise InputError(f"--max-drop needs accuracy, and {why}: pass --eval DIR with the "
                         f"model's {num_classes} classes")
    return EvaluationImages(folder, labelled, why, demo and not demo_model)


def reference_logits(models: dict, folder, pre, progress_factory, batch: int) -> dict[str, np.ndarray]:
    """PyTorch logits of each model (name -> model) on the evaluation set, on all cores but
    one (the converter's)."""
    import torch

    from edgestar.evaluate.validate import predict

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    bar = progress_factory(len(folder), "PyTorch reference") if progress_factory else None
    try:
        return predict({name: TorchRunner(m) for name, m in models.items()}, folder, pre,
                       chunk=batch, progress=bar)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()


def evaluate_tflite(paths: dict, reference, others: dict, pre, folder, progress_factory, batch: int, *,
                    spare_core: bool = False, logits: dict | None = None) -> dict:
    """Accuracy, agreement and logit error of each TFLite file (engine name -> path) against
    ``reference``; ``spare_core`` leaves one core to the converter while it still runs.
    ``logits``: a dict that receives each engine's logits."""
    from edgestar.evaluate.runners import TFLiteRunner
    from edgestar.evaluate.validate import evaluate

    if not paths:
        return {}
    threads = os.cpu_count() or 1
    threads = max(1, threads - 1) if spare_core else threads
    runners = {name: TFLiteRunner(path, num_threads=threads) for name, path in paths.items()}
    names = ", ".join(n.replace("tflite_", "").upper() for n in paths)
    bar = progress_factory(len(folder), f"evaluation images ({names})") if progress_factory else None
    try:
        result = evaluate(runners, folder, pre, reference=reference, reference_name="torch_fp32",
                          others=others, progress=bar, chunk=batch,
                          keep_logits=tuple(paths) if logits is not None else ())
    finally:
        if bar is not None:
            bar.close()
    if logits is not None:
        logits.update(result.logits)
    return result.engines


def micro_metrics(micro: dict, labelled: bool) -> dict:
    """The manifest's ``tflm_int8`` entry from :func:`edgestar.evaluate.micro.evaluate_on_micro`:
    the INT8 model on TensorFlow Lite Micro, beside LiteRT's INT8 on the same images."""
    same = micro["tflite_int8_same_images"]
    versus = micro["vs"]["tflite_int8"]
    return {"top1": micro["top1"] if labelled else None, "top5": micro["top5"] if labelled else None,
            "agreement": micro["agreement_top1"], "logit_sqnr_db": micro["logit_sqnr_db"],
            "max_abs_logit_diff": micro["max_abs_logit_diff"],
            # vs PyTorch FP32 on the same images (TFLM runs a sample)
            "top1_drop_pt": (100.0 * (micro["lost_top1"] - micro["gained_top1"]) / micro["images"]
                             if labelled else None),
            "tflite_int8_top1_same_images": same["top1"] if labelled else None,
            "agreement_with_tflite_int8": versus["agreement_top1"], "max_lsb_diff": versus["max_lsb_diff"],
            "images": micro["images"], "of_images": micro["of_images"], "runtime": micro["runtime"]}


def engine_metrics(engines: dict, images: int, labelled: bool, int8_key: str = "tflite_int8") -> dict:
    """The manifest/JSON metrics from per-engine statistics.

    With QAT, ``torch_fp32`` is still the user's model (the drop and agreement are measured
    against it); FP32 parity is against the fine-tuned float model that was exported (or the
    bias-corrected one, ``torch_exported_fp32``), and ``qat_sim_agreement`` is the INT8
    model's top-1 agreement with the QAT simulation. ``int8_key`` names the engine the INT8
    figures describe.
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
    int8, ref = engines[int8_key], engines["torch_fp32"]
    metrics["int8_top1_drop_pt"] = (ref["top1"] - int8["top1"]) * 100.0 if labelled else None
    metrics["int8_agreement"] = int8["agreement_top1"]
    # 1,000 images resolve a drop to about +-0.5 pt; the intervals say how far to trust them
    metrics["int8_agreement_ci95"] = [round(v, 5) for v in int8["agreement_ci95"]]
    metrics["int8_top1_drop_ci95_pt"] = ([round(100.0 * v, 3) for v in int8["top1_drop_ci95"]]
                                         if labelled else None)
    metrics["int8_logit_sqnr_db"] = int8["logit_sqnr_db"]
    fp32 = engines["tflite_fp32"]
    metrics["fp32_parity_max_abs"] = (fp32["vs"][exported]["max_abs_logit_diff"] if exported
                                      else fp32["max_abs_logit_diff"])
    if qat:
        metrics["qat_sim_agreement"] = int8["vs"]["torch_qat_int8sim"]["agreement_top1"]
    metrics["eval_images"] = images
    metrics["eval_labelled"] = labelled
    return metrics


def sanity_warnings(metrics: dict) -> list[str]:
    """Warnings for an INT8 model far worse than a working one, gate or no gate."""
    found = []
    agreement, sqnr = metrics.get("int8_agreement"), metrics.get("int8_logit_sqnr_db")
    if agreement is not None and agreement < SANE_AGREEMENT:
        found.append(f"the INT8 model agrees with FP32 on only {agreement:.1%} of images (a working "
                     f"one: ~98 %); it is probably broken: check the calibration data")
    if sqnr is not None and sqnr < SANE_LOGIT_SQNR_DB:
        found.append(f"INT8 logit SQNR is {sqnr:.1f} dB (a working model: 25-30 dB): the INT8 "
                     "logits are mostly quantization noise")
    return found

"""Human-readable reports rendered from manifests alone."""
from __future__ import annotations

from edgestar.quant.diagnose import format_rows
from edgestar.report.text import text_table

ROW_NAMES = {"onnx": "onnx fp32", "tflite_mixed": "tflite int8+float"}  # the fallback's mixed model


def summary_table(manifest: dict, out=None) -> str:
    """Format, size, top-1, drop and agreement of each artifact, from a manifest alone."""
    metrics = manifest["metrics"]
    ref_top1 = metrics.get("torch_fp32", {}).get("top1")
    rows = [("format", "bytes", "top-1", "drop (pt)", "agreement")]
    rows.append(("pytorch fp32", "-", percent(ref_top1), "-", "-"))
    for key, art in manifest["artifacts"].items():
        if key != "onnx" and not key.startswith("tflite_"):
            continue  # not a model (the error table, ...)
        stats = metrics.get(key, {})
        top1 = stats.get("top1")
        drop = f"{(ref_top1 - top1) * 100:+.2f}" if None not in (top1, ref_top1) else "-"
        agree = stats.get("agreement")
        rows.append((ROW_NAMES.get(key, key.replace("tflite_", "tflite ")),
                     f"{art['bytes']:,}", percent(top1), drop if key != "onnx" else "-",
                     percent(agree) if agree is not None else "-"))
        if key == "tflite_int8" and "tflm_int8" in metrics:  # the same file on TFLite Micro
            rows.append(_micro_row(metrics["tflm_int8"], art["bytes"]))
    lines = text_table(rows)
    parity = metrics.get("fp32_parity_max_abs")
    images = metrics.get("eval_images")
    caveats = (["the CIFAR-10 demo set, not your data"] if metrics.get("eval_demo_images_for_another_model")
               else []) + ([] if metrics.get("eval_labelled") else ["labels not known to be the model's: no accuracy"])
    foot = f"{images} evaluation images" + (f" ({'; '.join(caveats)})" if caveats else "")
    if parity is not None:
        foot += f"; FP32 TFLite vs PyTorch max |dlogit| {parity:.2e}"
    # What makes the numbers above suspect is said right under them.
    tail = [f"WARNING: {w}" for w in manifest.get("warnings", [])]
    if manifest.get("inputs", {}).get("weights", {}).get("spec") == "none":
        tail.append("NOTE: random weights (--weights none): these figures describe an untrained model")
    tail.append(foot)
    micro = metrics.get("tflm_int8")
    if micro:
        tail.append(f"TFLite Micro vs LiteRT INT8 on the same {micro['images']} images: top-1 "
                    f"{percent(micro['top1'])} vs {percent(micro['tflite_int8_top1_same_images'])}, "
                    f"agreement {percent(micro['agreement_with_tflite_int8'])}"
                    + (f", max {micro['max_lsb_diff']} LSB apart" if micro.get("max_lsb_diff") is not None else ""))
    drop_ci, agree_ci = metrics.get("int8_top1_drop_ci95_pt"), metrics.get("int8_agreement_ci95")
    if agree_ci:  # what these evaluation images can resolve
        tail.append("INT8 95 % intervals: " + (f"drop {drop_ci[0]:+.2f} to {drop_ci[1]:+.2f} pt, " if drop_ci else "")
                    + f"agreement {percent(agree_ci[0])} to {percent(agree_ci[1])}")
    worst = metrics.get("worst_int8_tensors")
    if worst:
        tail += ["", "INT8 tensors with the most quantization error (layer_errors.json has all):"]
        tail += ["  " + line for line in format_rows(worst, len(worst))]
    tail += [f"run directory: {out}"] if out is not None else []
    return "\n".join(lines + tail)


def _micro_row(micro: dict, size: int) -> tuple:
    """TFLite Micro's row. It runs a sample of the images: its top-1 and drop are on that
    sample (the drop against PyTorch FP32 on the same images)."""
    top1, drop = micro.get("top1"), micro.get("top1_drop_pt")
    drop = f"{drop:+.2f}" if drop is not None else "-"
    name = f"tflm int8 ({micro['images']}/{micro['of_images']} img)"
    return (name, f"{size:,}", percent(top1), drop, percent(micro["agreement"]))


def percent(fraction: float | None) -> str:
    """Accuracy the way every edgestar command prints it: ``79.80%`` (``-`` for none)."""
    return "-" if fraction is None else f"{fraction * 100:.2f}%"

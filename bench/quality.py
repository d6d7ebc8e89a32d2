"""INT8 quality tables: one ``quantize`` run per row, same model, same calibration and
evaluation images, results as a markdown table.

    python bench/quality.py ablation --variant s1 --weights demo --work /tmp/ablation
    python bench/quality.py methods --variant s1 --weights demo --train DIR --work /tmp/methods

``ablation``: what each post-training technique (``--ptq``) buys. ``methods``: plain
calibration, TFLite's calibrator, all PTQ techniques, data-free calibration and QAT.

Columns: INT8 top-1 and its drop against PyTorch FP32, top-1 agreement with FP32, the logit
SQNR (FP32 logits' power over the INT8 error's, dB: the least noisy of the four), the worst
tensor's own SQNR from the run's error table, and the INT8 file size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ABLATION = [
    ("min/max (baseline, default)", {"ptq": "none"}),
    ("+ scale-star", {"ptq": "scale-star"}),
    ("+ scale-dw", {"ptq": "scale-dw"}),
    ("+ scale-g", {"ptq": "scale-g"}),
    ("+ bias-correct", {"ptq": "bias-correct"}),
    ("+ mse-ranges", {"ptq": "mse-ranges"}),
    ("scale-star + mse-ranges", {"ptq": "scale-star,mse-ranges"}),
    ("all five", {"ptq": "all"}),
]


def methods(train: str | None, qat_steps: int) -> list:
    rows = [
        ("PTQ min/max (default)", {}),
        ("PTQ, TFLite calibrator", {"calibrator": "tflite"}),
        ("PTQ, all five techniques", {"ptq": "all"}),
        ("PTQ, data-free (`--calib distilled`)", {"calib": "distilled"}),
    ]
    if train:
        rows.append((f"QAT ({qat_steps} steps)", {"qat": True, "train": train, "qat_steps": qat_steps}))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=["ablation", "methods"])
    ap.add_argument("--train", default=None, help="QAT images (methods table; no QAT row without)")
    ap.add_argument("--qat-steps", type=int, default=300)
    ap.add_argument("--variant", default="s1")
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--eval", default=None)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args(argv)

    from edgestar import QuantizeConfig, quantize

    rows = ABLATION if args.table == "ablation" else methods(args.train, args.qat_steps)
    lines = ["| method | INT8 top-1 | drop, pt (95 % interval) | agreement | logit SQNR | worst tensor own SQNR | INT8 bytes |",
             "|---|---|---|---|---|---|---|"]
    for i, (label, options) in enumerate(rows):
        out = args.work / f"{args.table}-{i}"
        config = QuantizeConfig(**{"variant": args.variant, "weights": args.weights, "calib": args.calib,
                                   "eval": args.eval, "target": args.target, "out": out, **options})
        result = quantize(config)
        m = result.manifest["metrics"]
        errors = out / "layer_errors.json"
        worst = json.loads(errors.read_text())["tensors"][0] if errors.exists() else None
        worst_text = f"{worst['own_sqnr_db']:.1f} dB ({worst['where']})" if worst else "-"
        size = (out / result.manifest["artifacts"]["tflite_int8"]["path"]).stat().st_size
        drop, ci = m["int8_top1_drop_pt"], m["int8_top1_drop_ci95_pt"]
        lines.append(f"| {label} | {_pct(m['tflite_int8']['top1'])} | "
                     f"{'-' if drop is None else f'{drop:.2f} ({ci[0]:+.2f} to {ci[1]:+.2f})'} | "
                     f"{_pct(m['int8_agreement'])} | "
                     f"{m['int8_logit_sqnr_db']:.2f} dB | {worst_text} | "
                     f"{size:,} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print(f"{args.variant} ({args.weights}): PyTorch FP32 top-1 {_pct(m['torch_fp32']['top1'])}, "
          f"{m['eval_images']} evaluation images\n")
    print("\n".join(lines))
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


if __name__ == "__main__":
    sys.exit(main())

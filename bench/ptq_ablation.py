"""What each post-training technique buys: one ``quantize`` run per technique set, same model,
same calibration and evaluation images, results as a markdown table.

    python bench/ptq_ablation.py --variant s1 --weights demo --work /tmp/ablation

Columns: INT8 top-1 and its drop against PyTorch FP32, top-1 agreement with FP32, the logit
SQNR (FP32 logits' power over the INT8 error's, dB: the least noisy of the four), the worst
tensor's own SQNR from the run's error table, and the INT8 file size.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROWS = [
    ("min/max (baseline)", "none"),
    ("+ scale-star", "scale-star"),
    ("+ scale-dw", "scale-dw"),
    ("+ scale-g", "scale-g"),
    ("+ bias-correct", "bias-correct"),
    ("+ mse-ranges", "mse-ranges"),
    ("scale-star + mse-ranges (default)", "scale-star,mse-ranges"),
    ("all five", "all"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="s1")
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--eval", default=None)
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--only", default=None, help="--ptq specs to run, separated by semicolons (default: every row)")
    args = ap.parse_args(argv)

    from edgestar.pipeline import QuantizeConfig, quantize

    rows = [r for r in ROWS if args.only is None or r[1] in args.only.split(";")]
    lines = ["| PTQ | INT8 top-1 | drop (pt) | agreement | logit SQNR | worst tensor own SQNR | INT8 bytes |",
             "|---|---|---|---|---|---|---|"]
    for label, spec in rows:
        out = args.work / spec.replace(",", "+")
        config = QuantizeConfig(variant=args.variant, weights=args.weights, calib=args.calib,
                                eval=args.eval, target=args.target, ptq=spec, out=out)
        result = quantize(config)
        m = result.manifest["metrics"]
        table = json.loads((out / "layer_errors.json").read_text())["tensors"]
        worst = table[0]
        size = (out / result.manifest["artifacts"]["tflite_int8"]["path"]).stat().st_size
        drop = m["int8_top1_drop_pt"]
        lines.append(f"| {label} | {_pct(m['tflite_int8']['top1'])} | "
                     f"{'-' if drop is None else f'{drop:.2f}'} | {_pct(m['int8_agreement'])} | "
                     f"{m['int8_logit_sqnr_db']:.2f} dB | {worst['own_sqnr_db']:.1f} dB ({worst['where']}) | "
                     f"{size:,} |")
        print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines))
    return 0


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


if __name__ == "__main__":
    sys.exit(main())

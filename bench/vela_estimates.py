"""Arm Ethos-U NPU estimates (Vela) of edgestar's INT8 graphs against the naive route's.

    python bench/vela_estimates.py --work /tmp/vela-bench
    python bench/vela_estimates.py --variants s050 --sizes 96 --accelerators ethos-u55-128 --work DIR

For every variant and input size: one seeded random checkpoint (as ``naive_vs_edgestar.py``
makes it: random weights and BatchNorm statistics; Vela's cycle and memory estimates depend on
the graph's shapes, not on trained weights) converted three ways, each INT8 model then compiled
by Vela for every accelerator with edgestar's defaults (``edgestar.deploy.vela``):

- ``edgestar cpu``: ``quantize(QuantizeConfig(..., target="cpu"))``, the default graph;
- ``edgestar micro``: ``target="micro"``, the TFLite Micro graph (7x7 depthwise convs whole);
- ``naive``: ``torch.onnx.export`` + ``onnx2tf -oiqt -qt per-channel`` (``naive_route`` of
  ``naive_vs_edgestar.py``), its ``*_full_integer_quant.tflite``.

Prints a Markdown table (every time and memory figure is Vela's estimate, not a measurement)
and writes ``vela_estimates.json`` with every field of every estimate to the work folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_vs_edgestar import make_checkpoint, naive_int8  # noqa: E402

from edgestar import QuantizeConfig, op_counts, quantize  # noqa: E402
from edgestar.deploy.vela import vela_estimate, vela_version  # noqa: E402

GRAPHS = ("edgestar cpu", "edgestar micro", "naive")
CALIB_SAMPLES = 64  # ranges only; the graph, and so Vela's estimate, does not depend on them
EVAL_SAMPLES = 16  # quantize validates every run; a few images keep that short


def build_models(variant: str, img_size: int, work: Path) -> dict[str, Path]:
    """The three INT8 models of one seeded random checkpoint, by graph name."""
    work.mkdir(parents=True)
    args = argparse.Namespace(variant=variant, weights=None, img_size=img_size, num_classes=1000)
    weights, pre = make_checkpoint(args, work)
    models = {}
    for target in ("cpu", "micro"):
        result = quantize(QuantizeConfig(variant=variant, weights=weights, img_size=img_size, calib="demo",
                                         calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES,
                                         target=target, out=work / f"edgestar-{target}"))
        models[f"edgestar {target}"] = result.out / result.manifest["artifacts"]["tflite_int8"]["path"]
    models["naive"] = naive_int8(variant, weights, pre, work / "naive")
    return models


def kib(n: int) -> str:
    return f"{n / 1024:,.0f}"


def cpu_ops(e: dict) -> str:
    """``1 (REVERSE_V2)``, ``3 (QUANTIZE, 2 PAD)``, or ``0``."""
    if not e["cpu_ops"]:
        return "0"
    kinds = ", ".join(f"{n} {op}" if n > 1 else op for op, n in e["cpu_op_types"].items())
    return f"{e['cpu_ops']} ({kinds})"


def table(rows: list[dict]) -> str:
    lines = ["| model | px | graph | NPU | time ms (est.) | MMACs | SRAM KiB | flash KiB | DRAM KiB "
             "| ops | NPU ops | CPU ops (types) | .tflite KiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["estimate"]
        cells = [r["variant"], r["img_size"], r["graph"], e["accelerator"],
                 f"{e['inference_ms_estimate']:.2f}", f"{e['nn_macs'] / 1e6:.0f}",
                 kib(e["sram_bytes"]), kib(e["flash_bytes"]), kib(e["dram_bytes"]),
                 e["input_ops"], e["npu_ops"], cpu_ops(e), kib(e["model_bytes"])]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="s050,s1")
    ap.add_argument("--sizes", default="96,224")
    ap.add_argument("--accelerators", default="ethos-u55-128,ethos-u65-256")
    ap.add_argument("--work", type=Path, required=True, help="a new folder for the models and the JSON")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=False)
    rows = []
    t0 = time.perf_counter()
    for variant in args.variants.split(","):
        for size in map(int, args.sizes.split(",")):
            models = build_models(variant, size, args.work / f"{variant}-{size}")
            print(f"{variant} {size} px: models built ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            for graph in GRAPHS:
                for accelerator in args.accelerators.split(","):
                    # the compiled models and CSVs, one folder per graph (two share a file name)
                    keep = args.work / f"{variant}-{size}" / "vela" / graph.replace(" ", "-") / accelerator
                    estimate = vela_estimate(models[graph], accelerator=accelerator, keep_dir=keep)
                    rows.append({"variant": variant, "img_size": size, "graph": graph,
                                 "op_counts": dict(op_counts(models[graph])), "estimate": estimate})
    (args.work / "vela_estimates.json").write_text(json.dumps(
        {"vela_version": vela_version(), "rows": rows}, indent=1))
    print(f"Vela {vela_version()}; every time and memory figure is Vela's estimate, not a measurement")
    print(table(rows))


if __name__ == "__main__":
    main()

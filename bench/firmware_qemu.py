"""edgestar's `--target micro` graph against the naive route's, as firmware on an emulated Cortex-M.

    python bench/firmware_qemu.py --demo --patches --tflm-root ../shared/third_party/tflm --work /tmp/fwq
    python bench/firmware_qemu.py --cases s050:96,s1:64 --cpu cortex-m4 --tflm-root DIR --work DIR

For every case (variant:size, 10 classes): one seeded random checkpoint (as
``naive_vs_edgestar.py`` makes it; arena, flash and instruction counts depend on the graph's
shapes, not on trained weights), converted by edgestar (``quantize``, ``target="micro"``) and
by the naive route (``torch.onnx.export`` + ``onnx2tf -oiqt -qt per-channel``, its
``*_full_integer_quant.tflite``). ``--demo`` adds the shipped, trained S1 at 32 px. Each INT8
model then goes through what ``edgestar firmware --run qemu`` does:

- the arena measured by TFLite Micro's x86 interpreter (``measure_arena``);
- the sources generated, compiled with arm-none-eabi-gcc for ``--cpu`` (CMSIS-NN kernels)
  against the TFLM tree, flash and RAM read from the ELF;
- ``--patches``: also each edgestar graph rewritten by ``--patches auto`` (patch-based
  inference of the first layers; strip counts in brackets: stem pair, star chains);
- run on QEMU (Cortex-M55: mps3-an547) on ``--images`` demo images, outputs compared with the
  TFLM x86 interpreter on the same int8 inputs; the arena the firmware used; the instructions
  per inference (QEMU ``-icount``: instructions, not cycles).

Prints a Markdown table and writes ``firmware_qemu.json`` to the work folder.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_vs_edgestar import make_checkpoint, naive_int8  # noqa: E402

from edgestar import QuantizeConfig, quantize  # noqa: E402
from edgestar.deploy import firmware as fw  # noqa: E402
from edgestar.deploy.firmware_build import build, run_qemu  # noqa: E402
from edgestar.evaluate.runners import multiply_accumulates  # noqa: E402

CALIB_SAMPLES = 64
EVAL_SAMPLES = 16


def models_for(variant: str, img_size: int, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True)
    args = argparse.Namespace(variant=variant, weights=None, img_size=img_size, num_classes=10)
    weights, pre = make_checkpoint(args, work)
    result = quantize(QuantizeConfig(variant=variant, weights=weights, img_size=img_size, calib="demo",
                                     calib_samples=CALIB_SAMPLES, eval_samples=EVAL_SAMPLES,
                                     target="micro", out=work / "edgestar-micro"))
    models = {"edgestar micro": result.out / result.manifest["artifacts"]["tflite_int8"]["path"]}
    models["naive"] = naive_int8(variant, weights, pre, work / "naive")
    return models


def measure_one(model: Path, preprocessing: dict, class_names, out: Path, args, *, patches: bool = False) -> dict:
    facts = fw.model_facts(model)
    facts.preprocessing = facts.preprocessing or preprocessing  # the naive file carries no metadata
    facts.class_names = facts.class_names or class_names
    patch_info = None
    if patches:
        config = fw.FirmwareConfig(board="corstone-300", patches="auto", eval_samples=args.images)
        model, facts, patch_info = fw.patched_model(model, facts, out, config, print)
    arena = fw.measure_arena(model)
    # a generous arena: the firmware reports what it used (CMSIS-NN may need more than the host says)
    fw.generate(facts, arena, out, harness=True, reserve=2 * arena["total"] + (256 << 10), basis="a probe")
    built = build(out, facts.name, facts.ops, cpu=args.cpu, tflm_root=args.tflm_root, kernels=args.kernels,
                  log=print)
    pixels, labels, _ = fw.evaluation_pixels(facts, "demo", args.images)
    ran = run_qemu(built.elf, args.cpu, pixels, timeout_s=600)
    reference = fw.host_reference(model, facts, pixels)
    q = fw.compare_outputs(ran, reference, labels, facts)
    return {"model": str(model), "model_bytes": len(facts.data), "ops": facts.ops, "patches": patch_info,
            "macs": multiply_accumulates(model), "arena": arena, "arena_reserve": fw.arena_to_reserve(arena["total"]),
            "build": built.as_dict(), "qemu": q}


def table(rows: list[dict], cpu: str, kernels: str) -> str:
    lines = [f"| model | px | graph | MMACs | .tflite KiB | arena B (TFLM x86: activations + persistent) "
             f"| arena used on {cpu} B | flash B | instructions / inference | vs naive | bit-exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    naive = {(r["variant"], r["img_size"]): r for r in rows if r["graph"] == "naive"}
    for r in rows:
        q, a, b = r["qemu"], r["arena"], r["build"]
        base = naive.get((r["variant"], r["img_size"]))
        ratio = (f"{q['instructions_median'] / base['qemu']['instructions_median']:.2f}"
                 if base and r is not base else "—")
        exact = f"{q['bit_exact_images']}/{q['images']}" + ("" if q["bit_exact"] else f" (max {q['max_abs_diff_lsb']} LSB)")
        graph = r["graph"]
        if r.get("patches"):
            p = r["patches"]
            graph += f" ({p['strips']},{p['star_strips']})" if p.get("applied", True) else " (no gain: whole)"
        cells = [r["variant"], r["img_size"], graph, f"{r['macs'] / 1e6:.2f}", f"{r['model_bytes'] / 1024:,.0f}",
                 f"{a['total']:,} ({a['head']:,} + {a['tail']:,})", f"{q['arena_used_bytes']:,}",
                 f"{b['flash_bytes']:,}", f"{q['instructions_median']:,}", ratio, exact]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="s050:96,s1:64", help="variant:size,... [default: the issue's targets]")
    ap.add_argument("--demo", action="store_true", help="also the shipped, trained S1 at 32 px")
    ap.add_argument("--patches", action="store_true", help="also each edgestar graph with `--patches auto`")
    ap.add_argument("--cpu", default="cortex-m55")
    ap.add_argument("--kernels", default="cmsis_nn")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tflm-root", type=Path)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--table-from", type=Path, default=None, metavar="JSON",
                    help="only print the table of an earlier run's firmware_qemu.json")
    args = ap.parse_args()
    if args.table_from:
        print(table(json.loads(args.table_from.read_text()), args.cpu, args.kernels))
        return
    if not args.tflm_root or not args.work:
        ap.error("--tflm-root and --work are required")
    args.work.mkdir(parents=True, exist_ok=False)
    rows = []
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c]
    jobs = []
    for variant, size in cases:
        for graph, path in models_for(variant, size, args.work / f"{variant}-{size}").items():
            jobs.append((variant, size, graph, path))
    if args.demo:
        result = quantize(QuantizeConfig(variant="s1", weights="demo", target="micro", eval_samples=EVAL_SAMPLES,
                                         out=args.work / "demo-s1-micro"))
        jobs.append(("s1 (demo)", 32, "edgestar micro",
                     result.out / result.manifest["artifacts"]["tflite_int8"]["path"]))
    if args.patches:
        jobs += [(v, s, "edgestar micro + patches", p) for v, s, g, p in list(jobs) if g == "edgestar micro"]
    reference_meta = {}
    for variant, size, graph, path in jobs:
        facts = fw.model_facts(path)
        if facts.preprocessing:
            reference_meta[(variant, size)] = (facts.preprocessing, facts.class_names)
    for variant, size, graph, path in jobs:
        t0 = time.monotonic()
        pre, names = reference_meta[(variant, size)]
        out = args.work / "firmware" / f"{variant.split()[0]}-{size}-{graph.replace(' ', '-')}"
        row = {"variant": variant, "img_size": size, "graph": graph,
               **measure_one(path, pre, names, out, args, patches=graph.endswith("patches"))}
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"{variant} {size} {graph}: arena {row['arena']['total']:,} B, "
              f"{row['qemu']['instructions_median']:,} instructions, bit-exact {row['qemu']['bit_exact']}", flush=True)
    (args.work / "firmware_qemu.json").write_text(json.dumps(rows, indent=1, default=str))
    print()
    print(f"{args.cpu}, {args.kernels} kernels, QEMU {rows[0]['qemu']['machine']}, {args.images} demo images per model")
    print(table(rows, args.cpu, args.kernels))


if __name__ == "__main__":
    main()

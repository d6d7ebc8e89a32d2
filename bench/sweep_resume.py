"""The demo sweep's wall time, and what resuming an interrupted sweep saves.

    python bench/sweep_resume.py --work /tmp/sweeps                    # the README's demo sweep
    python bench/sweep_resume.py --work /tmp/sweeps --variants s050,s1 --kill-after 60

Three sweeps through the library (``edgestar.sweep``), one after the other on the same machine:

1. ``full``: the whole sweep from nothing, timed;
2. ``resume``: the same sweep into a second folder in a child process that is killed with
   SIGKILL after ``--kill-after`` seconds (default: half of the full sweep's time), as a
   power cut or an OOM killer would end it;
3. the same sweep again into that folder, timed: it keeps the runs that were complete and redoes
   the rest (and the bench, and the firmware of what it redid).

Then checks that the resumed sweep made the same models: every ``.tflite`` of the resumed folder
byte-identical to the full sweep's, and the same top-1 in every report row. Prints a Markdown
table and writes ``sweep_resume.json`` to ``--work``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

from edgestar import SweepConfig, sweep


def make_config(args, out: Path) -> SweepConfig:
    return SweepConfig(variants=tuple(args.variants.split(",")), out=out, bench=args.bench or None,
                       firmware=tuple(b for b in args.firmware.split(",") if b))


def _child(args, out):
    sweep(make_config(args, out))


def digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tflite")) if "firmware-" not in str(p)}


def top1s(folder: Path) -> dict:
    rows = json.loads((folder / "report.json").read_text())["rows"]
    return {f"{r['variant']}-{r['img_size']}-{r['precision']}": r.get("top1") for r in rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--variants", default="s050,s100,s150,s1")
    ap.add_argument("--bench", default="local", help="bench device ('' for none)")
    ap.add_argument("--firmware", default="corstone-300,nano33ble", help="boards ('' for none)")
    ap.add_argument("--kill-after", type=float, default=None, help="seconds [default: half the full sweep]")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    full, resumed = args.work / "full", args.work / "resume"
    for folder in (full, resumed):
        if folder.exists() and any(folder.iterdir()):
            raise SystemExit(f"{folder} is not empty: give a new --work")

    t0 = time.perf_counter()
    first = sweep(make_config(args, full), log=lambda m: print(f"[full] {m}", flush=True))
    full_s = time.perf_counter() - t0

    kill_after = args.kill_after or full_s / 2
    child = multiprocessing.get_context("spawn").Process(target=_child, args=(args, resumed))
    child.start()
    child.join(kill_after)
    killed = child.is_alive()
    if killed:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    complete_before = sum(1 for m in resumed.glob("*/manifest.json")
                          if json.loads(m.read_text()).get("status") == "ok" and
                          (json.loads(m.read_text()).get("sweep") or {}).get("key"))
    t0 = time.perf_counter()
    again = sweep(make_config(args, resumed), log=lambda m: print(f"[resume] {m}", flush=True))
    resume_s = time.perf_counter() - t0

    same_files = digests(full) == digests(resumed)
    same_top1 = top1s(full) == top1s(resumed)
    kept = [c["name"] for c in again.combinations if c["reused"]]
    record = json.loads((resumed / "sweep.json").read_text())
    result = {"variants": args.variants, "bench": args.bench, "firmware": args.firmware,
              "full_s": round(full_s, 1), "killed_after_s": round(kill_after, 1), "killed": killed,
              "complete_when_killed": complete_before, "resume_s": round(resume_s, 1),
              "runs": len(again.combinations), "kept": kept, "saved_by_resume_s": record["saved_by_resume_s"],
              "tflite_byte_identical": same_files, "same_top1": same_top1,
              "failed": [c["name"] for c in first.failed + again.failed]}
    (args.work / "sweep_resume.json").write_text(json.dumps(result, indent=1))
    print()
    print("| sweep | wall time | runs made | runs kept |")
    print("|---|---|---|---|")
    print(f"| full, from nothing | {full_s:.0f} s | {len(first.combinations)} | 0 |")
    print(f"| interrupted (SIGKILL) | {kill_after:.0f} s | {complete_before} complete | — |")
    print(f"| resumed | {resume_s:.0f} s | {len(again.combinations) - len(kept)} | {len(kept)} |")
    print(f"\nafter the interruption, resuming took {resume_s:.0f} s where starting again takes {full_s:.0f} s "
          f"(saved {full_s - resume_s:.0f} s; sweep.json: the kept runs had taken {record['saved_by_resume_s']} s); "
          f".tflite files byte-identical to the full sweep's: {same_files}; same top-1 in every row: {same_top1}")


if __name__ == "__main__":
    main()

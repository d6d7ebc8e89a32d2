"""Wall time and peak memory of one command, including its child processes.

    python bench/measure.py [--repeat N] -- edgestar quantize --variant s1 --weights demo

Peak memory is reported two ways, both sampled every 50 ms over this run's process tree only:
the peak of the summed RSS of the whole tree (edgestar's converter runs as a child while the
parent works) and the largest RSS any single process of the tree reached. (getrusage's
RUSAGE_CHILDREN is not used: it is a running maximum over every child this script ever
waited for, so it would carry one run's peak into the next.)
"""
import argparse
import platform
import subprocess
import sys
import threading
import time

import psutil


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(summed RSS, largest single RSS) of ``proc`` and its descendants now."""
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return sum(sizes), max(sizes, default=0)


def measure(cmd: list[str], env: dict | None = None) -> dict:
    peak = peak_single = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ps = psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        nonlocal peak, peak_single
        while not done.is_set():
            try:
                total, single = tree_rss(ps)
                peak, peak_single = max(peak, total), max(peak_single, single)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line] or lines
    error = errors[-1].strip()[:300] if proc.returncode != 0 and errors else None
    return {"wall_s": wall, "peak_tree_rss_mb": peak / 2**20, "max_process_rss_mb": peak_single / 2**20,
            "returncode": proc.returncode, "error": error}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")
    print(f"command: {' '.join(cmd)}")
    for i in range(args.repeat):
        r = measure([c.replace("{i}", str(i)) for c in cmd])
        if r["returncode"] != 0:
            sys.exit(f"command failed ({r['returncode']}): {r['error']}")
        print(f"run {i + 1}: wall {r['wall_s']:.1f} s, peak process-tree RSS "
              f"{r['peak_tree_rss_mb']:.0f} MiB, largest single process {r['max_process_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    main()

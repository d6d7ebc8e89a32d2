"""Does ``bench --device ssh://`` measure what ``--device local`` measures on the same machine?

    python bench/local_vs_ssh.py RUN_DIR [--repeat 4] [--runs 50] [--ssh-device ssh://board --ssh-config FILE]

Without ``--ssh-device`` it starts the tests' throwaway OpenSSH server on 127.0.0.1
(``tests/sshd.py``), so this machine is the "board". It then alternates local and ssh benches
(local, ssh, ssh, local, ...: neither side always goes first), each one ``edgestar.bench``
call with the same settings, and prints per model and kernels the median latency of every
repeat on both sides and the ratio ssh/local of their medians, plus the INT8/FP32 speed-up
each side measured. Same machine, same runner, same runtime: the two should agree within the
machine's noise, and this says how close that is.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--ssh-device", default=None)
    ap.add_argument("--ssh-config", type=Path, default=None)
    args = ap.parse_args()

    from edgestar import BenchConfig, bench

    server = None
    if args.ssh_device is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import sshd  # the tests' loopback server

        server = sshd.start(Path(tempfile.mkdtemp(prefix="edgestar-sshd-")))
        args.ssh_device, args.ssh_config = "ssh://board", server.config
    threads = tuple(int(t) for t in args.threads.split(","))
    common = dict(threads=threads, kernels=("xnnpack", "builtin"), runs=args.runs, warmup=5, write=False)
    configs = {
        "local": BenchConfig(device="local", **common),
        "ssh": BenchConfig(device=args.ssh_device, ssh_config=args.ssh_config, remote_python=sys.executable,
                           **common),
    }
    medians: dict[tuple, dict[str, list]] = {}
    speedups: dict[tuple, dict[str, list]] = {}
    try:
        for i in range(args.repeat):
            order = ["local", "ssh"] if i % 2 == 0 else ["ssh", "local"]
            for side in order:
                result = bench([args.run_dir], configs[side])
                for row in result.rows:
                    if row["kernels"] == "onnxruntime":
                        continue  # the host only
                    key = (row["model"], row["kernels"], row["threads"])
                    medians.setdefault(key, {"local": [], "ssh": []})[side].append(row["median_ms"])
                    if row["vs_fp32"]:
                        speedups.setdefault(key, {"local": [], "ssh": []})[side].append(row["vs_fp32"]["median"])
                print(f"repeat {i + 1}/{args.repeat}: {side} done", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.folder, ignore_errors=True)  # the mkdtemp folder: throwaway keys included

    print(f"{args.repeat} repeats x {args.runs} interleaved rounds, {', '.join(map(str, threads))} thread(s); "
          "median ms of each repeat")
    print(f"{'model':<12} {'kernels':<8} {'thr':>3}  {'local (each repeat)':<30} {'ssh (each repeat)':<30} ssh/local")
    for key, sides in medians.items():
        ratio = statistics.median(sides["ssh"]) / statistics.median(sides["local"])
        fmt = lambda xs: " ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"{key[0]:<12} {key[1]:<8} {key[2]:>3}  {fmt(sides['local']):<30} {fmt(sides['ssh']):<30} {ratio:.3f}")
    print("\nINT8/FP32 speed-up (median of per-round ratios), each repeat")
    for key, sides in speedups.items():
        fmt = lambda xs: " ".join(f"x{x:.2f}" for x in xs)  # noqa: E731
        print(f"{key[0]:<12} {key[1]:<8} {key[2]:>3}  local {fmt(sides['local'])}   ssh {fmt(sides['ssh'])}")


if __name__ == "__main__":
    main()

"""edgestar's INT8 route against the route a user takes by hand, from one checkpoint.

    python bench/naive_vs_edgestar.py --variant s1 --img-size 224 --num-classes 1000 --work /tmp/nve
    python bench/naive_vs_edgestar.py --variant s1 --weights demo --img-size 32 --work /tmp/nve-demo

Naive route: ``torch.onnx.export`` (opset 17) of the eval-mode model, then ``onnx2tf -oiqt
-qt per-channel`` with its defaults (run offline: its 20-image sample file is made from our
calibration images and placed in its working directory). edgestar's route: the whole
``edgestar quantize`` run (export, convert, calibrate on 200 images, validate on 500).

Without ``--weights`` the checkpoint is the variant with seeded random weights and random
BatchNorm statistics (so folded biases are not all zero, as in any trained model). Latency is
measured with ai-edge-litert (XNNPACK) at 1 and 2 threads, models interleaved round by round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402

from edgestar import (OnnxRunner, Preprocessing, TFLiteRunner, TorchRunner, build_model,  # noqa: E402
                      calibration_inputs, evaluation_set, op_counts, save_checkpoint)
from edgestar.convert.tflite_file import grouped_convs  # noqa: E402
from edgestar.data.images import load_batch  # noqa: E402
from edgestar.models.starnet import count_params, create_model  # noqa: E402

BIN = Path(sys.executable).parent


def make_checkpoint(args, work: Path) -> tuple[str, Preprocessing]:
    if args.weights:
        model, ckpt = build_model(args.variant, args.weights)
        pre = (ckpt.preprocessing or Preprocessing(224)).with_size(args.img_size)
        return args.weights, pre
    torch.manual_seed(0)
    model = create_model(args.variant, num_classes=args.num_classes).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    pre = Preprocessing(args.img_size)
    path = work / "checkpoint.pt"
    save_checkpoint(path, model, variant=args.variant, preprocessing=pre)
    return str(path), pre


def checkpoint_arguments(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark here shares: which model, and a fresh work folder."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="s1")
    ap.add_argument("--weights", default=None, help="checkpoint path or 'demo' [default: seeded random]")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--work", type=Path, required=True)
    return ap


def prepare(args):
    """Create the work folder and the checkpoint; return (weights, preprocessing, model)."""
    args.work.mkdir(parents=True, exist_ok=False)
    weights, pre = make_checkpoint(args, args.work)
    model, _ = build_model(args.variant, weights)
    return weights, pre, model


def naive_route(model, pre: Preprocessing, calib: np.ndarray, work: Path) -> dict:
    """torch.onnx.export + `onnx2tf -oiqt -qt per-channel`, timed as a command."""
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / "naive.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, pre.img_size, pre.img_size),), str(onnx_path),
                      input_names=["input"], output_names=["logits"], opset_version=17, dynamo=False)
    pixels = calib[:20].transpose(0, 2, 3, 1) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)
    np.save(work / "calibration_image_sample_data_20x128x128x3_float32.npy",
            np.clip(pixels, 0, 1).astype(np.float32))
    cmd = [str(BIN / "onnx2tf"), "-i", str(onnx_path), "-o", str(work / "out"), "-oiqt",
           "-qt", "per-channel", "-osd"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        stats = measure(cmd, env=env)
    finally:
        os.chdir(cwd)
    return {"onnx": onnx_path, "fp32": work / "out" / "naive_float32.tflite",
            "int8": work / "out" / "naive_full_integer_quant.tflite", **stats}


def naive_int8(variant: str, weights: str, pre: Preprocessing, work: Path) -> Path:
    """The naive route's full-integer INT8 model of a checkpoint (20 demo calibration images);
    exits with the converter's error when it fails."""
    model, _ = build_model(variant, weights)
    calib, _ = calibration_inputs("demo", pre, samples=20)
    naive = naive_route(model, pre, calib, work)
    if naive["returncode"] != 0 or not naive["int8"].exists():
        sys.exit(f"the naive route failed for {variant} at {pre.img_size} px: {naive['error']}")
    return naive["int8"]


def edgestar_route(weights: str, args, calib_npy: Path, out: Path) -> dict:
    cmd = [str(BIN / "edgestar"), "quantize", "--variant", args.variant, "--weights", weights,
           "--img-size", str(args.img_size), "--calib", str(calib_npy), "--calib-samples", "200",
           "--eval-samples", "500", "--target", args.target, "--out", str(out), "--json", "-q"]
    if args.num_classes and not args.weights:
        cmd += ["--num-classes", str(args.num_classes)]
    stats = measure(cmd)
    if stats["returncode"] != 0:
        sys.exit(f"edgestar quantize failed: {stats['error']}")
    manifest = json.loads((out / "manifest.json").read_text())
    art = manifest["artifacts"]
    return {"onnx": out / art["onnx"]["path"], "fp32": out / art["tflite_fp32"]["path"],
            "int8": out / art["tflite_int8"]["path"], "manifest": manifest, **stats}


def latency_ms(paths: dict[str, Path], onnx_path: Path, img_size: int, threads: int,
               rounds: int, iters: int) -> dict[str, float]:
    """Median per-inference latency, the models interleaved within every round."""
    x = np.random.default_rng(0).standard_normal((1, 3, img_size, img_size)).astype(np.float32)
    runners = {f"{name}, XNNPACK": TFLiteRunner(p, num_threads=threads) for name, p in paths.items()}
    runners.update({f"{name}, builtin kernels": TFLiteRunner(p, num_threads=threads, xnnpack=False)
                    for name, p in paths.items()})
    runners["onnxruntime fp32 (edgestar ONNX)"] = OnnxRunner(onnx_path, num_threads=threads)
    samples = {name: [] for name in runners}
    for run in runners.values():
        for _ in range(5):
            run(x)
    for _ in range(rounds):
        for name, run in runners.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                run(x)
            samples[name].append((time.perf_counter() - t0) / iters * 1000)
    return {name: statistics.median(v) for name, v in samples.items()}


def accuracy_against_torch(model, paths: dict[str, Path], folder, pre) -> dict:
    torch_run = TorchRunner(model)
    runners = {name: TFLiteRunner(p) for name, p in paths.items()}
    agree = {n: 0 for n in runners}
    max_diff = {n: 0.0 for n in runners}
    files = [p for p, _ in folder.samples]
    for i in range(0, len(files), 100):
        x = load_batch(files[i:i + 100], pre)
        ref = torch_run(x)
        for name, run in runners.items():
            y = run(x)
            agree[name] += int((y.argmax(1) == ref.argmax(1)).sum())
            max_diff[name] = max(max_diff[name], float(np.abs(y - ref).max()))
    return {n: {"agreement": agree[n] / len(files), "max_abs_logit_diff": max_diff[n]} for n in runners}


def main():
    ap = checkpoint_arguments(__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--target", default="cpu", choices=["cpu", "micro"], help="edgestar quantize --target")
    ap.add_argument("--conversions", type=int, default=2,
                    help="conversions per route, alternating naive/edgestar; medians reported")
    args = ap.parse_args()
    weights, pre, model = prepare(args)
    params = count_params(model)
    calib, _ = calibration_inputs("demo", pre, samples=200)
    calib_npy = args.work / "calib.npy"
    np.save(calib_npy, calib)

    # The routes alternate, so slow phases of this shared machine hit both alike.
    naive_runs, our_runs = [], []
    for i in range(args.conversions):
        naive_runs.append(naive_route(model, pre, calib, args.work / f"naive{i}"))
        our_runs.append(edgestar_route(weights, args, calib_npy, args.work / f"edgestar{i}"))
    naive, ours = naive_runs[0], our_runs[0]
    medians = {(route, key): statistics.median([r[key] for r in runs])
               for route, runs in (("naive", naive_runs), ("edgestar", our_runs))
               for key in ("wall_s", "peak_tree_rss_mb")}
    print("conversion wall s, naive:", [r["wall_s"] for r in naive_runs],
          "edgestar:", [r["wall_s"] for r in our_runs])
    print("peak RSS MiB, naive:", [r["peak_tree_rss_mb"] for r in naive_runs],
          "edgestar:", [r["peak_tree_rss_mb"] for r in our_runs])

    naive_ok = naive["returncode"] == 0 and naive["int8"].exists() and naive["fp32"].exists()
    artifacts = {"edgestar int8": ours["int8"], "edgestar fp32": ours["fp32"]}
    if naive_ok:
        artifacts.update({"naive int8": naive["int8"], "naive fp32": naive["fp32"]})
    lat = {t: latency_ms(artifacts, ours["onnx"], pre.img_size, t, args.rounds, args.iters) for t in (1, 2)}
    folder = evaluation_set("demo", samples=500)
    acc = accuracy_against_torch(model, artifacts, folder, pre)

    rows = []
    failed = f"failed: {naive['error']}" if not naive_ok else None

    def row(label, naive_v, ours_v, fmt="{:.3g}", ratio=True):
        shown = fmt.format(naive_v) if naive_v is not None else "n/a"
        r = f"{ours_v / naive_v:.2f}" if ratio and naive_v else "—"
        rows.append(f"| {label} | {shown} | {fmt.format(ours_v)} | {r} |")

    def naive_value(fn):
        return fn() if naive_ok else None

    n_ops = op_counts(naive["int8"]) if naive_ok else {}
    o_ops = op_counts(ours["int8"])
    for op in sorted(set(n_ops) | set(o_ops)):
        row(f"INT8 ops: {op}", naive_value(lambda: n_ops.get(op, 0)), o_ops.get(op, 0), "{}", ratio=False)
    row("INT8 grouped CONV_2D", naive_value(lambda: grouped_convs(naive["int8"])),
        grouped_convs(ours["int8"]), "{}", ratio=False)
    row("INT8 bytes", naive_value(lambda: naive["int8"].stat().st_size), ours["int8"].stat().st_size, "{:,}")
    row("INT8 bytes / parameter", naive_value(lambda: naive["int8"].stat().st_size / params),
        ours["int8"].stat().st_size / params, "{:.4f}")
    for kernels in ("XNNPACK", "builtin kernels"):
        for t in (1, 2):
            row(f"INT8 latency, {kernels}, {t} thread(s), ms",
                naive_value(lambda: lat[t][f"naive int8, {kernels}"]),
                lat[t][f"edgestar int8, {kernels}"], "{:.2f}")
    for t in (1, 2):
        best_ours = min(lat[t]["edgestar int8, XNNPACK"], lat[t]["edgestar int8, builtin kernels"])
        row(f"INT8 latency, best kernels of each, {t} thread(s), ms",
            naive_value(lambda: min(lat[t]["naive int8, XNNPACK"], lat[t]["naive int8, builtin kernels"])),
            best_ours, "{:.2f}")
    row("conversion wall time, s, median (naive: onnx2tf -oiqt; edgestar: whole quantize run)",
        medians["naive", "wall_s"], medians["edgestar", "wall_s"], "{:.1f}")
    row("peak process-tree RSS, MiB, median", medians["naive", "peak_tree_rss_mb"],
        medians["edgestar", "peak_tree_rss_mb"], "{:.0f}")
    row("FP32 TFLite vs PyTorch max |dlogit| (500 images)",
        naive_value(lambda: acc["naive fp32"]["max_abs_logit_diff"]),
        acc["edgestar fp32"]["max_abs_logit_diff"], "{:.2e}", ratio=False)
    row("INT8 top-1 agreement with PyTorch (500 images)", naive_value(lambda: acc["naive int8"]["agreement"]),
        acc["edgestar int8"]["agreement"], "{:.3f}", ratio=False)

    print(f"StarNet-{args.variant}, {pre.img_size} px, {model.num_classes} classes, {params:,} parameters, "
          f"weights: {args.weights or 'seeded random (random BN statistics)'}")
    if failed:
        print(f"\nnaive route {failed}")
    print("\n| measure | naive route | edgestar | edgestar / naive |\n|---|---|---|---|")
    print("\n".join(rows))
    print("\nLatency, ms (median of rounds; models interleaved in each round):")
    print("| model | 1 thread | 2 threads |\n|---|---|---|")
    for name in lat[1]:
        print(f"| {name} | {lat[1][name]:.2f} | {lat[2][name]:.2f} |")
    (args.work / "results.json").write_text(json.dumps(
        {"latency_ms": lat, "accuracy": acc, "naive": {k: str(v) for k, v in naive.items()},
         "edgestar": {k: str(v) for k, v in ours.items() if k != "manifest"}}, indent=1))


if __name__ == "__main__":
    main()

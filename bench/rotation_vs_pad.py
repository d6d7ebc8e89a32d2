"""Latency of the rotate-180 graph (one REVERSE_V2) against the same graph with PADs.

    python bench/rotation_vs_pad.py --variant s1 --img-size 224 --work /tmp/rot

Both INT8 models come from one checkpoint (seeded random weights with random BN statistics
unless --weights is given) and the same 50 calibration images; latency is the median of 9
interleaved rounds of 15 invocations, XNNPACK and builtin kernels, 1 and 2 threads.
"""
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from naive_vs_edgestar import checkpoint_arguments, prepare  # noqa: E402

from edgestar import TFLiteRunner, calibration_inputs, op_counts  # noqa: E402
from edgestar.convert.client import convert  # noqa: E402
from edgestar.export.onnx_export import export_onnx  # noqa: E402
from edgestar.models.starnet import fold_batchnorms  # noqa: E402


def main():
    args = checkpoint_arguments(__doc__).parse_args()
    _, pre, model = prepare(args)
    folded = fold_batchnorms(model)
    calib, _ = calibration_inputs("demo", pre, samples=50)
    models = {}
    for tag, rotate in (("rotate-180", True), ("PAD", False)):
        onnx_path = args.work / f"{tag}.onnx"
        export_onnx(folded, pre.img_size, onnx_path, rotate=rotate)
        outputs = {"int8": args.work / f"{tag}_int8.tflite"}
        convert(onnx_path, outputs, log_path=args.work / f"{tag}.log", calibration=calib,
                io_type="int8", metadata={}, mean=pre.mean, std=pre.std)
        models[tag] = outputs["int8"]
        print(f"{tag}: {dict(sorted(op_counts(outputs['int8']).items()))}")
    x = np.random.default_rng(0).standard_normal((1, 3, pre.img_size, pre.img_size)).astype(np.float32)
    print(f"\nStarNet-{args.variant} INT8, {pre.img_size} px, median ms\n")
    print("| kernels | threads | rotate-180 | PAD | ratio |\n|---|---|---|---|---|")
    for xnnpack in (True, False):
        for threads in (1, 2):
            runners = {t: TFLiteRunner(p, num_threads=threads, xnnpack=xnnpack) for t, p in models.items()}
            samples = {t: [] for t in runners}
            for run in runners.values():
                for _ in range(5):
                    run(x)
            for _ in range(9):
                for t, run in runners.items():
                    t0 = time.perf_counter()
                    for _ in range(15):
                        run(x)
                    samples[t].append((time.perf_counter() - t0) / 15 * 1000)
            rot, pad = (statistics.median(samples[t]) for t in ("rotate-180", "PAD"))
            print(f"| {'XNNPACK' if xnnpack else 'builtin'} | {threads} | {rot:.2f} | {pad:.2f} | {rot / pad:.2f} |")


if __name__ == "__main__":
    main()

"""How much INT8 noise a model's top-1 can take: where the INT8-vs-FP32 agreement is decided.

    python bench/agreement.py --variant s1 --weights demo [--train DIR --qat-steps 300]

Three measurements on the evaluation images, all in PyTorch with edgestar's INT8 simulation
(:func:`edgestar.qat.simulate`, which agrees with the converted TFLite model on 99.7-100 %
of images, see bench/RESULTS.md):

1. the bound: top-1 agreement of the FP32 logits with themselves plus i.i.d. Gaussian noise
   at a given logit SQNR. It depends only on how many images the FP32 model decides by a
   small margin, and says what logit SQNR an agreement target needs;
2. the budget: the logit SQNR and agreement when only one kind of tensor is quantized (the
   weights; or one role of activation: star products, residual adds, ...), the rest float;
   noise powers roughly add, so this says where the INT8 error comes from;
3. all of it together: plain min/max PTQ, and QAT (``--train``) from the same ranges.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import sys

import numpy as np

NOISE_DB = (24, 26, 28, 30, 32, 34, 36, 40)
DRAWS = 20

ROLES = {  # fx name pattern of the tensor's producer -> what it is in a StarNet block
    "x": "network input",
    "stem": "stem conv (ReLU6)",
    "conv": "downsampling conv",
    "dwconv.conv": "first depthwise 7x7",
    "act": "ReLU6(f1) branch",
    "f2.conv": "f2 branch",
    "mul": "star product ReLU6(f1)*f2",
    "g.conv": "g (1x1 after the product)",
    "dwconv2.conv": "second depthwise 7x7",
    "add": "residual add",
    "mean": "pooled features",
    "head": "logits",
}


def role(label: str) -> str:
    """``stages.1.2.f2.conv`` -> ``f2.conv``; ``mul after ...`` -> ``mul``."""
    first = label.split(" ")[0]
    return "stem" if first.startswith("stem") else re.sub(r"^stages\.\d+\.(\d+\.)?", "", first)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="s1")
    ap.add_argument("--weights", default="demo")
    ap.add_argument("--calib", default="demo")
    ap.add_argument("--calib-samples", type=int, default=300)
    ap.add_argument("--eval", default="demo")
    ap.add_argument("--train", default=None, help="images for a QAT row (none without)")
    ap.add_argument("--qat-steps", type=int, default=300)
    args = ap.parse_args(argv)

    import torch
    from torch import nn

    from edgestar.quant.ranges import trace
    from edgestar.models.checkpoints import build_model
    from edgestar.data.images import batches, calibration_inputs, evaluation_set, load_images, qat_images
    from edgestar.quant.diagnose import node_labels
    from edgestar import QuantizeConfig
    from edgestar.pipeline.torch_work import fold_for_target, preprocessing_for
    from edgestar.quant.ptq import calibration_ranges
    from edgestar.quant.qat import QATConfig, QConv2d, QLinear, finetune, quantized_nodes, simulate
    from edgestar.evaluate.validate import proportion_interval

    torch.manual_seed(0)
    model, ckpt = build_model(args.variant, args.weights)
    pre = preprocessing_for(QuantizeConfig(variant=args.variant, weights=args.weights), ckpt)
    calib, _ = calibration_inputs(args.calib, pre, samples=args.calib_samples, seed=0)
    folded = fold_for_target(model, calib, pre, "cpu", (), {}).eval()
    folder = evaluation_set(args.eval)
    x_eval = load_images([p for p, _ in folder.samples], pre)
    gm = trace(folded)
    ranges = calibration_ranges(gm, lambda: batches(calib, 64), mse=False)

    def logits(m) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([m(torch.from_numpy(b)) for b in batches(x_eval, 250)]).numpy()

    ref = logits(folded)
    top = ref.argmax(1)
    n = len(ref)

    def row(name: str, out: np.ndarray) -> str:
        k = int((out.argmax(1) == top).sum())
        lo, hi = proportion_interval(k, n)
        db = 10 * np.log10((ref ** 2).sum() / max(((out - ref) ** 2).sum(), 1e-30))
        return f"| {name} | {db:.1f} dB | {100 * k / n:.1f} % ({100 * lo:.1f}-{100 * hi:.1f}) |"

    ordered = np.sort(ref, 1)
    margin = ordered[:, -1] - ordered[:, -2]
    print(f"{args.variant} ({args.weights}), {n} evaluation images; FP32 top-1 margin (logit units, "
          f"logit RMS {np.sqrt((ref ** 2).mean()):.2f}): 1 % of images below "
          f"{np.quantile(margin, 0.01):.3f}, 5 % below {np.quantile(margin, 0.05):.3f}\n")

    print("| i.i.d. logit noise | mean agreement over 20 draws |\n|---|---|")
    rng = np.random.default_rng(0)
    power = (ref ** 2).mean()
    for db in NOISE_DB:
        agree = [((ref + rng.normal(size=ref.shape) * math.sqrt(power / 10 ** (db / 10))).argmax(1) == top).mean()
                 for _ in range(DRAWS)]
        print(f"| {db} dB | {100 * np.mean(agree):.2f} % |")

    labels = node_labels(gm)
    by_role: dict[str, set] = {}
    for name in quantized_nodes(gm):
        by_role.setdefault(role(labels.get(name, name)), set()).add(name)

    def only(keep: set, weights: bool):
        sim = simulate(copy.deepcopy(folded), ranges).eval()
        for name, module in list(sim.named_modules()):
            if name.startswith("act_quant_") and name[len("act_quant_"):] not in keep:
                module.forward = lambda x: x  # this activation stays float
            if isinstance(module, (QConv2d, QLinear)) and not weights:
                module.__class__ = nn.Conv2d if isinstance(module, QConv2d) else nn.Linear
        return sim

    print("\n| quantized alone (rest float) | logit SQNR | agreement (95 % interval) |\n|---|---|---|")
    print(row("weights (per-channel int8)", logits(only(set(), True))))
    for key, names in sorted(by_role.items(), key=lambda kv: list(ROLES).index(kv[0]) if kv[0] in ROLES else 99):
        print(row(f"{ROLES.get(key, key)} ({len(names)})", logits(only(names, False))))

    print("\n| all INT8 | logit SQNR | agreement (95 % interval) |\n|---|---|---|")
    print(row("PTQ min/max", logits(simulate(copy.deepcopy(folded), ranges).eval())))
    if args.train:
        qat = finetune(folded, qat_images(args.train), pre, ranges, config=QATConfig(max_steps=args.qat_steps))
        print(row(f"QAT {args.qat_steps} steps", logits(qat.simulated)))
        print(row("QAT's float model (its drift alone)", logits(qat.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

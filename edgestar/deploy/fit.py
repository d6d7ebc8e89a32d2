"""When a model does not fit a board: the largest StarNet variant and input size that would.

Two sources, labelled as what they are:

- **measured**: the user's other INT8 ``--target micro`` runs beside this one (sibling run
  directories): each model's bytes and its arena measured in TFLite Micro's interpreter.
- **estimated**: every variant at every input size from 32 to 224 px, scaled from this model's
  own measurements. Flash: bytes per parameter × the variant's parameters. Arena: this model's
  activation peak and persistent part, scaled by the ratio of an analytic proxy for each (the
  largest set of int8 maps alive at once in StarNet's op sequence; the number of per-channel
  quantized outputs). The proxies know StarNet's structure, not TFLite Micro's planner: these are
  estimates, never printed as measurements.
"""
from __future__ import annotations

from pathlib import Path

from edgestar.models.registry import STEM_CHANNELS, VARIANTS, VariantSpec

SIZES = tuple(range(32, 225, 32))


def params(spec: VariantSpec, num_classes: int) -> int:
    """Parameters of the BatchNorm-folded network (conv weights + biases, the head)."""
    total = STEM_CHANNELS * 3 * 9 + STEM_CHANNELS
    cin = STEM_CHANNELS
    for i, depth in enumerate(spec.depths):
        dim = spec.base_dim * 2 ** i
        hidden = spec.mlp_ratio * dim
        total += dim * cin * 9 + dim
        per_block = (dim * 49 + dim) * 2 + 2 * (hidden * dim + hidden) + dim * hidden + dim
        total += depth * per_block
        cin = dim
    return total + cin * num_classes + num_classes


def per_channel_outputs(spec: VariantSpec, num_classes: int) -> int:
    """Output channels of every conv and the head: what TFLite Micro keeps per channel."""
    total = STEM_CHANNELS
    for i, depth in enumerate(spec.depths):
        dim = spec.base_dim * 2 ** i
        total += dim + depth * (3 * dim + 2 * spec.mlp_ratio * dim)
    return total + num_classes


def macs(spec: VariantSpec, size: int, num_classes: int) -> int:
    """Multiply-accumulates of one inference (convs and the head; the star's MUL and the adds are
    elementwise and not counted)."""
    h = size // 2
    total = h * h * STEM_CHANNELS * 3 * 9
    cin = STEM_CHANNELS
    for i, depth in enumerate(spec.depths):
        h //= 2
        dim = spec.base_dim * 2 ** i
        hidden = spec.mlp_ratio * dim
        total += h * h * dim * cin * 9
        total += depth * h * h * (2 * dim * 49 + 3 * hidden * dim)
        cin = dim
    return total + cin * num_classes


def activation_peak(spec: VariantSpec, size: int, *, rotated: bool = True) -> int:
    """The largest sum of int8 maps alive at once, op by op (input, stem, each downsampling conv,
    each block's dwconv, f1/f2, star, g, dwconv2, residual add)."""
    inp = size * size * 3
    h = size // 2
    peak = 2 * inp if rotated else inp
    peak = max(peak, inp + h * h * STEM_CHANNELS)
    prev = h * h * STEM_CHANNELS
    for i, depth in enumerate(spec.depths):
        h //= 2
        dim = spec.base_dim * 2 ** i
        x = h * h * dim
        hid = spec.mlp_ratio * x
        peak = max(peak, prev + x)
        if depth:
            peak = max(peak, 2 * x + 2 * hid, x + 3 * hid, 2 * x + hid, 3 * x)
        prev = x
    return peak


def estimate(spec: VariantSpec, size: int, num_classes: int, *, base: dict) -> dict:
    """Model bytes and arena of ``spec`` at ``size``, scaled from ``base`` (this model's measured
    ``variant``, ``img_size``, ``model_bytes``, ``head``, ``tail``, ``num_classes``, ``rotated``)."""
    ref = VARIANTS[base["variant"]]
    nc0 = base["num_classes"]
    per_param = base["model_bytes"] / params(ref, nc0)
    head = base["head"] * activation_peak(spec, size, rotated=base["rotated"]) / activation_peak(
        ref, base["img_size"], rotated=base["rotated"])
    tail = base["tail"] * per_channel_outputs(spec, num_classes) / per_channel_outputs(ref, nc0)
    return {"variant": spec.name, "img_size": size, "model_bytes": round(per_param * params(spec, num_classes)),
            "arena_bytes": round(head + tail)}


def _rank(variant: str) -> tuple:
    spec = VARIANTS[variant]
    return (params(spec, 10), variant)


def suggest(board, *, base: dict, measured: list[dict]) -> dict:
    """What fits ``board``: ``measured`` candidates (dicts with variant, img_size, model,
    model_bytes, arena_bytes) and estimates for every variant and size. Returns the best fitting
    of each kind (largest variant, then largest size) and, estimated, the largest size of this
    model's own variant that fits."""
    from edgestar.deploy.boards import verdict
    from edgestar.deploy.firmware import arena_to_reserve

    def fits(c):
        return verdict(board, model_bytes=c["model_bytes"], arena_bytes=arena_to_reserve(c["arena_bytes"]))["fits"]

    def best(cands):
        ok = [c for c in cands if c.get("variant") in VARIANTS and fits(c)]
        return max(ok, key=lambda c: (_rank(c["variant"]), c["img_size"]), default=None)

    nc = base["num_classes"]
    estimates = [estimate(spec, s, nc, base=base) for spec in VARIANTS.values() for s in SIZES]
    same = [c for c in estimates if c["variant"] == base["variant"]]
    return {
        "variant": base["variant"], "img_size": base["img_size"],
        "measured": best(measured),
        "estimated": best(estimates),
        "estimated_same_variant": best(same),
        "method": "estimates: this model's bytes per parameter and measured arena, scaled by StarNet's "
                  "activation and per-channel counts (edgestar.deploy.fit); not measured",
    }


def measured_candidates(model: Path, *, limit: int = 12, log=None) -> list[dict]:
    """INT8 micro models in the run directories beside ``model``'s, with their arenas measured."""
    from edgestar.convert.tflite_file import read_metadata
    from edgestar.deploy.firmware import measure_arena

    runs = model.parent.parent
    found = []
    for path in sorted(runs.glob("*/*_int8.tflite"))[:limit * 4]:
        if path.parent == model.parent:
            continue
        try:
            meta = read_metadata(path) or {}
        except Exception:  # not a TFLite model, or corrupt: not a candidate
            continue
        size = (meta.get("preprocessing") or {}).get("img_size")
        if meta.get("variant") in VARIANTS and size and meta.get("io_type") == "int8":
            found.append((path, meta["variant"], int(size)))
    out = []
    for path, variant, size in found[:limit]:
        try:
            arena = measure_arena(path)
        except Exception as exc:  # a model TFLM cannot allocate is no candidate
            if log:
                log(f"skipped {path}: {exc}")
            continue
        out.append({"variant": variant, "img_size": size, "model": str(path),
                    "model_bytes": path.stat().st_size, "arena_bytes": arena["total"]})
    return out

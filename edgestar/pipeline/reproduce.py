"""Re-running a recorded run: ``quantize --from-manifest RUN_DIR/manifest.json``.

:func:`config_from_manifest` rebuilds the :class:`QuantizeConfig` a manifest records (a new
output folder); :func:`compare` then says, input by input and file by file, whether the new
run reproduced the recorded one: the same inputs (sha256 of the checkpoint, the evaluation
files and the calibration tensors), the same tool versions, byte-identical ``.tflite`` files
and the same top-1.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from edgestar.errors import InputError


def config_from_manifest(path: Path, *, out: Path | None = None, allow_pickle: bool = False):
    """The configuration of the run recorded in ``path`` (a manifest, or its run directory).
    ``allow_pickle`` is never taken from the file: a manifest from elsewhere must not be able to
    turn on unpickling; the user passes ``--unsafe-allow-pickle`` again."""
    from edgestar.pipeline.config import QuantizeConfig
    from edgestar.pipeline.rundir import load_manifest

    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not path.is_dir() and path.name != "manifest.json":
        raise InputError(f"--from-manifest {path}: give a run's manifest.json or its run directory")
    manifest = load_manifest(root)
    recorded = manifest.get("config")
    if manifest.get("tool") != "edgestar quantize" or not isinstance(recorded, dict):
        raise InputError(f"--from-manifest {path}: not the manifest of an edgestar quantize run")
    known = {f.name for f in fields(QuantizeConfig)}
    unknown = sorted(set(recorded) - known)
    if unknown:
        raise InputError(f"--from-manifest {path}: options this edgestar does not have: {', '.join(unknown)}")
    values = dict(recorded)
    values["out"] = Path(out) if out else None
    values["allow_pickle"] = allow_pickle
    for key in ("formats",):
        values[key] = tuple(values.get(key) or ())
    if isinstance(values.get("ptq"), list):
        values["ptq"] = tuple(values["ptq"])
    try:
        return QuantizeConfig(**values), manifest
    except TypeError as exc:
        raise InputError(f"--from-manifest {path}: {exc}") from None


def compare(recorded: dict, new: dict) -> list[str]:
    """Lines saying what the new run reproduced of the recorded one, and what not."""
    lines = []
    for name in ("weights", "evaluation", "calibration"):
        a = (recorded.get("inputs") or {}).get(name) or {}
        b = (new.get("inputs") or {}).get(name) or {}
        if a.get("sha256") != b.get("sha256"):
            lines.append(f"DIFFERENT input: {name} (sha256 {str(a.get('sha256'))[:12]} recorded, "
                         f"{str(b.get('sha256'))[:12]} now)")
    changed = {k: (v, (new.get("versions") or {}).get(k)) for k, v in (recorded.get("versions") or {}).items()
               if (new.get("versions") or {}).get(k) != v}
    if changed:
        lines.append("DIFFERENT tools: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    same, other = [], []
    for key, art in (recorded.get("artifacts") or {}).items():
        if not key.startswith("tflite_"):
            continue
        now = (new.get("artifacts") or {}).get(key) or {}
        (same if now.get("sha256") == art.get("sha256") else other).append(key.removeprefix("tflite_"))
    if same:
        lines.append(f"byte-identical to the recorded run: {', '.join(same)} .tflite")
    if other:
        lines.append(f"DIFFERENT from the recorded run: {', '.join(other)} .tflite")
    for key in ("tflite_fp32", "tflite_int8"):
        a = ((recorded.get("metrics") or {}).get(key) or {}).get("top1")
        b = ((new.get("metrics") or {}).get(key) or {}).get("top1")
        if a is not None and a != b:
            lines.append(f"DIFFERENT top-1 of {key.removeprefix('tflite_')}: {a} recorded, {b} now")
    return lines

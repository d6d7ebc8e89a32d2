"""What ``edgestar bench`` benchmarks: the models of run directories, or model files.

A run directory contributes every model its manifest lists (FP32 and INT8 ``.tflite``, the
extra formats, the fallback's mixed model, and the ONNX file for the host), each checked
against the sha256 the run recorded: a file changed since would be benchmarked under a name
that is no longer true. A bare ``.tflite`` inside a run directory counts as that run's model,
so its results are stored with the run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgestar.errors import InputError
from edgestar.pipeline.rundir import MANIFEST, load_manifest

TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4-8 of every .tflite


@dataclass
class BenchModel:
    path: Path
    kind: str  # "tflite" or "onnx"
    fmt: str  # fp32, int8, fp16, dynamic, mixed (int8 + float), or "model" when unknown
    run_dir: Path | None  # the run directory it belongs to (results are written there)
    group: str  # models in one group are compared with the group's FP32 model
    manifest: dict | None = field(default=None, repr=False)
    name: str = ""  # unique among the models of one bench (set by collect_models)

    @property
    def label(self) -> str:
        """``tflite int8``, ``onnx fp32``, ... (the summary table's row names)."""
        if self.kind == "onnx":
            return "onnx fp32"
        return {"mixed": "tflite int8+float", "model": self.path.name}.get(self.fmt, f"tflite {self.fmt}")

    @property
    def metadata(self) -> dict:
        """edgestar's metadata in the ``.tflite`` (class names, preprocessing), or {}."""
        if self.kind != "tflite":
            return {}
        from edgestar.convert.tflite_file import read_metadata

        try:
            return read_metadata(self.path) or {}
        except Exception:  # a foreign model: no metadata of ours
            return {}

    @property
    def preprocessing(self) -> dict | None:
        if self.manifest and self.manifest.get("preprocessing"):
            return self.manifest["preprocessing"]
        return self.metadata.get("preprocessing")

    @property
    def class_names(self) -> list | None:
        if self.manifest:
            return self.manifest.get("model", {}).get("class_names")
        return self.metadata.get("class_names")


def collect_models(paths, *, host: bool = True) -> list[BenchModel]:
    """The models behind ``paths`` (run directories and model files), in the order given.
    ``host=False`` leaves out ONNX files (ONNX Runtime runs on the host only)."""
    if not paths:
        raise InputError("give a run directory or a .tflite file to benchmark")
    models: list[BenchModel] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        found = _run_models(path) if path.is_dir() else [_model_file(path)]
        for m in found:
            if m.path.resolve() not in seen and (host or m.kind != "onnx"):
                seen.add(m.path.resolve())
                models.append(m)
    if not any(m.kind == "tflite" for m in models):
        raise InputError(f"no .tflite model to benchmark in {', '.join(map(str, paths))}")
    _name(models)
    return models


def _name(models: list[BenchModel]) -> None:
    """Unique display names: the label (``tflite int8``), prefixed with the run's folder name
    when several runs are benchmarked, and the file name where a label still repeats."""
    several = len({m.group for m in models}) > 1
    for m in models:
        m.name = f"{Path(m.run_dir).name if m.run_dir else m.path.parent.name}: {m.label}" if several else m.label
    counts = {}
    for m in models:
        counts[m.name] = counts.get(m.name, 0) + 1
    for m in models:
        if counts[m.name] > 1:
            m.name = f"{m.name} ({m.path.name})"


def _run_models(root: Path) -> list[BenchModel]:
    from edgestar.models.checkpoints import sha256_file

    manifest = load_manifest(root)
    artifacts = manifest.get("artifacts") if isinstance(manifest, dict) else None
    if not isinstance(artifacts, dict):
        raise InputError(f"{root / MANIFEST} is not an edgestar manifest (no artifacts)")
    if manifest.get("status") not in ("ok", None):
        stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
        failed = [k for k, s in stages.items() if isinstance(s, dict) and s.get("status") == "failed"]
        raise InputError(f"{root}: that run {manifest.get('status')}"
                         + (f" in stage {failed[0]}" if failed else "") + "; its models are not usable")
    models = []
    for key, art in artifacts.items():
        if key != "onnx" and not key.startswith("tflite_"):
            continue
        name = art.get("path") if isinstance(art, dict) else None
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise InputError(f"{root / MANIFEST}: artifact {key!r} has no plain file name")
        path = root / name
        if not path.is_file():
            raise InputError(f"{root}: {name} is listed in {MANIFEST} but missing")
        if art.get("sha256") and sha256_file(path) != art["sha256"]:
            raise InputError(f"{path} changed since the run wrote it (sha256 differs from {MANIFEST})")
        kind = "onnx" if key == "onnx" else "tflite"
        fmt = "fp32" if kind == "onnx" else key[len("tflite_"):]
        models.append(BenchModel(path, kind, fmt, root, str(root), manifest))
    if not models:
        raise InputError(f"{root}: its manifest lists no models")
    return models


def _model_file(path: Path) -> BenchModel:
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".tflite", ".onnx"):
        raise InputError(f"{path} is not a run directory, a .tflite or an .onnx file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    if suffix == ".tflite" and head[4:8] != TFLITE_IDENTIFIER:
        raise InputError(f"{path} is not a TFLite model (no TFL3 identifier)")
    member = _as_run_member(path)
    if member is not None:
        return member
    kind = suffix[1:]
    meta = BenchModel(path, kind, "model", None, "").metadata
    fmt = "fp32" if kind == "onnx" else meta.get("format", "model")
    # Loose files are compared with an FP32 file beside them only when edgestar's metadata says
    # they are the same network (variant, input size, classes); anything else stands alone.
    same = (meta.get("variant"), (meta.get("preprocessing") or {}).get("img_size"), meta.get("num_classes"))
    group = f"{path.parent.resolve()}::{same}" if None not in same else str(path.resolve())
    return BenchModel(path, kind, fmt, None, group)


def _as_run_member(path: Path) -> BenchModel | None:
    """The file as its run directory's model, when the folder holds a manifest listing it."""
    if not (path.parent / MANIFEST).is_file():
        return None
    try:
        models = _run_models(path.parent)
    except InputError:
        return None
    return next((m for m in models if m.path.resolve() == path.resolve()), None)

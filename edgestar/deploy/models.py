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
    key: str  # its artifact key in the run's manifest, or its file name
    group: str  # models in one group are compared with the group's FP32 model
    manifest: dict | None = field(default=None, repr=False)

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
    return models


def _run_models(root: Path) -> list[BenchModel]:
    from edgestar.models.checkpoints import sha256_file

    manifest = load_manifest(root)
    if manifest.get("status") not in ("ok", None):
        failed = [k for k, s in manifest.get("stages", {}).items() if s.get("status") == "failed"]
        raise InputError(f"{root}: that run {manifest.get('status')}"
                         + (f" in stage {failed[0]}" if failed else "") + "; its models are not usable")
    models = []
    for key, art in manifest.get("artifacts", {}).items():
        if key != "onnx" and not key.startswith("tflite_"):
            continue
        path = root / art["path"]
        if not path.is_file():
            raise InputError(f"{root}: {art['path']} is listed in {MANIFEST} but missing")
        if art.get("sha256") and sha256_file(path) != art["sha256"]:
            raise InputError(f"{path} changed since the run wrote it (sha256 differs from {MANIFEST})")
        kind = "onnx" if key == "onnx" else "tflite"
        fmt = "fp32" if kind == "onnx" else key[len("tflite_"):]
        models.append(BenchModel(path, kind, fmt, root, key, str(root), manifest))
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
    fmt = "fp32" if kind == "onnx" else BenchModel(path, kind, "model", None, "", "").metadata.get("format", "model")
    return BenchModel(path, kind, fmt, None, path.name, str(path.parent.resolve()))


def _as_run_member(path: Path) -> BenchModel | None:
    """The file as its run directory's model, when the folder holds a manifest listing it."""
    if not (path.parent / MANIFEST).is_file():
        return None
    try:
        models = _run_models(path.parent)
    except InputError:
        return None
    return next((m for m in models if m.path.resolve() == path.resolve()), None)

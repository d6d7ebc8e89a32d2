"""The run directory: artifacts written atomically and a ``manifest.json`` carrying state.

Nothing is ever left under its final name half-written: files are written to a temporary name
in the same directory and renamed when complete. The manifest is rewritten (atomically) after
every stage, so a failed run shows which stage failed and what it had measured so far.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import EdgestarError, InputError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def ensure_writable_dir(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"output folder {path} exists and is not a directory") from None
    except OSError as exc:
        raise InputError(f"cannot create output folder {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"output folder {path} is not writable")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"output folder {path} is not writable ({exc.strerror})") from None
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def temp_path_for(path: Path) -> Path:
    """The in-progress name of ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


class RunDir:
    """A run directory and its manifest; each stage records status, timing and outputs."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    @classmethod
    def create(cls, root: Path, **header) -> "RunDir":
        root = Path(root)
        if root.exists() and root.is_dir() and any(root.iterdir()):
            raise InputError(f"output folder {root} is not empty; choose a new --out")
        ensure_writable_dir(root)
        run = cls(root, {"manifest_version": MANIFEST_VERSION, **header,
                         "status": "running", "stages": {}, "artifacts": {},
                         "metrics": {}, "timings_s": {}})
        run.save()
        return run

    def path(self, name: str) -> Path:
        return self.root / name

    def save(self) -> None:
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def add_artifact(self, key: str, path: Path, **info) -> None:
        from .checkpoints import sha256_file

        path = Path(path)
        self.manifest["artifacts"][key] = {
            "path": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path), **info}
        self.save()

    @contextmanager
    def stage(self, name: str):
        """Time a stage and record ``ok`` / ``failed`` (with the error) in the manifest."""
        record = {"status": "running"}
        self.manifest["stages"][name] = record
        self.save()
        t0 = time.perf_counter()
        try:
            yield record
        except BaseException as exc:
            record["status"] = "failed"
            record["error"] = str(exc) if isinstance(exc, EdgestarError) else repr(exc)
            self.manifest["status"] = "failed"
            raise
        else:
            record["status"] = "ok"
        finally:
            seconds = round(time.perf_counter() - t0, 3)
            record["seconds"] = seconds
            self.manifest["timings_s"][name] = seconds
            self.save()

    def quarantine_artifacts(self) -> None:
        """Rename every artifact of a failed run to ``<name>.failed`` and record that."""
        for info in self.manifest["artifacts"].values():
            src = self.root / info["path"]
            if src.exists() and not info["path"].endswith(".failed"):
                os.replace(src, src.with_name(src.name + ".failed"))
                info["path"] += ".failed"
        self.manifest["status"] = "failed"
        self.save()

    def finish(self, status: str = "ok") -> None:
        self.manifest["status"] = status
        self.save()


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{root} is not an edgestar run directory (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})") from None

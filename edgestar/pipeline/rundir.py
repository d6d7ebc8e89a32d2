"""The run directory: artifacts written atomically (:mod:`edgestar.files`) and a
``manifest.json`` carrying state. The manifest is rewritten (atomically) after
every stage, so a failed run shows which stage failed and what it had measured so far.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

from edgestar.errors import EdgestarError, InputError
from edgestar.files import atomic_write_json, ensure_writable_dir

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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
        from edgestar.models.checkpoints import sha256_file

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

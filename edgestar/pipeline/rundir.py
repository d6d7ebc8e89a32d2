"""The run directory: artifacts written atomically (:mod:`edgestar.files`) and a
``manifest.json`` carrying state. The manifest is rewritten (atomically) after
every stage, so a failed run shows which stage failed and what it had measured so far.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

from edgestar import __version__
from edgestar.errors import EdgestarError, InputError, interrupt_name
from edgestar.files import atomic_write_json, check_can_create, ensure_writable_dir

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SUPPORTED_MANIFEST_VERSIONS = (MANIFEST_VERSION,)  # what load_manifest accepts
TOOL_PACKAGES = ("torch", "tensorflow", "onnx", "onnx2tf", "onnxruntime", "ai-edge-litert", "numpy")
STAGING = ".incomplete"  # files of a run in progress; emptied when it ends
# Staged files an interrupted run keeps for the run that redoes it (training state to resume
# from); removed when a run ends any other way.
QAT_STATE = "qat-state.pt"
RESUMABLE = (QAT_STATE,)


class RunDir:
    """A run directory and its manifest; each stage records status, timing and outputs."""

    def __init__(self, root: Path | None, manifest: dict):
        self.root = Path(root) if root is not None else None
        self.manifest = manifest

    @classmethod
    def pending(cls, **header) -> "RunDir":
        """A run whose manifest is kept in memory until :meth:`open` creates the folder, so
        that the input stages can fail without leaving one behind."""
        return cls(None, {"manifest_version": MANIFEST_VERSION, **header, "status": "running",
                          "process": {"pid": os.getpid(), "host": platform.node()},
                          "stages": {}, "artifacts": {}, "metrics": {}, "timings_s": {}})

    @classmethod
    def create(cls, root: Path, **header) -> "RunDir":
        run = cls.pending(**header)
        run.open(root)
        return run

    @staticmethod
    def check_new(root: Path) -> None:
        """Refuse a ``root`` that holds files already (before any work is done), unless they
        are an interrupted run (killed, Ctrl-C, SIGTERM), which the same command starts over."""
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise InputError(f"output folder {root} exists and is not a directory")
        if root.is_dir() and any(root.iterdir()) and not interrupted_run(root):
            raise InputError(f"output folder {root} is not empty; choose a new --out")
        check_can_create(root, "output folder")

    def open(self, root: Path) -> bool:
        """Create the folder (new, empty, or holding an interrupted run, which is removed) and
        write the manifest so far; whether it was created (rather than found)."""
        self.check_new(root)
        if Path(root).is_dir() and interrupted_run(Path(root)):
            keep = {Path(root) / STAGING / name for name in RESUMABLE}
            for item in [*Path(root).iterdir(), *(Path(root) / STAGING).glob("*")]:
                if item.name == STAGING or item in keep or not os.path.lexists(item):
                    continue
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        created = not Path(root).exists()
        ensure_writable_dir(root)
        self.root = Path(root)
        self.save()
        return created

    def open_new(self, base: Path) -> bool:
        """Create ``base``, or ``base-2``, ``base-3``, ... if it exists, atomically: two runs
        started in the same second never share a folder. Returns True (it was created)."""
        base = Path(base)
        ensure_writable_dir(base.parent)
        for n in range(1, 10_000):
            root = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                root.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise InputError(f"cannot create output folder {root}: {exc.strerror}") from None
            self.root = root
            self.save()
            return True
        raise InputError(f"no free run folder name next to {base}")

    def path(self, name: str) -> Path:
        """Where ``name`` is once the run has ended (see :meth:`staged` while it runs)."""
        return self.root / name

    def staged(self, name: str) -> Path:
        """Where a stage writes ``name`` while the run is in progress: a hidden ``.incomplete``
        folder, so that no file of an unfinished (or killed) run sits under its final name."""
        folder = self.root / STAGING
        folder.mkdir(exist_ok=True)
        return folder / name

    def save(self) -> None:
        if self.root is not None:  # a pending run keeps its manifest in memory
            atomic_write_json(self.root / MANIFEST, self.manifest)

    def add_artifact(self, key: str, path: Path, **info) -> None:
        """Record a finished file (written to :meth:`staged`) under ``key``."""
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
            if interrupt_name(exc):  # Ctrl-C, or SIGTERM (edgestar.errors.Terminated)
                record["status"] = self.manifest["status"] = "interrupted"
                record["error"] = f"interrupted by {interrupt_name(exc)}"
            else:
                record["status"] = self.manifest["status"] = "failed"
                record["error"] = str(exc) if isinstance(exc, EdgestarError) else repr(exc)
            raise
        else:
            record["status"] = "ok"
        finally:
            seconds = round(time.perf_counter() - t0, 3)
            record["seconds"] = seconds
            self.manifest["timings_s"][name] = seconds
            self.save()

    def finish(self, status: str = "ok") -> None:
        """Move every staged file to its final name, then write the manifest (last)."""
        self._unstage(suffix="")
        self.manifest["status"] = status
        self.save()

    def fail(self, status: str = "failed") -> None:
        """End a failed (or ``interrupted``) run: every staged file but the logs leaves the
        staging folder as ``<name>.failed`` (registered or not: the converter writes models
        before they are checked), and the manifest says ``status``."""
        self._unstage(suffix=".failed", keep_resumable=status == "interrupted")
        self.manifest["status"] = status
        self.save()

    def _unstage(self, suffix: str, keep_resumable: bool = False) -> None:
        folder = self.root / STAGING
        if not folder.is_dir():
            return
        artifacts = {info["path"]: info for info in self.manifest["artifacts"].values()}
        for src in sorted(folder.iterdir()):
            if src.name in RESUMABLE and keep_resumable:
                continue
            if src.name.endswith((".tmp", ".partial")) or src.name in RESUMABLE:  # unfinished, or done with
                src.unlink()
                continue
            name = src.name if src.suffix == ".log" else src.name + suffix
            os.replace(src, self.root / name)
            if src.name in artifacts:
                artifacts[src.name]["path"] = name
        if not any(folder.iterdir()):
            folder.rmdir()


def interrupted_run(root: Path) -> bool:
    """Does ``root`` hold an edgestar run that was interrupted (status ``interrupted``, or
    ``running`` with its process gone: killed)? A run whose process is still alive on this
    machine is refused with a one-line InputError: two runs never share a folder."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("status") not in ("running", "interrupted"):
        return False
    process = manifest.get("process") or {}
    if manifest["status"] == "running" and process.get("host") == platform.node() and _alive(process.get("pid")):
        raise InputError(f"a run is in progress in {root} (pid {process['pid']}); wait for it or choose "
                         "another --out")
    return True


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a recycled pid is some other program
        return b"edgestar" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def tool_versions() -> dict:
    versions = {"edgestar": __version__, "python": platform.python_version()}
    for pkg in TOOL_PACKAGES:
        try:
            versions[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def files_digest(paths, root: Path) -> str:
    """sha256 over (relative path, file sha256) of every file used, in order."""
    from edgestar.models.checkpoints import sha256_file

    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).relative_to(root)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def default_out(variant: str) -> Path:
    """``runs/<variant>-<time>``; :meth:`RunDir.open_new` adds ``-2``, ``-3``, ... when a run
    started in the same second has it."""
    return Path("runs") / f"{variant}-{timestamp()}"


def timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def load_manifest(root: Path) -> dict:
    """The manifest of the run directory ``root``. Every reader goes through here: a missing,
    unreadable or corrupt manifest, or one of a schema version this edgestar does not know
    (older or newer), is a one-line InputError naming the file and the versions."""
    path = Path(root) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{root} is not an edgestar run directory (no {MANIFEST})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} cannot be read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc.msg})") from None
    if not isinstance(manifest, dict):
        raise InputError(f"{path} is not a manifest (a JSON object)")
    version = manifest.get("manifest_version")
    if version not in SUPPORTED_MANIFEST_VERSIONS:
        writer = (manifest.get("versions") or {}).get("edgestar") if isinstance(manifest.get("versions"), dict) else None
        raise InputError(f"{path} has manifest_version {version!r}" + (f" (written by edgestar {writer})" if writer else "")
                         + f"; this edgestar ({__version__}) reads version "
                         + ", ".join(map(str, SUPPORTED_MANIFEST_VERSIONS)))
    return manifest

"""Writing files so that nothing is ever left under its final name half-written: every file
is written to a temporary name in the same folder and renamed when complete."""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgestar.errors import InputError


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


def check_can_create(path: Path, what: str = "output") -> None:
    """Refuse, before any work, a ``path`` that could not be created: its nearest existing
    folder must be writable. Nothing is created."""
    path = Path(path).absolute()
    existing = next(p for p in [path, *path.parents] if p.exists())
    if existing == path and not path.is_dir():
        return  # an existing file: whether to replace it is the caller's decision
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be created: {existing} is not writable")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place. The file
    gets the permissions a plain ``open(path, "w")`` would (``mkstemp`` makes it owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@functools.lru_cache(maxsize=None)
def current_umask() -> int:
    """The process umask, read once (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path_for(path: Path) -> Path:
    """The in-progress name of ``path`` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def path_fingerprint(path: Path) -> str:
    """A fingerprint of an input: a file by its content (sha256); a folder by the names, sizes
    and modification times of the files below it (hashing every image of a large dataset
    would cost more than many runs); a missing path as such."""
    import hashlib

    from edgestar.models.checkpoints import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        return f"missing:{path}"
    h = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            p = Path(folder) / name
            try:
                st = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temporary folder ``edgestar-<kind>-<pid>-XXXXXXXX`` for this process's scratch files,
    removed when the ``with`` block ends. A process killed with SIGKILL cannot remove its own,
    so scratch folders whose process is gone are removed first."""
    remove_orphaned_scratch()
    return tempfile.TemporaryDirectory(prefix=f"edgestar-{kind}-{os.getpid()}-")


def remove_orphaned_scratch() -> None:
    for folder in Path(tempfile.gettempdir()).glob("edgestar-*-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and folder.is_dir() and not folder.is_symlink() and not _process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True

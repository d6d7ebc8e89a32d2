"""How ``edgestar bench`` reaches a device: a private folder on it, files copied there, a
command run in it, the folder removed afterwards -- whatever happens in between.

* :class:`LocalTransport` -- this machine (a temporary folder, plain subprocesses).
* :class:`SshTransport` -- the system's OpenSSH client (``ssh``/``scp`` subprocesses), so the
  user's ``~/.ssh/config``, keys, agent and ProxyJump apply. ``BatchMode=yes``: never a
  password prompt that would hang a script.
* :class:`AdbTransport` -- ``adb`` for Android phones, folders under ``/data/local/tmp``.

No local shell is ever involved (argument lists only). The remote side does run a shell (ssh
and ``adb shell`` hand it one string): every word of a remote command is quoted with
:func:`shlex.quote`, and only file names edgestar chose (``model_0.tflite``, ...) and a folder
name it checked are used there -- never the user's paths.
"""
from __future__ import annotations

import re
import secrets
import shlex
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgestar.children import last_line
from edgestar.deploy.devices import Device
from edgestar.errors import InputError, StageError

SAFE_REMOTE_DIR = re.compile(r"/[A-Za-z0-9._/-]+")


class Timeout(StageError):
    pass


def _run(argv: list[str], timeout: float, what: str, input_text: str | None = None):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input_text,
                              stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # subprocess.run kills and reaps the local child first
        raise Timeout(f"{what}: no result within {timeout:.0f} s; gave up (the command on the device "
                      "is killed by its own deadline; raise --timeout for a slow board)") from None
    except FileNotFoundError:
        raise InputError(f"{argv[0]} is not installed here; {what} needs it") from None


PID_FILE = ".edgestar.pid"  # in the device folder: the running command, for stopping it


def with_deadline(argv: list[str], seconds: float) -> str:
    """The remote shell command running ``argv`` under the device's ``timeout`` (coreutils,
    busybox and Android's toybox have it; without it the command runs bare), so that nothing
    keeps running on the board after the host gave up. It runs as a background job whose pid
    goes to ``PID_FILE``, so that an interrupted bench can stop it (:func:`stop_command`:
    ``timeout`` passes the signal on); ``wait`` then reports a child killed by signal N as
    exit status 128 + N, where ssh itself would report 255."""
    words = remote_words(argv)
    limit = max(1, int(seconds))
    return (f"if command -v timeout >/dev/null 2>&1; then timeout -s KILL {limit} {words} & "
            f"else {words} & fi; echo $! > {PID_FILE}; wait $!")


def stop_command(folder: str) -> str:
    """Stop what :func:`with_deadline` started in ``folder`` (if still running)."""
    pid = shlex.quote(f"{folder}/{PID_FILE}")
    return f"if [ -f {pid} ]; then kill -TERM \"$(cat {pid})\" 2>/dev/null; fi"


def remote_words(argv: list[str]) -> str:
    """``argv`` as one string for a POSIX shell, every word quoted; a leading ``~/`` (the
    board user's home, e.g. ``--remote-python ~/venv/bin/python``) becomes ``"$HOME"/``."""
    words = []
    for word in argv:
        if word.startswith("~/"):
            words.append('"$HOME"/' + shlex.quote(word[2:]))
        else:
            words.append(shlex.quote(word))
    return " ".join(words)


class Transport:
    """A private folder on the device and commands run inside it; use as a context manager."""

    name: str
    folder: str | None = None

    def __enter__(self):
        self.folder = self.make_folder()
        return self

    def __exit__(self, exc_type, *exc):
        if self.folder is not None:
            self.remove_folder(stop=exc_type is not None)  # interrupted or failed: stop what runs
            self.folder = None

    def make_folder(self) -> str: ...
    def push(self, files: list[Path]) -> None: ...
    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess: ...
    def remove_folder(self, stop: bool = False) -> None: ...


class LocalTransport(Transport):
    def __init__(self):
        self.name = "local"
        self.warnings: list[str] = []

    def make_folder(self) -> str:
        return tempfile.mkdtemp(prefix=f"edgestar-bench-{os.getpid()}-")  # see files.scratch_dir

    def push(self, files):
        for f in files:
            shutil.copyfile(f, Path(self.folder) / Path(f).name)

    def run(self, argv, timeout):
        from edgestar.children import child_env

        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.folder,
                                  env=child_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise Timeout(f"local: no result within {timeout:.0f} s; stopped it") from None

    def remove_folder(self, stop: bool = False):  # the local runner dies with its parent
        shutil.rmtree(self.folder, ignore_errors=True)


class SshTransport(Transport):
    def __init__(self, device: Device, *, ssh_config: Path | None = None, connect_timeout: int = 10):
        self.device, self.name = device, device.name
        self.connect_timeout = connect_timeout
        self.options = (["-F", str(ssh_config)] if ssh_config else []) + [
            "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if device.user:
            self.options += ["-o", f"User={device.user}"]
        self.warnings: list[str] = []

    def _ssh(self, command: str, timeout: float, what: str):
        argv = ["ssh", *self.options, *(["-p", str(self.device.port)] if self.device.port else []),
                self.device.host, command]
        proc = _run(argv, timeout, f"{self.name} ({what})")
        if proc.returncode == 255:  # ssh's own failure, not the remote command's
            raise self._ssh_error(proc.stderr)
        return proc

    def _ssh_error(self, stderr: str) -> InputError:
        line = last_line(stderr)
        text = stderr or ""
        if "Permission denied" in text:
            cause = (f"authentication refused ({line}); edgestar runs ssh with BatchMode=yes, so "
                     "the board must accept your key or agent without a password prompt")
        elif "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
            cause = "its host key is unknown or has changed; connect once with ssh to check and accept it"
        elif any(s in text for s in ("Connection refused", "timed out", "No route to host",
                                      "Could not resolve hostname", "Network is unreachable",
                                      "Connection closed", "Connection reset")):
            cause = f"cannot connect ({line})"
        else:
            cause = f"ssh failed ({line})"
        return InputError(f"{self.name}: {cause}")

    def make_folder(self) -> str:
        proc = self._ssh('mktemp -d "${TMPDIR:-/tmp}/edgestar-XXXXXXXX"', 30 + self.connect_timeout,
                         "creating a folder")
        folder = proc.stdout.strip()
        if proc.returncode != 0 or not SAFE_REMOTE_DIR.fullmatch(folder):
            raise InputError(f"{self.name}: cannot create a temporary folder on the board "
                             f"({last_line(proc.stderr or proc.stdout)})")
        return folder

    def push(self, files):
        host = f"[{self.device.host}]" if ":" in self.device.host else self.device.host
        argv = ["scp", "-q", *self.options, *(["-P", str(self.device.port)] if self.device.port else []),
                *[str(Path(f).absolute()) for f in files], f"{host}:{self.folder}/"]
        proc = _run(argv, 600, f"{self.name} (copying files)")
        if proc.returncode != 0:
            if any(s in (proc.stderr or "") for s in ("Permission denied (", "Connection", "Host key")):
                raise self._ssh_error(proc.stderr)
            raise StageError(f"{self.name}: copying the model failed ({last_line(proc.stderr)})")

    def run(self, argv, timeout):
        command = f"cd {shlex.quote(self.folder)} && {with_deadline(argv, timeout)}"
        return self._ssh(command, timeout + 10, "running")

    def remove_folder(self, stop: bool = False):
        command = f"rm -rf -- {shlex.quote(self.folder)}"
        try:
            proc = self._ssh(f"{stop_command(self.folder)}; {command}" if stop else command,
                             30 + self.connect_timeout, "cleaning up")
            if proc.returncode != 0:
                self.warnings.append(f"could not remove {self.folder} on {self.name}: {last_line(proc.stderr)}")
        except (InputError, StageError) as exc:
            self.warnings.append(f"could not remove {self.folder} on {self.name}: {exc}")


class AdbTransport(Transport):
    """``adb [-s SERIAL] push/shell``; ``adb shell`` joins its arguments into one string for the
    phone's shell, so every command goes as one already-quoted string."""

    def __init__(self, device: Device, *, adb: str = "adb"):
        self.device, self.name = device, device.name
        self.base = [adb, *(["-s", device.serial] if device.serial else [])]
        self.warnings: list[str] = []

    def _adb(self, args: list[str], timeout: float, what: str):
        proc = _run([*self.base, *args], timeout, f"{self.name} ({what})")
        # adb's own failures ("error: no devices/emulators found", "adb: error: failed to ...",
        # "error: device unauthorized") start with "error:"; the command's output never decides.
        errors = [ln.strip() for ln in (proc.stderr or "").splitlines()
                  if ln.strip().startswith(("error:", "adb: error:"))]
        if proc.returncode != 0 and errors:
            hint = "; pass adb:SERIAL (see adb devices)" if "more than one" in errors[0] else ""
            raise InputError(f"{self.name}: {errors[0]}{hint}")
        return proc

    def shell(self, argv: list[str], timeout: float, what: str):
        command = f"cd {shlex.quote(self.folder)} && {with_deadline(argv, timeout)}"
        return self._adb(["shell", command], timeout + 10, what)

    def make_folder(self) -> str:
        folder = f"/data/local/tmp/edgestar-{secrets.token_hex(4)}"
        proc = self._adb(["shell", shlex.join(["mkdir", "-m", "700", folder])], 60, "creating a folder")
        if proc.returncode != 0:
            raise InputError(f"{self.name}: cannot create {folder} ({last_line(proc.stderr or proc.stdout)})")
        return folder

    def push(self, files):
        for f in files:
            proc = self._adb(["push", str(Path(f).absolute()), f"{self.folder}/{Path(f).name}"], 600, "pushing")
            if proc.returncode != 0:
                raise StageError(f"{self.name}: adb push failed ({last_line(proc.stderr or proc.stdout)})")

    def run(self, argv, timeout):
        return self.shell(argv, timeout, "running")

    def remove_folder(self, stop: bool = False):
        command = shlex.join(["rm", "-rf", self.folder])
        try:
            proc = self._adb(["shell", f"{stop_command(self.folder)}; {command}" if stop else command], 60,
                             "cleaning up")
            if proc.returncode != 0:
                self.warnings.append(f"could not remove {self.folder} on {self.name}")
        except (InputError, StageError) as exc:
            self.warnings.append(f"could not remove {self.folder} on {self.name}: {exc}")

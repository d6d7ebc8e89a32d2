"""The child processes edgestar starts (the TensorFlow converter, the re-quantizer, TensorFlow
Lite Micro): their environment, and that none outlives the process that started it.

A child started with :func:`child_env` knows its parent's pid; calling :func:`die_with_parent`
first thing makes the kernel end it when that parent dies, even by SIGKILL, so a killed
``quantize`` leaves no converter running on and writing into its run directory.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PARENT_VARIABLE = "EDGESTAR_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_env(**extra: str) -> dict:
    """The environment of a child: CPU only, TensorFlow quiet, our interpreter's scripts first
    on PATH (onnx2tf runs onnxsim from PATH), and this process's pid."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="-1", **extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env[PARENT_VARIABLE] = str(os.getpid())
    return env


def die_with_parent() -> None:
    """Ask the kernel for SIGKILL when the parent dies (Linux; elsewhere the children's own
    ``getppid`` checks in their wait loops are the only guard). If the parent is already gone,
    exit now."""
    parent = os.environ.get(PARENT_VARIABLE)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != int(parent):  # died before the prctl
        os._exit(1)


def last_line(*texts: str | None, limit: int = 300) -> str:
    """The last non-blank line of the first text that has one (a child's own error message is
    usually the last thing it prints), shortened to ``limit`` characters: for one-line errors."""
    for text in texts:
        lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if lines:
            line = lines[-1]
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return "no error output"


def exit_status(returncode: int) -> str:
    """``exit 1`` or, for a child ended by a signal (a negative return code), its name."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"


def run_tool(argv: list[str], *, timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)`` for a tool that starts processes
    of its own (make starts compilers, g++ starts cc1plus and the assembler). It runs in a
    process group of its own, and when edgestar stops while it runs (Ctrl-C, SIGTERM, an error,
    ``timeout``: then ``subprocess.TimeoutExpired`` as from ``subprocess.run``) the whole group
    is asked to stop with SIGTERM, on which make and gcc delete the file they were writing
    (no truncated object is left to be linked later), and killed if still there after 5 s.

    Ctrl-C and SIGTERM are held back while the tool starts (a signal arriving inside
    ``Popen`` would leave a started tool unknown to us) and delivered once it can be stopped;
    the tool itself starts with them unblocked."""
    held = {signal.SIGINT, signal.SIGTERM}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)

    def unblock():  # in the child, before exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)

    try:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, preexec_fn=unblock, **kwargs) as proc:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a held signal is raised here
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                _stop_group(proc)
                raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue

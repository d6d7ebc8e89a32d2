"""The child processes edgestar starts (the TensorFlow converter, the re-quantizer, TensorFlow
Lite Micro): their environment, and that none outlives the process that started it.

A child started with :func:`child_env` knows its parent's pid; calling :func:`die_with_parent`
first thing makes the kernel end it when that parent dies, even by SIGKILL, so a killed
``quantize`` leaves no converter running on and writing into its run directory.
"""
from __future__ import annotations

import os
import signal
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

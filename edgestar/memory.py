"""Process memory: hand freed heap back to the OS and read peak resident set sizes."""
from __future__ import annotations

import resource
import sys


def release_freed_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc keeps them otherwise);
    the trim is a no-op where ``malloc_trim`` does not exist."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_mb() -> dict:
    """Peak RSS in MiB of this process, and the largest peak of any child process it has
    waited for (the converter, the re-quantizer, TFLite Micro: not their sum)."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale / 1024
    return {"main": round(self_kb / 1024, 1), "largest_child": round(child_kb / 1024, 1),
            # getrusage: maxima over this Python process's life, so a second quantize() in the
            # same process reports at least the first one's (bench/measure.py measures per run)
            "scope": "process lifetime"}

"""Training state saved while ``train`` and QAT run, so that an interrupted job resumes where
it stopped instead of starting over.

A state file holds what the next step needs to go on exactly as if nothing had happened: the
model's parameters and buffers, the optimizer's moments, the position (step, epoch), the loss
summed so far, the random number generators, and a ``key``: a digest of everything the result
depends on (settings, data, starting weights). A file with another key belongs to another job
and is never resumed from. Files are written atomically (temporary name, then rename) and read
weights-only: a state file is never unpickled, so a planted one cannot run code.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from edgestar.errors import InputError
from edgestar.files import atomic_write_bytes

STATE_FORMAT = "edgestar-training-state-1"


def fingerprint(**parts) -> str:
    """sha256 of ``parts`` (JSON-serialisable values; anything else by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def tensors_digest(state_dict) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    import torch

    h = hashlib.sha256()
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return h.hexdigest()


def save_state(path: Path, *, key: str, **state) -> None:
    """Write a state file for the job identified by ``key`` (atomically)."""
    import torch

    buffer = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "key": key, **state}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_state(path: Path) -> dict | None:
    """The state saved at ``path``, or None when there is none. A file that cannot be read as
    a state file (corrupt, or not one) is a one-line InputError naming it."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"training state {path} cannot be read ({type(exc).__name__}); "
                         "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "key" not in state:
        raise InputError(f"{path} is not an edgestar training state; delete it to start over")
    return state

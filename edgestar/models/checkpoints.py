"""Reading and writing StarNet checkpoints.

Accepted formats, all read with ``torch.load(weights_only=True)``:

* the official release files (timm's saver: a dict with ``state_dict`` and training metadata
  such as an ``argparse.Namespace`` under ``args``, which is allow-listed as harmless);
* other timm/DeiT-style dicts (``state_dict``, ``state_dict_ema``, ``model``), DDP ``module.``
  prefixes stripped;
* a bare state dict;
* edgestar's own checkpoints (``{"format": "edgestar", ...}``) which also carry the variant,
  class names and the preprocessing the model was trained with.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edgestar.data.images import Preprocessing
from edgestar.errors import CheckpointError, InputError
from edgestar.files import atomic_write_bytes
from edgestar.models.registry import DOWNSAMPLE_FACTOR, get_variant
from edgestar.models.starnet import StarNet, create_model

EDGESTAR_FORMAT = "edgestar"
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights"
_STATE_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
CLASSIFIER_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadedCheckpoint:
    state_dict: dict
    source: str
    variant: str | None = None
    num_classes: int | None = None
    preprocessing: Preprocessing | None = None
    class_names: list[str] | None = None
    meta: dict = field(default_factory=dict)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESTAR_CACHE") or Path.home() / ".cache" / "edgestar")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- resolving --weights

def resolve_weights(weights: str, variant: str) -> Path | None:
    """Map ``--weights`` (``official``, ``demo``, ``none`` or a path) to a file, or None for
    random initialisation."""
    spec = get_variant(variant)
    if weights == "none":
        return None
    if weights == "demo":
        path = DEMO_WEIGHTS / f"starnet_{variant}_cifar10_demo.pt"
        if not path.is_file():
            have = sorted(p.name.split("_")[1] for p in DEMO_WEIGHTS.glob("starnet_*_demo.pt"))
            raise InputError(
                f"no demo weights for variant {variant} (demo weights exist for: "
                f"{', '.join(have) or 'none'}); train some with `edgestar train --variant "
                f"{variant} --data demo` and pass --weights PATH"
            )
        return path
    if weights == "official":
        if spec.official_url is None:
            raise InputError(
                f"variant {variant} has no official weights (only s1, s2, s3, s4 do); "
                "use --weights PATH, --weights demo or --weights none"
            )
        return download_official(variant, spec.official_url)
    path = Path(weights)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    return path


def download_official(variant: str, url: str, *, timeout: float = 30.0) -> Path:
    target = cache_dir() / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the weights cache {target.parent}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise InputError(
            f"cannot download the official {variant} weights from {url} ({reason}); "
            f"offline? pass --weights PATH to a local checkpoint, or --weights demo"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# --------------------------------------------------------------------------- reading

def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedCheckpoint:
    """Read any supported checkpoint file into a flat state dict plus metadata."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} contains pickled code objects that weights-only loading "
                "refuses; if you trust its origin, re-run with --unsafe-allow-pickle"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file") from None
    except Exception as exc:  # garbage bytes make the unpickler raise almost anything
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({_first_line(exc)})"
        ) from None
    return _interpret(obj, str(path))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _interpret(obj, source: str) -> LoadedCheckpoint:
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {source} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == EDGESTAR_FORMAT:
        return _interpret_edgestar(obj, source)
    state = obj
    for key in _STATE_KEYS:
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {source} does not contain a state dict of tensors")
    state = {_strip_prefix(k): v for k, v in state.items()}
    meta = {}
    if "arch" in obj:
        meta["arch"] = str(obj["arch"])
    return LoadedCheckpoint(state_dict=_float_state(state), source=source, meta=meta)


def _interpret_edgestar(obj: dict, source: str) -> LoadedCheckpoint:
    """Check every field of an edgestar checkpoint, so that a damaged or hand-made file is
    reported here, naming the file and the field, rather than as a KeyError later."""
    def unusable(problem: str) -> CheckpointError:
        return CheckpointError(f"edgestar checkpoint {source} {problem}")

    state = obj.get("state_dict")
    if state is None:
        raise unusable("has no state_dict")
    if (not isinstance(state, dict) or not state
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())):
        raise unusable("has a state_dict that is not a non-empty dict of named tensors")
    head_classes = infer_num_classes(state)

    variant = obj.get("variant")
    if variant is not None and not isinstance(variant, str):
        raise unusable(f"has variant {variant!r}, not a variant name")

    num_classes = obj.get("num_classes")
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise unusable(f"has num_classes {num_classes!r}, not a positive integer")
        if head_classes is not None and head_classes != num_classes:
            raise unusable(f"says num_classes {num_classes} but its classifier has {head_classes}")

    class_names = obj.get("class_names")
    if class_names is not None:
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            raise unusable("has class_names that are not a list of strings")
        # Names that do not line up with the classifier would label every prediction wrongly.
        expected = num_classes or head_classes
        if expected is not None and len(class_names) != expected:
            raise unusable(f"has {len(class_names)} class_names for {expected} classes")

    pre = obj.get("preprocessing")
    preprocessing = None
    if pre is not None:
        try:
            preprocessing = Preprocessing.from_dict(pre)
        except ValueError as exc:
            raise unusable(f"has unusable preprocessing: {exc}") from None
        if preprocessing.img_size % DOWNSAMPLE_FACTOR:
            raise unusable(f"has preprocessing img_size {preprocessing.img_size}, "
                           f"not a multiple of {DOWNSAMPLE_FACTOR} (StarNet downsamples by 32)")

    return LoadedCheckpoint(
        state_dict=_float_state(state),
        source=source,
        variant=variant,
        num_classes=num_classes,
        preprocessing=preprocessing,
        class_names=class_names,
        meta={k: obj[k] for k in ("train", "metrics") if k in obj},
    )


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _float_state(state: dict) -> dict:
    """Half-precision checkpoints (the shipped demo) load as float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def infer_num_classes(state: dict) -> int | None:
    w = state.get("head.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim == 2 else None


# --------------------------------------------------------------------------- building models

def load_into(model: StarNet, ckpt: LoadedCheckpoint, variant: str, *,
              skip: tuple[str, ...] = ()) -> None:
    """Strict load that explains a mismatch instead of dumping PyTorch's message.

    Keys in ``skip`` are neither loaded nor required: the model keeps its own values for them.
    """
    expected = {k: v for k, v in model.state_dict().items() if k not in skip}
    given = {k: v for k, v in ckpt.state_dict.items() if k not in skip}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch (checkpoint vs model)", mismatched)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        hint = f" (it was saved for variant {ckpt.variant})" if ckpt.variant not in (None, variant) else ""
        raise CheckpointError(
            f"checkpoint {ckpt.source} does not fit StarNet-{variant}{hint}: " + "; ".join(parts)
        )
    model.load_state_dict(given, strict=not skip)


def build_model(variant: str, weights: str, *, num_classes: int | None = None,
                drop_path_rate: float = 0.0,
                allow_pickle: bool = False) -> tuple[StarNet, LoadedCheckpoint | None]:
    """Create ``variant`` and load ``weights`` into it (eval mode)."""
    get_variant(variant)
    path = resolve_weights(weights, variant)
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle) if path else None
    inferred = infer_num_classes(ckpt.state_dict) if ckpt else None
    if num_classes is None:
        num_classes = inferred or 1000
    elif inferred is not None and inferred != num_classes:
        raise CheckpointError(
            f"--num-classes {num_classes} does not match checkpoint {ckpt.source}, "
            f"whose classifier has {inferred} classes"
        )
    model = create_model(variant, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if ckpt:
        load_into(model, ckpt, variant)
    return model.eval(), ckpt


def build_model_for_finetuning(
    variant: str, weights: str, num_classes: int, *, drop_path_rate: float = 0.0,
    allow_pickle: bool = False,
) -> tuple[StarNet, LoadedCheckpoint | None, bool]:
    """Create ``variant`` with ``num_classes`` outputs, initialised from ``weights``.

    When the checkpoint's classifier has another class count (ImageNet weights fine-tuned on
    a 10-class folder), or it has no classifier, every weight but the classifier is loaded and
    the model keeps a freshly initialised head. Returns ``(model, checkpoint, head_replaced)``;
    the model is in eval mode, with stochastic depth ``drop_path_rate`` for training.
    """
    get_variant(variant)
    path = resolve_weights(weights, variant)
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle) if path else None
    model = create_model(variant, num_classes=num_classes, drop_path_rate=drop_path_rate)
    if ckpt is None:
        return model.eval(), None, False
    head_replaced = infer_num_classes(ckpt.state_dict) != num_classes
    load_into(model, ckpt, variant, skip=CLASSIFIER_KEYS if head_replaced else ())
    return model.eval(), ckpt, head_replaced


def save_checkpoint(path: str | os.PathLike, model: StarNet, *, variant: str,
                    preprocessing: Preprocessing, class_names: list[str] | None = None,
                    half: bool = False, extra: dict | None = None) -> None:
    """Write an edgestar checkpoint atomically (temp name, then rename)."""
    state = {k: (v.half() if half and v.is_floating_point() else v).clone()
             for k, v in model.state_dict().items()}
    obj = {
        "format": EDGESTAR_FORMAT,
        "variant": variant,
        "num_classes": model.num_classes,
        "class_names": class_names,
        "preprocessing": preprocessing.to_dict(),
        "state_dict": state,
        **(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # hidden temporary name, removed on failure

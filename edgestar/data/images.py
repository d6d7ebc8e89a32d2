"""Images in, model inputs out: image folders, .npy arrays, the shipped demo set, preprocessing.

Every stage (training, calibration, evaluation, conversion) reads data through this module so
that the preprocessing a model was trained with is the one it is calibrated and validated with.
Finding images on disk lives in :mod:`edgestar.data.folders`, label files in
:mod:`edgestar.data.labels`, checks on ``.npy`` arrays in :mod:`edgestar.data.arrays`; their
public names are exported from here too.
"""
from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgestar.data import arrays
from edgestar.data.folders import (IMAGE_EXTENSIONS, ImageFolder, list_images, scan_image_folder,
                                   scan_labelled_folder)
from edgestar.data.labels import (LABELS_FILE_AND_INDEX, LABELS_FILE_AND_NAME, LABELS_FROM_FOLDERS,
                                  LABELS_INDEX_PER_LINE, LABELS_NONE)
from edgestar.errors import DataError, InputError

__all__ = [
    "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "DEMO_DIR", "Preprocessing",
    "load_rgb", "preprocess_image", "normalize",
    "ImageFolder", "scan_image_folder", "scan_labelled_folder", "list_images",
    "LABELS_FROM_FOLDERS", "LABELS_FILE_AND_NAME", "LABELS_FILE_AND_INDEX", "LABELS_INDEX_PER_LINE",
    "LABELS_NONE",
    "subsample", "load_batch", "load_images", "load_array", "batches", "save_nhwc", "read_batches",
    "demo_split", "FEW_CALIBRATION_IMAGES", "calibration_inputs", "qat_images", "evaluation_set",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The demo set lives in the repository's calib/ folder, which setup.cfg installs as the package
# edgestar._demo_data. A source checkout (PYTHONPATH or an editable install) reads its own
# calib/ first: there, importing edgestar._demo_data could reach another checkout's copy through
# that checkout's editable-install finder, or nothing at all.
DEMO_PACKAGE = "edgestar._demo_data"


def _find_demo_dir() -> Path | None:
    """This checkout's ``calib/cifar10_demo``, else the installed package data, else None."""
    import importlib.resources  # only this lookup needs it

    repository = Path(__file__).resolve().parents[2]  # site-packages when installed from a wheel
    if (repository / "setup.cfg").is_file() and (repository / "calib" / "cifar10_demo").is_dir():
        return repository / "calib" / "cifar10_demo"
    try:
        installed = importlib.resources.files(DEMO_PACKAGE) / "cifar10_demo"
    except ModuleNotFoundError:
        return None
    # Wheels install plain files; a zipped installation would need extracting first.
    return installed if isinstance(installed, Path) and installed.is_dir() else None


DEMO_DIR = _find_demo_dir()


@dataclass(frozen=True)
class Preprocessing:
    """How a raw RGB image becomes the model's input tensor; travels with every model.

    Resize the shorter side to ``round(img_size / crop_pct)`` with ``interpolation``, center
    crop ``img_size`` x ``img_size``, scale to [0, 1], subtract ``mean``, divide by ``std``.
    The tensor layout is NCHW in PyTorch/ONNX and NHWC in TFLite.
    """

    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Rebuild from ``to_dict`` output (as stored in checkpoints).

        Raises ``ValueError`` with a one-line reason when a field is missing or unusable (the
        caller knows which file the dict came from and names it). An odd stored value would
        otherwise surface much later as a division by zero or a silently different resize.
        """
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def bad(name, why):
            return ValueError(f"preprocessing {name} {d[name]!r} {why}")

        if not isinstance(d, dict):
            raise ValueError(f"preprocessing is a {type(d).__name__}, not a dict")
        if "img_size" not in d:
            raise ValueError("preprocessing has no img_size")
        d = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop_pct": 0.875,
             "interpolation": "bicubic", **d}
        if not number(d["img_size"]) or d["img_size"] != int(d["img_size"]) or d["img_size"] < 1:
            raise bad("img_size", "is not a positive integer")
        for name in ("mean", "std"):
            v = d[name]
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(number(x) for x in v):
                raise bad(name, "is not 3 numbers (one per RGB channel)")
        if not all(x > 0 for x in d["std"]):
            raise bad("std", "has a value that is not positive")
        if not number(d["crop_pct"]) or not 0 < d["crop_pct"] <= 1:
            raise bad("crop_pct", "is not in (0, 1]")
        if not isinstance(d["interpolation"], str) or d["interpolation"] not in _RESAMPLE:
            raise bad("interpolation", f"is not one of {', '.join(_RESAMPLE)}")
        return cls(
            img_size=int(d["img_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=d["interpolation"],
        )

    def with_size(self, img_size: int) -> "Preprocessing":
        return Preprocessing(img_size, self.mean, self.std, self.crop_pct, self.interpolation)


# --------------------------------------------------------------------------- image decoding

def load_rgb(path: Path):
    """Open any image as 8-bit RGB the way users expect; name the file when it is unusable.

    Grayscale, palette, CMYK and alpha images go through PIL's RGB conversion (alpha is
    dropped, as torchvision/timm loaders do). 16-bit and 32-bit integer images are scaled to
    8 bits first: PIL's own conversion would clip them to white. Animations give their first
    frame. EXIF orientation is applied, so photos come out upright as viewers show them
    (torchvision's loader does not do this). Images above Pillow's decompression-bomb limit
    are refused, the limit left as it is.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; make that a refusal too.
            # (catch_warnings changes process-wide filters, so not for concurrent threads;
            # images are decoded on one thread per process here.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # the first frame of an animation
                return _as_rgb(_upright(im))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"image {path} is too large to decode safely: {_short(exc)}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {_short(exc)}") from None


def _upright(im):
    """``im`` turned as its EXIF orientation tag says (phone photos are often stored sideways)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block raises anything; viewers then show the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def _as_rgb(im):
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _short(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:  # "Permission denied", without the repeated path
        return exc.strerror
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


def preprocess_image(img, pre: Preprocessing) -> np.ndarray:
    """PIL RGB image -> float32 CHW array, normalized."""
    return normalize(np.asarray(resize_and_crop(img, pre), dtype=np.uint8)[None], pre)[0]


def resize_and_crop(img, pre: Preprocessing):
    """The geometric part of the preprocessing (what a board's app does before the lookup
    table of ``edgestar firmware``): resize the shorter side, center crop; a PIL image."""
    from PIL import Image

    resample = _RESAMPLE.get(pre.interpolation, Image.BICUBIC)
    size = pre.img_size
    scale_size = int(math.floor(size / pre.crop_pct + 0.5)) if pre.crop_pct < 1 else size
    w, h = img.size
    if (w, h) != (size, size) or scale_size != size:
        if w <= h:
            nw, nh = scale_size, max(scale_size, int(round(h * scale_size / w)))
        else:
            nw, nh = max(scale_size, int(round(w * scale_size / h))), scale_size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def normalize(images_nhwc_uint8: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW normalized model input."""
    x = images_nhwc_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- subsets and batches

def subsample(items: list, n: int | None, seed: int = 0) -> list:
    """A deterministic, class-mixed subset of ``n`` items (all when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in picked]


def load_batch(paths, pre: Preprocessing) -> np.ndarray:
    return np.stack([preprocess_image(load_rgb(p), pre) for p in paths])


def load_images(paths, pre: Preprocessing, *, progress=None, batch: int = 256) -> np.ndarray:
    """Decode and preprocess ``paths`` into one float32 NCHW array."""
    out = np.empty((len(paths), 3, pre.img_size, pre.img_size), np.float32)
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        out[start:start + len(chunk)] = load_batch(chunk, pre)
        if progress is not None:
            progress.update(len(chunk))
    return out


# --------------------------------------------------------------------------- arrays

def load_array(path: str | os.PathLike, pre: Preprocessing, *, what: str = "array",
               notes: list[str] | None = None) -> np.ndarray:
    """A ``.npy`` of images: uint8 NxHxWx3 RGB pixels (preprocessed here, H and W must equal
    the model size) or float32 Nx3xSxS model inputs already preprocessed.

    Refused (DataError): other shapes and dtypes (float64 included), no images, NaN/Inf, a
    constant array. Values this model's preprocessing cannot produce (un-normalized pixels)
    are appended to ``notes``; without a ``notes`` list they are issued as warnings.
    """
    path = Path(path)
    arr = arrays.read_npy(path, what)
    kind = arrays.layout(arr, pre.img_size, path, what)
    low, high = arrays.check_values(arr, path, what)
    if kind == arrays.INPUTS:
        arrays.require_float32(arr, path, what)
    found = arrays.range_notes(kind, low, high, pre.mean, pre.std, path, what)
    if notes is not None:
        notes.extend(found)
    else:
        for note in found:
            warnings.warn(note, stacklevel=2)
    return normalize(arr, pre) if kind == arrays.PIXELS else arr


def batches(x: np.ndarray, size: int):
    """``x`` in consecutive slices of ``size`` along the first axis."""
    for i in range(0, len(x), size):
        yield x[i:i + size]


def save_nhwc(path: str | os.PathLike, x_nchw: np.ndarray, *, chunk: int = 16) -> None:
    """Write float32 NCHW inputs as an NHWC ``.npy`` (TensorFlow's layout), a chunk at a time:
    a transposed copy of 200 images at 224 px would be another 120 MB."""
    n, c, h, w = x_nchw.shape
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.dtype(np.float32).str, "fortran_order": False, "shape": (n, h, w, c)})
        for part in batches(x_nchw, chunk):
            f.write(np.ascontiguousarray(part.transpose(0, 2, 3, 1), np.float32).tobytes())


def read_batches(path: str | os.PathLike, size: int):
    """Consecutive ``size``-row batches of a C-ordered ``.npy`` file, read one at a time (a
    memory map would keep every page it touched resident)."""
    with open(path, "rb") as f:
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if fortran:
            raise DataError(f"{path} is Fortran-ordered; expected a C-ordered array")
        row = int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], size):
            rows = min(size, shape[0] - start)
            data = np.fromfile(f, dtype=dtype, count=rows * row)
            yield data.reshape((rows, *shape[1:]))


# --------------------------------------------------------------------------- named sources

def demo_split(split: str) -> Path:
    """The folder of the shipped demo set's ``calib`` (500 images) or ``eval`` (1,000) split."""
    if DEMO_DIR is None:
        raise InputError(f"the demo data set is missing from this installation (package "
                         f"{DEMO_PACKAGE} not found): reinstall edgestar")
    path = DEMO_DIR / split
    if not path.is_dir():
        raise InputError(f"the demo data set is missing from this installation ({path})")
    return path


# Below this many images, per-tensor ranges (and percentiles above all) rest on too few values.
FEW_CALIBRATION_IMAGES = 100


def calibration_inputs(source: str, pre: Preprocessing, *, samples: int | None,
                       seed: int = 0, progress_factory=None) -> tuple[np.ndarray, dict]:
    """Float32 NCHW calibration inputs from ``demo``, an image folder or a ``.npy`` file.

    Returns the array and a description for the manifest: ``source`` (resolved path),
    ``kind`` ("npy" or "images"), ``requested`` (``samples``; None = all), ``count`` (how
    many were used) and ``notes`` (strings the caller should show the user: suspicious
    values, fewer images than requested, skipped files).
    """
    if samples is not None and samples < 1:
        raise InputError(f"calibration samples must be at least 1, got {samples}")
    if source == "demo":
        source = str(demo_split("calib"))
    path = Path(source)
    notes: list[str] = []
    if path.suffix.lower() == ".npy":
        arr = load_array(path, pre, what="calibration array", notes=notes)
        arr, kind = arr[subsample(list(range(len(arr))), samples, seed)], "npy"
    else:
        files = subsample(list_images(path, what="calibration folder", notes=notes), samples, seed)
        bar = progress_factory(len(files), "calibration images") if progress_factory else None
        try:
            arr, kind = load_images(files, pre, progress=bar), "images"
        finally:
            if bar is not None:
                bar.close()
    notes.extend(_count_notes(len(arr), samples))
    return arr, {"source": str(path.resolve()), "kind": kind, "requested": samples,
                 "count": len(arr), "notes": notes}


def _count_notes(count: int, requested: int | None) -> list[str]:
    images = f"{count} calibration image{'s' if count != 1 else ''}"
    few = count < FEW_CALIBRATION_IMAGES
    if requested is not None and count < requested:
        return [f"only {images} ({requested} asked for)"
                + (": INT8 ranges from so few images are unreliable" if few else "")]
    if requested is None and few:
        return [f"only {images}: INT8 ranges from so few images are unreliable"]
    return []


def qat_images(source: str) -> ImageFolder:
    """Images for quantization-aware training: ``demo`` (the demo calibration split) or a
    folder, searched recursively. Labels are not used (QAT distils the float model)."""
    if source == "demo":
        source = str(demo_split("calib"))
    path = Path(source)
    if path.suffix.lower() == ".npy":
        raise InputError(f"QAT trains on image files, not an array ({path}); pass --train DIR")
    notes: list[str] = []
    files = list_images(path, what="QAT training folder", notes=notes)
    return ImageFolder(path, [], [(f, 0) for f in files], labels_source=LABELS_NONE, notes=notes)


def evaluation_set(source: str, *, labels: str | os.PathLike | None = None,
                   samples: int | None = None, seed: int = 0) -> ImageFolder:
    """The labelled evaluation images: ``demo``, a folder of class sub-folders, or (with
    ``labels``, a label file) a flat folder of images; see :mod:`edgestar.data.labels`.

    The result's ``labels_source`` says how labels were read and ``notes`` what the user
    should hear about (empty class folders, label indices that never use class 0, ...).
    """
    if samples is not None and samples < 1:
        raise InputError(f"evaluation samples must be at least 1, got {samples}")
    if source == "demo":
        source = str(demo_split("eval"))
    if labels is None:
        folder = scan_image_folder(source, what="evaluation folder")
    else:
        folder = scan_labelled_folder(source, labels, what="evaluation folder")
    if samples is not None:
        folder = replace(folder, samples=subsample(folder.samples, samples, seed))
    return folder

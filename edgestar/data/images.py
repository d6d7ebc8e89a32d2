"""Images in, model inputs out: image folders, .npy arrays, the shipped demo set, preprocessing.

Every stage (training, calibration, evaluation, conversion) reads data through this module so
that the preprocessing a model was trained with is the one it is calibrated and validated with.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgestar.errors import DataError, InputError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEMO_DIR = Path(__file__).resolve().parents[2] / "calib" / "cifar10_demo"


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
    8 bits first: PIL's own conversion would clip them to white.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {_short(exc)}") from None


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1}


def preprocess_image(img, pre: Preprocessing) -> np.ndarray:
    """PIL RGB image -> float32 CHW array, normalized."""
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
    return normalize(np.asarray(img, dtype=np.uint8)[None], pre)[0]


def normalize(images_nhwc_uint8: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 NHWC RGB -> float32 NCHW normalized model input."""
    x = images_nhwc_uint8.astype(np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- image folders

@dataclass
class ImageFolder:
    """``root/<class>/<image>`` listing, classes sorted by name (torchvision's convention)."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]

    def __len__(self) -> int:
        return len(self.samples)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def scan_image_folder(root: str | os.PathLike, *, what: str = "image folder") -> ImageFolder:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory")
    try:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError:
        raise DataError(f"{what} {root} is not readable") from None
    if not class_dirs:
        raise DataError(
            f"{what} {root} has no class sub-folders (expected {root}/<class>/<image files>)"
        )
    samples = []
    for idx, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        samples.extend((p, idx) for p in files)
    if not samples:
        raise DataError(f"{what} {root} contains no image files")
    return ImageFolder(root, [d.name for d in class_dirs], samples)


def list_images(root: str | os.PathLike, *, what: str = "image folder") -> list[Path]:
    """All images under ``root`` (recursively); labels not needed (calibration)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    if not files:
        raise DataError(f"{what} {root} contains no image files")
    return files


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

def load_array(path: str | os.PathLike, pre: Preprocessing) -> np.ndarray:
    """A ``.npy`` of images: uint8 NxHxWx3 RGB pixels (preprocessed here, H and W must equal
    the model size) or float32 Nx3xSxS model inputs already preprocessed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"array file {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"cannot read array {path}: {_short(exc)}") from None
    s = pre.img_size
    if arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[3] == 3:
        if arr.shape[1:3] != (s, s):
            raise DataError(
                f"array {path} holds {arr.shape[1]}x{arr.shape[2]} images; the model takes {s}x{s}"
            )
        return normalize(arr, pre)
    if arr.ndim == 4 and arr.dtype.kind == "f" and arr.shape[1:] == (3, s, s):
        if not np.isfinite(arr).all():
            raise DataError(f"array {path} contains NaN or infinite values")
        return arr.astype(np.float32)
    raise DataError(
        f"array {path} has shape {arr.shape} and dtype {arr.dtype}; expected uint8 Nx{s}x{s}x3 "
        f"RGB images or float32 Nx3x{s}x{s} preprocessed inputs"
    )


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
    path = DEMO_DIR / split
    if not path.is_dir():
        raise InputError(f"the demo data set is missing from this installation ({path})")
    return path


def calibration_inputs(source: str, pre: Preprocessing, *, samples: int | None,
                       seed: int = 0, progress_factory=None) -> tuple[np.ndarray, dict]:
    """Float32 NCHW calibration inputs from ``demo``, an image folder or a ``.npy`` file.

    Returns the array and a description (resolved path, count) for the manifest.
    """
    if samples is not None and samples < 1:
        raise InputError(f"calibration samples must be at least 1, got {samples}")
    if source == "demo":
        source = str(demo_split("calib"))
    path = Path(source)
    if path.suffix.lower() == ".npy":
        arr = load_array(path, pre)
        if len(arr) == 0:
            raise DataError(f"calibration array {path} is empty")
        idx = subsample(list(range(len(arr))), samples, seed)
        return arr[idx], {"source": str(path.resolve()), "kind": "npy", "count": len(idx)}
    files = subsample(list_images(path, what="calibration folder"), samples, seed)
    bar = progress_factory(len(files), "calibration images") if progress_factory else None
    try:
        arr = load_images(files, pre, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    return arr, {"source": str(path.resolve()), "kind": "images", "count": len(files)}


def qat_images(source: str) -> ImageFolder:
    """Images for quantization-aware training: ``demo`` (the demo calibration split) or a
    folder, searched recursively. Labels are not used (QAT distils the float model)."""
    if source == "demo":
        source = str(demo_split("calib"))
    path = Path(source)
    if path.suffix.lower() == ".npy":
        raise InputError(f"QAT trains on image files, not an array ({path}); pass --train DIR")
    files = list_images(path, what="QAT training folder")
    return ImageFolder(path, [], [(f, 0) for f in files])


def evaluation_set(source: str, *, samples: int | None = None, seed: int = 0) -> ImageFolder:
    if source == "demo":
        source = str(demo_split("eval"))
    folder = scan_image_folder(source, what="evaluation folder")
    if samples is not None:
        if samples < 1:
            raise InputError(f"evaluation samples must be at least 1, got {samples}")
        folder = ImageFolder(folder.root, folder.classes, subsample(folder.samples, samples, seed))
    return folder

"""Finding the images of a data set on disk: class folders, a flat folder with a label file,
or every image under a folder (calibration, where labels are not needed).

Symlinked folders are followed (data sets are often assembled from links, and torchvision
follows them too), but each real folder is entered once per walk: a link that points back
up the tree would otherwise be walked until the OS gives up, listing the same images again
and again. Hidden files and folders (names starting with ``.``) are skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgestar.data.labels import INDEXED_SOURCES, LABELS_FROM_FOLDERS, read_label_file
from edgestar.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageFolder:
    """Labelled images: ``samples`` are (path, class index) pairs, ``classes`` the class names.

    ``labels_source`` says how the labels were read (one of the ``LABELS_*`` strings of
    :mod:`edgestar.data.labels`), ``label_file`` is the label file if there was one, and
    ``notes`` are things the caller should show the user (empty class folders, skipped files).
    """

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    labels_source: str = LABELS_FROM_FOLDERS
    notes: list[str] = field(default_factory=list)
    label_file: Path | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def indexed_labels(self) -> bool:
        """Whether the classes are model output indices ("0", "1", ...) rather than names."""
        return self.labels_source in INDEXED_SOURCES


# --------------------------------------------------------------------------- walking

def _identity(path: str | Path) -> tuple[int, int] | None:
    """The real folder behind ``path`` (device, inode), links resolved; None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _image_names(folder: str | Path, names, broken: list[str] | None = None) -> list[str]:
    """The image files among ``names`` (entries of ``folder``); links to nothing go to ``broken``."""
    images = []
    for name in names:
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            images.append(name)
        elif broken is not None and os.path.islink(full):
            broken.append(full)
    return images


def walk_images(top: Path, *, seen: set, what: str, notes: list[str] | None = None) -> list[Path]:
    """Every image file under ``top``, sorted. ``seen`` holds the identities of folders already
    entered; a folder found in it again (a symlink loop, or a second link to one folder) is
    skipped."""
    def unreadable(err: OSError):
        raise DataError(f"{what}: cannot read folder {err.filename}: {err.strerror}")

    seen.add(_identity(top))
    found, broken = [], []
    for dirpath, dirnames, filenames in os.walk(top, onerror=unreadable, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            ident = _identity(os.path.join(dirpath, d))
            if d.startswith(".") or ident is None or ident in seen:
                continue
            seen.add(ident)
            keep.append(d)
        dirnames[:] = keep  # os.walk descends only into what is left here
        found.extend(Path(dirpath, name) for name in _image_names(dirpath, filenames, broken))
    if broken and notes is not None:
        notes.append(f"skipped {len(broken)} broken link(s) to images under {top}, e.g. {broken[0]}")
    return sorted(found)


def _checked_dir(root: str | os.PathLike, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{what} {root} is not a directory")
    return root


def _entries(root: Path, what: str) -> tuple[list[Path], list[str]]:
    """The visible sub-folders of ``root`` (sorted) and the names of the images directly in it."""
    try:
        names = sorted(os.listdir(root))
    except OSError as exc:
        raise DataError(f"{what} {root} is not readable ({exc.strerror})") from None
    dirs = [root / n for n in names if not n.startswith(".") and os.path.isdir(root / n)]
    return dirs, _image_names(root, names)


# --------------------------------------------------------------------------- data sets

def scan_image_folder(root: str | os.PathLike, *, what: str = "image folder") -> ImageFolder:
    """``root/<class>/<image>``: classes sorted by name (torchvision's convention), images
    searched recursively inside each class folder.

    An empty class folder keeps its class (and so the indices of the others) and gets a note:
    dropping it would shift every later label by one.
    """
    root = _checked_dir(root, what)
    class_dirs, loose = _entries(root, what)
    if not class_dirs:
        hint = (f"; it holds {len(loose)} images directly: for a flat folder give a label file"
                if loose else "")
        raise DataError(f"{what} {root} has no class sub-folders (expected "
                        f"{root}/<class>/<image files>){hint}")
    root_id = _identity(root)
    samples, notes, taken = [], [], set()
    for index, d in enumerate(class_dirs):
        ident = _identity(d)
        if ident in taken or ident == root_id:
            raise DataError(f"{what} {root}: class folder {d.name} links to a folder that is "
                            f"already part of the data set (a symlink loop or a duplicate class)")
        taken.add(ident)
        files = walk_images(d, seen={root_id}, what=what, notes=notes)
        if not files:
            notes.append(_empty_class_note(d, index, what))
        samples.extend((p, index) for p in files)
    if not samples:
        raise DataError(f"{what} {root} contains no image files")
    if loose:
        notes.append(f"{len(loose)} image(s) directly in {what} {root} belong to no class "
                     f"folder and are not used, e.g. {loose[0]}")
    return ImageFolder(root, [d.name for d in class_dirs], samples, notes=notes)


def _empty_class_note(d: Path, index: int, what: str) -> str:
    try:
        others = sum(len(files) for _, _, files in os.walk(d))
    except OSError:
        others = 0
    content = (f"holds {others} file(s) but none is an image ({', '.join(sorted(IMAGE_EXTENSIONS))})"
               if others else "is empty")
    return f"class folder {d} (class {index}) of the {what} {content}: its class is kept but has no samples"


def scan_labelled_folder(root: str | os.PathLike, label_file: str | os.PathLike, *,
                         what: str = "image folder") -> ImageFolder:
    """The images directly in ``root``, labelled by ``label_file`` (see :mod:`edgestar.data.labels`).

    A folder that also has class sub-folders with images is refused: which labels were
    meant, the folders' or the file's, is a guess we will not make.
    """
    root, label_file = _checked_dir(root, what), Path(label_file)
    sub_dirs, names = _entries(root, what)
    root_id = _identity(root)
    with_images = [d.name for d in sub_dirs if walk_images(d, seen={root_id}, what=what)]
    if with_images:
        raise DataError(f"{what} {root} has class sub-folders with images ({', '.join(with_images[:3])}"
                        f"{', ...' if len(with_images) > 3 else ''}) and a label file {label_file} "
                        f"was given: use one or the other")
    if not names:
        raise DataError(f"{what} {root} has no image files directly in it (a label file labels "
                        f"the images in the folder itself)")
    labels = read_label_file(label_file, names, folder=root)
    samples = [(root / name, labels.by_file[name]) for name in sorted(names)]
    return ImageFolder(root, labels.classes, samples, labels_source=labels.source,
                       notes=list(labels.notes), label_file=label_file)


def list_images(root: str | os.PathLike, *, what: str = "image folder",
                notes: list[str] | None = None) -> list[Path]:
    """All images under ``root`` (recursively); labels not needed (calibration)."""
    root = _checked_dir(root, what)
    files = walk_images(root, seen=set(), what=what, notes=notes)
    if not files:
        raise DataError(f"{what} {root} contains no image files")
    return files

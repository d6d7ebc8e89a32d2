"""Label files for a flat folder of images (ImageNet's validation set is shipped that way).

Two formats, told apart by the number of fields per line:

* ``<file name> <class>`` per line, the class an index or a name. File names are relative to
  the image folder and may contain spaces (the class is the last field). With names, the
  classes are the sorted set of names (as for class folders); with indices, they are
  ``0..max`` and index i is model output i.
* one class index per line, for the images in sorted file-name order: the format of
  ILSVRC2012's ``validation_ground_truth.txt``. The line count must equal the image count.

Blank lines and lines starting with ``#`` are skipped; a UTF-8 BOM and Windows or old Mac
line endings are accepted. Anything else that does not fit is a one-line :class:`DataError`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from edgestar.errors import DataError

# How an image set's labels were read: ``ImageFolder.labels_source`` holds one of these.
LABELS_FROM_FOLDERS = "class folders"
LABELS_FILE_AND_NAME = "label file: file name and class name per line"
LABELS_FILE_AND_INDEX = "label file: file name and class index per line"
LABELS_INDEX_PER_LINE = "label file: one class index per line, images in sorted file-name order"
LABELS_NONE = "unlabelled"  # images whose labels are not used (QAT distils the float model)

# Sources whose classes are model output indices ("0", "1", ...) rather than names.
INDEXED_SOURCES = (LABELS_FILE_AND_INDEX, LABELS_INDEX_PER_LINE)

_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN = 3  # how many offending file names an error message lists


@dataclass(frozen=True)
class Labels:
    """What a label file says: the class list, the class index of each image, and how it was read."""

    classes: list[str]
    by_file: dict[str, int]
    source: str
    notes: list[str] = field(default_factory=list)


def read_label_file(path: str | Path, image_names: list[str], *, folder: Path) -> Labels:
    """Labels for ``image_names`` (file names inside ``folder``) from the label file ``path``."""
    path = Path(path)
    lines = _data_lines(path)
    one_field = [(n, text) for n, text in lines if len(text.split()) == 1]
    if len(one_field) == len(lines):
        return _index_per_line(path, lines, sorted(image_names), folder)
    if one_field:
        n, text = one_field[0]
        raise DataError(f"label file {path} line {n}: '{text}' has one field where other lines have "
                        f"two ('<file name> <class>'); use one format for the whole file")
    return _name_and_class(path, lines, image_names, folder)


def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every line that is not blank or a ``#`` comment."""
    if not path.exists():
        raise DataError(f"label file {path} does not exist")
    if not path.is_file():
        raise DataError(f"label file {path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read label file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")  # drops a BOM if there is one
    except UnicodeDecodeError as exc:
        raise DataError(f"label file {path} is not UTF-8 text (byte {exc.start})") from None
    # splitlines() also splits on \r\n and \r; strip() drops the \r of mixed endings too.
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise DataError(f"label file {path} holds no labels (it is empty, or only blank lines "
                        f"and comments)")
    return lines


def _class_index(token: str, path: Path, line_no: int) -> int:
    if not _INTEGER.fullmatch(token):
        raise DataError(f"label file {path} line {line_no}: '{token}' is not a class index "
                        f"(a one-column label file holds one class index per line)")
    index = int(token)
    if index < 0:
        raise DataError(f"label file {path} line {line_no}: class index {index} is negative")
    return index


def _index_per_line(path: Path, lines, sorted_names: list[str], folder: Path) -> Labels:
    indices = [_class_index(text, path, n) for n, text in lines]
    if len(indices) != len(sorted_names):
        raise DataError(f"label file {path} has {len(indices)} labels but {folder} has "
                        f"{len(sorted_names)} images; a one-index-per-line file labels the images "
                        f"in sorted file-name order, so the counts must match")
    return _indexed(dict(zip(sorted_names, indices)), LABELS_INDEX_PER_LINE, path)


def _name_and_class(path: Path, lines, image_names: list[str], folder: Path) -> Labels:
    given: dict[str, tuple[int, str]] = {}  # file name -> (line number, class token)
    for n, text in lines:
        name, token = text.rsplit(None, 1)  # the class is the last field: names may hold spaces
        name = name.removeprefix("./")
        if name in given:
            raise DataError(f"label file {path} labels {name} twice (lines {given[name][0]} and {n})")
        given[name] = (n, token)
    _check_coverage(path, set(given), image_names, folder)

    numeric = [n for n, token in given.values() if _INTEGER.fullmatch(token)]
    named = [n for n, token in given.values() if not _INTEGER.fullmatch(token)]
    if numeric and named:
        raise DataError(f"label file {path} mixes class indices (line {numeric[0]}) and "
                        f"class names (line {named[0]}); use one or the other")
    if numeric:
        by_file = {name: _class_index(token, path, n) for name, (n, token) in given.items()}
        return _indexed(by_file, LABELS_FILE_AND_INDEX, path)
    classes = sorted({token for _, token in given.values()})
    position = {c: i for i, c in enumerate(classes)}
    return Labels(classes, {name: position[token] for name, (_, token) in given.items()},
                  LABELS_FILE_AND_NAME)


def _check_coverage(path: Path, labelled: set[str], image_names: list[str], folder: Path) -> None:
    """Every labelled file must be one of the images, and every image must have a label."""
    images = set(image_names)
    unknown = sorted(labelled - images)
    if unknown:
        raise DataError(f"label file {path} names {len(unknown)} file(s) that are not images in "
                        f"{folder}: {_listing(unknown)}")
    unlabelled = sorted(images - labelled)
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in {folder} have no label in {path}: "
                        f"{_listing(unlabelled)}")


def _indexed(by_file: dict[str, int], source: str, path: Path) -> Labels:
    """Labels given as model output indices: the classes are "0".."max"."""
    top = max(by_file.values())
    notes = []
    if 0 not in by_file.values():
        # ILSVRC2012's devkit numbers its classes 1..1000 in its own order, not the
        # 0-based sorted-synset order models are trained with: a silent misreading.
        notes.append(f"label file {path} never uses class 0: if its indices start at 1 "
                     f"(like ILSVRC2012 devkit IDs) they are not model output indices; "
                     f"index i must be model output i")
    return Labels([str(i) for i in range(top + 1)], by_file, source, notes)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")

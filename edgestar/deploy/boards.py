"""Microcontroller boards and the "does it fit" verdict for ``edgestar firmware --board``.

The board table is ``firmware_assets/boards.toml`` (its header explains every field and how the
reserves were chosen). setup.cfg installs that folder as the package
``edgestar._firmware_assets``, so an installed wheel carries the table; a source checkout reads
its own ``firmware_assets/`` first. Stdlib only: no numpy, no TensorFlow.

    v = verdict(get_board("nano33ble"), model_bytes=300_000, arena_bytes=141_744)
    print(format_verdict(v))      # or json.dumps(v)
"""
from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgestar.errors import InputError

__all__ = ["Board", "BOARD_FIELDS", "DEFAULT_CODE_BYTES", "CODE_BYTES_SOURCE", "load_boards", "parse_boards",
           "get_board", "verdict", "format_verdict"]

ASSETS_PACKAGE = "edgestar._firmware_assets"
TABLE_NAME = "boards.toml"

# Flash the code takes besides the model, when the caller has no linked ELF to measure.
DEFAULT_CODE_BYTES = 100 * 1024
CODE_BYTES_SOURCE = (
    "estimate, not measured: TFLite Micro's interpreter core is ~16 KB on a Cortex-M3 (TFLM paper, "
    "MLSys 2021); with the kernels a small CNN needs (CMSIS-NN), start-up, HAL and C library an app "
    "comes to roughly 60-120 KB; 100 KB assumed. ESP-IDF images are larger. `--build` measures it "
    "(arm-none-eabi-size)")

FAMILIES = ("arm-cortex-m", "esp32")
CORES = {  # core -> family it belongs to
    "cortex-m0plus": "arm-cortex-m", "cortex-m3": "arm-cortex-m", "cortex-m4": "arm-cortex-m",
    "cortex-m7": "arm-cortex-m", "cortex-m33": "arm-cortex-m", "cortex-m55": "arm-cortex-m",
    "cortex-m85": "arm-cortex-m", "xtensa-lx7": "esp32",
}
CORE_NAMES = {"cortex-m0plus": "Cortex-M0+", "xtensa-lx7": "Xtensa LX7"}

STRING_FIELDS = ("description", "mcu", "core", "family")
INT_FIELDS = ("clock_mhz", "flash_bytes", "flash_reserve_bytes", "ram_bytes", "arena_region_bytes",
              "reserve_bytes")
ZERO_ALLOWED = {"flash_reserve_bytes"}
# The figures that need a source, and so the keys of [boards.NAME.sources].
SOURCED = ("core", "clock_mhz", "flash_bytes", "flash_reserve_bytes", "ram_bytes", "arena_region_bytes",
           "reserve_bytes")
BOARD_FIELDS = STRING_FIELDS + INT_FIELDS + ("sources",)


def core_display_name(core: str) -> str:
    """cortex-m4 -> Cortex-M4, cortex-m0plus -> Cortex-M0+, xtensa-lx7 -> Xtensa LX7."""
    return CORE_NAMES.get(core, core.replace("cortex-m", "Cortex-M"))


NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


@dataclass(frozen=True)
class Board:
    """One board's budgets. Sizes are in bytes (1 KB = 1,024 B); see boards.toml's header."""

    name: str
    description: str
    mcu: str
    core: str  # arm-none-eabi-gcc -mcpu name for Arm cores, xtensa-lx7 for the ESP32-S3
    clock_mhz: int
    flash_bytes: int
    ram_bytes: int
    arena_region_bytes: int  # the largest contiguous RAM region the arena can be placed in
    reserve_bytes: int  # of that region, what stack, heap, SDK, drivers and I/O buffers take
    family: str  # arm-cortex-m or esp32
    sources: dict[str, str]  # figure -> where it comes from
    flash_reserve_bytes: int = 0  # of the flash, what the app cannot use (bootloader, partitions)

    @property
    def usable_arena_bytes(self) -> int:
        """What the arena may take: the arena region less the reserve."""
        return self.arena_region_bytes - self.reserve_bytes

    @property
    def usable_flash_bytes(self) -> int:
        """What the firmware image (code + model) may take."""
        return self.flash_bytes - self.flash_reserve_bytes

    @property
    def core_name(self) -> str:
        """The core as a datasheet writes it: cortex-m4 -> Cortex-M4."""
        return core_display_name(self.core)

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- the table

def _short(value: Any, limit: int = 60) -> str:
    """A value for a one-line message: repr, newlines escaped, cut to ``limit`` characters."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "table", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "float"}.get(type(value), type(value).__name__)


def _check_board(name: str, entry: Any, where: str) -> Board:
    """One [boards.NAME] table -> Board, or an InputError naming the board and the field."""

    def fail(field: str, problem: str) -> InputError:
        return InputError(f"{where}: board {name!r}: field {field!r}: {problem}")

    if not isinstance(entry, dict):
        raise InputError(f"{where}: board {name!r}: must be a table ([boards.{name}]), "
                         f"got {_type_name(entry)}")
    unknown = sorted(set(entry) - set(BOARD_FIELDS), key=str)
    if unknown:
        raise fail(str(unknown[0]), f"unknown field (the fields are: {', '.join(BOARD_FIELDS)})")
    for field in BOARD_FIELDS:
        if field not in entry:
            raise fail(field, "missing")
    values: dict[str, Any] = {}
    for field in STRING_FIELDS:
        value = entry[field]
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise fail(field, f"must be a non-empty one-line string, got {_type_name(value)} {_short(value)}")
        values[field] = value.strip()
    for field in INT_FIELDS:
        value = entry[field]
        # bool is an int in Python; TOML's true is not a size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(field, f"must be an integer, got {_type_name(value)} {_short(value)}")
        lowest = 0 if field in ZERO_ALLOWED else 1
        if value < lowest:
            raise fail(field, f"must be {'>= 0' if lowest == 0 else 'positive'}, got {value}")
        values[field] = value
    if values["core"] not in CORES:
        raise fail("core", f"unknown core {_short(values['core'])} (known: {', '.join(CORES)})")
    if values["family"] not in FAMILIES:
        raise fail("family", f"must be one of {', '.join(FAMILIES)}, got {_short(values['family'])}")
    if CORES[values["core"]] != values["family"]:
        raise fail("family", f"{values['family']!r} does not match core {values['core']!r} "
                             f"(which is {CORES[values['core']]!r})")
    if values["flash_reserve_bytes"] >= values["flash_bytes"]:
        raise fail("flash_reserve_bytes", f"{values['flash_reserve_bytes']:,} must be less than "
                                          f"flash_bytes {values['flash_bytes']:,}")
    if values["arena_region_bytes"] > values["ram_bytes"]:
        raise fail("arena_region_bytes", f"{values['arena_region_bytes']:,} is more than "
                                         f"ram_bytes {values['ram_bytes']:,}")
    if values["reserve_bytes"] >= values["arena_region_bytes"]:
        raise fail("reserve_bytes", f"{values['reserve_bytes']:,} leaves nothing of "
                                    f"arena_region_bytes {values['arena_region_bytes']:,}")
    sources = entry["sources"]
    if not isinstance(sources, dict):
        raise fail("sources", f"must be a table ([boards.{name}.sources]), got {_type_name(sources)}")
    extra = sorted(set(sources) - set(SOURCED), key=str)
    if extra:
        raise fail(f"sources.{extra[0]}", f"no such figure (sources are for: {', '.join(SOURCED)})")
    for field in SOURCED:
        text = sources.get(field)
        if not isinstance(text, str) or not text.strip():
            raise fail(f"sources.{field}", "missing or empty: every figure needs its source"
                       if text is None or isinstance(text, str) else
                       f"must be a string, got {_type_name(text)} {_short(text)}")
    return Board(name=name, sources={k: sources[k].strip() for k in SOURCED}, **values)


def parse_boards(data: Any, where: str = "board table") -> dict[str, Board]:
    """The parsed TOML document ``{"boards": {NAME: {...}}}`` -> boards by name.

    Anything malformed raises one InputError that names ``where`` (the file), the board and the
    field; nothing else is raised, whatever ``data`` holds.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where}: must be a TOML document with a [boards.NAME] table per board")
    unknown = sorted(set(data) - {"boards"}, key=str)
    if unknown:
        raise InputError(f"{where}: unknown top-level key {_short(unknown[0])} "
                         "(only [boards.NAME] tables belong here)")
    boards = data.get("boards")
    if not isinstance(boards, dict) or not boards:
        raise InputError(f"{where}: no boards: expected [boards.NAME] tables")
    out = {}
    for name, entry in boards.items():
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InputError(f"{where}: board name {_short(name)} must be lower-case letters, digits "
                             "and '-' (at most 64)")
        out[name] = _check_board(name, entry, where)
    return out


def _default_table() -> Path:
    """This checkout's firmware_assets/boards.toml, else the installed package's copy.

    A source checkout (PYTHONPATH or an editable install) reads its own folder first, as
    edgestar.data.images does for the demo set.
    """
    import importlib.resources  # only this lookup needs it

    repository = Path(__file__).resolve().parents[2]  # site-packages when installed from a wheel
    if (repository / "setup.cfg").is_file() and (repository / "firmware_assets" / TABLE_NAME).is_file():
        return repository / "firmware_assets" / TABLE_NAME
    try:
        installed = importlib.resources.files(ASSETS_PACKAGE) / TABLE_NAME
    except ModuleNotFoundError:
        installed = None
    if isinstance(installed, Path) and installed.is_file():
        return installed
    raise InputError(f"the board table is missing: neither firmware_assets/{TABLE_NAME} in the source tree "
                     f"nor {ASSETS_PACKAGE} installed; reinstall edgestar")


def load_boards(path: Path | str | None = None) -> dict[str, Board]:
    """The board table at ``path`` (default: the packaged ``boards.toml``), checked.

    An unreadable file, invalid TOML or a malformed board raises a one-line InputError naming
    the file (and the board and field where there is one).
    """
    path = _default_table() if path is None else Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read the board table: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        first = str(e).splitlines()[0] if str(e) else "parse error"
        raise InputError(f"{path}: invalid TOML: {first}") from None
    return parse_boards(data, str(path))


@functools.cache
def _packaged_boards() -> dict[str, Board]:
    return load_boards()


def get_board(name: str) -> Board:
    """The packaged board ``name``; an unknown name raises InputError listing the choices."""
    boards = _packaged_boards()
    if name not in boards:
        raise InputError(f"unknown board {name!r}; choose one of: {', '.join(boards)}")
    return boards[name]


# --------------------------------------------------------------------------- the verdict

def _size(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{what} must be a byte count (an integer >= 0), got {_short(value)}")
    return value


def _budget(used: int, budget: int) -> dict:
    headroom = budget - used
    return {"budget_bytes": budget, "headroom_bytes": headroom,
            "headroom_percent": round(100.0 * headroom / budget, 1), "fits": headroom >= 0}


def verdict(board: Board, *, model_bytes: int, arena_bytes: int,
            code_bytes_estimate: int | None = None) -> dict:
    """Does a model fit ``board``? A JSON-able dict.

    Flash: the model's bytes plus the code (``code_bytes_estimate``, default
    DEFAULT_CODE_BYTES, an estimate) against the flash less its reserve (bootloader). RAM: the
    tensor arena against the arena region less the board's reserve. Exactly filling a budget
    fits (headroom 0). ``reason`` is None when it fits, else one line per failed budget, joined.
    """
    model_bytes = _size(model_bytes, "model_bytes")
    arena_bytes = _size(arena_bytes, "arena_bytes")
    estimated = code_bytes_estimate is None
    code_bytes = DEFAULT_CODE_BYTES if estimated else _size(code_bytes_estimate, "code_bytes_estimate")
    image = model_bytes + code_bytes
    flash = {"model_bytes": model_bytes, "code_bytes": code_bytes, "code_bytes_is_default": estimated,
             "code_bytes_source": CODE_BYTES_SOURCE if estimated else "given by the caller",
             "used_bytes": image, "flash_bytes": board.flash_bytes,
             "flash_reserve_bytes": board.flash_reserve_bytes, **_budget(image, board.usable_flash_bytes)}
    ram = {"arena_bytes": arena_bytes, "arena_region_bytes": board.arena_region_bytes,
           "reserve_bytes": board.reserve_bytes, "ram_bytes": board.ram_bytes,
           **_budget(arena_bytes, board.usable_arena_bytes)}
    reasons = []
    if not flash["fits"]:
        reasons.append(f"flash: model {model_bytes:,} B + code {code_bytes:,} B = {image:,} B exceeds the "
                       f"{flash['budget_bytes']:,} B usable flash by {-flash['headroom_bytes']:,} B")
    if not ram["fits"]:
        reasons.append(f"RAM: arena {arena_bytes:,} B exceeds the {ram['budget_bytes']:,} B usable for it "
                       f"(arena region {board.arena_region_bytes:,} B less {board.reserve_bytes:,} B "
                       "reserve) "
                       f"by {-ram['headroom_bytes']:,} B")
    return {"board": board.name, "description": board.description, "mcu": board.mcu, "core": board.core,
            "clock_mhz": board.clock_mhz, "family": board.family, "fits": not reasons,
            "flash": flash, "ram": ram, "reason": "; ".join(reasons) if reasons else None}


def format_verdict(v: dict) -> str:
    """A few human lines for a verdict() dict."""
    flash, ram = v["flash"], v["ram"]
    core = core_display_name(v["core"])
    head = f"{v['board']} ({v['mcu']}, {core} {v['clock_mhz']} MHz): "
    if v["fits"]:
        head += "FITS"
    else:
        failed = []
        if not ram["fits"]:
            failed.append(f"arena {ram['arena_bytes']:,} B > {ram['budget_bytes']:,} B usable RAM "
                          f"(over by {-ram['headroom_bytes']:,} B)")
        if not flash["fits"]:
            failed.append(f"model + code {flash['used_bytes']:,} B > {flash['budget_bytes']:,} B "
                          "usable flash "
                          f"(over by {-flash['headroom_bytes']:,} B)")
        head += "DOES NOT FIT — " + "; ".join(failed)
    code = f"code {flash['code_bytes']:,} B" + (" (estimate)" if flash["code_bytes_is_default"] else "")
    flash_of = f"{flash['flash_bytes']:,} B flash" + (
        f" less {flash['flash_reserve_bytes']:,} B reserved" if flash["flash_reserve_bytes"] else "")
    lines = [
        head,
        f"  flash: model {flash['model_bytes']:,} B + {code} = {flash['used_bytes']:,} B "
        f"of {flash['budget_bytes']:,} B "
        f"({flash_of}); headroom {flash['headroom_bytes']:,} B ({flash['headroom_percent']:.1f} %)",
        f"  RAM:   arena {ram['arena_bytes']:,} B of {ram['budget_bytes']:,} B (arena region "
        f"{ram['arena_region_bytes']:,} B less {ram['reserve_bytes']:,} B reserve for stack, heap and I/O); "
        f"headroom {ram['headroom_bytes']:,} B ({ram['headroom_percent']:.1f} %)",
    ]
    return "\n".join(lines)

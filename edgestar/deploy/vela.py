"""Arm Ethos-U NPU estimates with Arm's Vela compiler (``ethos-u-vela``): the ``vela:CONFIG``
device of ``edgestar bench``.

Vela compiles an INT8 ``.tflite`` for an Ethos-U55/U65/U85 microNPU: every operator it supports
goes into ``ethos-u`` CUSTOM operators (the NPU's command stream and compressed weights), the
rest stays as ordinary TFLite operators that TensorFlow Lite Micro runs on the Cortex-M CPU.
Its summary CSV estimates the NPU's cycles and time per inference and the memory the model
needs in each memory area. No hardware runs here, so every figure :func:`vela_estimate`
returns is Vela's *estimate*; the dict says so (``"estimate": True``) and the time keys end in
``_estimate``. The time covers the NPU only: CPU-fallback operators are not in it.

Vela runs as a child process of this same Python (``python -m edgestar.deploy.vela``: this
module's ``__main__`` calls Vela's own ``main``), in a private temporary folder, killed after a
time-out and when edgestar dies. Nothing here imports TensorFlow.

    from edgestar.deploy.vela import vela_estimate
    print(vela_estimate(Path("runs/s1-.../starnet_s1_224_int8.tflite"), accelerator="ethos-u55-128"))
"""
from __future__ import annotations

import csv
import glob
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edgestar.children import exit_status
from edgestar.errors import InputError, StageError
from edgestar.files import scratch_dir

VELA_PACKAGE = "ethos-u-vela"  # on PyPI; pinned by setup.cfg's [npu] extra
INSTALL_HINT = 'pip install "edgestar[npu]"'
CONFIG_FILE = "Arm/vela.ini"  # Arm's system configurations, shipped inside ethos-u-vela
ETHOS_U_OP = "CUSTOM:ethos-u"  # how edgestar.convert.tflite_file names Vela's NPU operator

# Every --accelerator-config of Vela 5.2.0 (`vela --help`): Ethos-U<family>-<MACs per cycle>.
ACCELERATORS: tuple[str, ...] = (
    "ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256",
    "ethos-u65-256", "ethos-u65-512",
    "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048",
)

# The defaults are those of Arm's ML Embedded Evaluation Kit, which builds its examples for the
# Corstone-300 (Cortex-M55 + Ethos-U55 or U65), Corstone-310 and Corstone-320 (Ethos-U85)
# reference systems from these names of the bundled Arm/vela.ini:
# - U55: "Ethos_U55_High_End_Embedded" (500 MHz, SRAM 4 GB/s, flash 0.5 GB/s) with "Shared_Sram":
#   weights and command stream read from flash, the tensor arena in SRAM that the Cortex-M
#   shares. Vela sets no SRAM limit in this mode: compare sram_bytes with the board's SRAM.
# - U65: "Ethos_U65_High_End" (1 GHz, SRAM 16 GB/s, DRAM 3.75 GB/s) with "Dedicated_Sram" and a
#   384 KiB NPU cache (the kit's default ETHOS_U_NPU_CACHE_SIZE, 393216): weights and arena in
#   DRAM, the SRAM only the NPU's cache. The bundled ini calls that "Dedicated_Sram_384KB";
#   plain "Dedicated_Sram" would let Vela assume an unlimited cache.
# - U85: the same memory mode; the kit takes "Ethos_U85_SYS_DRAM_Low" for 128 and 256 MACs and
#   faster systems for more MACs (its own ini's *_Mid_512/_Mid_1024/_High_2048; the bundled
#   ini's nearest are SYS_DRAM_Mid and SYS_DRAM_High).
_U85_SYSTEMS = {128: "Ethos_U85_SYS_DRAM_Low", 256: "Ethos_U85_SYS_DRAM_Low",
                512: "Ethos_U85_SYS_DRAM_Mid", 1024: "Ethos_U85_SYS_DRAM_Mid",
                2048: "Ethos_U85_SYS_DRAM_High"}

_KIB = 1024  # Vela's CSV gives memory sizes in KiB


def vela_available() -> bool:
    """Whether Arm's Vela compiler can run in this Python (``pip install "edgestar[npu]"``)."""
    try:
        return importlib.util.find_spec("ethosu.vela") is not None
    except ImportError:  # no "ethosu" package at all
        return False


def vela_version() -> str:
    """The installed ``ethos-u-vela`` version, e.g. ``"5.2.0"``."""
    try:
        return importlib.metadata.version(VELA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def check_accelerator(accelerator: str) -> None:
    if accelerator not in ACCELERATORS:
        raise InputError(f"unknown Ethos-U accelerator {accelerator!r}; "
                         f"choose one of {', '.join(ACCELERATORS)}")


def system_config_for(accelerator: str) -> tuple[str, str]:
    """``(system config, memory mode)`` of Arm's ``vela.ini`` that edgestar uses by default for
    ``accelerator``: what Arm's evaluation kit uses for that NPU family (see the comment above
    ``_U85_SYSTEMS``)."""
    check_accelerator(accelerator)
    family, macs = accelerator.rsplit("-", 1)
    if family == "ethos-u55":
        return "Ethos_U55_High_End_Embedded", "Shared_Sram"
    if family == "ethos-u65":
        return "Ethos_U65_High_End", "Dedicated_Sram_384KB"
    return _U85_SYSTEMS[int(macs)], "Dedicated_Sram_384KB"


def vela_estimate(model: Path, *, accelerator: str = "ethos-u55-128", system_config: str | None = None,
                  memory_mode: str | None = None, timeout_s: float = 600,
                  keep_dir: Path | None = None) -> dict:
    """Compile the INT8 ``.tflite`` ``model`` with Vela for ``accelerator`` and return Vela's
    estimates as a JSON-able dict (all sizes in bytes, times in milliseconds):

    ``device``                     ``"vela:<accelerator>"``
    ``estimate``                   always ``True``: nothing here ran on an NPU
    ``accelerator``, ``system_config``, ``memory_mode``   what Vela compiled for (Arm/vela.ini)
    ``vela_version``               the ``ethos-u-vela`` that compiled it
    ``model``                      the input model's path
    ``inference_ms_estimate``      Vela's estimated time of one inference on the NPU, in ms
                                   (= ``cycles_total`` / ``npu_clock_hz``). It leaves out the
                                   CPU-fallback operators (``cpu_op_types``) and the CPU's work
                                   around the NPU (pre- and post-processing, driver)
    ``inferences_per_s_estimate``  1000 / ``inference_ms_estimate``
    ``npu_clock_hz``               the NPU clock of the system config
    ``cycles_npu``                 NPU cycles of one inference spent computing
    ``cycles_total``               NPU cycles of one inference including the waits for memory
                                   (more than ``cycles_npu`` when memory-bound)
    ``nn_macs``                    multiply-accumulates of one inference on the NPU
    ``sram_bytes``                 SRAM Vela uses: the tensor arena in ``Shared_Sram``/``Sram_Only``
                                   modes, the NPU's cache in ``Dedicated_Sram`` modes
    ``dram_bytes``                 DRAM used (``Dedicated_Sram`` modes: weights and arena)
    ``flash_bytes``                off-chip flash used: weights and NPU command stream
                                   (``Shared_Sram``; 0 where they live in DRAM)
    ``weights_in``, ``feature_maps_in``  the memory areas holding weights and feature maps
    ``input_ops``                  operators of the input model
    ``npu_ops``                    of those, how many Vela put on the NPU
    ``cpu_ops``                    operators left for the CPU (TFLite Micro's kernels), and
    ``cpu_op_types``               the same by type, e.g. ``{"REVERSE_V2": 1}``
    ``npu_segments``               ``ethos-u`` operators in the compiled model: stretches of
                                   NPU work between CPU operators (1 when none interrupt it)
    ``model_bytes``, ``vela_model_bytes``   sizes of the input and of the compiled ``.tflite``
    ``vela_model``, ``vela_summary``   only with ``keep_dir``: where the compiled model (the
                                   one to flash) and Vela's summary CSV were kept

    ``system_config`` and ``memory_mode`` default to :func:`system_config_for`. Vela gets
    ``timeout_s`` seconds. ``keep_dir`` (created if needed) receives ``<name>_vela.tflite`` and
    ``<name>_summary_<system config>.csv``; otherwise nothing outside a temporary folder is written.

    Raises InputError for a missing or non-INT8 model, an unknown accelerator, system config or
    memory mode, or no Vela installed; StageError when Vela fails or times out.
    """
    model = Path(model)
    check_accelerator(accelerator)
    if not vela_available():
        raise InputError(f"the vela:{accelerator} estimate needs Arm's Vela compiler ({VELA_PACKAGE}), "
                         f"which is not installed; install it with: {INSTALL_HINT}")
    input_ops = _check_int8_model(model)
    default_system, default_memory = system_config_for(accelerator)
    system_config = system_config or default_system
    memory_mode = memory_mode or default_memory
    _check_config_names(system_config, memory_mode)

    with scratch_dir("vela") as tmp:
        out = Path(tmp)
        _run_vela(model, out, accelerator, system_config, memory_mode, timeout_s)
        compiled = out / f"{model.stem}_vela.tflite"
        summaries = sorted(out.glob(f"{glob.escape(model.stem)}_summary_*.csv"))
        if not compiled.is_file() or not summaries:
            raise StageError(f"Vela finished on {model} but wrote no compiled model or summary CSV "
                             f"(found: {', '.join(p.name for p in out.iterdir()) or 'nothing'})")
        result = _result(model, compiled, _read_summary(summaries[0]), input_ops, accelerator,
                         system_config, memory_mode)
        if keep_dir is not None:
            keep_dir = Path(keep_dir)
            keep_dir.mkdir(parents=True, exist_ok=True)
            result["vela_model"] = str(Path(shutil.copy2(compiled, keep_dir / compiled.name)))
            result["vela_summary"] = str(Path(shutil.copy2(summaries[0], keep_dir / summaries[0].name)))
    return result


# ---------------------------------------------------------------------------- checks

def _check_int8_model(model: Path) -> int:
    """The number of operators of ``model`` after checking it is an integer-quantized
    ``.tflite``. Vela would "compile" an FP32 model too, without error, by leaving every
    operator on the CPU: an estimate of nothing."""
    from edgestar.convert.tflite_file import float_ops_inside, op_counts

    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    with open(model, "rb") as f:
        if f.read(8)[4:] != b"TFL3":  # a .tflite flatbuffer's file identifier
            raise InputError(f"{model} is not a .tflite model")
    try:
        ops = sum(op_counts(model).values())
        floats = float_ops_inside(model)
    except Exception as e:  # the flatbuffer reader raises whatever a bad offset leads to
        raise InputError(f"{model} is not a readable .tflite model ({type(e).__name__})") from None
    if floats:
        kinds = ", ".join(sorted(set(floats)))
        raise InputError(f"{model} is not an INT8 model ({len(floats)} of its {ops} operators compute "
                         f"in float: {kinds}); Vela compiles only quantized models: use the "
                         "*_int8.tflite of a run")
    return ops


def _config_names() -> tuple[list[str], list[str]] | None:
    """(system configs, memory modes) defined in the installed ``Arm/vela.ini``, or None when
    the file cannot be found (Vela then reports a wrong name itself)."""
    spec = importlib.util.find_spec("ethosu.vela")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        return None
    ini = Path(locations[0]).parent / "config_files" / CONFIG_FILE
    try:
        text = ini.read_text()
    except OSError:
        return None
    sections = re.findall(r"^\[(System_Config|Memory_Mode)\.([^\]]+)\]", text, flags=re.MULTILINE)
    return ([name for kind, name in sections if kind == "System_Config"],
            [name for kind, name in sections if kind == "Memory_Mode"])


def _check_config_names(system_config: str, memory_mode: str) -> None:
    names = _config_names()
    if names is None:
        return
    systems, modes = names
    if system_config not in systems:
        raise InputError(f"unknown Vela system config {system_config!r}; {CONFIG_FILE} defines "
                         f"{', '.join(systems)}")
    if memory_mode not in modes:
        raise InputError(f"unknown Vela memory mode {memory_mode!r}; {CONFIG_FILE} defines "
                         f"{', '.join(modes)}")


# ---------------------------------------------------------------------------- the child process

def _vela_command(model: Path, out: Path, accelerator: str, system_config: str,
                  memory_mode: str) -> list[str]:
    """Vela's command line, run by this module's ``__main__`` in this same Python. The model
    path is absolute, so no file name can pass for an option."""
    return [sys.executable, "-m", "edgestar.deploy.vela",
            "--output-dir", str(out), "--accelerator-config", accelerator, "--config", CONFIG_FILE,
            "--system-config", system_config, "--memory-mode", memory_mode,
            str(model.resolve())]


def _run_vela(model: Path, out: Path, accelerator: str, system_config: str, memory_mode: str,
              timeout_s: float) -> None:
    from edgestar.children import child_env

    command = _vela_command(model, out, accelerator, system_config, memory_mode)
    try:
        # On time-out subprocess.run kills the child (SIGKILL) and reaps it before raising.
        proc = subprocess.run(command, cwd=out, capture_output=True, text=True, timeout=timeout_s,
                              env=child_env())
    except subprocess.TimeoutExpired:
        raise StageError(f"Vela did not finish compiling {model} for {accelerator} within its time-out "
                         f"of {timeout_s:g} s; the child process was killed") from None
    if proc.returncode != 0:
        line = _error_line(proc.stderr, proc.stdout)
        if "ConfigOptionError" in line or "Invalid configuration" in line:
            raise InputError(f"Vela rejected system config {system_config} with memory mode "
                             f"{memory_mode} for {accelerator}: {line}")
        raise StageError(f"Vela failed on {model} for {accelerator} "
                         f"({exit_status(proc.returncode)}): {line}")


def _error_line(*texts: str | None, limit: int = 300) -> str:
    """Vela's own error: the last line that says "Error" (a Python traceback's final line, or
    Vela's ``Error: ...`` message), else the last non-blank line of the first text with one."""
    lines = [[line.strip() for line in (text or "").splitlines() if line.strip()] for text in texts]
    errors = [line for group in lines for line in group if "error" in line.lower()]
    candidates = errors or next((group for group in lines if group), ["no error output"])
    line = candidates[-1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


# ---------------------------------------------------------------------------- Vela's outputs

def _read_summary(path: Path) -> dict[str, str]:
    """The one data row of Vela's summary CSV, by column name."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise StageError(f"Vela's summary {path.name} has no rows")
    return rows[0]


def _result(model: Path, compiled: Path, row: dict[str, str], input_ops: int, accelerator: str,
            system_config: str, memory_mode: str) -> dict:
    """The estimate dict of :func:`vela_estimate` from Vela's CSV row and the compiled model."""
    from edgestar.convert.tflite_file import op_counts

    def number(column: str) -> float:
        try:
            return float(row[column])
        except (KeyError, ValueError):
            raise StageError(f"Vela's summary CSV has no number in column {column!r} "
                             f"(Vela {vela_version()}; edgestar reads the columns of 5.2.0)") from None

    def kib(column: str) -> int:
        return round(number(column) * _KIB)

    compiled_ops = op_counts(compiled)
    cpu_op_types = {op: n for op, n in sorted(compiled_ops.items()) if op != ETHOS_U_OP}
    cpu_ops = sum(cpu_op_types.values())
    seconds = number("inference_time")
    return {
        "device": f"vela:{accelerator}",
        "estimate": True,
        "accelerator": accelerator,
        "system_config": system_config,
        "memory_mode": memory_mode,
        "vela_version": vela_version(),
        "model": str(model),
        "inference_ms_estimate": seconds * 1000,
        "inferences_per_s_estimate": 1 / seconds if seconds > 0 else None,
        "npu_clock_hz": number("core_clock"),
        "cycles_npu": int(number("cycles_npu")),
        "cycles_total": int(number("cycles_total")),
        "nn_macs": int(number("nn_macs")),
        "sram_bytes": kib("sram_memory_used"),
        "dram_bytes": kib("dram_memory_used"),
        "flash_bytes": kib("off_chip_flash_memory_used"),
        "weights_in": row.get("weights_storage_area"),
        "feature_maps_in": row.get("feature_map_storage_area"),
        "input_ops": input_ops,
        # CPU operators pass through Vela unchanged, so the rest went into the ethos-u operators
        "npu_ops": max(input_ops - cpu_ops, 0),
        "cpu_ops": cpu_ops,
        "cpu_op_types": cpu_op_types,
        "npu_segments": compiled_ops.get(ETHOS_U_OP, 0),
        "model_bytes": model.stat().st_size,
        "vela_model_bytes": compiled.stat().st_size,
    }


if __name__ == "__main__":
    from edgestar.children import die_with_parent

    die_with_parent()
    from ethosu.vela.vela import main

    sys.exit(main(sys.argv[1:]))

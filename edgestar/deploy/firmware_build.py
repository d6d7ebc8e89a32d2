"""``edgestar firmware --build / --run qemu``: compile the generated sources for a Cortex-M core
with ``arm-none-eabi-gcc`` against a TensorFlow Lite Micro tree, and run the result on QEMU's
emulated boards, feeding it evaluation images.

- The TFLM library is built with the tree's own Makefile (``make -C TREE BUILD_DIR=… CPU=…
  KERNELS=…``), but only the objects the model needs: the interpreter core, the kernels of the
  model's ops and the CMSIS-NN sources (168 of 315 objects for StarNet: 125 s on 2 idle cores,
  where facts.md measured ~5 min for the whole library). Objects are cached under
  ``$EDGESTAR_CACHE/tflm/<cpu>-<kernels>-<tree>/``, where make compiles only what is missing, and
  each object set gets its own archive. If the link still misses a symbol, the whole library is
  built and the link retried.
- The application is compiled with the flags ``make print-flags`` reports (a mismatch in
  ``TF_LITE_STATIC_MEMORY``/``CMSIS_NN`` breaks the ABI silently), linked with a start-up file
  and a linker script for the emulated machine of the core, and measured with
  ``arm-none-eabi-size``: flash = code + read-only data + initialised data; RAM = data + bss
  (the arena) + the heap and stack the script reserves.
- Under ``qemu-system-arm -icount shift=0`` each instruction advances virtual time by 1 ns, so
  the SysTick counter, clocked by the CPU clock, counts instructions: ticks × 10⁹ / clock.
  QEMU is not cycle-accurate; these are instruction counts, never latencies.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgestar.children import run_tool
from edgestar.errors import InputError, StageError
from edgestar.files import scratch_dir


@dataclass(frozen=True)
class Machine:
    """An emulated board QEMU runs, and where the linker script puts code, model and data."""

    name: str  # qemu-system-arm -M
    cpu_clock_hz: int  # what SysTick counts with CLKSOURCE = processor clock
    code: tuple[int, int, str]  # origin, length, region name
    model: tuple[int, int, str]
    ram: tuple[int, int, str]


# Memory maps read from QEMU 7.2 (`info mtree -f`); see ../shared/notes/facts.md.
MACHINES = {
    "cortex-m55": Machine("mps3-an547", 32_000_000, (0x00000000, 512 << 10, "ITCM"),
                          (0x60000000, 256 << 20, "DDR"), (0x21000000, 4 << 20, "SRAM2")),
    "cortex-m4": Machine("mps2-an386", 25_000_000, (0x00000000, 4 << 20, "SSRAM1"),
                         (0x21000000, 16 << 20, "RAM"), (0x20000000, 4 << 20, "SSRAM2/3")),
    "cortex-m7": Machine("mps2-an500", 25_000_000, (0x00000000, 4 << 20, "SSRAM1"),
                         (0x60000000, 16 << 20, "RAM"), (0x20000000, 4 << 20, "SSRAM2/3")),
}
# Cores the tree's Makefile builds for but QEMU has no plain bare-metal board for here: linked
# with a generic map, for the sizes only.
GENERIC = Machine("", 0, (0x00000000, 64 << 20, "CODE"), (0x10000000, 256 << 20, "MODEL"),
                  (0x20000000, 64 << 20, "RAM"))
BUILD_CPUS = ("cortex-m55", "cortex-m4", "cortex-m7", "cortex-m33", "cortex-m0plus", "cortex-m85")
STACK_BYTES = 16 << 10
HEAP_BYTES = 16 << 10  # newlib's stdio buffers (semihosting printf, fopen)

# TFLite op -> the kernel sources (tensorflow/lite/micro/kernels/<stem>.cc) registering it. A
# CMSIS-NN build takes kernels/cmsis_nn/<stem>.cc instead where one exists, as the Makefile does.
KERNEL_STEMS = {
    "ADD": ("add", "add_common"), "AVERAGE_POOL_2D": ("pooling", "pooling_common"),
    "CONCATENATION": ("concatenation",), "CONV_2D": ("conv", "conv_common"),
    "DEPTHWISE_CONV_2D": ("depthwise_conv", "depthwise_conv_common"),
    "DEQUANTIZE": ("dequantize", "dequantize_common"),
    "FULLY_CONNECTED": ("fully_connected", "fully_connected_common"),
    "HARD_SWISH": ("hard_swish", "hard_swish_common"), "LOGISTIC": ("logistic", "logistic_common"),
    "MAX_POOL_2D": ("pooling", "pooling_common"), "MEAN": ("reduce", "reduce_common"),
    "MUL": ("mul", "mul_common"), "PAD": ("pad", "pad_common"), "PADV2": ("pad", "pad_common"),
    "QUANTIZE": ("quantize", "quantize_common"), "RELU": ("activations", "activations_common"),
    "RELU6": ("activations", "activations_common"), "RESHAPE": ("reshape", "reshape_common"),
    "REVERSE_V2": ("reverse",), "SLICE": ("slice",), "SOFTMAX": ("softmax", "softmax_common"), "SQUEEZE": ("squeeze",),
    "STRIDED_SLICE": ("strided_slice", "strided_slice_common"), "SUB": ("sub", "sub_common"),
    "SUM": ("reduce", "reduce_common"), "TRANSPOSE": ("transpose", "transpose_common"),
    "CUSTOM:ethos-u": ("ethosu",),
}
KERNEL_HELPERS = ("kernel_util", "micro_tensor_utils")
KERNELS_DIR = "tensorflow/lite/micro/kernels"
TEST_ONLY = ("test_helpers", "test_helper_custom_ops", "mock_micro_graph", "fake_micro_context")


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        package = "qemu-system-arm" if name.startswith("qemu") else "gcc-arm-none-eabi libnewlib-arm-none-eabi"
        raise StageError(f"{name} is not installed (Debian: apt install {package})")
    return found


def check_tree(root: Path) -> Path:
    root = Path(root).expanduser()
    if not (root / "Makefile").is_file() or not (root / "tensorflow/lite/micro/micro_interpreter.h").is_file():
        raise InputError(f"--tflm-root {root} is not a standalone TFLite Micro tree (needs its Makefile and "
                         "tensorflow/lite/micro/; see ../shared/third_party/tflm/README.md)")
    return root


def cache_root() -> Path:
    from edgestar.models.checkpoints import cache_dir

    return cache_dir() / "tflm"


# --------------------------------------------------------------------------- the library

def library_sources(root: Path, ops, kernels: str) -> list[str]:
    """The tree's sources a model with ``ops`` needs: the interpreter core, its ops' kernels and,
    for CMSIS-NN, the CMSIS-NN library (its unused functions drop out at link time)."""
    found = sorted(str(p.relative_to(root)) for pattern in ("*.cc", "*.c")
                   for p in (root / "tensorflow").rglob(pattern))
    core = [s for s in found if not s.startswith(KERNELS_DIR + "/") and Path(s).stem not in TEST_ONLY]
    stems = list(KERNEL_HELPERS)
    for op in sorted(ops):
        if op not in KERNEL_STEMS:
            raise InputError(f"no TFLite Micro kernel sources known for {op}")
        stems += [s for s in KERNEL_STEMS[op] if s not in stems]
    chosen = []
    for stem in stems:
        cmsis = f"{KERNELS_DIR}/cmsis_nn/{stem}.cc"
        if kernels == "cmsis_nn" and (root / cmsis).is_file():
            chosen.append(cmsis)
        elif (root / f"{KERNELS_DIR}/{stem}.cc").is_file():
            chosen.append(f"{KERNELS_DIR}/{stem}.cc")
    if kernels == "cmsis_nn":
        chosen += sorted(str(p.relative_to(root)) for p in (root / "third_party/cmsis_nn/Source").rglob("*.c"))
    return core + chosen


def _tree_fingerprint(root: Path) -> str:
    """The tree's identity: every source file's path, size and mtime (cheap; a rebuilt or edited
    tree gets a new key)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".cc", ".c", ".h", "") and "build" not in p.relative_to(root).parts[:1]:
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


def make_vars(cpu: str, kernels: str, build_dir: Path) -> list[str]:
    return [f"BUILD_DIR={build_dir}", f"CPU={cpu}", f"KERNELS={kernels}"]


def print_flags(root: Path, cpu: str, kernels: str, build_dir: Path) -> dict:
    """``make print-flags``: the CXXFLAGS, CCFLAGS and INCLUDES the application must share."""
    proc = run_tool(["make", "-s", "-C", str(root), *make_vars(cpu, kernels, build_dir), "print-flags"], timeout=120)
    flags = dict(re.findall(r"^(CXXFLAGS|CCFLAGS|INCLUDES|LIB): (.*)$", proc.stdout, re.M))
    if proc.returncode != 0 or "CXXFLAGS" not in flags:
        from edgestar.children import last_line

        raise StageError(f"make print-flags failed in {root}: {last_line(proc.stderr, proc.stdout)}")
    return {k: shlex.split(v) for k, v in flags.items()}


def tflm_library(root: Path, *, cpu: str, kernels: str, ops, full: bool = False, jobs: int | None = None,
                 log=None) -> tuple[Path, bool]:
    """Build (or reuse from the cache) ``libtflm.a`` for ``cpu``/``kernels`` with what ``ops``
    need (``full``: every object). Returns the library and whether it came from the cache."""
    from edgestar.children import last_line
    from edgestar.files import ensure_writable_dir

    log = log or (lambda msg: None)
    root = check_tree(root)
    tool("arm-none-eabi-gcc")
    sources = None if full else library_sources(root, ops, kernels)
    tree = hashlib.sha256(f"{_tree_fingerprint(root)}\n{root.resolve()}".encode()).hexdigest()[:16]
    # One object folder per (tree, CPU, kernels): make compiles only objects it lacks, so another
    # model's library reuses what an earlier one built. One archive per object set.
    build_dir = ensure_writable_dir(cache_root()) / f"{cpu}-{kernels}-{tree}"
    objects = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:12] if sources else ""
    lib = build_dir / (f"libtflm-{objects}.a" if sources else "libtflm.a")
    if sources and lib.is_file():  # archives are renamed into place whole; the full one is make's, so ask make
        return lib, True
    what = "all objects" if full else f"{len(sources)} objects for {', '.join(sorted(ops))}"
    log(f"building TFLite Micro for {cpu} ({kernels} kernels, {what}) in {build_dir}; cached afterwards")
    jobs = jobs or max(1, os.cpu_count() or 1)
    targets = [] if full else [str(build_dir / "obj" / re.sub(r"\.cc?$", ".o", s)) for s in sources]
    t0 = time.monotonic()
    proc = run_tool(["make", "-C", str(root), f"-j{jobs}", *make_vars(cpu, kernels, build_dir), *(targets or ["lib"])])
    if proc.returncode != 0:
        raise StageError(f"building TFLite Micro failed: {last_line(proc.stderr, proc.stdout)}")
    if not full:
        tmp = lib.with_name(lib.name + ".partial")
        tmp.unlink(missing_ok=True)
        ar = run_tool([tool("arm-none-eabi-ar"), "rcs", str(tmp), *targets])
        if ar.returncode != 0:
            raise StageError(f"arm-none-eabi-ar failed: {last_line(ar.stderr)}")
        tmp.replace(lib)
    log(f"built {lib.name} in {time.monotonic() - t0:.0f} s")
    return lib, False


# --------------------------------------------------------------------------- the application

@dataclass
class BuildResult:
    elf: Path
    cpu: str
    kernels: str
    machine: str  # QEMU machine the ELF runs on, "" for a sizes-only build
    sections: dict  # text / data / bss (arm-none-eabi-size, Berkeley format)
    flash_bytes: int
    ram_bytes: int
    library: Path
    library_cached: bool
    compile_s: float

    def as_dict(self) -> dict:
        return {"elf": str(self.elf), "cpu": self.cpu, "kernels": self.kernels, "machine": self.machine or None,
                "sections": self.sections, "flash_bytes": self.flash_bytes, "ram_bytes": self.ram_bytes,
                "stack_bytes": STACK_BYTES, "heap_bytes": HEAP_BYTES, "library": str(self.library),
                "library_cached": self.library_cached, "compile_s": round(self.compile_s, 1)}


def linker_script(machine: Machine) -> str:
    from edgestar.deploy.firmware import _fill, _template

    def region(key, value):
        origin, length, name = value
        return {f"{key}_ORIGIN": f"0x{origin:08x}", f"{key}_LENGTH": f"0x{length:x}", f"{key}_NAME": name}

    values = {"MACHINE": f"QEMU {machine.name}" if machine.name else "a generic Cortex-M memory map (sizes only)",
              **region("CODE", machine.code), **region("MODEL", machine.model), **region("RAM", machine.ram),
              "STACK_BYTES": STACK_BYTES, "HEAP_BYTES": HEAP_BYTES}
    return _fill(_template("qemu/link.ld"), values)


def build(sources: Path, name: str, ops, *, cpu: str, tflm_root: Path, kernels: str = "cmsis_nn",
          app: str = "harness.cc", log=None) -> BuildResult:
    """Compile ``sources`` (what :func:`edgestar.deploy.firmware.generate` wrote, plus the QEMU
    harness) with the TFLM library into ``sources/build-<cpu>/<name>.elf``."""
    from edgestar.children import last_line
    from edgestar.deploy.firmware import _template

    if cpu not in BUILD_CPUS:
        raise InputError(f"--build needs an Arm Cortex-M core ({', '.join(BUILD_CPUS)}); this board has {cpu}")
    if kernels not in ("cmsis_nn", "reference"):
        raise InputError(f"kernels must be cmsis_nn or reference, not {kernels!r}")
    log = log or (lambda msg: None)
    machine = MACHINES.get(cpu, GENERIC)
    gcc, gxx, size = tool("arm-none-eabi-gcc"), tool("arm-none-eabi-g++"), tool("arm-none-eabi-size")
    root = check_tree(tflm_root)
    lib, cached = tflm_library(root, cpu=cpu, kernels=kernels, ops=ops, log=log)
    flags = print_flags(root, cpu, kernels, lib.parent)
    out = Path(sources) / f"build-{cpu}-{kernels}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "link.ld").write_text(linker_script(machine))
    (out / "startup.c").write_text(_template("qemu/startup.c"))
    t0 = time.monotonic()
    objects = []
    units = [(gxx, Path(sources) / app), (gxx, Path(sources) / f"{name}_model_data.cc"), (gcc, out / "startup.c")]
    for compiler, src in units:
        obj = out / (src.stem + ".o")
        cflags = flags["CXXFLAGS"] if compiler == gxx else flags["CCFLAGS"]
        proc = run_tool([compiler, *cflags, "-O2", *flags["INCLUDES"], f"-I{sources}", "-c", str(src), "-o", str(obj)])
        if proc.returncode != 0:
            raise StageError(f"compiling {src.name} failed: {last_line(proc.stderr)}")
        objects.append(obj)
    elf = out / f"{name}.elf"
    arch = [f for f in flags["CXXFLAGS"] if f.startswith(("-mcpu", "-mfpu", "-mfloat-abi", "-mthumb"))]

    def link(library: Path):
        return run_tool([gxx, *arch, "-nostartfiles", "--specs=rdimon.specs", f"-T{out / 'link.ld'}",
                         "-Wl,--gc-sections", f"-Wl,-Map={out / (name + '.map')}", *map(str, objects),
                         str(library), "-lm", "-o", str(elf) + ".partial"])

    proc = link(lib)
    if proc.returncode != 0 and "undefined reference" in proc.stderr:
        log("the model needs more of TFLite Micro than its ops' kernels: building the whole library")
        lib, cached = tflm_library(root, cpu=cpu, kernels=kernels, ops=ops, full=True, log=log)
        proc = link(lib)
    if proc.returncode != 0:
        raise StageError(f"linking {elf.name} failed: {last_line(proc.stderr)}")
    Path(str(elf) + ".partial").replace(elf)
    sections = elf_sections(elf, size)
    return BuildResult(elf=elf, cpu=cpu, kernels=kernels, machine=machine.name, sections=sections,
                       flash_bytes=sections["text"] + sections["data"],
                       ram_bytes=sections["data"] + sections["bss"], library=lib, library_cached=cached,
                       compile_s=time.monotonic() - t0)


def elf_sections(elf: Path, size_tool: str | None = None) -> dict:
    """``arm-none-eabi-size`` (Berkeley): text (code + read-only data), data, bss (NOLOAD sections,
    i.e. bss, heap and stack, count here)."""
    proc = run_tool([size_tool or tool("arm-none-eabi-size"), str(elf)])
    rows = [ln.split() for ln in proc.stdout.splitlines()]
    if proc.returncode != 0 or len(rows) < 2 or not rows[1][0].isdigit():
        raise StageError(f"arm-none-eabi-size could not read {elf}")
    text, data, bss = (int(v) for v in rows[1][:3])
    return {"text": text, "data": data, "bss": bss}


# --------------------------------------------------------------------------- QEMU

@dataclass
class QemuRun:
    outputs: np.ndarray  # (images, classes) int8
    ticks: list[int]
    instructions: list[int]
    arena_used: int
    machine: str
    seconds: float


def run_qemu(elf: Path, cpu: str, pixels: np.ndarray, *, timeout_s: float = 600) -> QemuRun:
    """Run the harness ELF on QEMU's board for ``cpu`` with ``pixels`` (N x H x W x 3 uint8)
    as edgestar_inputs.bin; parse what it prints."""
    if cpu not in MACHINES:
        raise InputError(f"--run qemu: no emulated board for {cpu} here (have: "
                         + ", ".join(f"{c} on {m.name}" for c, m in MACHINES.items()) + ")")
    machine = MACHINES[cpu]
    qemu = tool("qemu-system-arm")
    with scratch_dir("qemu") as tmp:
        (Path(tmp) / "edgestar_inputs.bin").write_bytes(np.ascontiguousarray(pixels, np.uint8).tobytes())
        t0 = time.monotonic()
        try:
            proc = run_tool([qemu, "-M", machine.name, "-nographic", "-monitor", "none", "-serial", "none",
                             "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
                             "-kernel", str(Path(elf).absolute())], cwd=tmp, timeout=timeout_s,
                            stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StageError(f"the firmware did not finish on QEMU {machine.name} within {timeout_s:.0f} s") from None
        seconds = time.monotonic() - t0
    return parse_harness_output(proc.stdout, proc.stderr, proc.returncode, machine, seconds)


def parse_harness_output(text: str, stderr: str, returncode: int, machine: Machine, seconds: float) -> QemuRun:
    """What ``harness.cc`` printed: ``edgestar-out <i> <ticks> <hex>`` per image,
    ``edgestar-arena-used``, ``edgestar-done <n>``; ``edgestar-error`` or no ``done`` line fails."""
    from edgestar.children import last_line

    error = re.search(r"^edgestar-error (.*)$", text, re.M)
    if error:
        raise StageError(f"the firmware on QEMU {machine.name} reported: {error.group(1)}")
    done = re.search(r"^edgestar-done (\d+)$", text, re.M)
    if not done:
        raise StageError(f"the firmware on QEMU {machine.name} stopped early (exit {returncode}; "
                         f"3 = a CPU fault): {last_line(stderr, text) or 'no output'}")
    rows = re.findall(r"^edgestar-out (\d+) (\d+) ([0-9a-f]*)$", text, re.M)
    if len(rows) != int(done.group(1)) or [int(i) for i, _, _ in rows] != list(range(len(rows))):
        raise StageError(f"the firmware on QEMU {machine.name} printed {len(rows)} results for {done.group(1)} images")
    outputs = np.array([np.frombuffer(bytes.fromhex(h), np.int8) for _, _, h in rows], np.int8)
    ticks = [int(t) for _, t, _ in rows]
    per_tick = 1e9 / machine.cpu_clock_hz
    used = re.search(r"^edgestar-arena-used (\d+)$", text, re.M)
    return QemuRun(outputs=outputs, ticks=ticks, instructions=[round(t * per_tick) for t in ticks],
                   arena_used=int(used.group(1)) if used else -1, machine=machine.name, seconds=seconds)

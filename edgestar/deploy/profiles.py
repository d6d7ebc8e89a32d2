"""Target profiles: what each kind of board implies, in one table.

A profile fills in the defaults a user would otherwise have to know: the graph shape to build
(``quantize --target``), the model's input/output type, the runtime and how ``bench`` reaches
the board, the thread counts worth sweeping and, for Arm's Ethos-U NPUs, the Vela
configuration. Options given explicitly always win over the profile.

    edgestar profiles                                  # this table
    edgestar quantize --variant s1 --profile cortex-m55
    edgestar bench runs/s1-... --profile rpi5 --device ssh://pi@raspberrypi.local
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from edgestar.errors import InputError


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    target: str  # quantize --target: cpu (LiteRT/XNNPACK graph) or micro (TFLite Micro, PAD-free)
    io_type: str  # quantize --io
    runtime: str  # what runs the model on the board
    device: str | None  # how `bench` reaches it: local, ssh, adb, vela; None = not benchmarked by bench
    threads: tuple[int, ...]  # thread counts `bench` sweeps by default
    vela: str | None = None  # Vela accelerator configuration (Ethos-U)
    notes: str = ""

    def to_json(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("android-arm64", "Android phone, 64-bit ARM (big.LITTLE)", "cpu", "int8",
            "benchmark_model (LiteRT C++, XNNPACK)", "adb", (1, 4),
            notes="Android has no Python: bench pushes a benchmark_model binary you supply "
                  "(--benchmark-binary); --cpu-mask pins it to the big cores."),
    Profile("rpi4", "Raspberry Pi 4 (4x Cortex-A72), Raspberry Pi OS 64-bit", "cpu", "int8",
            "ai-edge-litert (XNNPACK)", "ssh", (1, 4),
            notes="32-bit Raspberry Pi OS has only tflite-runtime <= 2.14 (no ai-edge-litert wheel)."),
    Profile("rpi5", "Raspberry Pi 5 (4x Cortex-A76, dot-product int8), Raspberry Pi OS 64-bit",
            "cpu", "int8", "ai-edge-litert (XNNPACK)", "ssh", (1, 4)),
    Profile("arm64-linux", "Any 64-bit ARM Linux board (Jetson CPU, i.MX 8, RK3588, ...)", "cpu",
            "int8", "ai-edge-litert (XNNPACK)", "ssh", (1, 2, 4)),
    Profile("x86-64", "This machine or any x86-64 Linux host", "cpu", "int8",
            "ai-edge-litert (XNNPACK and builtin kernels), ONNX Runtime", "local", (1, 2)),
    Profile("ethos-u55-128", "Arm Ethos-U55 NPU, 128 MAC/cycle (Corstone-300, Alif Ensemble)",
            "micro", "int8", "TFLite Micro + Ethos-U driver (Vela-compiled model)", "vela", (1,),
            vela="ethos-u55-128",
            notes="Latency is Vela's estimate, not a measurement; ops Vela cannot map run on the Cortex-M."),
    Profile("ethos-u65-256", "Arm Ethos-U65 NPU, 256 MAC/cycle (i.MX 93, Corstone-1000 class)",
            "micro", "int8", "TFLite Micro + Ethos-U driver (Vela-compiled model)", "vela", (1,),
            vela="ethos-u65-256",
            notes="Latency is Vela's estimate, not a measurement."),
    Profile("cortex-m4", "Cortex-M4F microcontroller (nRF52840, STM32F4)", "micro", "int8",
            "TFLite Micro (CMSIS-NN)", None, (1,)),
    Profile("cortex-m7", "Cortex-M7 microcontroller (STM32F7/H7, i.MX RT)", "micro", "int8",
            "TFLite Micro (CMSIS-NN)", None, (1,)),
    Profile("cortex-m55", "Cortex-M55 microcontroller with Helium (Corstone-300, Alif)", "micro",
            "int8", "TFLite Micro (CMSIS-NN, Helium)", None, (1,)),
]}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}") from None


def profiles_table() -> str:
    """The table ``edgestar profiles`` prints."""
    rows = [("profile", "target", "io", "bench device", "threads", "runtime")]
    for p in PROFILES.values():
        device = {None: "- (microcontroller)", "vela": f"vela:{p.vela}"}.get(p.device, p.device)
        rows.append((p.name, p.target, p.io_type, device, ",".join(map(str, p.threads)), p.runtime))
    from edgestar.report.text import text_table

    return "\n".join(text_table(rows, left=len(rows[0])))

"""``edgestar firmware --build/--run`` pieces that need no compiler: which TFLite Micro sources a
model needs, the linker script, and reading what the QEMU harness prints."""
import os
from pathlib import Path

import numpy as np
import pytest

from edgestar.deploy.firmware import RESOLVER_METHODS
from edgestar.deploy.firmware_build import (GENERIC, KERNEL_STEMS, MACHINES, library_sources, linker_script,
                                            parse_harness_output)
from edgestar.errors import InputError, StageError

TFLM_TREE = Path(os.environ.get("EDGESTAR_TFLM_ROOT")
                 or Path(__file__).resolve().parents[2] / "shared" / "third_party" / "tflm")
STARNET_OPS = ["REVERSE_V2", "CONV_2D", "DEPTHWISE_CONV_2D", "MUL", "ADD", "MEAN", "FULLY_CONNECTED"]


def test_every_op_firmware_registers_has_kernel_sources():
    assert set(KERNEL_STEMS) == set(RESOLVER_METHODS)


@pytest.mark.skipif(not (TFLM_TREE / "Makefile").is_file(), reason=f"no TFLite Micro tree at {TFLM_TREE}")
@pytest.mark.parametrize("kernels", ["cmsis_nn", "reference"])
def test_library_sources_are_the_core_and_the_models_kernels(kernels):
    sources = library_sources(TFLM_TREE, STARNET_OPS, kernels)
    assert all((TFLM_TREE / s).is_file() for s in sources) and len(set(sources)) == len(sources)
    names = {Path(s).name for s in sources}
    assert {"micro_interpreter.cc", "micro_allocator.cc", "kernel_util.cc", "reverse.cc", "reduce.cc"} <= names
    assert not names & {"softmax.cc", "test_helpers.cc", "mock_micro_graph.cc"}  # not used / tests only
    conv = [s for s in sources if s.endswith("/conv.cc")]
    cmsis = [s for s in sources if s.startswith("third_party/cmsis_nn/")]
    if kernels == "cmsis_nn":  # CMSIS-NN's conv replaces the reference one, as the Makefile does
        assert conv == ["tensorflow/lite/micro/kernels/cmsis_nn/conv.cc"] and len(cmsis) > 50
    else:
        assert conv == ["tensorflow/lite/micro/kernels/conv.cc"] and not cmsis
    with pytest.raises(InputError, match="TANH"):
        library_sources(TFLM_TREE, ["TANH"], kernels)


@pytest.mark.parametrize("machine", [*MACHINES.values(), GENERIC])
def test_linker_script_places_code_model_and_ram(machine):
    script = linker_script(machine)
    assert "{{" not in script
    for key, (origin, length, _) in (("CODE", machine.code), ("MODEL", machine.model), ("RAM", machine.ram)):
        assert f"{key}" in script and f"ORIGIN = 0x{origin:08x}, LENGTH = 0x{length:x}" in script
    assert ".rodata : ALIGN(16)" in script and "> MODEL" in script and "__stack_top" in script


M55 = MACHINES["cortex-m55"]


def test_harness_output_is_parsed_into_outputs_instructions_and_arena():
    text = ("edgestar-out 0 1000 7f80ff00\nsome log line\nedgestar-out 1 1001 00010203\n"
            "edgestar-arena-used 4096\nedgestar-done 2\n")
    run = parse_harness_output(text, "", 0, M55, 1.0)
    assert run.outputs.dtype == np.int8 and run.outputs.tolist() == [[127, -128, -1, 0], [0, 1, 2, 3]]
    assert run.ticks == [1000, 1001] and run.instructions == [31250, 31281]  # 32 MHz SysTick: 31.25 / tick
    assert run.arena_used == 4096 and run.machine == "mps3-an547"


@pytest.mark.parametrize("text, message", [
    ("edgestar-error AllocateTensors failed with a 10 B arena\n", "AllocateTensors failed"),
    ("edgestar-out 0 5 00\n", "stopped early"),  # a fault: no done line
    ("edgestar-out 0 5 00\nedgestar-done 2\n", "printed 1 results for 2 images"),
])
def test_harness_failures_are_stage_errors(text, message):
    with pytest.raises(StageError, match=message):
        parse_harness_output(text, "", 3, M55, 1.0)

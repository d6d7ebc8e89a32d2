"""Tests for edgestar.deploy.benchmark_output, the parser of benchmark_model's output.

The fixtures in tests/fixtures/benchmark_model/ follow the upstream formats line for line (their
README.md says which source defines each). The property tests render random timings the way the
C++ tools print them (``ostream`` with six significant digits, ``%.2f`` for LiteRT's block) and
check that the parser gives the same numbers back, and that damaged output never yields a wrong
number: it either raises BenchmarkOutputError or gives only numbers the intact output gives.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgestar.deploy.benchmark_output import (BenchmarkOutputError, BenchmarkRun, OpTypeTime,
                                              parse_benchmark_output, pooled)
from edgestar.errors import StageError

FIXTURES = Path(__file__).parent / "fixtures" / "benchmark_model"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_bytes().decode()  # as written: CRLF stays CRLF


def without_ops(run: BenchmarkRun) -> dict:
    d = run.to_json()
    d.pop("op_types")
    return d


def same(actual: dict, expected: dict, rel: float = 1e-12, abs_: float = 1e-12) -> bool:
    """Equal dicts of run fields: strings, counts and None exactly, floats to ``rel``/``abs_``."""
    assert actual.keys() == expected.keys()
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, float) and isinstance(got, float):
            assert got == pytest.approx(want, rel=rel, abs=abs_), key
        else:
            assert got == want, key
    return True


def fields(**values) -> dict:
    """A full to_json() dict (less op_types): the fields not given are None."""
    d = {f.name: None for f in dataclasses.fields(BenchmarkRun) if f.name != "op_types"}
    d.update(values)
    return d


# --------------------------------------------------------------------------- fixtures that parse

EXPECTED = {
    "classic_tf_desktop.txt": fields(
        format="classic", count=77, mean_ms=12.9312, std_ms=0.173, min_ms=12.571, max_ms=13.348,
        init_ms=48.352, first_ms=14.657, warmup_mean_ms=13.1094,
        memory_init_mb=9.89062, memory_overall_mb=17.4531),
    "classic_litert_percentiles.txt": fields(
        format="classic", count=62, mean_ms=16.1225, std_ms=0.259, min_ms=15.561, max_ms=16.746,
        median_ms=16.103, p5_ms=15.76, p95_ms=16.577, init_ms=61.07, first_ms=17.928,
        warmup_mean_ms=16.3827, memory_init_mb=10.2539, memory_overall_mb=18.3867, peak_memory_mb=24.5273),
    "android_logcat_threadtime.txt": fields(
        format="classic", count=50, mean_ms=20.988, std_ms=0.524, min_ms=19.726, max_ms=21.973,
        median_ms=20.982, p5_ms=20.233, p95_ms=21.918, init_ms=37.915, first_ms=27.459,
        warmup_mean_ms=21.4802, memory_init_mb=7.41797, memory_overall_mb=14.8828),
    "android_adb_shell_crlf.txt": fields(
        format="classic", count=50, mean_ms=21.9272, std_ms=0.576, min_ms=20.736, max_ms=23.336,
        median_ms=21.943, p5_ms=21.043, p95_ms=22.9, init_ms=52.118, first_ms=27.468, warmup_mean_ms=22.866,
        memory_init_mb=18.9102, memory_overall_mb=31.2383),
    "old_tf_peak_memory_start_column.txt": fields(
        format="classic", count=50, mean_ms=18.9713, std_ms=0.889, min_ms=18.527, max_ms=25.129,
        init_ms=9.208, first_ms=32.667, warmup_mean_ms=23.5973, memory_init_mb=3.49219,
        memory_overall_mb=9.88672),
    "op_profiling_starnet.txt": fields(
        format="classic", count=50, mean_ms=18.9485, std_ms=0.892, min_ms=18.55, max_ms=25.134,
        median_ms=18.852, p5_ms=18.606, p95_ms=19.018, init_ms=9.871, first_ms=31.417,
        warmup_mean_ms=25.3205, memory_init_mb=2.83594, memory_overall_mb=8.05859),
    # avg=1.23668e+06; the one-run warm-up's count=1 curr=1391882 is exact where the timings
    # line says Warmup (avg): 1.39188e+06
    "sci_notation_armv7.txt": fields(
        format="classic", count=12, mean_ms=1236.68, std_ms=5.13, min_ms=1228.025, max_ms=1243.753,
        init_ms=211.455, first_ms=1391.882, warmup_mean_ms=1391.882,
        memory_init_mb=31.0469, memory_overall_mb=58.6719),
    "all_same.txt": fields(
        format="classic", count=5, mean_ms=0.412, std_ms=0.0, min_ms=0.412, max_ms=0.412, median_ms=0.412,
        p5_ms=0.412, p95_ms=0.412, init_ms=0.911, first_ms=0.431, warmup_mean_ms=0.431,
        memory_init_mb=0.0390625, memory_overall_mb=0.0429688),
    # the count= lines (whole microseconds) agree with the block (0.01 ms) and are used
    "litert_cpp_benchmark_results.txt": fields(
        format="litert", count=58, mean_ms=17.1316, std_ms=0.282, min_ms=16.558, max_ms=17.875,
        median_ms=17.173, p5_ms=16.691, p95_ms=17.65, init_ms=55.4, first_ms=20.818, warmup_mean_ms=17.4537,
        memory_init_mb=11.37, memory_overall_mb=19.05),
    # the Python tool prints the sample std (0.30); we report the population one
    "litert_python_benchmark_results.txt": fields(
        format="litert", count=50, mean_ms=16.88, std_ms=0.30 * math.sqrt(49 / 50), min_ms=16.21,
        max_ms=17.59, median_ms=16.83, p5_ms=16.37, p95_ms=17.37, init_ms=41.73, first_ms=18.59,
        warmup_mean_ms=18.5),
    "old_tf1_average_timings.txt": fields(
        format="classic", count=50, mean_ms=171.658, std_ms=2.232, min_ms=166.602, max_ms=177.062,
        init_ms=3.2, first_ms=187.413, warmup_mean_ms=187.413),
}

STARNET_OP_TYPES = [  # the timed runs' "Summary by node type" of op_profiling_starnet.txt
    OpTypeTime("CONV_2D", 23, 14.452, 76.628, 23),
    OpTypeTime("DEPTHWISE_CONV_2D", 12, 2.853, 15.127, 12),
    OpTypeTime("MUL", 6, 0.941, 4.989, 6),
    OpTypeTime("ADD", 6, 0.431, 2.285, 6),
    OpTypeTime("QUANTIZE", 1, 0.088, 0.467, 1),
    OpTypeTime("MEAN", 1, 0.040, 0.212, 1),
    OpTypeTime("REVERSE_V2", 2, 0.038, 0.201, 2),
    OpTypeTime("FULLY_CONNECTED", 1, 0.016, 0.085, 1),
    OpTypeTime("DEQUANTIZE", 1, 0.001, 0.005, 1),
]
OLD_OP_TYPES = [  # the same for old_tf_peak_memory_start_column.txt
    OpTypeTime("CONV_2D", 23, 14.475, 76.660, 23),
    OpTypeTime("DEPTHWISE_CONV_2D", 12, 2.854, 15.115, 12),
    OpTypeTime("MUL", 6, 0.940, 4.978, 6),
    OpTypeTime("ADD", 6, 0.430, 2.277, 6),
    OpTypeTime("QUANTIZE", 1, 0.087, 0.461, 1),
    OpTypeTime("MEAN", 1, 0.041, 0.217, 1),
    OpTypeTime("REVERSE_V2", 2, 0.038, 0.201, 2),
    OpTypeTime("FULLY_CONNECTED", 1, 0.016, 0.085, 1),
    OpTypeTime("DEQUANTIZE", 1, 0.001, 0.005, 1),
]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_parses_to_exact_values(name):
    run = parse_benchmark_output(fixture(name))
    assert without_ops(run) == EXPECTED[name]
    json.dumps(run.to_json(), allow_nan=False)  # plain JSON, no NaN


def test_op_profile_gives_the_timed_runs_summary_by_node_type():
    # the initialization profile (AllocateTensors) comes first and must not be taken
    assert parse_benchmark_output(fixture("op_profiling_starnet.txt")).op_types == STARNET_OP_TYPES
    assert parse_benchmark_output(fixture("old_tf_peak_memory_start_column.txt")).op_types == OLD_OP_TYPES
    assert parse_benchmark_output(fixture("classic_tf_desktop.txt")).op_types == []


def test_the_op_types_name_the_starnet_star_products_and_depthwise_convs():
    by_type = {t.op_type: t for t in parse_benchmark_output(fixture("op_profiling_starnet.txt")).op_types}
    assert by_type["MUL"].count == 6 and by_type["DEPTHWISE_CONV_2D"].count == 12
    assert sum(t.count for t in by_type.values()) == 53  # "Number of nodes executed: 53"


RUN_PROFILE = "Operator-wise Profiling Info for Regular Benchmark Runs:"


def drop_summary(text: str) -> str:
    """The text without the timed runs' "Number of nodes executed" and "Summary by node type"."""
    lines = text.split("\n")
    run = next(i for i, line in enumerate(lines) if line.endswith(RUN_PROFILE))
    start = next(i for i in range(run, len(lines)) if lines[i].startswith("Number of nodes executed"))
    end = next(i for i in range(start, len(lines)) if lines[i] == "")
    return "\n".join(lines[:start] + lines[end + 1:])


def run_order_by_type(text: str) -> dict:
    """Per op type (count, sum of avg ms, sum of %): the timed runs' Run Order table, summed here."""
    lines = text.split("\n")
    at = next(i for i, line in enumerate(lines) if line.endswith(RUN_PROFILE)) + 3
    totals = {}
    for line in lines[at:]:
        if not line:
            break
        cells = [c.strip() for c in line.split("\t")[1:]]
        n, avg, pct = totals.get(cells[0], (0, 0.0, 0.0))
        totals[cells[0]] = (n + 1, avg + float(cells[-6]), pct + float(cells[-5].rstrip("%")))
    return totals


@pytest.mark.parametrize("name", ["op_profiling_starnet.txt", "old_tf_peak_memory_start_column.txt"])
def test_without_the_summary_the_run_order_table_is_aggregated(name):
    text = fixture(name)
    full = parse_benchmark_output(text)
    run = parse_benchmark_output(drop_summary(text))
    assert without_ops(run) == without_ops(full)
    expected = run_order_by_type(text)
    assert {t.op_type: (t.count, t.avg_ms, t.percent) for t in run.op_types} == {
        k: (n, round(avg, 3), round(pct, 3)) for k, (n, avg, pct) in expected.items()}
    assert [t.avg_ms for t in run.op_types] == sorted((t.avg_ms for t in run.op_types), reverse=True)
    # and the aggregate agrees with benchmark_model's own summary up to its rounding
    for ours, theirs in zip(sorted(run.op_types, key=lambda t: t.op_type),
                            sorted(full.op_types, key=lambda t: t.op_type)):
        assert (ours.op_type, ours.count, ours.times_called) == \
            (theirs.op_type, theirs.count, theirs.times_called)
        assert ours.avg_ms == pytest.approx(theirs.avg_ms, abs=0.0015 * ours.count)
        assert ours.percent == pytest.approx(theirs.percent, abs=0.01 * ours.count)


def test_other_apps_logcat_lines_are_left_out():
    text = fixture("android_logcat_threadtime.txt")
    ours = "\n".join(line for line in text.splitlines() if " tflite  : " in line) + "\n"
    assert ours != text
    assert without_ops(parse_benchmark_output(ours)) == EXPECTED["android_logcat_threadtime.txt"]


LOGCAT_STYLES = {  # what each logcat -v format puts before a tflite message (AOSP logprint)
    "threadtime": "12-01 10:00:00.123  4242  4242 I tflite  : ",
    "threadtime, -v year": "2026-12-01 10:00:00.123  4242  4242 I tflite  : ",
    "threadtime, -v uid": "12-01 10:00:00.123  u0_a123  4242  4242 I tflite  : ",
    "time": "12-01 10:00:00.123 I/tflite  ( 4242): ",
    "brief": "I/tflite  ( 4242): ",
    "tag": "I/tflite  : ",
    "threadtime's tail": "I tflite  : ",
    "LiteRT's tag": "12-01 10:00:00.123  4242  4242 I litert  : ",
}


@pytest.mark.parametrize("style", sorted(LOGCAT_STYLES))
def test_every_logcat_prefix_is_stripped(style):
    text = fixture("classic_litert_percentiles.txt")
    lines = [line.removeprefix("INFO: ") for line in text.splitlines() if line]
    logcat = "".join(LOGCAT_STYLES[style] + line + "\n" for line in lines)
    assert without_ops(parse_benchmark_output(logcat)) == EXPECTED["classic_litert_percentiles.txt"]


def test_an_excerpt_of_count_and_timings_lines_parses():
    text = ("count=50 first=20543 curr=20657 min=19726 max=21973 avg=20988 std=524\n"
            "Inference timings in us: Init: 37915, First inference: 27459, Warmup (avg): 21480.2, "
            "Inference (avg): 20988\n")
    run = parse_benchmark_output(text)
    assert (run.count, run.mean_ms, run.std_ms, run.first_ms) == (50, 20.988, 0.524, 27.459)


def test_a_timings_line_alone_gives_the_mean_without_a_count():
    run = parse_benchmark_output("INFO: Inference timings in us: Init: 911, First inference: 431, "
                                 "Warmup (avg): 431, Inference (avg): 1.23457e+06\n")
    assert without_ops(run) == fields(format="classic", count=None, mean_ms=1234.57, init_ms=0.911,
                                      first_ms=0.431, warmup_mean_ms=0.431)


def test_a_last_line_without_newline_is_fine_unless_a_number_is_read_from_it():
    text = fixture("classic_litert_percentiles.txt")
    assert text.endswith("+ RssFile + RssShmem : 11 MB\n")
    unterminated = text.rstrip("\n")
    assert without_ops(parse_benchmark_output(unterminated)) == EXPECTED["classic_litert_percentiles.txt"]
    cut = text[:text.index("INFO: Overall peak")].rstrip("\n")  # now ends with the memory line
    with pytest.raises(BenchmarkOutputError, match=r"cut off.*overall=18\.3867"):
        parse_benchmark_output(cut)


SUMMARY_HEADER = ("\t             [Node type]\t  [count]\t  [avg ms]\t    [avg %]\t    [cdf %]\t  [mem KB]"
                  "\t[times called]")


def summary_row(op_type: str, count: int, avg: str, pct: str, cdf: str, called: int) -> str:
    """A "Summary by node type" row as StatsCalculator::GetStatsByNodeType writes it (width 24)."""
    return (f"\t{op_type:>24}\t{count:>9}\t{avg:>10}\t{pct:>10}%\t{cdf:>10}%\t{'0.000':>10}"
            f"\t{called:>9}")


def profile_text(summary_rows: list[str], nodes: int, header: str = "") -> str:
    """A classic output followed by a hand-written timed-run profile (tab-separated like the tool)."""
    base = fixture("classic_tf_desktop.txt")
    lines = ["INFO: Operator-wise Profiling Info for Regular Benchmark Runs:"]
    if header:
        lines.append(header)
    lines += [f"Number of nodes executed: {nodes}",
              "============================== Summary by node type ==============================",
              SUMMARY_HEADER, *summary_rows, "", "Timings (microseconds): count=1 curr=10",
              "Memory (bytes): count=0", f"{nodes} nodes observed", "", "", ""]
    return base + "\n".join(lines) + "\n"


def test_nan_percentages_become_none():
    # every node under 1 us: the summary divides 0 by 0
    rows = [summary_row("ADD", 2, "0.000", "nan", "nan", 2),
            summary_row("MUL", 1, "0.000", "-nan", "-nan", 1)]
    run = parse_benchmark_output(profile_text(rows, 3))
    assert run.op_types == [OpTypeTime("ADD", 2, 0.0, None, 2), OpTypeTime("MUL", 1, 0.0, None, 1)]
    json.dumps(run.to_json(), allow_nan=False)


def test_a_csv_summary_is_read_too():
    # --op_profiling_output_mode=csv: ProfileSummaryCSVFormatter, default float format
    text = profile_text([], 0).replace(
        SUMMARY_HEADER + "\n",
        "node type, count, avg_ms, avg %, cdf %, mem KB, times called\n"
        "CONV_2D, 23, 14.452, 76.628%, 76.628%, 0, 23\n"
        "Convolution (NHWC, QC8) IGEMM, 2, 1.5e-05, 1e-04%, 76.6281%, 0, 2\n").replace(
        "Number of nodes executed: 0", "Number of nodes executed: 25")
    assert parse_benchmark_output(text).op_types == [
        OpTypeTime("CONV_2D", 23, 14.452, 76.628, 23),
        OpTypeTime("Convolution (NHWC, QC8) IGEMM", 2, 1.5e-05, 1e-04, 2)]


def test_with_subgraphs_the_primary_graphs_summary_is_taken():
    primary = [summary_row("CONV_2D", 2, "1.000", "80.000", "80.000", 2),
               summary_row("WHILE", 1, "0.250", "20.000", "100.000", 1)]
    text = profile_text(primary, 3, header="Primary graph (name: main) profile:")
    text += "\n".join([
        "Subgraph (index: 1, name: body) profile:", "Number of nodes executed: 1",
        "============================== Summary by node type ==============================",
        SUMMARY_HEADER, summary_row("ADD", 1, "0.200", "100.000", "100.000", 4),
        ""]) + "\n"
    assert [t.op_type for t in parse_benchmark_output(text).op_types] == ["CONV_2D", "WHILE"]


# --------------------------------------------------------------------------- outputs that must not parse

BAD = {  # fixture -> (what the message says, what it quotes)
    "truncated_mid_count.txt": ("cut off", "avg=161"),
    "truncated_after_warmup.txt": ("ends before its results", "Running benchmark for at least 50"),
    "truncated_litert_block.txt": ("no closing", "BENCHMARK RESULTS"),
    "android_logcat_op_profiling_cut.txt": ("does not end with an empty line.*1023 bytes", "13.91"),
    "benchmarking_failed.txt": ("reported a failure", "Node number 1 (REVERSE_V2) failed to invoke."),
    "bad_number.txt": ("timings line", "Inference timings in us"),
    "dry_run.txt": ("no timed inferences", "count=0 p5=0 median=0 p95=0"),
    "not_benchmark_output.txt": ("no benchmark_model result", "/system/bin/sh"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_output_raises_one_line_quoting_the_line(name):
    why, quoted = BAD[name]
    with pytest.raises(BenchmarkOutputError, match=why) as info:
        parse_benchmark_output(fixture(name))
    message = str(info.value)
    assert "\n" not in message and len(message) < 300
    assert quoted in message
    assert isinstance(info.value, StageError)


def test_the_quoted_line_is_numbered():
    with pytest.raises(BenchmarkOutputError, match=r"\[line 15: 'count=62 first=15817"):
        parse_benchmark_output(fixture("truncated_mid_count.txt"))


def test_two_runs_in_one_text_are_refused():
    text = fixture("classic_tf_desktop.txt") + fixture("all_same.txt")
    with pytest.raises(BenchmarkOutputError, match="several runs in one output"):
        parse_benchmark_output(text)


def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("old, new, why", [
    # the timed count= line must carry the average the timings line reports
    ("avg=12931.2 std=173", "avg=12931.3 std=173", "does not match Inference"),
    ("avg=13109.4 std=378", "avg=13109.5 std=378", "does not match Warmup"),
    # the timed count= line is gone: the warm-up's must not stand in for it
    ("INFO: count=77 first=12836 curr=13108 min=12571 max=13348 avg=12931.2 std=173\n", "", "0 count= lines"),
    # Stat prints "(all same)" only with several values, and min <= avg <= max
    ("count=77 first=12836 curr=13108 min=12571 max=13348",
     "count=1 first=12836 curr=13108 min=12571 max=13348", "cannot have min and max"),
    ("min=12571 max=13348 avg=12931.2", "min=12971 max=13348 avg=12931.2", "contradict"),
    ("count=77 first=12836 curr=13108 min=12571 max=13348 avg=12931.2 std=173",
     "count=77 first=12836 curr=13108 min=12571 max=13348 avg=12931.2 std=173 p5=1", "not in any form"),
    ("init=9.89062 overall=17.4531", "init=9.89062 overall=17.45.31", "memory line"),
    ("Inference (avg): 12931.2", "Inference (avg): nan", "timings line"),
])
def test_inconsistent_classic_output_is_refused(old, new, why):
    with pytest.raises(BenchmarkOutputError, match=why):
        parse_benchmark_output(edit(fixture("classic_tf_desktop.txt"), old, new))


@pytest.mark.parametrize("old, new, why", [
    ("Inference (avg):      17.13 ms (58 runs)", "Inference (avg):      17.13 ms (57 runs)", "says count=58"),
    ("Inference (max):      17.88 ms", "Inference (max):      17.98 ms",
     "does not match Inference \\(max\\)"),
    ("Inference (min):      16.56 ms", "Inference (min):      16.5 ms", "not followed by a value"),
    ("Inference (avg):      17.13 ms (58 runs)", "Inference (avg):      17.13 ms", "not followed by a value"),
    ("Init footprint:       11.37 MB", "Init footprint:       11.37", "not followed by a value"),
    ("Memory Usage:", "Memory Usage", "not 'label: value'"),
])
def test_inconsistent_litert_block_is_refused(old, new, why):
    with pytest.raises(BenchmarkOutputError, match=why):
        parse_benchmark_output(edit(fixture("litert_cpp_benchmark_results.txt"), old, new))


def test_unknown_labels_in_the_block_are_ignored():
    text = edit(fixture("litert_cpp_benchmark_results.txt"), "Throughput:           8.38 MB/s",
                "Delegated partitions: 1")
    assert without_ops(parse_benchmark_output(text)) == EXPECTED["litert_cpp_benchmark_results.txt"]


def test_python_block_beside_count_lines_is_refused():
    text = fixture("classic_tf_desktop.txt").split("INFO: Inference timings")[0]
    with pytest.raises(BenchmarkOutputError, match="two tools"):
        parse_benchmark_output(text + fixture("litert_python_benchmark_results.txt"))


def test_an_initialization_profile_without_the_timed_runs_profile_is_truncated_output():
    text = fixture("op_profiling_starnet.txt")
    cut = text[:text.index("INFO: Operator-wise Profiling Info")]
    with pytest.raises(BenchmarkOutputError, match="initialization profile is not followed"):
        parse_benchmark_output(cut)


def test_a_missing_summary_row_is_noticed():
    text = fixture("op_profiling_starnet.txt")
    row = next(line for line in text.split("\n")[::-1] if line.strip().startswith("MUL\t"))
    with pytest.raises(BenchmarkOutputError, match="counts 47 nodes but benchmark_model executed 53"):
        parse_benchmark_output(edit(text, row + "\n", ""))


def test_only_str_is_accepted():
    with pytest.raises(TypeError):
        parse_benchmark_output(fixture("all_same.txt").encode())


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_output(text):
    with pytest.raises(BenchmarkOutputError, match="no output"):
        parse_benchmark_output(text)


# --------------------------------------------------------------------------- rendering, as the tools do

def g6(x: float) -> str:
    """C++ ``ostream << double`` with the default precision: ``%g`` with six significant digits."""
    return format(float(x), ".6g")


def cpp_stat(values: list[int]) -> dict:
    """What ``Stat<int64_t>`` / ``StatWithPercentiles<int64_t>`` hold for ``values``."""
    n = len(values)
    if n == 0:
        return {"count": 0}
    avg = sum(values) / n
    variance = int(float(sum(v * v for v in values)) / n - avg * avg)  # ValueType: truncated
    s = sorted(values)
    return {"count": n, "first": values[0], "curr": values[-1], "min": s[0], "max": s[-1], "avg": avg,
            "std": 0 if s[0] == s[-1] else int(math.sqrt(variance)),
            "p5": s[n * 5 // 100], "median": s[n * 50 // 100], "p95": s[n * 95 // 100]}


def count_line(values: list[int], percentiles: bool) -> str:
    """``Stat::OutputToStream`` (+ ``StatWithPercentiles``)."""
    s = cpp_stat(values)
    if s["count"] == 0:
        line = "count=0"
    elif s["min"] == s["max"]:
        line = f"count={s['count']} curr={s['curr']}" + ("(all same)" if s["count"] > 1 else "")
    else:
        line = (f"count={s['count']} first={s['first']} curr={s['curr']} min={s['min']} max={s['max']} "
                f"avg={g6(s['avg'])} std={s['std']}")
    if percentiles:
        line += " p5={} median={} p95={}".format(*(s.get(k, 0) for k in ("p5", "median", "p95")))
    return line


def printed_avg(values: list[int]) -> float:
    """The average a parser can know: exact for a curr= line, six digits for avg=."""
    s = cpp_stat(values)
    return float(s["min"]) if s["min"] == s["max"] else float(g6(s["avg"]))


def emit(messages: list[str], style: str, crlf: bool) -> str:
    """Each message as TFLITE_LOG writes it to stdout, or as logcat shows it."""
    lines = []
    for msg in messages:
        parts = msg.split("\n")
        if style == "none":
            lines += parts
        elif style == "INFO":
            lines += ["INFO: " + parts[0], *parts[1:]]
        else:  # logcat: the message without TFLITE_LOG's endl; a trailing newline makes no line
            if parts[-1] == "":
                parts = parts[:-1]
            lines += [LOGCAT_STYLES[style] + p for p in parts]
    end = "\r\n" if crlf else "\n"
    return end.join(lines) + end


RUNNING = ("Running benchmark for at least {} iterations and at least {} seconds but terminate if "
           "exceeding 150 seconds.")


def classic_messages(timed, warm, init_us, mem_kb, percentiles) -> list[str]:
    """What BenchmarkModel::Run and BenchmarkLoggingListener::OnBenchmarkEnd log."""
    w = cpp_stat(warm)
    msgs = ["STARTING!", "Log parameter values verbosely: [0]", "Graph: [m.tflite]", "Loaded model m.tflite",
            f"Initialized session in {g6(init_us / 1e3)}ms.",
            RUNNING.format(1, 0.5), count_line(warm, percentiles) + "\n",
            RUNNING.format(50, 1), count_line(timed, percentiles) + "\n",
            f"Inference timings in us: Init: {init_us}, First inference: {w.get('first', 0)}, "
            f"Warmup (avg): {g6(w.get('avg', 0))}, Inference (avg): {g6(cpp_stat(timed)['avg'])}"]
    if mem_kb is not None:
        msgs += ["Note: as the benchmark tool itself affects memory footprint, the following is only "
                 "APPROXIMATE to the actual memory footprint of the model at runtime. Take the information "
                 "at your discretion.",
                 f"Memory footprint delta from the start of the tool (MB): init={g6(mem_kb[0] / 1024.0)} "
                 f"overall={g6(mem_kb[1] / 1024.0)}"]
    return msgs


def classic_expected(timed, warm, init_us, mem_kb, percentiles) -> dict:
    s, w = cpp_stat(timed), cpp_stat(warm)
    warmed = w["count"] > 0

    def ms(us):
        return None if us is None else round(us / 1000, 9)

    return fields(format="classic", count=s["count"], mean_ms=ms(printed_avg(timed)), std_ms=ms(s["std"]),
                  min_ms=ms(s["min"]), max_ms=ms(s["max"]),
                  median_ms=ms(s["median"]) if percentiles else None,
                  p5_ms=ms(s["p5"]) if percentiles else None, p95_ms=ms(s["p95"]) if percentiles else None,
                  init_ms=ms(init_us), first_ms=ms(w["first"]) if warmed else None,
                  warmup_mean_ms=ms(printed_avg(warm)) if warmed else None,
                  memory_init_mb=float(g6(mem_kb[0] / 1024.0)) if mem_kb else None,
                  memory_overall_mb=float(g6(mem_kb[1] / 1024.0)) if mem_kb else None)


# microsecond timings: from sub-millisecond models to multi-second ones (scientific notation)
micros = st.integers(min_value=0, max_value=30_000_000)
timings = st.one_of(st.lists(micros, min_size=1, max_size=80),
                    st.tuples(micros, st.integers(1, 40)).map(lambda t: [t[0]] * t[1]))  # (all same)
classic_case = st.fixed_dictionaries({
    "timed": timings,
    "warm": st.one_of(st.just([]), timings),
    "init_us": st.integers(0, 10_000_000),
    "mem_kb": st.one_of(st.none(), st.tuples(st.integers(-4096, 4_000_000), st.integers(-4096, 4_000_000))),
    "percentiles": st.booleans(),
})
styles = st.sampled_from(["none", "INFO", *sorted(LOGCAT_STYLES)])
PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(case=classic_case, style=styles, crlf=st.booleans())
def test_classic_round_trip(case, style, crlf):
    text = emit(classic_messages(**case), style, crlf)
    assert same(without_ops(parse_benchmark_output(text)), classic_expected(**case))


def litert_cpp_text(timed, warm, init_us, mem_kb) -> str:
    """LiteRT's C++ benchmark_model: BenchmarkModel::Run's lines, then LITERT_LOG's block."""
    s, w = cpp_stat(timed), cpp_stat(warm)
    lines = [f"INFO: {m}" for m in classic_messages(timed, warm, init_us, None, True)[:-1]]
    lines = "\n".join(lines).split("\n")
    log = "INFO: [benchmark_litert_model.h:{}] {}".format
    block = [log(89, ""), "========== BENCHMARK RESULTS ==========",
             log(94, f"Model initialization: {init_us / 1000.0:.2f} ms"),
             log(95, f"Warmup (first):       {w.get('first', 0) / 1000.0:.2f} ms"),
             log(97, f"Warmup (avg):         {w.get('avg', 0) / 1000.0:.2f} ms ({w['count']} runs)"),
             log(99, f"Inference (avg):      {s['avg'] / 1000.0:.2f} ms ({s['count']} runs)"),
             log(103, f"Inference (min):      {s['min'] / 1000.0:.2f} ms"),
             log(105, f"Inference (max):      {s['max'] / 1000.0:.2f} ms"),
             log(107, f"Inference (std):      {s['std'] / 1000.0:.2f}"),
             log(117, "No throughput data available (throughput <= 0).")]
    if mem_kb is not None:
        block += [log(124, ""), "Memory Usage:",
                  log(125, f"Init footprint:       {mem_kb[0] / 1024.0:.2f} MB"),
                  log(127, f"Overall footprint:    {mem_kb[1] / 1024.0:.2f} MB"),
                  log(134, "Peak memory usage not available. (peak_mem_mb <= 0)")]
    block += [log(138, "======================================"), ""]
    return "\n".join(lines + block) + "\n"


@PROPERTY
@given(case=classic_case)
def test_litert_cpp_round_trip(case):
    timed, warm, init_us, mem_kb = case["timed"], case["warm"], case["init_us"], case["mem_kb"]
    expected = classic_expected(timed, warm, init_us, None, True)
    expected.update(format="litert", init_ms=float(f"{init_us / 1000.0:.2f}"),
                    memory_init_mb=float(f"{mem_kb[0] / 1024.0:.2f}") if mem_kb else None,
                    memory_overall_mb=float(f"{mem_kb[1] / 1024.0:.2f}") if mem_kb else None)
    run = parse_benchmark_output(litert_cpp_text(timed, warm, init_us, mem_kb))
    assert same(without_ops(run), expected)


def interpolated(sorted_ms: list[float], p: float) -> float:
    """The percentile the Python litert-benchmark prints (linear between samples)."""
    k = (len(sorted_ms) - 1) * p / 100.0
    f = int(k)
    if f + 1 >= len(sorted_ms):
        return sorted_ms[-1]
    return sorted_ms[f] + (k - f) * (sorted_ms[f + 1] - sorted_ms[f])


@PROPERTY
@given(timed=st.lists(st.floats(0.05, 5000.0), min_size=1, max_size=60),
       warm=st.lists(st.floats(0.05, 5000.0), max_size=6), init=st.floats(0.0, 9000.0))
def test_litert_python_round_trip(timed, warm, init):
    sd = statistics.stdev(timed) if len(timed) > 1 else 0
    s = sorted(timed)
    lines = ["", "=" * 40, " BENCHMARK RESULTS", "=" * 40,
             f"Model initialization:  {init:.2f} ms",
             f"Warmup (first):        {warm[0] if warm else 0:.2f} ms",
             f"Warmup (avg):          {statistics.mean(warm) if warm else 0:.2f} ms ({len(warm)} runs)",
             f"Inference (avg):       {statistics.mean(timed):.2f} ms ({len(timed)} runs)",
             f"Inference (min):       {min(timed):.2f} ms", f"Inference (max):       {max(timed):.2f} ms",
             f"Inference (median):    {statistics.median(timed):.2f} ms",
             f"Inference (std):       {sd:.2f} ms",
             f"Inference (p5):        {interpolated(s, 5):.2f} ms",
             f"Inference (p95):       {interpolated(s, 95):.2f} ms", "Fully accelerated:     False", "=" * 40]

    def two(x):
        return float(f"{x:.2f}")

    n = len(timed)
    expected = fields(format="litert", count=n, mean_ms=two(statistics.mean(timed)),
                      std_ms=two(sd) * math.sqrt((n - 1) / n) if n > 1 else 0.0,
                      min_ms=two(min(timed)), max_ms=two(max(timed)), median_ms=two(statistics.median(timed)),
                      p5_ms=two(interpolated(s, 5)), p95_ms=two(interpolated(s, 95)), init_ms=two(init),
                      first_ms=two(warm[0]) if warm else None,
                      warmup_mean_ms=two(statistics.mean(warm)) if warm else None)
    assert same(without_ops(parse_benchmark_output("\n".join(lines) + "\n")), expected)


# --------------------------------------------------------------------------- damaged output

def agrees(damaged: BenchmarkRun, intact: BenchmarkRun) -> None:
    """Every number the damaged output gave is the intact output's number (or is missing)."""
    d, i = without_ops(damaged), without_ops(intact)
    assert d["format"] == i["format"]
    # equal up to printing: a number may come from another line that prints it less precisely
    # (Warmup (avg) with six digits instead of a whole curr=; the LiteRT block's 0.01 ms)
    printing = dict(rel=5e-6, abs_=0.005 + 1e-9 if d["format"] == "litert" else 1e-12)
    same({k: v for k, v in d.items() if v is not None}, {k: i[k] for k, v in d.items() if v is not None},
         **printing)
    if damaged.op_types:  # the summary, or (summary lost) the Run Order table summed: same up to rounding
        assert [(t.op_type, t.count) for t in sorted(damaged.op_types, key=lambda t: t.op_type)] == \
            [(t.op_type, t.count) for t in sorted(intact.op_types, key=lambda t: t.op_type)]
        for a, b in zip(sorted(damaged.op_types, key=lambda t: t.op_type),
                        sorted(intact.op_types, key=lambda t: t.op_type)):
            assert a.avg_ms == pytest.approx(b.avg_ms, abs=0.0015 * a.count)


def parses_or_refuses(text: str, intact: BenchmarkRun) -> None:
    try:
        damaged = parse_benchmark_output(text)
    except BenchmarkOutputError as exc:
        assert "\n" not in str(exc)
        return
    agrees(damaged, intact)


# a warm-up with the same printed average as the timed runs cannot be told from them once lines
# are lost: leave such cases out
intact_case = classic_case.filter(
    lambda c: not c["warm"] or printed_avg(c["timed"]) != printed_avg(c["warm"]))


@PROPERTY
@given(case=intact_case, style=styles, data=st.data())
def test_truncated_output_never_gives_a_wrong_number(case, style, data):
    # (the filter: a warm-up with the same printed average as the timed runs is indistinguishable)
    text = emit(classic_messages(**case), style, crlf=False)
    intact = parse_benchmark_output(text)
    cut = data.draw(st.integers(0, len(text)))
    parses_or_refuses(text[:cut], intact)


@PROPERTY
@given(case=intact_case, style=styles, data=st.data())
def test_lines_lost_or_garbled_never_give_a_wrong_number(case, style, data):
    text = emit(classic_messages(**case), style, crlf=False)
    intact = parse_benchmark_output(text)
    lines = text.split("\n")
    start = data.draw(st.integers(0, len(lines) - 1))
    stop = data.draw(st.integers(start, min(len(lines), start + 3)))
    garbage = data.draw(st.lists(st.text(max_size=40).filter(lambda s: "\n" not in s and "\r" not in s),
                                 max_size=2))
    parses_or_refuses("\n".join(lines[:start] + garbage + lines[stop:]), intact)


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_every_fixture_cut_anywhere_never_gives_a_wrong_number(data):
    text = fixture(data.draw(st.sampled_from(sorted(EXPECTED))))
    intact = parse_benchmark_output(text)
    parses_or_refuses(text[:data.draw(st.integers(0, len(text)))], intact)


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.data())
def test_op_profile_with_a_line_lost_never_gives_a_wrong_number(data):
    text = fixture(data.draw(st.sampled_from([
        "op_profiling_starnet.txt", "old_tf_peak_memory_start_column.txt",
        "litert_cpp_benchmark_results.txt", "litert_python_benchmark_results.txt"])))
    intact = parse_benchmark_output(text)
    lines = text.split("\n")
    i = data.draw(st.integers(0, len(lines) - 1))
    parses_or_refuses("\n".join(lines[:i] + lines[i + 1:]), intact)


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_random_text_is_refused(text):
    with pytest.raises(BenchmarkOutputError):
        parse_benchmark_output(text)


FRAGMENTS = ["count=", "count=5 curr=3", "(all same)", " avg=", "1.24027e+06", "Inference timings in us: ",
             "Init: 1, ", "Inference (avg): ", "INFO: ", "I tflite  : ", "=========", " BENCHMARK RESULTS",
             "Summary by node type", "\t", "12", "%", "\n", " ", "ms (5 runs)", "Memory footprint"]


@settings(max_examples=300, deadline=None, database=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_fragments_of_real_lines_never_give_a_number_that_is_not_in_the_text(parts):
    text = "".join(parts)
    try:
        run = parse_benchmark_output(text)
    except BenchmarkOutputError:
        return
    # whatever parsed, its mean is a number printed in the text (in us or in ms)
    printed = [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e[-+]\d+)?", text)]
    assert any(math.isclose(run.mean_ms * k, x, rel_tol=1e-9) for x in printed for k in (1, 1000))


# --------------------------------------------------------------------------- pooled

def run_of(samples_ms: np.ndarray, median: bool = True) -> BenchmarkRun:
    return BenchmarkRun(format="classic", count=len(samples_ms), mean_ms=float(samples_ms.mean()),
                        std_ms=float(samples_ms.std()), min_ms=float(samples_ms.min()),
                        max_ms=float(samples_ms.max()),
                        median_ms=float(np.median(samples_ms)) if median else None)


@settings(max_examples=100, deadline=None, database=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6), seed=st.integers(0, 2**32 - 1))
def test_pooled_mean_and_std_equal_numpys_over_all_samples(sizes, seed):
    rng = np.random.default_rng(seed)
    # interleaved runs of one model on a noisy machine: each run shifted and scaled a little
    samples = [rng.normal(20 + rng.normal(0, 2), 0.5 + rng.random(), n) for n in sizes]
    result = pooled([run_of(s) for s in samples])
    everything = np.concatenate(samples)
    assert result["count"] == everything.size and result["runs"] == len(sizes)
    assert result["mean_ms"] == pytest.approx(everything.mean(), rel=1e-12)
    assert result["std_ms"] == pytest.approx(everything.std(ddof=0), rel=1e-9, abs=1e-12)
    assert result["min_ms"] == everything.min() and result["max_ms"] == everything.max()
    assert result["median_ms"] == pytest.approx(statistics.median([float(np.median(s)) for s in samples]))


def test_pooled_parsed_runs_and_what_is_missing():
    a = parse_benchmark_output(fixture("classic_litert_percentiles.txt"))
    b = parse_benchmark_output(fixture("android_logcat_threadtime.txt"))
    result = pooled([a, b, a])
    assert result["count"] == 62 + 50 + 62 and result["runs"] == 3
    assert result["mean_ms"] == pytest.approx((62 * 16.1225 * 2 + 50 * 20.988) / 174)
    assert result["median_ms"] == 16.103 and (result["min_ms"], result["max_ms"]) == (15.561, 21.973)
    no_median = pooled([a, parse_benchmark_output(fixture("classic_tf_desktop.txt"))])
    assert no_median["median_ms"] is None and no_median["std_ms"] is not None


def test_pooled_refuses_runs_without_a_count():
    excerpt = parse_benchmark_output("Inference timings in us: Init: 1, First inference: 2, Warmup (avg): 2, "
                                     "Inference (avg): 3\n")
    with pytest.raises(BenchmarkOutputError, match="run 2 has no count"):
        pooled([parse_benchmark_output(fixture("all_same.txt")), excerpt])
    with pytest.raises(BenchmarkOutputError, match="zero"):
        pooled([])

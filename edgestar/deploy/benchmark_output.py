"""Read the text that TFLite's ``benchmark_model`` and LiteRT's benchmark tools print.

``parse_benchmark_output(text)`` turns the output of one invocation into a ``BenchmarkRun`` (all
times in milliseconds); ``pooled(runs)`` combines several invocations of the same model. Every
format below was read from upstream source; nothing is guessed. Output we cannot read with
certainty (unknown, truncated, inconsistent) raises ``BenchmarkOutputError`` quoting the first
line we could not use: a wrong latency is worse than none.

Where the formats come from
---------------------------
*Classic* ``benchmark_model`` (TensorFlow ``tensorflow/lite/tools/benchmark/``; LiteRT
``tflite/tools/benchmark/``), all times in microseconds:

- ``BenchmarkModel::Run`` (``benchmark_model.cc``) runs the model twice over: the warm-up
  first, then the timed runs. Each logs ``Running benchmark for at least N iterations and at
  least S seconds but terminate if exceeding M seconds.`` (TensorFlow 1.x: ``Running benchmark
  for N iterations``) and then one statistics line written by ``Stat::OutputToStream``
  (``tsl/util/stats_calculator.h``, formerly ``tensorflow/core/util/stats_calculator.h``)::

      count=0
      count=1 curr=X
      count=N curr=X(all same)
      count=N first=X curr=X min=X max=X avg=X std=X

  Builds whose ``Run`` keeps a ``StatWithPercentiles`` (LiteRT's ``tflite/`` tree; the
  TensorFlow-tree ``benchmark_model.cc`` read here keeps a plain ``Stat``) append `` p5=X median=X p95=X`` to each form: the values at sorted index ``n*p//100`` (the
  "median" is the upper median for an even count). ``avg`` is a double printed with six
  significant digits (so ``avg=1.24027e+06``); the others are whole microseconds (``std``, the
  population standard deviation, is truncated to one).
- ``BenchmarkLoggingListener::OnBenchmarkEnd`` then logs ``Inference timings in us: Init: A,
  First inference: B, Warmup (avg): C, Inference (avg): D`` (older builds: ``Average inference
  timings in us: Warmup: C, Init: A, no stats: D``), where C and D are the averages of the two
  ``count=`` lines; then ``Memory footprint delta from the start of the tool (MB): init=X
  overall=Y`` (older builds: ``Peak memory footprint (MB): init=X overall=Y``, max-RSS
  deltas) and, with ``--report_peak_memory_footprint``, ``Overall peak memory footprint (MB) via
  periodic monitoring: Z``.
- With ``--enable_op_profiling=true`` the ``ProfilingListener`` logs ``Profiling Info for
  Benchmark Initialization:`` and ``Operator-wise Profiling Info for Regular Benchmark Runs:``
  (``profiling/profile_summary_formatter.cc``), each followed by tables from
  ``StatsCalculator`` (``stats_calculator.cc``): ``Run Order`` and ``Top by Computation Time``
  (columns ``[node type] [start] [first] [avg ms] [%] [cdf%] [mem KB] [times called] [Name]``;
  newer builds drop ``[start]``), then ``Number of nodes executed: N`` and ``Summary by node
  type`` (``[Node type] [count] [avg ms] [avg %] [cdf %] [mem KB] [times called]``). Fields are
  tab-separated, fixed to three decimals; each table ends with an empty line. We read the timed
  runs' ``Summary by node type`` (the primary graph's, when there are subgraphs), or sum their
  ``Run Order`` table by node type when the summary is missing.

*LiteRT* tools print a ``BENCHMARK RESULTS`` block, values in milliseconds with two decimals:

- the C++ ``benchmark_model`` (``litert/tools/benchmark_litert_model.h``, July 2025 on) logs it
  through ``LITERT_LOG`` (``INFO: [benchmark_litert_model.h:94] Model initialization: 45.32 ms``)
  between ``========== BENCHMARK RESULTS ==========`` and a line of 38 ``=``; it runs the same
  ``BenchmarkModel::Run``, so its ``count=`` lines (with percentiles) are on stdout too, and we
  take the precise values from them after checking that they agree with the block;
- the Python ``litert-benchmark`` (``litert/python/tools/benchmark_litert_model.py``, 2026 on)
  prints it between lines of 40 ``=``, with median, p5 and p95 interpolated between samples and
  a *sample* standard deviation, which we convert to the population one (see ``BenchmarkRun``).

Prefixes: ``TFLITE_LOG`` writes ``INFO: ``/``WARN: `` before the first line of each message
(older builds: no prefix); on Android each message also goes to logcat with the tag
``tflite`` (LiteRT: ``litert``). We strip those and logcat's ``threadtime``, ``time``,
``brief`` and ``tag`` prefixes (``12-01 10:00:00.123  1234  1234 I tflite  : ``), and drop
logcat lines of other tags.

Rules that keep wrong numbers out:

- The timed ``count=`` line is the one after the *second* ``Running benchmark`` line (the first
  belongs to the warm-up); its average must equal the ``Inference (avg)`` it is reported as, and
  the LiteRT block must agree with it to its 0.01 ms.
- A run that reports a failure (``Benchmarking failed.``, ``Node number N (OP) failed to
  invoke.``, LiteRT's ``Run failed:``) or has no timed inference (``count=0``) is refused.
- An empty warm-up prints 0 for ``First inference`` and ``Warmup (avg)``: those become None.
- Through logcat every message is cut to 1023 bytes (``__android_log_print``), which cuts the
  op-profile tables: a table that does not end with its empty line is refused.
- benchmark_model ends every line with a newline: a last line without one is taken as cut off,
  and if it is a line we would read a number from, the parse fails.
"""
from __future__ import annotations

import dataclasses
import math
import re
import statistics
from dataclasses import dataclass, field

from edgestar.errors import StageError


class BenchmarkOutputError(StageError):
    """benchmark_model output we cannot read with certainty: unknown, truncated or inconsistent."""


@dataclass
class OpTypeTime:
    """The time one op type takes per inference, from ``--enable_op_profiling``.

    ``count`` is the number of nodes of that type; ``percent`` is its share of the profiled time
    (None where benchmark_model printed ``nan``); ``times_called`` is per inference.
    """

    op_type: str
    count: int | None
    avg_ms: float
    percent: float | None
    times_called: int | None


@dataclass
class BenchmarkRun:
    """One invocation of benchmark_model (or a LiteRT benchmark tool). Times in milliseconds.

    ``count`` is the number of timed inferences; ``std_ms`` is the *population* standard
    deviation (what benchmark_model computes; the Python LiteRT tool's sample one is converted).
    ``median_ms``, ``p5_ms`` and ``p95_ms`` come only from builds that print them. ``init_ms`` is
    the interpreter set-up, ``first_ms`` the first warm-up inference and ``warmup_mean_ms`` the
    warm-up mean. Memory is in the tool's MB (KiB / 1024). A field the output does not carry is
    None; ``op_types`` is empty without ``--enable_op_profiling``.
    """

    format: str  # "classic" or "litert"
    count: int | None
    mean_ms: float
    std_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    median_ms: float | None = None
    p5_ms: float | None = None
    p95_ms: float | None = None
    init_ms: float | None = None
    first_ms: float | None = None
    warmup_mean_ms: float | None = None
    memory_init_mb: float | None = None
    memory_overall_mb: float | None = None
    peak_memory_mb: float | None = None
    op_types: list[OpTypeTime] = field(default_factory=list)

    def to_json(self) -> dict:
        """A plain dict (op types as dicts) that ``json.dumps`` writes as is."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- lines and prefixes

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"  # what C++ ostreams print for numbers

_SEVERITY = re.compile(r"(?:INFO|WARN|WARNING|ERROR|VERBOSE|DEBUG|FATAL): ")
_SOURCE_LOCATION = re.compile(r"\[[\w.+-]+:\d+\] ?")  # LITERT_LOG's "[file.h:89] "

# logcat's formats (liblog logprint: FORMAT_THREADTIME, FORMAT_TIME, FORMAT_BRIEF, FORMAT_TAG),
# with the optional year, zone and uid of ``-v year``, ``-v zone``, ``-v uid``.
_LOGCAT_TIME = r"(?:(?:\d{4}-)?\d\d-\d\d \d\d:\d\d:\d\d|\s*\d+)\.\d{3,9}(?: ?[+-]\d{4})?"
_LOGCAT_PREFIXES = [
    re.compile(rf"{_LOGCAT_TIME}\s+(?:\S+\s+)?\d+\s+\d+ [VDIWEFAS] (?P<tag>.+?) *: "),  # threadtime
    re.compile(rf"{_LOGCAT_TIME} [VDIWEFAS]/(?P<tag>.+?) *\( *(?:\S+: *)?\d+\): "),  # time
    re.compile(r"[VDIWEFAS]/(?P<tag>.+?) *\( *\d+\): "),  # brief
    re.compile(r"[VDIWEFAS]/(?P<tag>[^:(]+?) *: "),  # tag
    re.compile(r"[VDIWEFAS] (?P<tag>\S+) *: "),  # threadtime's tail, as it is often quoted
]
_OUR_TAGS = ("tflite", "litert")


@dataclass(frozen=True)
class _Line:
    number: int  # 1-based, in the text as given
    raw: str  # as given, for error messages
    msg: str  # the message: prefixes removed, otherwise untouched (table rows keep their tabs)
    complete: bool  # False for a last line with no newline after it: it may be cut off
    logcat: bool  # it came through logcat, which cuts each message to 1023 bytes

    @property
    def text(self) -> str:
        return self.msg.strip()


def _quote(line: _Line) -> str:
    shown = " ".join(line.msg.split()) or line.raw.strip()
    if len(shown) > 80:  # keep both ends: the start says what the line is, the end where it stops
        shown = shown[:45] + " ... " + shown[-30:]
    return f"line {line.number}: {shown!r}"


def _fail(why: str, line: _Line | None = None) -> BenchmarkOutputError:
    """The error to raise: one line saying why, quoting the line concerned."""
    return BenchmarkOutputError(f"benchmark output: {why}" + (f" [{_quote(line)}]" if line else ""))


def _split(text: str) -> list[_Line]:
    """The lines of ``text`` with logcat, severity and source-location prefixes removed; logcat
    lines of other tags are left out."""
    raws = text.splitlines()
    ends_with_newline = text.endswith(("\n", "\r"))
    lines = []
    for i, raw in enumerate(raws):
        msg, logcat = raw, False
        for prefix in _LOGCAT_PREFIXES:
            m = prefix.match(msg)
            if m:
                if m.group("tag").strip() not in _OUR_TAGS:
                    msg = None  # another app's log line
                else:
                    msg, logcat = msg[m.end():], True
                break
        if msg is None:
            continue
        m = _SEVERITY.match(msg)
        if m:
            msg = msg[m.end():]
        m = _SOURCE_LOCATION.match(msg)
        if m:
            msg = msg[m.end():]
        complete = ends_with_newline or i < len(raws) - 1
        lines.append(_Line(i + 1, raw, msg, complete, logcat))
    return lines


def _require_complete(line: _Line) -> None:
    if not line.complete:
        raise _fail("the last line is cut off (the output does not end with a newline)", line)


def _number(value: str, line: _Line) -> float:
    _require_complete(line)
    number = float(value)
    if not math.isfinite(number):
        raise _fail(f"{value!r} is not a finite number", line)
    return number


# --------------------------------------------------------------------------- classic lines

@dataclass
class _Stat:
    """One ``count=`` line, in microseconds."""

    line: _Line
    count: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    first: float | None = None
    p5: float | None = None
    median: float | None = None
    p95: float | None = None


_COUNT = re.compile(
    rf"count=(?P<count>\d+)"
    rf"(?:(?P<single> curr=(?P<curr>{_NUM})(?P<same>\(all same\))?)"
    rf"|(?P<full> first=(?P<first>{_NUM}) curr=(?P<curr2>{_NUM}) min=(?P<min>{_NUM})"
    rf" max=(?P<max>{_NUM}) avg=(?P<avg>{_NUM}) std=(?P<std>{_NUM})))?"
    rf"(?: p5=(?P<p5>{_NUM}) median=(?P<median>{_NUM}) p95=(?P<p95>{_NUM}))?")


def _close(a: float, b: float, rel: float, abs_: float) -> bool:
    return abs(a - b) <= abs_ + rel * max(abs(a), abs(b))


def _ms(us: float | None) -> float | None:
    """Microseconds to milliseconds, without float noise such as 13.109399999999999."""
    return None if us is None else round(us / 1000, 9)


# an average printed with six significant digits is within 5e-6 (relative) of the exact one
_SIX_DIGITS = dict(rel=5e-6 + 1e-12, abs_=1e-12)


def _parse_count(line: _Line) -> _Stat:
    """A ``count=`` line in one of the forms ``Stat::OutputToStream`` writes (module docstring)."""
    _require_complete(line)
    m = _COUNT.fullmatch(line.text)
    if not m:
        raise _fail("a count= line that is not in any form benchmark_model writes", line)

    def num(name: str) -> float:
        return _number(m.group(name), line)

    count = int(m.group("count"))
    stat = _Stat(line, count)
    if m.group("single"):
        # one value, or several equal ones: Stat prints "(all same)" exactly when count > 1
        if count == 0 or (count > 1) != bool(m.group("same")):
            raise _fail(f"count={count} does not fit the curr= form", line)
        stat.mean = stat.min = stat.max = stat.first = num("curr")
        stat.std = 0.0
    elif m.group("full"):
        if count < 2:
            raise _fail(f"count={count} cannot have min and max", line)
        stat.mean, stat.std, stat.min, stat.max = num("avg"), num("std"), num("min"), num("max")
        stat.first = num("first")
        # avg is printed with six significant digits: allow its rounding
        if not (stat.min <= stat.max and stat.std >= 0
                and stat.min * (1 - 1e-5) <= stat.mean <= stat.max * (1 + 1e-5)
                and all(stat.min <= v <= stat.max for v in (stat.first, num("curr2")))):
            raise _fail("the numbers of this count= line contradict each other", line)
    elif count != 0:
        raise _fail(f"count={count} without any values", line)
    if m.group("p5") is not None:
        stat.p5, stat.median, stat.p95 = num("p5"), num("median"), num("p95")
        if count > 0 and not (stat.min <= stat.p5 <= stat.median <= stat.p95 <= stat.max):
            raise _fail("the percentiles of this count= line lie outside min..max or out of order", line)
        if count == 0:
            stat.p5 = stat.median = stat.p95 = None  # Stat prints 0 for an empty run
    return stat


_TIMINGS = re.compile(
    rf"Inference timings in us: Init: (?P<init>{_NUM}), First inference: (?P<first>{_NUM}), "
    rf"Warmup \(avg\): (?P<warmup>{_NUM}), Inference \(avg\): (?P<avg>{_NUM})")
_OLD_TIMINGS = re.compile(
    rf"Average inference timings in us: Warmup: (?P<warmup>{_NUM}), Init: (?P<init>{_NUM}), "
    rf"no stats: (?P<avg>{_NUM})")
_RUNNING = re.compile(r"Running benchmark for (?:at least )?\d+ iterations\b")
_SEVERAL = "several runs in one output? Parse each run's output separately"

# the line's start, the pattern it must then match in full, and the values it gives (MB)
_MEMORY_LINES = [
    ("Memory footprint delta from the start of the tool (MB):",
     re.compile(rf"Memory footprint delta from the start of the tool \(MB\): init=(?P<memory_init_mb>{_NUM})"
                rf" overall=(?P<memory_overall_mb>{_NUM})")),
    ("Peak memory footprint (MB):",
     re.compile(rf"Peak memory footprint \(MB\): init=(?P<memory_init_mb>{_NUM})"
                rf" overall=(?P<memory_overall_mb>{_NUM})")),
    ("Overall peak memory footprint (MB) via periodic monitoring:",
     re.compile(rf"Overall peak memory footprint \(MB\) via periodic monitoring:"
                rf" (?P<peak_memory_mb>{_NUM})")),
]

# messages that say the benchmark failed, so its numbers must not be used: benchmark_main.cc,
# the interpreter's error reporter, and LiteRT's RunImpl
_FAILURES = re.compile(r"Benchmarking failed\.|Node number \d+ \(.*\) failed to invoke\.?|Run failed: .*")


# --------------------------------------------------------------------------- LiteRT block

@dataclass
class _Block:
    start: _Line
    variant: str  # "cpp" (litert/tools/benchmark_litert_model.h) or "python" (litert-benchmark)
    values: dict[str, tuple[float, int | None, _Line]]  # label -> (value, "(N runs)", line)


_MS, _MB = ("ms",), ("MB",)
_BLOCK_LABELS = {  # label -> (the units it may be printed with, whether "(N runs)" follows)
    "Model initialization": (_MS, False),
    "Warmup (first)": (_MS, False),
    "First inference": (_MS, False),  # what the C++ tool's README calls Warmup (first)
    "Warmup (avg)": (_MS, True),
    "Inference (avg)": (_MS, True),
    "Inference (min)": (_MS, False),
    "Inference (max)": (_MS, False),
    "Inference (std)": (("", "ms"), False),  # the C++ tool prints no unit here, the Python one ms
    "Inference (median)": (_MS, False),
    "Inference (p5)": (_MS, False),
    "Inference (p95)": (_MS, False),
    "Init footprint": (_MB, False),
    "Overall footprint": (_MB, False),
    "Peak memory": (_MB, False),
}
_BLOCK_SENTENCES = {
    "Memory Usage:",
    "No inference runs were performed.",
    "No throughput data available (throughput <= 0).",
    "Peak memory usage not available. (peak_mem_mb <= 0)",
}
_BLOCK_FIELD = re.compile(r"(?P<label>[A-Za-z][\w ()]*?):\s+(?P<value>.*)")
_BLOCK_VALUE = re.compile(r"(?P<num>-?\d+\.\d\d)(?P<unit> ms| MB)?(?: \((?P<runs>\d+) runs\))?")


def _is_rule(text: str) -> bool:
    return len(text) >= 10 and set(text) == {"="}


def _read_block(lines: list[_Line], at: int) -> tuple[_Block, int]:
    """The block whose title is ``lines[at]``; returns it and the index after its last line."""
    title = lines[at].text
    if title == "BENCHMARK RESULTS":  # the Python tool: a rule, the title, a rule
        variant = "python"
        if at + 1 >= len(lines) or not _is_rule(lines[at + 1].text):
            raise _fail("BENCHMARK RESULTS without the rule under it", lines[at])
        i = at + 2
    else:
        variant, i = "cpp", at + 1
    values: dict[str, tuple[float, int | None, _Line]] = {}
    while True:
        if i >= len(lines):
            raise _fail("the BENCHMARK RESULTS block has no closing '=====' line (truncated?)", lines[at])
        line = lines[i]
        text = line.text
        i += 1
        if _is_rule(text):
            return _Block(lines[at], variant, values), i
        if not text or text in _BLOCK_SENTENCES:
            continue
        _require_complete(line)
        m = _BLOCK_FIELD.fullmatch(text)
        if not m:
            raise _fail("a line in the BENCHMARK RESULTS block that is not 'label: value'", line)
        label = m.group("label")
        if label not in _BLOCK_LABELS:
            continue  # e.g. Signature name, Throughput, Fully accelerated
        units, with_runs = _BLOCK_LABELS[label]
        v = _BLOCK_VALUE.fullmatch(m.group("value"))  # "%.2f", a unit, maybe "(N runs)"
        if (not v or (v.group("unit") or "").strip() not in units
                or with_runs != (v.group("runs") is not None)):
            raise _fail(f"'{label}' is not followed by a value as the LiteRT tools print it", line)
        if label in values:
            raise _fail(f"'{label}' appears twice in one BENCHMARK RESULTS block", line)
        runs = int(v.group("runs")) if v.group("runs") is not None else None
        values[label] = (_number(v.group("num"), line), runs, line)


# --------------------------------------------------------------------------- op profiling

_TITLE = re.compile(r"=+ (?P<title>.+?) =+")
_INIT_PROFILE = "Profiling Info for Benchmark Initialization:"
_RUN_PROFILE = "Operator-wise Profiling Info for Regular Benchmark Runs:"
_FIX = r"-?\d+\.\d{3}"  # std::fixed, setprecision(3)
_PCT = rf"(?:{_FIX}|-?nan|-?inf)"
_SUMMARY_COLUMNS = ["[Node type]", "[count]", "[avg ms]", "[avg %]", "[cdf %]", "[mem KB]", "[times called]"]
_SUMMARY_CSV = "node type, count, avg_ms, avg %, cdf %, mem KB, times called"
_SUMMARY_ROW = re.compile(
    rf"\s*(?P<type>\S.*?)\s+(?P<count>\d+)\s+(?P<avg>{_FIX})\s+(?P<pct>{_PCT})%\s+(?P<cdf>{_PCT})%"
    rf"\s+(?P<mem>{_FIX})\s+(?P<called>\d+)\s*")
_NODE_COLUMNS = ["[node type]", "[first]", "[avg ms]", "[%]", "[cdf%]", "[mem KB]", "[times called]",
                 "[Name]"]
_NODE_ROW = {
    has_start: re.compile(
        r"\s*(?P<type>\S.*?)\s+" + (rf"(?P<start>{_FIX})\s+" if has_start else "")
        + rf"(?P<first>{_FIX})\s+(?P<avg>{_FIX})\s+(?P<pct>{_PCT})%\s+(?P<cdf>{_PCT})%\s+(?P<mem>{_FIX})"
        rf"\s+(?P<called>\d+)\s+(?P<name>\S.*?)\s*")
    for has_start in (False, True)}


def _percent(value: str, line: _Line) -> float | None:
    return None if value.lstrip("-") in ("nan", "inf") else _number(value, line)


def _table_fail(why: str, line: _Line) -> BenchmarkOutputError:
    if line.logcat:
        why += "; logcat cuts each message to 1023 bytes, so read benchmark_model's stdout instead"
    return _fail(why, line)


def _table_rows(lines: list[_Line], first: int, end: int, what: str) -> list[_Line]:
    """The rows from ``lines[first]`` up to the empty line that ends every table."""
    rows = []
    for i in range(first, end):
        _require_complete(lines[i])  # a cut "\t" is not the empty line
        if not lines[i].text:
            return rows
        rows.append(lines[i])
    raise _table_fail(f"the '{what}' table does not end with an empty line (truncated?)", lines[end - 1])


_CSV_PCT = rf"(?:{_NUM}|-?nan|-?inf)%"
_CSV_CELL = {"count": r"\d+", "avg": _NUM, "pct": _CSV_PCT, "cdf": _CSV_PCT, "mem": _NUM, "called": r"\d+"}


def _csv_summary_row(text: str) -> dict | None:
    """A row of the CSV summary (``--op_profiling_output_mode=csv``): ``type, count, avg_ms, avg %,
    cdf %, mem KB, times called`` in the default float format. A node type may contain ", "."""
    cells = text.rsplit(", ", len(_CSV_CELL))
    if len(cells) != len(_CSV_CELL) + 1:
        return None
    row = dict(zip(["type", *_CSV_CELL], cells))
    if not all(re.fullmatch(pattern, row[key]) for key, pattern in _CSV_CELL.items()):
        return None
    row["pct"] = row["pct"][:-1]
    return row


def _summary_table(lines: list[_Line], at: int, end: int) -> list[OpTypeTime]:
    """``Summary by node type`` (``StatsCalculator::GetStatsByNodeType``)."""
    if at + 1 >= end:
        raise _fail("'Summary by node type' without its table (truncated?)", lines[at])
    header = lines[at + 1]
    csv = header.text == _SUMMARY_CSV
    if not csv and re.findall(r"\[[^\]]*\]", header.msg) != _SUMMARY_COLUMNS:
        raise _fail("unknown columns under 'Summary by node type'", header)
    op_types = []
    for row in _table_rows(lines, at + 2, end, "Summary by node type"):
        m = _csv_summary_row(row.text) if csv else _SUMMARY_ROW.fullmatch(row.msg)
        if not m:
            raise _table_fail("a 'Summary by node type' row that does not parse", row)
        op_types.append(OpTypeTime(op_type=m["type"].strip(), count=int(m["count"]),
                                   avg_ms=_number(m["avg"], row), percent=_percent(m["pct"], row),
                                   times_called=int(m["called"])))
    nodes = lines[at - 1].text if at > 0 else ""
    m = re.fullmatch(r"Number of nodes executed: (\d+)", nodes)
    if m and sum(t.count for t in op_types) != int(m.group(1)):
        raise _fail(f"'Summary by node type' counts {sum(t.count for t in op_types)} nodes but "
                    f"benchmark_model executed {m.group(1)} (rows missing?)", lines[at - 1])
    return op_types


def _aggregate_nodes(lines: list[_Line], at: int, end: int) -> list[OpTypeTime]:
    """Per-op-type totals from the per-node ``Run Order`` table, for output that lacks the
    summary. ``percent`` is then the share of the profiled run time."""
    if at + 1 >= end:
        raise _fail("'Run Order' without its table (truncated?)", lines[at])
    header = lines[at + 1]
    columns = re.findall(r"\[[^\]]*\]", header.msg)
    if columns not in (_NODE_COLUMNS, _NODE_COLUMNS[:1] + ["[start]"] + _NODE_COLUMNS[1:]):
        raise _fail("unknown columns under 'Run Order' (a CSV table cannot be aggregated)", header)
    row_pattern = _NODE_ROW["[start]" in columns]
    totals: dict[str, OpTypeTime] = {}
    for row in _table_rows(lines, at + 2, end, "Run Order"):
        m = row_pattern.fullmatch(row.msg)
        if not m:
            raise _table_fail("a 'Run Order' row that does not parse", row)
        t = totals.setdefault(m["type"], OpTypeTime(m["type"], 0, 0.0, 0.0, 0))
        pct = _percent(m["pct"], row)
        t.count += 1
        t.avg_ms += _number(m["avg"], row)
        t.percent = None if pct is None or t.percent is None else t.percent + pct
        t.times_called += int(m["called"])
    for t in totals.values():  # sums of three-decimal numbers: keep three decimals
        t.avg_ms = round(t.avg_ms, 3)
        t.percent = None if t.percent is None else round(t.percent, 3)
    return sorted(totals.values(), key=lambda t: (-t.avg_ms, t.op_type))


def _op_types(lines: list[_Line]) -> list[OpTypeTime]:
    """The per-op-type breakdown of the timed runs' profile (the primary graph's), or []."""
    texts = [line.text for line in lines]
    init_at = texts.index(_INIT_PROFILE) if _INIT_PROFILE in texts else None
    run_at = texts.index(_RUN_PROFILE) if _RUN_PROFILE in texts else None
    if run_at is None and init_at is not None:
        raise _fail("the initialization profile is not followed by the timed runs' profile (truncated?)",
                    lines[init_at])
    start = 0 if run_at is None else run_at + 1
    end = next((i for i in range(start, len(lines))
                if texts[i].startswith("Subgraph (index: ") or texts[i] == "Delegate internal:"), len(lines))
    titles = {}
    for i in range(start, end):
        m = _TITLE.fullmatch(texts[i])
        if m:
            titles.setdefault(m.group("title"), i)
    if "Summary by node type" in titles:
        return _summary_table(lines, titles["Summary by node type"], end)
    if "Run Order" in titles:
        return _aggregate_nodes(lines, titles["Run Order"], end)
    if run_at is not None:
        raise _fail("the timed runs' profile has no 'Run Order' or 'Summary by node type' table",
                    lines[run_at])
    return []


# --------------------------------------------------------------------------- putting it together

@dataclass
class _Scan:
    """The lines that matter, found in one pass."""

    running: list[_Line] = field(default_factory=list)
    counts: list[_Stat] = field(default_factory=list)
    timings: list[tuple[_Line, dict]] = field(default_factory=list)  # (line, values in us)
    blocks: list[_Block] = field(default_factory=list)
    memory: dict[str, tuple[float, _Line]] = field(default_factory=dict)
    seen_benchmark: bool = False  # lines only benchmark_model prints, for a better error


def _scan(lines: list[_Line]) -> _Scan:
    scan = _Scan()
    i = 0
    while i < len(lines):
        line, text = lines[i], lines[i].text
        if _FAILURES.fullmatch(text):
            raise _fail("the tool reported a failure, so its timings cannot be used", line)
        title = _TITLE.fullmatch(text)
        if text == "BENCHMARK RESULTS" or (title and title.group("title") == "BENCHMARK RESULTS"):
            block, i = _read_block(lines, i)
            scan.blocks.append(block)
            continue
        i += 1
        if text == "STARTING!" or text.startswith(("Loaded model", "Initialized session", "Graph: [")):
            scan.seen_benchmark = True
        elif _RUNNING.match(text):
            scan.running.append(line)
        elif text.startswith("count="):
            scan.counts.append(_parse_count(line))
        elif text.startswith(("Inference timings in us:", "Average inference timings in us:")):
            _require_complete(line)
            m = (_TIMINGS if text.startswith("Inference") else _OLD_TIMINGS).fullmatch(text)
            if not m:
                raise _fail("a timings line that is not in the form benchmark_model writes", line)
            scan.timings.append((line, {k: _number(v, line) for k, v in m.groupdict().items()}))
        else:
            for start, pattern in _MEMORY_LINES:
                if text.startswith(start):
                    _require_complete(line)
                    m = pattern.fullmatch(text)
                    if not m:
                        raise _fail("a memory line that is not in the form benchmark_model writes", line)
                    for key, value in m.groupdict().items():
                        if key in scan.memory:
                            raise _fail(f"a second memory line of the same kind ({_SEVERAL})", line)
                        scan.memory[key] = (_number(value, line), line)
    return scan


def _pick_counts(scan: _Scan, end: _Line) -> tuple[_Stat | None, _Stat | None]:
    """The timed runs' and the warm-up's ``count=`` lines of the result that ``end`` reports.

    ``BenchmarkModel::Run`` is called for the warm-up first and for the timed runs second; each
    call logs ``Running benchmark for ...`` and then its ``count=`` line. So the timed line is the
    one after the last ``Running`` line before the result, and the warm-up line the one before
    that. Without ``Running`` lines (a quoted excerpt) the last ``count=`` line before the result
    is taken; the callers then check its average against the result's ``Inference (avg)``.
    """
    later = [c for c in scan.counts if c.line.number > end.number]
    if later:
        raise _fail(f"a count= line after the results ({_SEVERAL})", later[0].line)
    counts = scan.counts
    running = [r for r in scan.running if r.number < end.number]
    if len(running) > 2:
        raise _fail(f"more than two 'Running benchmark' lines ({_SEVERAL})", running[2])
    if not running:
        if len(counts) > 2:
            raise _fail("more than two count= lines before the results", counts[0].line)
        return (counts[-1] if counts else None), (counts[-2] if len(counts) == 2 else None)
    last = running[-1]
    timed = [c for c in counts if c.line.number > last.number]
    if len(timed) != 1:
        raise _fail(f"{len(timed)} count= lines after the last 'Running benchmark' line, not 1 (truncated?)",
                    last)
    warmup = [c for c in counts if c.line.number < last.number]
    if len(warmup) > 1 or (warmup and len(running) == 2 and warmup[0].line.number < running[0].number):
        raise _fail("a count= line where no warm-up count= line can be", warmup[0].line)
    return timed[0], (warmup[0] if warmup else None)


def _check_same(what: str, ours_us: float, theirs: float, stat: _Stat, line: _Line, unit: float,
                rel: float, abs_: float) -> None:
    """Raise unless the value from ``stat``'s count= line (microseconds) agrees with ``theirs``,
    which ``line`` printed in microseconds (``unit`` 1) or milliseconds (``unit`` 1000)."""
    if not _close(ours_us / unit, theirs, rel=rel, abs_=abs_):
        raise _fail(f"the count= line at line {stat.line.number} does not match {what} = {theirs:g}", line)


def _run_from_stat(fmt: str, stat: _Stat) -> BenchmarkRun:
    return BenchmarkRun(format=fmt, count=stat.count, mean_ms=_ms(stat.mean), std_ms=_ms(stat.std),
                        min_ms=_ms(stat.min), max_ms=_ms(stat.max), median_ms=_ms(stat.median),
                        p5_ms=_ms(stat.p5), p95_ms=_ms(stat.p95))


def _from_classic(scan: _Scan) -> BenchmarkRun:
    """A run from the ``Inference timings`` line and the ``count=`` lines before it."""
    line, t = scan.timings[0]
    timed, warmup = _pick_counts(scan, line)
    if timed is not None and timed.count == 0:
        raise _fail("no timed inferences (count=0; --dry_run or --num_runs=0?)", timed.line)
    if timed is None:
        if t["avg"] == 0:
            raise _fail("Inference (avg) is 0, which benchmark_model prints when nothing ran", line)
        run = BenchmarkRun(format="classic", count=None, mean_ms=_ms(t["avg"]))
    else:
        # the same average, printed with six significant digits (a curr= value is printed whole)
        _check_same("Inference (avg)", timed.mean, t["avg"], timed, line, unit=1, **_SIX_DIGITS)
        run = _run_from_stat("classic", timed)
    # an empty warm-up prints 0 for First inference and Warmup (avg): without the warm-up's count=
    # line, zeros are taken to mean that (a real warm-up of 0 us is then reported as None)
    if warmup is not None:
        warmed = warmup.count > 0
    else:
        warmed = not (t.get("first", 0) == 0 and t["warmup"] == 0)
    if warmup is not None and warmed:
        _check_same("Warmup (avg)", warmup.mean, t["warmup"], warmup, line, unit=1, **_SIX_DIGITS)
    # "First inference" is the warm-up's first run; the oldest format only has it on the count= line
    first = t["first"] if "first" in t else (warmup.first if warmup is not None else None)
    run.init_ms = _ms(t["init"])
    run.first_ms = _ms(first) if warmed else None
    # the count= line's average is the same number, exact where it is a whole curr= value
    run.warmup_mean_ms = _ms(t["warmup"] if warmup is None else warmup.mean) if warmed else None
    return run


def _from_block(scan: _Scan) -> BenchmarkRun:
    block = scan.blocks[0]
    v = block.values

    def value(*labels):
        return next((v[label][0] for label in labels if label in v), None)

    if "Inference (avg)" not in v:
        raise _fail("the BENCHMARK RESULTS block has no 'Inference (avg)' line", block.start)
    avg, n, avg_line = v["Inference (avg)"]
    if n == 0:
        raise _fail("no timed inferences (0 runs)", avg_line)
    timed = warmup = None
    if block.variant == "python" and scan.counts:
        raise _fail("count= lines beside the Python tool's results (two tools in one output?)",
                    scan.counts[0].line)
    if block.variant == "cpp":
        timed, warmup = _pick_counts(scan, block.start)
    two_decimals = dict(unit=1000, rel=5e-6, abs_=0.005 + 1e-9)  # the block rounds to 0.01 ms
    if timed is not None:
        if timed.count != n:
            raise _fail(f"the count= line at line {timed.line.number} says count={timed.count} but "
                        f"BENCHMARK RESULTS says {n} runs", avg_line)
        for label, ours in (("Inference (avg)", timed.mean), ("Inference (min)", timed.min),
                            ("Inference (max)", timed.max), ("Inference (std)", timed.std)):
            if label in v:
                _check_same(label, ours, v[label][0], timed, v[label][2], **two_decimals)
        run = _run_from_stat("litert", timed)
    else:
        std = value("Inference (std)")
        if std is not None and block.variant == "python":  # statistics.stdev -> population std
            std = std * math.sqrt((n - 1) / n) if n > 1 else 0.0
        run = BenchmarkRun(format="litert", count=n, mean_ms=avg, std_ms=std,
                           min_ms=value("Inference (min)"), max_ms=value("Inference (max)"),
                           median_ms=value("Inference (median)"), p5_ms=value("Inference (p5)"),
                           p95_ms=value("Inference (p95)"))
        if run.min_ms is not None and run.max_ms is not None and not (
                run.min_ms - 0.01 <= run.mean_ms <= run.max_ms + 0.01):
            raise _fail("Inference (avg) lies outside Inference (min)..(max)", avg_line)
    warm_avg = v.get("Warmup (avg)")
    warmed = warm_avg is None or warm_avg[1] > 0
    if warmup is not None and warm_avg is not None and warmup.count != warm_avg[1]:
        raise _fail(f"the warm-up count= line says count={warmup.count} but BENCHMARK RESULTS says "
                    f"{warm_avg[1]} runs", warm_avg[2])
    if warmup is not None and warmup.count > 0 and warm_avg is not None:
        _check_same("Warmup (avg)", warmup.mean, warm_avg[0], warmup, warm_avg[2], **two_decimals)
    run.init_ms = value("Model initialization")
    if warmup is not None and warmup.count > 0:  # the warm-up's count= line has whole microseconds
        run.first_ms, run.warmup_mean_ms = _ms(warmup.first), _ms(warmup.mean)
    elif warmed:
        run.first_ms = value("Warmup (first)", "First inference")
        run.warmup_mean_ms = None if warm_avg is None else warm_avg[0]
    run.memory_init_mb = value("Init footprint")
    run.memory_overall_mb = value("Overall footprint")
    run.peak_memory_mb = value("Peak memory")
    return run


def parse_benchmark_output(text: str) -> BenchmarkRun:
    """The result of one benchmark_model (or LiteRT benchmark tool) invocation, in milliseconds.

    Raises ``BenchmarkOutputError`` (one line, quoting the line concerned) for output that holds
    no result, is cut off, reports a failure, holds several runs, or contradicts itself.
    """
    if not isinstance(text, str):
        raise TypeError(f"benchmark output must be str, not {type(text).__name__}")
    lines = _split(text)
    scan = _scan(lines)
    results = [line for line, _ in scan.timings] + [b.start for b in scan.blocks]
    if len(results) > 1:
        raise _fail(f"a second result after the one at line {results[0].number} ({_SEVERAL})", results[1])
    if not results:
        shown = [line for line in lines if line.text]
        if not shown:
            raise _fail("no output")
        if scan.seen_benchmark or scan.running or scan.counts:
            raise _fail("benchmark_model output that ends before its results (truncated?); it ends with",
                        shown[-1])
        raise _fail("no benchmark_model result found; it starts with", shown[0])
    if scan.timings:
        run = _from_classic(scan)
        if scan.memory:
            for key, (value, _) in scan.memory.items():
                setattr(run, key, value)
    else:
        if scan.memory:
            raise _fail("a classic memory line beside a BENCHMARK RESULTS block",
                        next(iter(scan.memory.values()))[1])
        run = _from_block(scan)
    run.op_types = _op_types(lines)
    return run


def pooled(runs: list[BenchmarkRun]) -> dict:
    """Statistics over all the timed inferences of several runs of the same model.

    ``mean_ms`` is the count-weighted mean; ``std_ms`` the population standard deviation of all
    inferences together, exact from each run's count, mean and (population) std:
    ``sqrt(sum(n_i * (std_i**2 + (mean_i - mean)**2)) / sum(n_i))``. ``min_ms``/``max_ms`` are
    the extremes over the runs; ``median_ms`` is the median of the runs' medians (not the median
    of all inferences, which the runs do not carry). A statistic some run lacks is None.
    """
    if not runs:
        raise BenchmarkOutputError("cannot pool zero benchmark runs")
    for i, run in enumerate(runs, 1):
        if not run.count:
            raise BenchmarkOutputError(f"cannot pool: run {i} has no count of timed inferences")
    total = sum(run.count for run in runs)
    mean = sum(run.count * run.mean_ms for run in runs) / total
    if all(run.std_ms is not None for run in runs):
        var = sum(run.count * (run.std_ms ** 2 + (run.mean_ms - mean) ** 2) for run in runs) / total
        std = math.sqrt(var)
    else:
        std = None

    def over_runs(pick, values):
        return None if any(v is None for v in values) else pick(values)

    return {"count": total, "mean_ms": mean, "std_ms": std,
            "min_ms": over_runs(min, [run.min_ms for run in runs]),
            "max_ms": over_runs(max, [run.max_ms for run in runs]),
            "median_ms": over_runs(statistics.median, [run.median_ms for run in runs]),
            "runs": len(runs)}

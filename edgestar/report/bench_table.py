"""The table ``edgestar bench`` prints, rendered from its JSON result alone."""
from __future__ import annotations

from edgestar.deploy.stats import format_speedup
from edgestar.report.summary import percent
from edgestar.report.text import text_table


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}")


def device_line(result: dict) -> str:
    system, runtime = result.get("system") or {}, result.get("runtime") or {}
    parts = [result["device"]]
    what = system.get("model") or system.get("cpu")
    if system.get("machine"):
        parts.append(", ".join(filter(None, [system["machine"], what, f"{system.get('cpus')} cores"])))
    if runtime.get("name"):
        parts.append(" ".join(filter(None, [runtime["name"], runtime.get("version")])))
    return " | ".join(parts)


def bench_table(result: dict) -> str:
    """Latency per model, kernels and threads; the speed-up over FP32 from per-round pairs."""
    if result.get("estimate"):
        return vela_table(result)
    rows = [("model", "kernels", "threads", "mean", "median", "p90", "min", "max", "std", "vs fp32 (p10-p90)")]
    for r in result["rows"]:
        rows.append((r["name"], r["kernels"], str(r["threads"]), *(_ms(r.get(k)) for k in (
            "mean_ms", "median_ms", "p90_ms", "min_ms", "max_ms", "std_ms")), format_speedup(r.get("vs_fp32"))))
    s = result["settings"]
    head = [f"device: {device_line(result)}"]
    if "rounds" in s and "runs_per_invocation" not in s:
        head.append(f"{s['rounds']} rounds, every configuration once per round, interleaved "
                    f"({s.get('timed_seconds', 0):.1f} s timed, after {s['warmup']} warm-up rounds); times in ms")
    elif "runs_per_invocation" in s:
        head.append(f"benchmark_model: {s['rounds']} invocation rounds x {s['runs_per_invocation']} runs, "
                    "models alternated; times in ms")
    lines = head + text_table(rows, left=3)
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]  # right under the numbers
    per = {(r.get("vs_fp32") or {}).get("per") for r in result["rows"]} - {None}
    if per:
        unit = "invocation round (benchmark_model runs)" if per == {"invocation"} else "round"
        lines.append("vs fp32: how many times faster than the FP32 .tflite of the same run at the same kernels "
                     f"and threads: the median of ratios timed side by side in one {unit}; trust the ratios, "
                     "not the absolute times, on a busy machine")
    for ev in result.get("evaluation") or []:
        lines.append(evaluation_line(ev))
    for entry in result.get("op_profile") or []:
        ops = entry["op_types"]
        if ops:
            lines.append(f"op types by time, {entry['name']} (--enable_op_profiling):")
            for op in sorted(ops, key=lambda o: -o["avg_ms"])[:8]:
                pct = f"{op['percent']:.1f}%" if op.get("percent") is not None else "-"
                lines.append(f"  {op['op_type']:<22} {op['avg_ms']:8.3f} ms  {pct:>6}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    return "\n".join(lines)


def evaluation_line(ev: dict) -> str:
    top1 = (f"top-1 {percent(ev['top1'])} on the device (host {percent(ev['host_top1'])})"
            if ev.get("top1") is not None else "no top-1 (labels not the model's)")
    unit = " LSB" if ev.get("output_unit") == "LSB" else ""
    return (f"on-device evaluation, {ev['name']}, {ev['images']} images: {top1}; top-1 agreement with this "
            f"host's run {percent(ev['agreement_with_host'])}; bit-exact outputs on "
            f"{percent(ev['bit_exact_images'])} of images, at most {ev['max_abs_output_diff']:g}{unit} apart")


def vela_table(result: dict) -> str:
    rows = [("model", "NPU ops", "CPU ops", "SRAM KiB", "flash KiB", "inference ms (ESTIMATE)")]
    for r in result["rows"]:
        cpu = str(r.get("cpu_ops", "-"))
        if r.get("cpu_op_types"):
            cpu += " (" + ", ".join(f"{k} x{v}" for k, v in r["cpu_op_types"].items()) + ")"
        rows.append((r["name"], str(r.get("npu_ops", "-")), cpu, _kib(r.get("sram_bytes")),
                     _kib(r.get("flash_bytes")), _ms(r.get("inference_ms_estimate"))))
    lines = text_table(rows, left=len(rows[0]))
    first = result["rows"][0]
    head = (f"device: {result['device']} | Vela {(result.get('runtime') or {}).get('version') or ''} "
            f"{first.get('system_config', '')} {first.get('memory_mode', '')} -- ESTIMATES from Vela's "
            "performance model, not measurements; CPU ops run on the Cortex-M and are not in the time")
    return "\n".join([head, *lines, *[f"WARNING: {w}" for w in result.get("warnings", [])],
                      *[f"note: {n}" for n in result.get("notes", [])]])


def _kib(v) -> str:
    return "-" if v is None else f"{v / 1024:.1f}"

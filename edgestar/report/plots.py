"""The report's two plots (matplotlib, rendered off-screen to PNG bytes): top-1 against the
``.tflite`` size and against host latency. Variants are colours, precisions marker shapes,
error bars the 95 % intervals, and the Pareto front a dashed line with its models labelled.
Rows missing either coordinate are left out, and the plot says how many."""
from __future__ import annotations

import io

MARKERS = {"fp32": "o", "fp16": "s", "dynamic": "D", "int8": "^", "int8-qat": "v", "fp32-qat": "P",
           "mixed": "X"}
FRONT_KEYS = {"bytes": "pareto_size", "host_latency_ms": "pareto_latency"}


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(9, 5.6), dpi=120)


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _plot(rows: list[dict], x_key: str, x_label: str, title: str, empty: str, x_scale=1.0, tick=None,
          base=10) -> bytes:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator

    plt, fig, ax = _figure()
    shown = [r for r in rows if r.get("precision") and r.get(x_key) is not None and r.get("top1") is not None]
    left_out = len([r for r in rows if r.get("precision")]) - len(shown)
    if not shown:
        ax.text(0.5, 0.5, empty, ha="center", va="center", wrap=True, fontsize=12, transform=ax.transAxes)
        ax.set_axis_off()
        ax.set_title(title)
        return _png(plt, fig)
    variants = list(dict.fromkeys(r["variant"] for r in shown))
    colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(variants)}
    precisions = list(dict.fromkeys(r["precision"] for r in shown))
    for r in shown:
        x, y = r[x_key] * x_scale, r["top1"] * 100
        ci = r.get("top1_ci95")
        yerr = [[y - ci[0] * 100], [ci[1] * 100 - y]] if ci else None
        ax.errorbar([x], [y], yerr=yerr, fmt=MARKERS.get(r["precision"], "o"), color=colours[r["variant"]],
                    markersize=8, markeredgecolor="black", markeredgewidth=0.6, elinewidth=1, capsize=3,
                    alpha=0.9, zorder=3)
    front = sorted((r for r in shown if r.get(FRONT_KEYS[x_key])), key=lambda r: r[x_key])
    if front:
        ax.plot([r[x_key] * x_scale for r in front], [r["top1"] * 100 for r in front], "--", color="0.35",
                linewidth=1.2, zorder=2, label="Pareto front")
        for r in front:
            ax.annotate(f"{r['variant']} {r['precision']}" + (f" {r['img_size']}px" if _sizes(shown) > 1 else ""),
                        (r[x_key] * x_scale, r["top1"] * 100), textcoords="offset points", xytext=(7, 7),
                        fontsize=8.5, color="0.15", zorder=4,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "0.7", "alpha": 0.85})
    ax.set_xscale("log")
    if tick is not None:  # plain labels (1 MiB, 0.5 ms), not powers of ten
        ax.xaxis.set_major_locator(LogLocator(base=base, subs=(1.0,) if base == 2 else (1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: tick(x)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    ax.set_xlabel(x_label)
    ax.set_ylabel("top-1 accuracy, % (bars: 95 % interval)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title + (f"\n({left_out} models without this figure are not shown)" if left_out else ""))
    handles = [Line2D([], [], linestyle="", marker="o", markersize=9, color=colours[v], markeredgecolor="black",
                      label=v) for v in variants]
    handles += [Line2D([], [], linestyle="", marker=MARKERS.get(p, "o"), markersize=8, color="0.75",
                       markeredgecolor="black", label=p) for p in precisions]
    handles += [Line2D([], [], linestyle="--", color="0.35", label="Pareto front")] if front else []
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
              title="variant / precision")
    return _png(plt, fig)


def _sizes(rows) -> int:
    return len({r.get("img_size") for r in rows})


def accuracy_vs_size(rows: list[dict]) -> bytes:
    from edgestar.report.render import size

    return _plot(rows, "bytes", ".tflite size (log scale)", "Top-1 vs model size", tick=lambda x: size(round(x)), base=2,
                 empty="No model has both a size and a labelled top-1 accuracy.")


def accuracy_vs_latency(rows: list[dict]) -> bytes:
    threads = {r.get("host_threads") for r in rows if r.get("host_latency_ms") is not None}
    setting = (", ".join("all cores" if t in (0, None) else f"{t} thread{'s' if t != 1 else ''}"
                         for t in sorted(threads, key=lambda t: t or 0)) + ", faster kernel set per model")
    return _plot(rows, "host_latency_ms", f"host latency, ms (median; {setting}; log scale)",
                 "Top-1 vs host latency", tick=lambda x: f"{x:g} ms",
                 empty="No host latency measured:\nrun `edgestar bench RUN_DIR` or `edgestar sweep --bench local`.")

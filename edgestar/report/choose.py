"""Which model for which board, computed from the report's rows.

For each board of the firmware board table: the most accurate INT8 row whose ``.tflite`` and
arena reserve (measured by ``edgestar firmware``) fit (:func:`edgestar.deploy.boards.verdict`,
with its default code-size estimate); equal top-1 goes to the higher agreement with FP32, then to
the smaller file. Rows without a measured
arena are not guessed at: the board then says what is missing. FP32/FP16 models are not
candidates: edgestar's firmware runs INT8 models only.
"""
from __future__ import annotations

MCU_PRECISIONS = ("int8", "int8-qat")
NEAR_BEST_PT = 1.0  # cpu_pick: the fastest model within this many points of the most accurate


def _name(row: dict) -> str:
    return f"{row['variant']} {row['img_size']} px {row['precision']}"


def _rank(row: dict):
    top1 = row.get("top1")
    return (top1 if top1 is not None else -1.0, row.get("agreement") or 0.0, -(row.get("bytes") or 0))


def board_choices(rows: list[dict], boards=None) -> list[dict]:
    from edgestar.deploy.boards import load_boards, verdict

    boards = boards or load_boards()
    candidates = [r for r in rows if r.get("precision") in MCU_PRECISIONS and r.get("bytes")
                  and r.get("arena_reserve_bytes")]
    out = []
    for board in boards.values():
        entry = {"board": board.name, "mcu": board.mcu, "core": board.core, "clock_mhz": board.clock_mhz,
                 "flash_budget": board.usable_flash_bytes, "arena_budget": board.usable_arena_bytes,
                 "choice": None}
        verdicts = [(r, verdict(board, model_bytes=r["bytes"], arena_bytes=r["arena_reserve_bytes"]))
                    for r in candidates]
        fitting = [(r, v) for r, v in verdicts if v["fits"]]
        if fitting:
            row, v = max(fitting, key=lambda rv: _rank(rv[0]))
            acc = f"top-1 {row['top1'] * 100:.1f} %" if row.get("top1") is not None else "no labelled accuracy"
            entry.update(choice={"run": row["run"], "variant": row["variant"], "img_size": row["img_size"],
                                 "precision": row["precision"], "top1": row.get("top1")},
                         choice_text=f"{_name(row)} ({acc}, {row['bytes']:,} B, arena reserve {row['arena_reserve_bytes']:,} B)",
                         why=f"{len(fitting)} of {len(candidates)} measured INT8 models fit; flash headroom "
                             f"{v['flash']['headroom_bytes']:,} B, RAM headroom {v['ram']['headroom_bytes']:,} B "
                             "(code size: the default estimate)")
        elif candidates:
            row, v = min(verdicts, key=lambda rv: (rv[0]["arena_reserve_bytes"], rv[0]["bytes"]))
            entry.update(choice_text="nothing in this report fits",
                         why=f"the smallest, {_name(row)}: {v['reason']}")
        else:
            entry.update(choice_text="unknown",
                         why="no INT8 model here has a measured arena (edgestar sweep --firmware BOARD, or "
                             "edgestar firmware RUN --board BOARD)")
        out.append(entry)
    return out


def cpu_pick(rows: list[dict]) -> dict | None:
    """The most accurate row with a host latency, and the fastest within NEAR_BEST_PT of it."""
    timed = [r for r in rows if r.get("host_latency_ms") is not None and r.get("top1") is not None]
    if not timed:
        return None
    best = max(timed, key=_rank)
    near = [r for r in timed if (best["top1"] - r["top1"]) * 100 <= NEAR_BEST_PT]
    fast = min(near, key=lambda r: (r["host_latency_ms"], -r["top1"]))
    text = (f"Most accurate: {_name(best)}, top-1 {best['top1'] * 100:.1f} % at {best['host_latency_ms']:.3f} ms "
            f"({best.get('host_kernels')} kernels). ")
    if fast is best:
        text += f"No model within {NEAR_BEST_PT:g} point of it is faster."
    else:
        text += (f"Fastest within {NEAR_BEST_PT:g} point: {_name(fast)}, top-1 {fast['top1'] * 100:.1f} % at "
                 f"{fast['host_latency_ms']:.3f} ms ({fast.get('host_kernels')} kernels; "
                 f"{best['host_latency_ms'] / fast['host_latency_ms']:.1f}x faster). "
                 "Differences within the 95 % intervals are not significant.")
    return {"best": _name(best), "fast": _name(fast), "text": text}

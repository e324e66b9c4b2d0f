"""The results table, shaped like the paper's Tables 1-2 (spec section 5): method, NFE, one column per metric."""

from __future__ import annotations

from typing import Any

from flashdmd.eval.metrics import REGISTRY

# the paper's column order, then the metrics it does not report
COLUMN_ORDER = ("clip_score", "image_reward", "pickscore", "hpsv2", "mps", "fid", "fd_clip")


def results_table(rows: list[dict[str, Any]], metrics: list[str] | None = None, notes: list[str] = ()) -> str:
    """Markdown table: one row per ``{"method": str, "nfe": int | str, "metrics": {name: value}}``.

    ``metrics`` fixes the columns (registry names); by default every metric any row has, in the
    paper's order.  A metric a row lacks (skipped, or not run) shows "-".  ``notes`` (e.g. skip
    messages) are listed under the table.
    """
    unknown = [m for row in rows for m in row["metrics"] if m not in REGISTRY]
    if unknown:
        raise ValueError(f"results_table: unknown metric(s) {', '.join(sorted(set(unknown)))}")
    if metrics is None:
        present = {m for row in rows for m in row["metrics"]}
        metrics = [m for m in COLUMN_ORDER if m in present] + sorted(present - set(COLUMN_ORDER))
    header = ["Method", "NFE", *(REGISTRY[m].column for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["method"]), str(row["nfe"])]
        for name in metrics:
            value = row["metrics"].get(name)
            cells.append("-" if value is None else f"{value:.{REGISTRY[name].digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    return "\n".join(lines) + "\n"

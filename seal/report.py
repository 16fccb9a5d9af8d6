"""Write an evaluation's results: a Markdown table and a bar chart of accuracy with 95% CIs.

A row is a dict with ``condition`` (str), ``accuracy`` (``Interval.to_dict()``: mean/low/high/n,
fractions in ``[0, 1]``), and optionally ``delta_vs_base`` (``PairedDifference.to_dict()`` or
None), ``passages`` and ``questions`` (ints) and ``minutes`` (float). Missing values print as ``–``; the
``minutes`` column only appears when some row has a time (a column of dashes says nothing).

`seal evaluate` gives its rows no minutes: its conditions train together in shared TTT batches, so no
condition has a wall time of its own. Its measured stage times are a table of their own (`markdown_timing`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on savefig

__all__ = ["MISSING", "bar_chart", "markdown_results", "markdown_timing"]

MISSING = "–"
_COLUMNS = (
    "condition",
    "passages",
    "questions",
    "accuracy (95% CI)",
    "Δ vs base (95% CI)",
    "p",
)
_MINUTES = "minutes"


def _as_mapping(value: Any) -> Mapping[str, Any] | None:
    """Accept a dict, an object with ``to_dict()`` (Interval / PairedDifference) or None."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _pct(x: float, signed: bool = False) -> str:
    v = round(100.0 * float(x), 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _interval_cell(d: Mapping[str, Any] | None, signed: bool = False) -> str:
    if d is None or d.get("mean") is None:
        return MISSING
    cell = _pct(d["mean"], signed)
    if d.get("low") is not None and d.get("high") is not None:
        cell += f" [{_pct(d['low'], signed)}, {_pct(d['high'], signed)}]"
    return cell


def _p_cell(delta: Mapping[str, Any] | None) -> str:
    p = None if delta is None else delta.get("p_value")
    if p is None:
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _int_cell(value: Any) -> str:
    return MISSING if value is None else str(int(value))


def _minutes_cell(value: Any) -> str:
    return MISSING if value is None else f"{float(value):.1f}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_results(rows: list[dict], grader: str, title: str | None = None) -> str:
    """Markdown results table (accuracy in %, Δ in percentage points) under a grader header line."""
    header = f"**{_escape(title)}** — Grader: {grader}" if title else f"Grader: {grader}"
    timed = any(row.get(_MINUTES) is not None for row in rows)
    columns = (*_COLUMNS, _MINUTES) if timed else _COLUMNS
    lines = [
        header,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
    ]
    for row in rows:
        delta = _as_mapping(row.get("delta_vs_base"))
        cells = [
            _escape(row.get("condition", MISSING)),
            _int_cell(row.get("passages")),
            _int_cell(row.get("questions")),
            _interval_cell(_as_mapping(row.get("accuracy"))),
            _interval_cell(delta, signed=True),
            _p_cell(delta),
        ]
        if timed:
            cells.append(_minutes_cell(row.get(_MINUTES)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_rows(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table over the union of their keys (a key a row lacks prints as –)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = (r.get(c, "–") for c in cols)
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def markdown_timing(minutes: Mapping[str, float | None]) -> str:
    """Markdown table of measured wall-clock minutes per stage (``{stage: minutes}``, e.g. with a ``total``);
    None prints as ``–`` with a note that the stage was not measured."""
    lines = [
        "**Wall time** (measured in the run, summed over resumed runs)",
        "",
        "| stage | minutes |",
        "|---|---:|",
    ]
    lines += [f"| {_escape(stage)} | {_minutes_cell(value)} |" for stage, value in minutes.items()]
    if any(value is None for value in minutes.values()):
        lines += ["", f"{MISSING}: not measured (journaled by a version of seal that kept no times)."]
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path: str | os.PathLike, grader: str, title: str | None = None) -> Path:
    """Bar chart of accuracy (%) per condition with asymmetric 95% CI error bars; saves a PNG."""

    labels: list[str] = []
    heights: list[float] = []
    err_low: list[float] = []
    err_high: list[float] = []
    texts: list[str] = []
    for row in rows:
        labels.append(str(row.get("condition", MISSING)))
        acc = _as_mapping(row.get("accuracy"))
        if acc is None or acc.get("mean") is None:
            heights.append(0.0)
            err_low.append(0.0)
            err_high.append(0.0)
            texts.append(MISSING)
            continue
        mean = 100.0 * float(acc["mean"])
        low = 100.0 * float(acc.get("low", acc["mean"]))
        high = 100.0 * float(acc.get("high", acc["mean"]))
        heights.append(mean)
        err_low.append(max(0.0, mean - low))
        err_high.append(max(0.0, high - mean))
        texts.append(f"{mean:.1f}")

    fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0), layout="constrained")
    ax = fig.add_subplot()
    xs = list(range(len(rows)))
    ax.bar(
        xs,
        heights,
        yerr=[err_low, err_high],
        capsize=4,
        color="tab:blue",
        alpha=0.85,
        error_kw={"elinewidth": 1.2, "ecolor": "black"},
    )
    for x, h, eh, text in zip(xs, heights, err_high, texts, strict=True):
        ax.annotate(
            text,
            (x, h + eh),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    tops = [h + eh for h, eh in zip(heights, err_high, strict=True)]
    ax.set_ylim(0.0, min(110.0, max(tops, default=0.0) * 1.15 + 1.0))  # room for the value labels
    ax.set_xticks(xs)
    long_labels = len(rows) > 4 or any(len(label) > 12 for label in labels)
    ax.set_xticklabels(labels, rotation=20 if long_labels else 0, ha="right" if long_labels else "center")
    ax.set_ylabel(f"no-context QA accuracy (%) — {grader}")
    if title:
        ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150, format="png")
    return out

"""The filter stage: choose which rewarded self-edits the generator is fine-tuned on (ReST-EM's E-step)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from seal.config import FilterConfig


def rewarded(row: dict[str, Any], cfg: FilterConfig) -> bool:
    """True when a parsed self-edit earned a reward the E-step may train on: above `filter_min_reward`
    (unless None) and, with `filter_beat_passage`, an adapted accuracy above TTT on the passage alone."""
    if row["status"] != "ok":
        return False
    if cfg.filter_min_reward is not None and not row["reward"] > cfg.filter_min_reward:
        return False
    if cfg.filter_beat_passage:
        if row.get("passage_accuracy") is None:
            raise ValueError("filter_beat_passage needs each row's passage_accuracy (passage-only TTT)")
        return row["adapted_accuracy"] > row["passage_accuracy"]
    return True


def select(rows: Sequence[dict[str, Any]], cfg: FilterConfig) -> list[dict[str, Any]]:
    """Return the kept rows (each needs passage_id, index, status, reward, adapted_accuracy, base_accuracy,
    and passage_accuracy with filter_beat_passage).

    Only :func:`rewarded` rows are ever kept, whatever the strategy; the strategy then chooses among them.
    Ties in top_k are broken by the lower self-edit index, so the selection is deterministic.
    """
    valid = [r for r in rows if rewarded(r, cfg)]
    if cfg.filter_strategy == "threshold":
        return [r for r in valid if r["reward"] >= cfg.filter_threshold]
    if cfg.filter_strategy == "gain":
        return [r for r in valid if r["adapted_accuracy"] - r["base_accuracy"] > cfg.filter_min_gain]
    by_passage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in valid:
        by_passage[r["passage_id"]].append(r)
    kept = []
    for group in by_passage.values():
        kept.extend(sorted(group, key=lambda r: (-r["reward"], r["index"]))[: cfg.filter_top_k])
    return kept


def passages_without_kept(rows: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]]) -> int:
    """How many passages of `rows` have no self-edit in `kept` (the E-step gave them no training signal)."""
    return len({r["passage_id"] for r in rows} - {k["passage_id"] for k in kept})

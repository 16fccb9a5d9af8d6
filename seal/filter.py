"""The filter stage: choose which rewarded self-edits the generator is fine-tuned on (ReST-EM's E-step)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from seal.config import FilterConfig

STRATEGIES = ("top_k", "threshold", "gain")


def select(rows: Sequence[dict[str, Any]], cfg: FilterConfig) -> list[dict[str, Any]]:
    """Return the kept rows (each needs passage_id, index, status, reward, adapted_accuracy, base_accuracy).

    Self-edits whose status is not `ok` (empty or unparseable) are never kept. Ties in top_k are broken by
    the lower self-edit index, so the selection is deterministic.
    """
    if cfg.filter_strategy not in STRATEGIES:
        raise ValueError(f"filter_strategy must be one of {STRATEGIES}, got '{cfg.filter_strategy}'")
    valid = [r for r in rows if r["status"] == "ok"]
    if cfg.filter_strategy == "threshold":
        return [r for r in valid if r["reward"] >= cfg.filter_threshold]
    if cfg.filter_strategy == "gain":
        return [r for r in valid if r["adapted_accuracy"] - r["base_accuracy"] > cfg.filter_min_gain]
    if cfg.filter_top_k < 1:
        raise ValueError(f"filter_top_k must be >= 1, got {cfg.filter_top_k}")
    by_passage: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in valid:
        if cfg.filter_min_reward is None or r["reward"] > cfg.filter_min_reward:
            by_passage[r["passage_id"]].append(r)
    kept = []
    for group in by_passage.values():
        kept.extend(sorted(group, key=lambda r: (-r["reward"], r["index"]))[: cfg.filter_top_k])
    return kept

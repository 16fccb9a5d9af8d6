"""The layout of a run directory: where the loop writes each file and where `seal push`, `seal review` and a
resumed run read it back (docs/run_directory.md shows the tree).

    <run>/config.yaml, journal.jsonl, log.txt, summary.{json,md}, rounds.png, heldout/, adapters/
    <run>/round_<r>/labels.jsonl, generations.jsonl, self_edits.jsonl, kept.jsonl, summary.{json,md},
                    adapters/, update/

Files a stage owns inside these (the review pages and decisions, the update's marker, the tracker's marker)
are named by that stage's module. A leaf module: it imports nothing of seal's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.yaml"  # the recipe snapshot: a resumed run refuses a changed one
JOURNAL = "journal.jsonl"  # finished work (seal.journal; per-rank files beside it)
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"  # a run's (every round) and a round's own
PLOT = "rounds.png"
HELDOUT = "heldout"
ADAPTERS = "adapters"
LABELS = "labels.jsonl"  # pseudo-labels, kept or not (also `seal label`'s output)
GENERATIONS = "generations.jsonl"
SELF_EDITS = "self_edits.jsonl"
KEPT = "kept.jsonl"
UPDATE = "update"

_ROUND = re.compile(r"round_(\d+)")


@dataclass(frozen=True)
class _Dir:
    """What a run and each of its rounds have: a summary and the TTT adapters in flight."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str is accepted

    @property
    def summary_json(self) -> Path:
        return self.path / SUMMARY_JSON

    @property
    def summary_md(self) -> Path:
        return self.path / SUMMARY_MD

    @property
    def adapters(self) -> Path:
        return self.path / ADAPTERS


@dataclass(frozen=True)
class RoundDir(_Dir):
    """`<run>/round_<r>/`: one round's files."""

    @property
    def index(self) -> int:
        return round_number(self.path)

    @property
    def labels(self) -> Path:
        return self.path / LABELS

    @property
    def generations(self) -> Path:
        return self.path / GENERATIONS

    @property
    def self_edits(self) -> Path:
        return self.path / SELF_EDITS

    @property
    def kept(self) -> Path:
        return self.path / KEPT

    @property
    def update(self) -> Path:
        return self.path / UPDATE


@dataclass(frozen=True)
class RunDir(_Dir):
    """`<run>/`: the output_dir of one ReST-EM run."""

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def journal(self) -> Path:
        return self.path / JOURNAL

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    @property
    def heldout(self) -> Path:
        return self.path / HELDOUT

    def round(self, r: int) -> RoundDir:
        return RoundDir(self.path / f"round_{r}")

    def rounds(self) -> list[RoundDir]:
        """The round directories present, in round order."""
        found = [p for p in self.path.glob("round_*") if p.is_dir() and _ROUND.fullmatch(p.name)]
        return [RoundDir(p) for p in sorted(found, key=round_number)]


def round_number(round_dir: str | Path) -> int:
    """r of a `round_<r>` directory; ValueError for any other name."""
    match = _ROUND.fullmatch(Path(round_dir).name)
    if not match:
        raise ValueError(f"{round_dir} is not a round directory (round_<r>)")
    return int(match.group(1))

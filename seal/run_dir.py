"""The layout of a run directory: where the loop writes each file and where `seal push`, `seal review` and a
resumed run read it back (docs/run_directory.md shows the tree).

    <run>/config.yaml, journal.jsonl, log.txt, summary.{json,md}, rounds.png, heldout/, adapters/
    <run>/round_<r>/labels.jsonl, generations.jsonl, self_edits.jsonl, kept.jsonl, summary.{json,md},
                    adapters/, update/

Files a stage owns inside these (the review pages and decisions, the update's marker, the tracker's marker)
are named by that stage's module. `setup_run_dir` creates a run directory and refuses to resume a run made
with another recipe.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from seal.config import SealArgs
from seal.utils import atomic_write

logger = logging.getLogger("seal")

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

# Fields that only say where a run is shared or logged: changing them does not block resuming the run.
RESUMABLE = ("logging_dir", "run_name", "push_to_hub", "hub_model_id", "hub_private_repo")
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


def setup_run_dir(args: SealArgs, main_process: bool = True) -> Path:
    """Create the run directory, snapshot the recipe, and refuse to resume a run made with another recipe.

    Every process checks (so all of them stop on a changed recipe); only the main process writes, atomically:
    config.yaml is always a whole recipe, the old one or the new one, even after a crash mid-write.
    """
    run_dir = Path(args.sft.output_dir)
    layout = RunDir(run_dir)
    snapshot = args.to_dict()
    for volatile in ("resume",):
        snapshot["loop"].pop(volatile, None)
    snapshot.get("review", {}).pop("review_decisions", None)  # one round's file, not part of the recipe
    config_path = layout.config
    if config_path.exists():
        if args.loop.resume:
            previous = yaml.safe_load(config_path.read_text())
            changed = sorted(
                f"{section}.{k}"
                for section, values in snapshot.items()
                for k, v in values.items()
                if previous.get(section, {}).get(k, v) != v
                and k not in RESUMABLE
                and section != "hub"  # where results are shared does not change them
            )
            if changed:
                raise ValueError(
                    f"{run_dir} holds a run made with a different recipe (changed: {', '.join(changed)}). "
                    "Use another output_dir, or --resume false to start over."
                )
        elif main_process:
            logger.info("resume=false: discarding the previous run in %s", run_dir)
            journals = run_dir.glob(f"{Path(JOURNAL).stem}*.jsonl")  # + the per-process ones
            for stale in [*journals, *(rd.path for rd in layout.rounds())]:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    if main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(config_path, lambda f: yaml.safe_dump(snapshot, f, sort_keys=False))  # whole or old
    return run_dir

"""The loop's own metrics per round, to the trackers named by the recipe's `report_to`, and a PNG plot.

The update step reports its training to `report_to` through `SFTTrainer` itself. The loop's per-round
metrics (mean reward, mean adapted accuracy, best-of-k, kept count, update loss, ...) go to the same
trackers through accelerate's tracker classes (`accelerate.tracking`: tensorboard, wandb, trackio, ...), one
step per round; `none` or an empty list logs nothing. `<run>/rounds.png` plots reward and accuracy per round.

Where they land: TensorBoard under `<run>/tensorboard/loop` (the updates' under
`<run>/round_<r>/update/trainer/runs`, so `tensorboard --logdir <run>` shows both); trackio and wandb in
project `SFTConfig.project` (wandb: `WANDB_PROJECT`, as for the update; default "huggingface"), run
`<run_name or run dir name>-loop`.
A round is logged once: a rerun that resumes the run does not log finished rounds again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers
from matplotlib.figure import Figure  # no pyplot: no global state

from seal.run_dir import RunDir
from seal.utils import write_json

logger = logging.getLogger("seal")

METRICS = (
    "mean_reward",
    "mean_adapted_acc",
    "best_of_k_acc",
    "base_acc",
    "kept",
    "parsed",
    "self_edits",
    "update_loss",
    "minutes",
)
PREFIX = "seal/"
MARKER = "tracked.json"  # in round_<r>/: the round was reported (a resumed run does not log it twice)


def tracker_names(report_to: str | Sequence[str] | None) -> list[str]:
    """The accelerate trackers for `report_to`; refuses one that accelerate knows but is not installed.

    Integrations only transformers knows (e.g. codecarbon) are left to the update step.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = {str(t) for t in get_available_trackers()}
    if "all" in names:
        names = [n for n in LOGGER_TYPE_TO_CLASS if n in available]
    out = []
    for name in dict.fromkeys(names):
        if name == "none":
            continue
        if name not in LOGGER_TYPE_TO_CLASS:
            logger.info("report_to '%s': the update reports to it; the loop's own metrics do not", name)
        elif name not in available:
            raise ValueError(f"report_to names '{name}', which is not installed (pip install {name})")
        else:
            out.append(name)
    return out


def round_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The numeric per-round metrics of a round summary, under the `seal/` prefix."""
    values = {}
    for key in [*METRICS, *(k for k in summary if k.startswith("heldout_"))]:  # + the held-out evaluation
        value = summary.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            values[PREFIX + key] = float(value) if isinstance(value, float) else int(value)
    return values


class RoundTracker:
    """Logs each finished round's summary once (step = round) and redraws `<run>/rounds.png`."""

    def __init__(
        self,
        run_dir: str | Path,
        report_to: str | Sequence[str] | None,
        project: str = "huggingface",
        run_name: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.layout = RunDir(run_dir)
        self.names = tracker_names(report_to)
        self.project = project or "huggingface"
        self.run_name = f"{run_name or self.run_dir.name}-loop"
        self.trackers: list[Any] | None = None  # started at the first round to log

    @classmethod
    def for_run(cls, run_dir: str | Path, training_args: Any) -> RoundTracker:
        """The tracker of a run whose update uses `training_args` (an `SFTConfig`)."""
        return cls(
            run_dir,
            getattr(training_args, "report_to", None),
            getattr(training_args, "project", None) or "huggingface",
            getattr(training_args, "run_name", None),
        )

    def _start(self) -> list[Any]:
        PartialState()  # the trackers log only on the main process, which needs accelerate's state
        trackers = []
        for name in self.names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if name == "tensorboard":
                tracker = cls("loop", str(self.run_dir / "tensorboard"))
            elif name == "trackio":
                tracker = cls(self.project, name=self.run_name, resume="allow")
            elif name == "wandb":  # the update's project (WANDB_PROJECT); a resumed run continues its run
                digest = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:8]
                project = os.environ.get("WANDB_PROJECT") or self.project
                tracker = cls(project, name=self.run_name, id=f"{self.run_name}-{digest}", resume="allow")
            elif cls.requires_logging_directory:
                tracker = cls(self.run_name, str(self.run_dir / name))
            else:
                tracker = cls(self.run_name)
            tracker.start()
            trackers.append(tracker)
        return trackers

    def update(self, summaries: Sequence[dict[str, Any]], heldout: dict[str, Any] | None = None) -> None:
        """Log the rounds of `summaries` not logged before, and redraw the plot of all of them (with the
        held-out tables, `heldout`, when the run has held-out sets)."""
        if summaries:
            plot_rounds(summaries, self.layout.plot, heldout)
        if not self.names:
            return
        for summary in summaries:
            marker = self.layout.round(summary["round"]).path / MARKER
            if marker.is_file():
                continue
            if self.trackers is None:
                self.trackers = self._start()
            values = round_metrics(summary)
            for tracker in self.trackers:
                tracker.log(values, step=int(summary["round"]))
            write_json(marker, {"report_to": self.names, "step": summary["round"]})

    def close(self) -> None:
        """Finish the trackers' runs (flushes trackio and wandb)."""
        for tracker in self.trackers or []:
            tracker.finish()
        self.trackers = None


def plot_rounds(
    summaries: Sequence[dict[str, Any]], path: str | Path, heldout: dict[str, Any] | None = None
) -> Path:
    """Accuracy (mean adapted, best-of-k, base) and mean reward per round, side by side, as a PNG; with a
    held-out evaluation, its accuracy for each generator's self-edits (x = the generator version: 0 the base,
    r + 1 after round r): one panel per set with 95% CIs and passage-only TTT when `heldout` (the contents of
    heldout/results.json) is given, else one panel from the round summaries."""

    rounds = [s["round"] for s in summaries]
    names = sorted(
        {k[: -len("_acc")] for s in summaries for k in s if k.startswith("heldout_") and k.endswith("_acc")}
    )
    tables = (heldout or {}).get("tables", {})
    panels = len(tables) if tables else min(len(names), 1)
    fig = Figure(figsize=(4.0 * (2 + panels), 3.4), layout="constrained")
    acc, rew, *held = fig.subplots(1, 2 + panels)
    for key, label, style in (
        ("best_of_k_acc", "best-of-k", "s--"),
        ("mean_adapted_acc", "mean adapted", "o-"),
        ("base_acc", "base (no training)", "x:"),
    ):
        acc.plot(rounds, [s.get(key) for s in summaries], style, label=label)
    acc.set_title("no-context QA accuracy")
    acc.set_ylim(bottom=0.0)
    acc.legend(fontsize=8, loc="best")
    rew.plot(rounds, [s.get("mean_reward") for s in summaries], "^-", color="tab:red", label="mean reward")
    rew.axhline(0.0, color="black", linewidth=0.6)
    rew.set_title("mean reward of the self-edits")
    if tables:
        for ax, (name, rows) in zip(held, tables.items(), strict=True):
            heldout_panel(ax, rows)
            ax.set_title(f"held-out: {Path(name).stem if name.endswith(('.json', '.jsonl')) else name}")
    elif held:
        (ax,) = held
        for name in names:
            first = summaries[0].get(f"{name}_acc_before")
            points = [(0, first)] if first is not None else []
            points += [(s["round"] + 1, s[f"{name}_acc"]) for s in summaries if f"{name}_acc" in s]
            ax.plot(*zip(*points, strict=True), "o-", label=name.removeprefix("heldout_"))
        ax.set_title("held-out: generator's self-edits")
    for ax in held:
        ax.set_xlabel("generator (0 = base, r+1 = after round r)")
        ax.set_ylim(bottom=0.0)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    for ax in (acc, rew):
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        if len(rounds) == 1:
            ax.set_xlim(rounds[0] - 0.5, rounds[0] + 0.5)
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    return path


def heldout_panel(ax: Any, rows: Sequence[dict[str, Any]]) -> None:
    """One held-out set's table: each generator's self-edits with their 95% CI, passage-only TTT as a band."""
    by_key = {row["key"]: row["accuracy"] for row in rows if row.get("accuracy")}
    points = sorted(int(k.split("_")[1]) for k in by_key if k.startswith("generator_"))
    if points:
        means = [by_key[f"generator_{q}"]["mean"] for q in points]
        low = [m - by_key[f"generator_{q}"]["low"] for q, m in zip(points, means, strict=True)]
        high = [by_key[f"generator_{q}"]["high"] - m for q, m in zip(points, means, strict=True)]
        ax.errorbar(points, means, yerr=[low, high], fmt="o-", capsize=3, label="passage + self-edits")
        ax.set_xticks(points)
    for key, label, color in (("passage", "passage only", "tab:green"), ("base", "no training", "tab:gray")):
        if key in by_key:
            ci = by_key[key]
            ax.axhline(ci["mean"], color=color, linestyle="--", linewidth=1.0, label=label)
            ax.axhspan(ci["low"], ci["high"], color=color, alpha=0.12)

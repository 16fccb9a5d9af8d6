"""Held-out evaluation inside the ReST-EM loop (TRL's `eval_strategy`, per round).

At evaluation point 0 (before round 0) and after each round's update (point r + 1), the current generator
samples `heldout_num_self_edits` self-edits per held-out passage; each is applied by TTT (on the generator
itself in SEAL's setting, on the base with `ttt_model: base`) and the adapted model answers the passage's
questions without the passage. Point 0 also scores the base model with no training and TTT on the passage
alone. Every TTT is journaled, and the self-edits are saved, so an interrupted evaluation resumes.

Passages are the resampled units of the bootstrap; each generator is compared with the base generator and
with passage-only TTT on the same passages (paired).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from seal.config import HeldOutConfig
from seal.data import DataValidationError, Passage, context_key, load_passages
from seal.describe import describe_rows
from seal.domain import Domain, Policy
from seal.generate import SelfEdit
from seal.inner_loop import InnerLoop, Job
from seal.journal import Journal
from seal.paths import safe_name
from seal.reward import PassageScore, Rewarder
from seal.run_dir import RunDir
from seal.stats import bootstrap_ci, paired_difference
from seal.templates import TrainExample
from seal.utils import read_jsonl, task_seed, write_json, write_jsonl

logger = logging.getLogger("seal")


def load_heldout(cfg: HeldOutConfig, train: Sequence[Passage]) -> dict[str, list[Passage]]:
    """{set name: passages} of every held-out set, validated; a held-out passage whose context is also a
    training passage's, contains one or lies inside one (of 8 words or more: documents split into passages),
    is refused
    (DataValidationError naming both records) before any model loads."""
    seen = {context_key(p.context): p.id for p in train}

    def trained_as(context: str) -> str | None:
        key = context_key(context)
        if key in seen:
            return seen[key]
        inside = (  # one inside the other; a few words in common are not a passage
            pid
            for other, pid in seen.items()
            if (other in key and len(other.split()) >= 8) or (key in other and len(key.split()) >= 8)
        )
        return next(inside, None)

    sets, problems = {}, []
    for name in cfg.heldout_datasets:
        if name in sets:
            raise ValueError(f"heldout_datasets lists '{name}' twice")
        passages = load_passages(
            name, cfg.heldout_split, limit=cfg.heldout_num_passages, max_questions=cfg.heldout_max_questions
        )
        for p in passages:
            if (trained := trained_as(p.context)) is not None:
                problems.append(
                    f"{name}: record (id={p.id}): field 'context': overlaps the training passage "
                    f"'{trained}': held-out passages must never be trained on"
                )
        sets[name] = passages
    if problems:
        raise DataValidationError(problems)
    return sets


def labels(names: Sequence[str]) -> dict[str, str]:
    """A short label per set for summary keys: the file stem (or name), numbered when two collide."""
    out: dict[str, str] = {}
    for name in names:
        stem = Path(name).stem if name.endswith((".json", ".jsonl")) else name
        label = "".join(c if c.isalnum() else "_" for c in stem)
        out[name] = label if label not in out.values() else f"{label}_{len(out)}"
    return out


class HeldOut:
    """The held-out sets of one run, their journal entries (``("heldout", set, ...)``) and their table."""

    def __init__(
        self,
        sets: dict[str, list[Passage]],
        cfg: HeldOutConfig,
        domain: Domain,
        journal: Journal,
        run_dir: Path,
        seed: int,
        ttt_model: str,
    ):
        self.sets, self.cfg, self.journal, self.seed = sets, cfg, journal, seed
        self.domain, self.n = domain, cfg.heldout_num_self_edits
        self.dir = RunDir(run_dir).heldout  # generations per set and point, results.{json,md}
        self.ttt_model = ttt_model
        self.labels = labels(list(sets))
        self.results: dict[str, Any] | None = None  # the last point's results.json, once evaluated

    def evaluate(
        self, point: int, inner: InnerLoop, rewarder: Rewarder, policy: Policy, tokenizer
    ) -> dict[str, Any]:
        """Evaluate the generator of point `point` (`policy`; `inner`/`rewarder` train and
        score on the weights TTT runs on now) on every set; return the round-summary fields."""
        jobs: list[Job] = []
        keys: dict[str, tuple] = {}
        for name, passages in self.sets.items():
            if point == 0 or self.ttt_model == "generator":  # the no-context score of these weights
                key = ("heldout", name, "nocontext", point)
                if self.journal.get(*key) is None:
                    scores = rewarder.score(passages, adapter=None)
                    self.journal.append(key, scores=[s.to_dict() for s in scores])
            if point == 0:
                for p in passages:
                    keys[f"heldout-{name}-passage-{p.id}"] = ("heldout", name, "passage", p.id)
                    jobs.append(
                        self._job(f"heldout-{name}-passage-{p.id}", self.domain.control_examples(p), p)
                    )
            edits = self._self_edits(name, point, passages, policy, tokenizer)
            for p in passages:
                for i, edit in enumerate(edits[p.id]):
                    job_name = f"heldout-{name}-{point}-{p.id}-{i}"
                    keys[job_name] = ("heldout", name, "generator", point, p.id, i)
                    jobs.append(self._job(job_name, self.domain.edit_examples(edit, p), p))
        pending = [j for j in jobs if self.journal.get(*keys[j.name]) is None]
        logger.info(
            "held-out evaluation %d: %d TTT runs (%d already done)",
            point,
            len(jobs),
            len(jobs) - len(pending),
        )

        def finished(job: Job, losses: list[float], scores: list[PassageScore]) -> None:
            self.journal.append(keys[job.name], losses=losses, scores=[s.to_dict() for s in scores])

        if pending:
            inner.run(pending, finished)
        return self.summary(point)

    def _job(self, name: str, examples: list[TrainExample], passage: Passage) -> Job:
        return Job(name, examples, [passage], task_seed(self.seed, name))

    def _self_edits(
        self, name: str, point: int, passages: list[Passage], policy: Policy, tokenizer
    ) -> dict[str, list[SelfEdit]]:
        """The point's self-edits for one set: sampled once, saved, reused on resume."""
        path = self.dir / safe_name(name) / f"generations_{point}.jsonl"
        if path.exists():
            saved = [SelfEdit.from_dict(d) for d in read_jsonl(path)]
        else:
            seed = task_seed(self.seed, "heldout", name, point)
            nested = self.domain.sample(policy, tokenizer, passages, seed, self.n)
            saved = [e for per in nested for e in per]
            write_jsonl(path, [e.to_dict() for e in saved])
        grouped: dict[str, list[SelfEdit]] = {p.id: [] for p in passages}
        for e in saved:
            grouped[e.passage_id].append(e)
        return grouped

    def accuracies(self, name: str, point: int) -> dict[str, list[float] | None]:
        """Per-passage accuracies of a set for each row of its table (None: not evaluated yet)."""
        passages = self.sets[name]

        def entry(*key: Any) -> dict[str, Any] | None:
            return self.journal.get("heldout", name, *key)

        out: dict[str, list[float] | None] = {}
        base = entry("nocontext", 0)
        out["base"] = [s["accuracy"] for s in base["scores"]] if base else None
        passage = [entry("passage", p.id) for p in passages]
        out["passage"] = [e["scores"][0]["accuracy"] for e in passage] if all(passage) else None
        for q in range(point + 1):
            runs = [[entry("generator", q, p.id, i) for i in range(self.n)] for p in passages]
            done = all(all(per) for per in runs)
            out[f"generator_{q}"] = (
                [fmean(e["scores"][0]["accuracy"] for e in per) for per in runs] if done else None
            )
            own = entry("nocontext", q) if q > 0 else None
            if own is not None:
                out[f"nocontext_{q}"] = [s["accuracy"] for s in own["scores"]]
        return out

    def described(self, name: str, point: int) -> dict[str, dict[str, Any]]:
        """`describe_rows` of each generator's saved self-edits for one set, by table key."""
        by_id = {p.id: p for p in self.sets[name]}
        out = {}
        for q in range(point + 1):
            path = self.dir / safe_name(name) / f"generations_{q}.jsonl"
            if path.exists():
                out[f"generator_{q}"] = describe_rows(read_jsonl(path), by_id)
        return out

    def table(self, name: str, point: int) -> list[dict[str, Any]]:
        """The rows of a set's table up to `point`, with CIs and paired differences."""
        acc = self.accuracies(name, point)
        n, seed = self.cfg.heldout_bootstrap_resamples, self.seed
        on = "generator" if self.ttt_model == "generator" else "base"
        described = {
            "base": ("Base model, no training", "–"),
            "passage": ("Train on passage", "base"),
            "generator_0": ("Passage + self-edits (base generator)", "base"),
        }
        rows = []
        for key, values in acc.items():
            if values is None:
                continue
            q = int(key.rsplit("_", 1)[1]) if key[-1].isdigit() else None
            label, ttt = described.get(key) or (
                (f"Passage + self-edits (generator after round {q - 1})", on)
                if key.startswith("generator")
                else (f"Generator after round {q - 1}, no training", "–")
            )

            def vs(ref: str, key: str = key, values: list[float] = values) -> dict[str, Any] | None:
                other = acc.get(ref)
                if other is None or ref == key:
                    return None
                return paired_difference(other, values, n, seed=seed).to_dict()

            rows.append(
                {
                    "key": key,
                    "condition": label,
                    "ttt_on": ttt,
                    "passages": len(values),
                    "accuracy": bootstrap_ci(values, n, seed=seed).to_dict(),
                    "delta_vs_base_generator": vs("generator_0") if key.startswith("generator") else None,
                    "delta_vs_passage": vs("passage") if key.startswith("generator") else None,
                    "per_passage": values,
                }
            )
        return rows

    def summary(self, point: int) -> dict[str, Any]:
        """Write <run>/heldout/results.{json,md}; return the point's fields for the round summary."""
        tables = {name: self.table(name, point) for name in self.sets}
        described = {name: self.described(name, point) for name in self.sets}
        self.results = {
            "point": point,
            "ttt_model": self.ttt_model,
            "tables": tables,
            "self_edits": described,
        }
        write_json(self.dir / "results.json", self.results)
        sections = []
        for name, rows in tables.items():
            questions = sum(len(p.questions) for p in self.sets[name])
            sections.append(
                markdown_table(rows, f"{name}: {len(self.sets[name])} passages, {questions} questions")
            )
            sections.append(markdown_described(described[name]))
        (self.dir / "results.md").write_text("\n\n".join(sections) + "\n")
        fields: dict[str, Any] = {}
        for name, rows in tables.items():
            row = next((r for r in rows if r["key"] == f"generator_{point}"), None)
            if row is None:
                continue
            label = self.labels[name]
            fields[f"heldout_{label}_acc"] = row["accuracy"]["mean"]
            delta = row["delta_vs_base_generator"]
            fields[f"heldout_{label}_vs_base_gen"] = delta["mean"] if delta else 0.0
        return fields


def points(d: dict[str, Any] | None, signed: bool = False) -> str:
    """A mean with its CI in percent or percentage points, ``12.5 [8.0, 17.0]``; ``–`` for none."""
    if not d:
        return "–"
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * d['mean'])} [{f.format(100 * d['low'])}, {f.format(100 * d['high'])}]"


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    """One held-out set's table: accuracy in %, paired differences in percentage points (95% CIs)."""
    lines = [
        f"**{title}** — no-context accuracy (grader of the recipe)",
        "",
        "| condition | TTT on | accuracy (95% CI) | Δ vs base generator | Δ vs passage |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['condition']} | {r['ttt_on']} | {points(r['accuracy'])} "
            f"| {points(r['delta_vs_base_generator'], True)} | {points(r['delta_vs_passage'], True)} |"
        )
    return "\n".join(lines)


def markdown_described(described: dict[str, dict[str, Any]]) -> str:
    """What each generator's held-out self-edits are made of (seal.describe)."""
    lines = [
        "| self-edits of | parsed | words | sentences copied from the passage | content words not in it |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, d in described.items():
        q = int(key.rsplit("_", 1)[1])
        who = "the base generator" if q == 0 else f"the generator after round {q - 1}"
        if not d["described"]:
            lines.append(f"| {who} | 0 | – | – | – |")
            continue
        lines.append(
            f"| {who} | {d['described']} | {d['edit_words']:.0f} | {100 * d['edit_copied']:.1f}% "
            f"| {100 * d['edit_novel']:.1f}% |"
        )
    return "\n".join(lines)

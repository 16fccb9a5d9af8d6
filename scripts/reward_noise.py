"""Reward noise: how far a self-edit's reward moves across TTT seeds, against how far self-edits differ.

    python scripts/reward_noise.py --config recipes/knowledge/smollm2-135m-squad-cpu.yaml \
        --generations runs/smollm2-135m-squad-cpu/round_0/generations.jsonl --num_passages 10 --repeats 3

Trains every parsed self-edit of the first --num_passages passages --repeats times (other TTT seeds, the
recipe's TTT settings, on the recipe's base model) and scores each adapted model without context. Reports:
the within-self-edit SD (seed noise), the between-self-edit SD of the means, their ratio as the share of
reward variance that is the self-edit's own (an intra-class correlation), and how often the self-edit that
one seed ranks first per passage is the one the other seeds rank first (what ReST-EM's top-1 filter relies
on; chance is one over the self-edits per passage), and what that top-1 pick is worth: its accuracy under the
other seeds above the passage's mean self-edit, beside the same for the self-edit the other seeds rank first
(an oracle free of this seed's noise). Every TTT is journaled in --out, so a rerun resumes. Writes
results.json and results.md.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from statistics import fmean, pvariance

from accelerate import PartialState

from seal.cli import parse_args
from seal.data import load_passages
from seal.domain import build_domain
from seal.generate import SelfEdit
from seal.inner_loop import Job
from seal.journal import Journal
from seal.loop import load_runtime
from seal.utils import read_jsonl, task_seed, write_json


def variance_components(acc: dict[str, dict[int, list[float]]]) -> dict[str, float]:
    """Pooled within-self-edit variance (across seeds) and the variance of self-edit means within a passage
    (less the seed noise their means still carry); their share is the reward's self-edit component."""
    within, between = [], []
    for per_edit in acc.values():
        repeats = min(len(v) for v in per_edit.values())
        within += [pvariance(v) * len(v) / (len(v) - 1) for v in per_edit.values() if len(v) > 1]
        means = [fmean(v) for v in per_edit.values()]
        if len(means) > 1:
            between.append(max(0.0, pvariance(means) * len(means) / (len(means) - 1)))
    w = fmean(within) if within else 0.0
    b = max(0.0, (fmean(between) if between else 0.0) - w / max(repeats, 1))
    return {"within_sd": w**0.5, "between_sd": b**0.5, "self_edit_share": b / (b + w) if b + w > 0 else 0.0}


def top1_agreement(acc: dict[str, dict[int, list[float]]]) -> float | None:
    """Share of passages where seed 0's best self-edit is also the best by the mean of the other seeds
    (ties broken by the lower index, as the filter does); None with fewer than 2 seeds."""
    hits, n = 0, 0
    for per_edit in acc.values():
        if len(per_edit) < 2 or min(len(v) for v in per_edit.values()) < 2:
            continue
        edits = sorted(per_edit)
        first = edits[_first_best([per_edit[i][0] for i in edits])]
        rest = edits[_first_best([fmean(per_edit[i][1:]) for i in edits])]
        hits, n = hits + (first == rest), n + 1
    return hits / n if n else None


def _first_best(scores: list[float]) -> int:
    """The filter's pick: the highest score, ties broken by the lower index."""
    return min(range(len(scores)), key=lambda i: (-scores[i], i))


def selection_gain(acc: dict[str, dict[int, list[float]]]) -> dict[str, float] | None:
    """For every passage and seed s: the self-edit seed s ranks first, scored by the mean of the other seeds,
    minus the passage's mean self-edit under those seeds (`pick_gain`); `oracle_gain` is the same for the
    self-edit the other seeds themselves rank first. None when no passage has 2 self-edits and 2 seeds."""
    picks, oracles = [], []
    for per_edit in acc.values():
        edits = sorted(per_edit)
        repeats = min(len(v) for v in per_edit.values())
        if len(edits) < 2 or repeats < 2:
            continue
        for s in range(repeats):
            others = [fmean(per_edit[i][t] for t in range(repeats) if t != s) for i in edits]
            pick = _first_best([per_edit[i][s] for i in edits])
            picks.append(others[pick] - fmean(others))
            oracles.append(max(others) - fmean(others))
    if not picks:
        return None
    return {"pick_gain": fmean(picks), "oracle_gain": fmean(oracles)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="the recipe whose model, data and TTT settings to use"
    )
    parser.add_argument("--generations", required=True, help="a round's generations.jsonl")
    parser.add_argument("--num_passages", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="scripts/results/reward_noise")
    cli = parser.parse_args()
    if cli.repeats < 2:
        parser.error("--repeats must be >= 2")
    args = parse_args(["--config", cli.config])
    passages = load_passages(
        args.data.dataset_name, split=args.data.dataset_split, config=args.data.dataset_config,
        limit=cli.num_passages, max_questions=args.data.max_questions_per_passage,
    )  # fmt: skip
    by_id = {p.id: p for p in passages}
    edits = [SelfEdit.from_dict(d) for d in read_jsonl(cli.generations)]
    edits = [e for e in edits if e.passage_id in by_id and e.status == "ok"]
    if not edits:
        raise SystemExit(f"{cli.generations}: no parsed self-edit of the first {cli.num_passages} passages")
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out / "journal.jsonl")
    jobs, keys = [], {}
    for e in edits:
        for rep in range(cli.repeats):
            name = f"{e.passage_id}-{e.index}-{rep}"
            keys[name] = ("noise", e.passage_id, e.index, rep)
            if journal.get(*keys[name]) is None:
                seed = task_seed(args.sft.seed, "noise", e.passage_id, e.index, rep)
                jobs.append(Job(name, e.examples, [by_id[e.passage_id]], seed))
    print(f"{len(edits)} self-edits x {cli.repeats} seeds: {len(jobs)} TTT runs to do", flush=True)
    if jobs:
        rt = load_runtime(args, PartialState(), build_domain(args), passages, [])
        rt.inner_loop(out / "adapters").run(
            jobs, lambda job, losses, scores: journal.append(keys[job.name], accuracy=scores[0].accuracy)
        )
        rt.close()

    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in edits:
        for rep in range(cli.repeats):
            acc[e.passage_id][e.index].append(journal.get("noise", e.passage_id, e.index, rep)["accuracy"])
    results = {
        "passages": len(acc),
        "self_edits": len(edits),
        "repeats": cli.repeats,
        **variance_components(acc),
        "top1_agreement": top1_agreement(acc),
        "top1_chance": fmean(1 / len(per) for per in acc.values()),
        **(selection_gain(acc) or {}),
        "generations": cli.generations,
        "accuracies": {pid: dict(per) for pid, per in acc.items()},
    }
    write_json(out / "results.json", results)
    agreement = results["top1_agreement"]
    table = "\n".join(
        [
            f"{len(edits)} self-edits of {len(acc)} passages, each trained with {cli.repeats} TTT seeds "
            f"({cli.generations})",
            "",
            "| within-self-edit SD (seeds) | between-self-edit SD | self-edit share of variance | "
            "top-1 agreement (chance) | top-1 pick vs mean self-edit, other seeds | oracle pick |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {100 * results['within_sd']:.1f} pts | {100 * results['between_sd']:.1f} pts "
            f"| {100 * results['self_edit_share']:.0f}% "
            + (f"| {100 * agreement:.0f}% " if agreement is not None else "| – ")
            + f"({100 * results['top1_chance']:.0f}%) "
            + (
                f"| +{100 * results['pick_gain']:.1f} pts | +{100 * results['oracle_gain']:.1f} pts |"
                if "pick_gain" in results
                else "| – | – |"
            ),
        ]
    )
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

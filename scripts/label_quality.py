"""How good are pseudo-labels? The labeller answers gold questions with the passage in context; its kept
answers are checked against the gold ones, as a curve over the confidence threshold.

    python scripts/label_quality.py --data ../shared/data/squad_seal/synthetic_data/eval/base_val.json \
        --num_passages 100 --out eval/results/label-quality-squad

For each gold question the labeller (the embedded model by default; vLLM when installed) samples
--samples answers with the passage in context (seal.label, the recipe's defaults otherwise) and picks the
consensus answer; each confidence measure (agreement, token_prob, both) is then thresholded at 0, 0.05, ..,
1, with and without the support rule as recipes apply it (the consensus among the samples whose every
content word occurs in the passage, kept only when there is one). Per threshold: coverage (share of
questions kept) and precision (share of kept answers that are correct: token F1 >= 0.5 against the gold
answers; `contains`, gold inside the answer, beside it). The share of questions with at least one correct
sample bounds every selection rule: at coverage c no rule is more than that share / c correct. The answers
are saved (`labels.jsonl`) and reused by a rerun with the same arguments. Writes results.json, results.md
and precision_coverage.png (with that bound).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from statistics import fmean
from typing import Any

from matplotlib.figure import Figure
from trl import ModelConfig

from seal.config import GenerateConfig, LabelConfig, VLLMConfig
from seal.data import load_passages
from seal.graders import gold_contained, token_f1
from seal.label import Labeller, build_labeller, confidence
from seal.models import DEFAULT_MODEL
from seal.report import markdown_rows
from seal.utils import read_json, read_jsonl, write_json, write_jsonl

MEASURES = ("agreement", "token_prob", "both")
THRESHOLDS = [round(t / 20, 2) for t in range(21)]
CORRECT_F1 = 0.5
GOAL = {"precision": 0.9, "coverage": 0.5}


def label_gold_questions(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    """One row per gold question: the labeller's answer, its confidence measures, support and correctness."""
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    cache = out / "labels.jsonl"
    if cache.exists() and read_json(out / "settings.json") == settings:
        rows = read_jsonl(cache)
        if rows and "selection" in rows[0]:  # else written by an earlier version: judged again below
            return rows
    passages = load_passages(args.data, split=args.split, limit=args.num_passages)
    cfg = LabelConfig(
        label_num_samples=args.samples,
        label_temperature=args.temperature,
        label_max_new_tokens=args.max_new_tokens,
        label_extract=args.extract,
        label_confidence="both",  # computes both measures; each is thresholded below
        label_threshold=0.0,
        label_require_support=False,
        label_model=args.model,
        label_seed=args.seed,
    )
    questions = [[q.question for q in p.questions] for p in passages]
    sampled = out / "samples.json"  # the sampled answers survive a crash in the scoring pass
    resumed = sampled.exists() and read_json(out / "settings.json") == settings
    model = ModelConfig(model_name_or_path=args.model, dtype="float32")
    backend = "hf" if resumed else args.backend  # scoring only: no sampling engine needed
    labeller = build_labeller(cfg, model, GenerateConfig(), VLLMConfig(), backend)
    if resumed:
        samples = read_json(sampled)
    else:
        try:
            samples = labeller.sample_answers(passages, questions, args.seed)
        finally:
            labeller.engine.close()
        write_json(sampled, samples)
        write_json(out / "settings.json", settings)
    # the same samples judged twice: the plain consensus, and the support rule's (the consensus among the
    # samples the passage supports), which is what a recipe with label_require_support keeps from
    grounded_cfg = dataclasses.replace(cfg, label_require_support=True)
    grounded = Labeller(
        labeller.engine, labeller.tokenizer, grounded_cfg, labeller.use_chat_template, labeller.scorer
    )
    rows = []
    for selection, judge in (("consensus", labeller), ("grounded", grounded)):
        labelled = judge.judge(passages, questions, samples)
        for p, lp in zip(passages, labelled, strict=True):
            for qa, label in zip(p.questions, lp.labels, strict=True):
                rows.append({
                    "selection": selection,
                    "passage_id": p.id,
                    "question": qa.question,
                    "gold": qa.answers,
                    **{k: v for k, v in dataclasses.asdict(label).items() if k != "question"},
                    "f1": token_f1(label.answer, qa.answers),
                    "contains": gold_contained(label.answer, qa.answers),
                    "any_sample_correct": any(token_f1(a, qa.answers) >= CORRECT_F1 for a in label.samples),
                })  # fmt: skip
    write_jsonl(cache, rows)
    return rows


def curve(rows: list[dict[str, Any]], measure: str, support: bool) -> list[dict[str, Any]]:
    """Coverage and precision of the kept answers at every threshold of one measure; with `support`, the
    support rule's answers (the consensus of the supported samples), kept only when supported."""
    rows = [r for r in rows if r["selection"] == ("grounded" if support else "consensus")]
    points = []
    for t in THRESHOLDS:
        kept = [
            r
            for r in rows
            if r["answer"]
            and confidence(r["agreement"], r["token_prob"], measure) >= t
            and (r["supported"] or not support)
        ]
        points.append({
            "measure": measure,
            "support": support,
            "threshold": t,
            "kept": len(kept),
            "coverage": round(len(kept) / len(rows), 4),
            "precision": round(fmean(r["f1"] >= CORRECT_F1 for r in kept), 4) if kept else None,
            "precision_contains": round(fmean(r["contains"] for r in kept), 4) if kept else None,
        })  # fmt: skip
    return points


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The point with the highest precision among those keeping at least GOAL's coverage."""
    covered = [p for p in points if p["precision"] is not None and p["coverage"] >= GOAL["coverage"]]
    return max(covered, key=lambda p: (p["precision"], p["coverage"]), default=None)


def plot(curves: dict[str, list[dict[str, Any]]], any_correct: float, path: Path, title: str) -> None:
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    cs = [c / 100 for c in range(1, 101)]
    bound = [min(1.0, any_correct / c) for c in cs]  # no selection among the samples does better
    ax.plot(cs, bound, color="black", lw=0.8, ls=":", label="bound: a correct sample / coverage")
    for name, points in curves.items():
        xs = [p["coverage"] for p in points if p["precision"] is not None]
        ys = [p["precision"] for p in points if p["precision"] is not None]
        ax.plot(xs, ys, marker=".", label=name)
    ax.axhline(GOAL["precision"], color="grey", lw=0.8, ls="--")
    ax.axvline(GOAL["coverage"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="coverage (share of questions kept)", ylabel=f"precision (token F1 >= {CORRECT_F1})")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="sample", help="gold QA data (seal.data formats)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--num_passages", type=int, default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the labeller")
    parser.add_argument("--backend", default="auto", choices=("auto", "hf", "vllm"))
    parser.add_argument("--samples", type=int, default=LabelConfig.label_num_samples)
    parser.add_argument("--temperature", type=float, default=LabelConfig.label_temperature)
    parser.add_argument("--max_new_tokens", type=int, default=LabelConfig.label_max_new_tokens)
    parser.add_argument(
        "--extract", action=argparse.BooleanOptionalAction, default=True, help="seal.label.extract_answer"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="eval/results/label-quality")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = label_gold_questions(args, out)
    curves = {f"{m}{' + support' if s else ''}": curve(rows, m, s) for m in MEASURES for s in (False, True)}
    best = {name: best_point(points) for name, points in curves.items()}
    plain = [r for r in rows if r["selection"] == "consensus"]
    any_correct = fmean(r["any_sample_correct"] for r in plain)
    results = {
        "data": args.data,
        "questions": len(plain),
        "passages": len({r["passage_id"] for r in plain}),
        "answered": sum(1 for r in plain if r["answer"]),
        "precision_all": round(fmean(r["f1"] >= CORRECT_F1 for r in plain), 4),
        # no choice among these samples does better: at coverage c, precision <= any_sample_correct / c
        "any_sample_correct": round(any_correct, 4),
        "precision_bound_at_goal_coverage": round(min(1.0, any_correct / GOAL["coverage"]), 4),
        "goal": GOAL,
        "best_at_goal_coverage": best,
        "curves": curves,
    }
    write_json(out / "results.json", results)
    title = f"{args.data.split('/')[-1]}: {len(plain)} gold questions"
    plot(curves, any_correct, out / "precision_coverage.png", title)
    summary = [{"curve": name, **(p or {"precision": None})} for name, p in best.items()]
    lines = [
        f"# Pseudo-label quality: {results['questions']} gold questions of {results['passages']} passages "
        f"({args.data})",
        "",
        f"Every question answered (any confidence): precision {results['precision_all']:.3f}. Questions with "
        f"at least one correct sample: {results['any_sample_correct']:.3f}, so no choice among these samples "
        f"is more than {results['precision_bound_at_goal_coverage']:.3f} correct at coverage "
        f"{GOAL['coverage']}.",
        "",
        f"## Best precision at coverage >= {GOAL['coverage']} (goal: precision >= {GOAL['precision']})",
        "",
        markdown_rows(summary),
        "",
        "## Every threshold",
        "",
        markdown_rows([p for points in curves.values() for p in points]),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9]))


if __name__ == "__main__":
    main()

"""Compare self-edits from several runs on the same passages, paired by passage.

    python scripts/compare_self_edits.py \
        --dataset ../shared/data/squad_seal/synthetic_data/train/iter0_train.json --num_passages 20 \
        --source "base generator, TTT on base=runs/smollm2-135m-squad-cpu/round_0" \
        --source "8 epochs, TTT on θ=runs/update_budget/e8-lr5e-4/eval" \
        --out eval/results/smollm2-135m-squad-rl/update_budget/e8-lr5e-4

A source is `LABEL=DIR` or `LABEL=DIR#CONDITION`: a loop round's directory (its `self_edits.jsonl`) or an
evaluation harness output directory (`answers.jsonl` and `generations_<CONDITION>.jsonl`; the condition
defaults to the one self-edit condition there). Per source it reports the parsed self-edits, the no-context
accuracy of the model TTT ran on (the loop's `base_accuracy`, the harness's `trained_base` or `base`, when
measured), the adapted accuracy, the reward (adapted − no-context) and what the self-edits are made of
(`seal.describe`), and each source's paired difference from the first. Per passage, a source's accuracy is
the mean over its parsed self-edits; with `--passage_only DIR` (a harness directory with the `passage`
condition) an unparsed self-edit counts as TTT on the passage alone instead, the harness's convention: in a
harness run as what the harness trained for it, in a loop round (which trains nothing) as that passage-only
TTT.
Only passages every source scores are compared. Writes results.json and results.md to --out if given.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import fmean
from typing import Any

from seal.data import Passage, load_passages
from seal.describe import describe_rows
from seal.evaluate import answer_means, passage_means
from seal.heldout import points
from seal.stats import bootstrap_ci, paired_difference
from seal.utils import read_jsonl, write_json

SELF_EDIT_CONDITIONS = ("trained_generator", "base_generator")


def read_source(spec: str) -> dict[str, Any]:
    """A source's self-edit rows (passage_id, index, status, completion, adapted_accuracy, no_context)."""
    label, sep, location = spec.partition("=")
    if not sep or not label.strip() or not location.strip():
        raise SystemExit(f"--source takes LABEL=DIR or LABEL=DIR#CONDITION, got '{spec}'")
    path, _, condition = location.strip().partition("#")
    root = Path(path)
    if (root / "self_edits.jsonl").is_file():  # a loop round
        rows = read_jsonl(root / "self_edits.jsonl")
        for r in rows:
            r["no_context"], r["trained_unparsed"] = r["base_accuracy"], False
        return {"label": label.strip(), "path": path, "rows": rows}
    if not (root / "answers.jsonl").is_file():
        raise SystemExit(f"{path}: neither a loop round (self_edits.jsonl) nor a harness run (answers.jsonl)")
    if not condition:
        found = [c for c in SELF_EDIT_CONDITIONS if (root / f"generations_{c}.jsonl").is_file()]
        if len(found) != 1:
            raise SystemExit(f"{path}: name the condition (LABEL=DIR#CONDITION); found {found or 'none'}")
        condition = found[0]
    adapted = answer_means(root, condition)
    # the model TTT ran on, without training: the trained generator in SEAL's setting, else the base
    no_context = passage_means(root, "trained_base") or passage_means(root, "base")
    rows = read_jsonl(root / f"generations_{condition}.jsonl")
    for r in rows:
        r["adapted_accuracy"] = adapted[(r["passage_id"], r["index"])]
        r["no_context"] = no_context.get(r["passage_id"])
        r["trained_unparsed"] = True  # the harness trains an unparsed self-edit's fallback examples
    return {"label": label.strip(), "path": f"{path}#{condition}", "rows": rows}


def passage_scores(
    rows: Sequence[Mapping[str, Any]], passage_only: Mapping[str, float] | None
) -> tuple[dict[str, float], dict[str, float | None]]:
    """Per passage: mean adapted accuracy over the counted self-edits, and the no-context accuracy."""
    counted: dict[str, list[float]] = defaultdict(list)
    no_context: dict[str, float | None] = {}
    for r in rows:
        no_context[r["passage_id"]] = r["no_context"]
        if r["status"] == "ok":
            counted[r["passage_id"]].append(r["adapted_accuracy"])
        elif passage_only is not None:
            fallback = r["adapted_accuracy"] if r["trained_unparsed"] else passage_only[r["passage_id"]]
            counted[r["passage_id"]].append(fallback)
    return {pid: fmean(v) for pid, v in counted.items()}, no_context


def compare(
    sources: Sequence[Mapping[str, Any]],
    passages: Sequence[Passage],
    passage_only: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Each source's means with 95 % CIs over the passages all sources score, and paired differences from
    the first source (and from passage-only TTT when given)."""
    by_id = {p.id: p for p in passages}
    scored = [
        passage_scores([r for r in s["rows"] if r["passage_id"] in by_id], passage_only) for s in sources
    ]
    common = [p.id for p in passages if all(p.id in adapted for adapted, _ in scored)]
    if not common:
        raise SystemExit("no passage is scored by every source")
    series = []  # per source: (adapted per common passage, reward per common passage or None)
    for adapted, no_context in scored:
        acc = [adapted[pid] for pid in common]
        known = all(no_context.get(pid) is not None for pid in common)
        series.append(
            (acc, [a - no_context[pid] for a, pid in zip(acc, common, strict=True)] if known else None)
        )
    (ref_acc, ref_reward), rows = series[0], []
    for i, (s, (acc, reward)) in enumerate(zip(sources, series, strict=True)):
        in_scope = [r for r in s["rows"] if r["passage_id"] in common]
        baseline = [scored[i][1][pid] for pid in common] if reward else None
        rows.append(
            {
                "label": s["label"],
                "source": s["path"],
                "parsed": sum(r["status"] == "ok" for r in in_scope),
                "self_edits": len(in_scope),
                "no_context": fmean(baseline) if baseline else None,
                "adapted": bootstrap_ci(acc).to_dict(),
                "reward": bootstrap_ci(reward).to_dict() if reward else None,
                "adapted_vs_first": paired_difference(ref_acc, acc).to_dict() if i else None,
                "reward_vs_first": (
                    paired_difference(ref_reward, reward).to_dict() if i and reward and ref_reward else None
                ),
                "adapted_vs_passage": (
                    paired_difference([passage_only[pid] for pid in common], acc).to_dict()
                    if passage_only
                    else None
                ),
                **describe_rows(in_scope, by_id),
            }
        )
    out: dict[str, Any] = {"passages": len(common), "of": len(passages), "rows": rows}
    if passage_only is not None:
        out["passage_only"] = bootstrap_ci([passage_only[pid] for pid in common]).to_dict()
    return out


def to_markdown(result: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table (accuracies in points)."""
    lines = [
        f"Paired over the {result['passages']} of {result['of']} passages every source scores; "
        "Δ is against the first row.",
        "",
        "| self-edits | parsed | no-context | adapted (95 % CI) | Δ adapted | reward | Δ reward | words "
        "| copied | novel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if "passage_only" in result:
        lines.append(f"| passage only | | | {points(result['passage_only'])} | | | | | | |")
    for r in result["rows"]:
        nc = "–" if r["no_context"] is None else f"{100 * r['no_context']:.1f}"
        desc = [
            "–" if r[k] is None else f"{r[k]:.0f}" if k == "edit_words" else f"{100 * r[k]:.1f} %"
            for k in ("edit_words", "edit_copied", "edit_novel")
        ]
        lines.append(
            f"| {r['label']} | {r['parsed']}/{r['self_edits']} | {nc} | {points(r['adapted'])} "
            f"| {points(r['adapted_vs_first'], True)} | {points(r['reward'], True)} "
            f"| {points(r['reward_vs_first'], True)} | {' | '.join(desc)} |"
        )
    if "passage_only" in result:
        lines += ["", "Against passage-only TTT (paired):"]
        lines += [f"- {r['label']}: {points(r['adapted_vs_passage'], True)}" for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, help="the passages (as for the loop: file, name, sample)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_passages", type=int, default=None, help="the first N passages")
    parser.add_argument("--source", action="append", required=True, help="LABEL=DIR[#CONDITION]; repeat")
    parser.add_argument("--passage_only", help="harness dir with the passage condition: unparsed = passage")
    parser.add_argument("--out", help="directory for results.json and results.md")
    cli = parser.parse_args()
    passages = load_passages(cli.dataset, split=cli.split, limit=cli.num_passages)
    alone = None
    if cli.passage_only:
        alone = passage_means(cli.passage_only, "passage")
        missing = [p.id for p in passages if p.id not in alone]
        if missing:
            raise SystemExit(f"{cli.passage_only}: no passage-only answers for {missing[:5]}")
    result = compare([read_source(s) for s in cli.source], passages, alone)
    text = to_markdown(result)
    print(text, end="")
    if cli.out:
        Path(cli.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(cli.out) / "results.json", {"command": vars(cli), **result})
        (Path(cli.out) / "results.md").write_text(text)


if __name__ == "__main__":
    main()

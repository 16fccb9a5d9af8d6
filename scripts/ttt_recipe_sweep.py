"""Choose TTT settings on the sample data's *train* passages, never on the passages the benchmark scores.

    python scripts/ttt_recipe_sweep.py --seeds 2 \
        --configs bs=1,epochs=10,lr=1e-3,sched=linear bs=1,epochs=5,lr=2e-3,sched=linear

Samples self-edits for the first --num_passages train passages (cached in the output directory), then for
each configuration and seed set trains one adapter per self-edit with seal's batched TTT and scores it on
its passage's questions, as ``scripts/bench_ttt.py`` does for the eval passages. The first configuration is
the baseline: every other one is reported as the paired difference in mean accuracy from it (same
self-edits, same seeds) and its time relative to it. Writes ``sweep.json`` and ``sweep.md``.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from bench_ttt import (
    REFERENCE,
    ours,
    percents,
    run_seed_sets,
    self_edits,
    signed_points,
    ttt_settings,
    write_markdown,
)

from seal.config import RewardConfig
from seal.data import load_passages
from seal.graders import make_grader
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.stats import bootstrap_ci, paired_difference
from seal.ttt import wrap_for_adapters
from seal.utils import write_json


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--num_passages", type=int, default=8)
    parser.add_argument("--num_self_edits", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--configs", nargs="+", required=True, help="the first one is the baseline")
    parser.add_argument("--out", default="scripts/results/ttt_recipe_sweep")
    args = parser.parse_args()
    configs = {text: ttt_settings(text) for text in args.configs}  # bad input fails before any work
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    passages = load_passages("sample", "train", limit=args.num_passages)
    by_id = {p.id: p for p in passages}
    edits = self_edits(out / "self_edits.jsonl", model_path, tokenizer, passages, args.num_self_edits)
    edits = [e for e in edits if e.status == "ok"]
    grader, reward_cfg = make_grader("contains"), RewardConfig(answer_max_new_tokens=24)
    model = wrap_for_adapters(load_model(model_path), REFERENCE)
    print(f"{len(edits)} self-edits of {len(passages)} train passages", flush=True)

    runs = {}
    for text, cfg in configs.items():
        run = partial(ours, model, tokenizer, edits, by_id, grader, reward_cfg, cfg)
        runs[text] = run_seed_sets(text, range(args.seeds), run, prefix="sweep-")
    base_text, base = args.configs[0], runs[args.configs[0]]
    rows = []
    for text, run in runs.items():
        diff = paired_difference(base["accuracies"], run["accuracies"]) if text != base_text else None
        rows.append(
            {
                "config": text,
                "seconds": round(run["seconds"], 1),
                "time_vs_baseline": round(run["seconds"] / base["seconds"], 3),
                "accuracy": bootstrap_ci(run["accuracies"]).to_dict(),
                "seed_accuracies": [round(a, 4) for a in run["seed_accuracies"]],
                "per_self_edit_accuracies": [round(a, 4) for a in run["accuracies"]],
                "delta_vs_baseline": diff.to_dict() if diff else None,
            }
        )
    write_json(out / "sweep.json", {"self_edits": len(edits), "seeds": args.seeds, "rows": rows})
    lines = [
        f"{len(edits)} self-edits of {len(passages)} train passages, {args.seeds} seed sets; "
        f"baseline {base_text}",
        "",
        "| config | seconds | time vs baseline | accuracy % | Δ vs baseline (paired 95% CI) | per seed set |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['seconds']} | {r['time_vs_baseline']} | {100 * r['accuracy']['mean']:.1f} "
            f"| {signed_points(r['delta_vs_baseline'])} | {percents(r['seed_accuracies'])} |"
        )
    write_markdown(out / "sweep.md", lines)


if __name__ == "__main__":
    main()

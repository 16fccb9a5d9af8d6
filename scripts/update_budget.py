"""The update's budget and filter: redo a round's ReST-EM update with other SFT or filter settings.

    accelerate launch --config_file recipes/accelerate/cpu.yaml scripts/update_budget.py \
        --config recipes/knowledge/smollm2-135m-squad-cpu.yaml \
        --kept runs/smollm2-135m-squad-cpu/round_0/kept.jsonl --out runs/update_budget/e8-lr5e-4 \
        --num_train_epochs 8 --learning_rate 5e-4

Trains the generator exactly as the loop's update of that round does (the recipe's model, LoRA and SFT
settings, a fresh copy of the recipe's base) except for the overrides after the named flags (any recipe field,
TrlParser syntax), and writes it to `<out>/update/generator` with its record (`seal_update.json`: training
loss, examples). Evaluate it with the evaluation harness's `--eval_generator <out>/update/generator`. A
finished update is read back, not retrained.

With `--self_edits <round>/self_edits.jsonl` instead of `--kept`, the round's rewarded self-edits are filtered
again by the recipe's filter settings (overridable like the rest, e.g. `--filter_beat_passage true`, which
needs `--passage_only DIR`: an evaluation harness run with the `passage` condition on the same passages); the
selection is written to `<out>/kept.jsonl`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from seal.cli import parse_args
from seal.config import FilterConfig
from seal.evaluate import passage_means
from seal.filter import select
from seal.models import resolve_model_path
from seal.update import finished_update, update_generator
from seal.utils import read_jsonl, write_jsonl


def refiltered(path: str, cfg: FilterConfig, passage_only: str | None) -> list[dict[str, Any]]:
    """The rows of a round's self_edits.jsonl that `cfg` keeps; with `passage_only` (a harness run) each row
    first gets its passage's passage-only TTT accuracy, for `filter_beat_passage`."""
    rows = read_jsonl(path)
    need = ("passage_id", "index", "status", "reward", "adapted_accuracy", "base_accuracy")
    missing = [
        f"{path}: record {i}: field '{f}' missing" for i, r in enumerate(rows) for f in need if f not in r
    ]
    if missing:
        raise SystemExit("\n".join(missing[:10]))
    if passage_only is not None:
        alone = passage_means(passage_only, "passage")
        missing = sorted({r["passage_id"] for r in rows} - set(alone))
        if missing:
            raise SystemExit(f"{passage_only}: no passage-only answers for passages {missing[:5]}")
        for r in rows:
            r["passage_accuracy"] = alone[r["passage_id"]]
    elif cfg.filter_beat_passage:
        raise SystemExit("filter_beat_passage needs --passage_only: a harness run with the passage condition")
    return select(rows, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the recipe whose update to redo")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kept", help="a round's kept.jsonl (prompt and completion per row)")
    source.add_argument("--self_edits", help="a round's self_edits.jsonl, filtered again (see above)")
    parser.add_argument("--passage_only", help="harness run with the passage condition (filter_beat_passage)")
    parser.add_argument("--out", required=True, help="output dir; the generator goes to <out>/update")
    cli, overrides = parser.parse_known_args()
    args = parse_args(["--config", cli.config, *overrides])
    if cli.kept:
        kept, name = read_jsonl(cli.kept), cli.kept
    else:
        kept, name = refiltered(cli.self_edits, args.filter, cli.passage_only), cli.self_edits
    missing = [
        f"{name}: record {i}: field '{f}' missing"
        for i, row in enumerate(kept)
        for f in ("prompt", "completion")
        if not isinstance(row.get(f), str)
    ]
    if missing or not kept:
        raise SystemExit("\n".join(missing) or f"{name}: no kept self-edits")
    if cli.self_edits:  # the selection, beside the update it trains
        Path(cli.out).mkdir(parents=True, exist_ok=True)
        write_jsonl(Path(cli.out) / "kept.jsonl", kept)
    out = f"{cli.out}/update"
    update = finished_update(out)
    if update is None:
        base = resolve_model_path(args.model.model_name_or_path, args.loop.model_cache_dir)
        update = update_generator(
            base, kept, args.model, args.sft, out, args.loop.update_merge, args.generate.use_chat_template
        )
    print(
        f"{update.kind} trained on {update.num_examples} self-edits, {args.sft.num_train_epochs:g} epochs "
        f"at lr {args.sft.learning_rate:g}: training loss {update.train_loss:.4f} -> {update.path}"
    )


if __name__ == "__main__":
    main()

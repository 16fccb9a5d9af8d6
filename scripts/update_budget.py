"""The update's budget: redo a round's ReST-EM update on its kept self-edits with other SFT settings.

    accelerate launch --config_file recipes/accelerate/cpu.yaml scripts/update_budget.py \
        --config recipes/knowledge/smollm2-135m-squad-cpu.yaml \
        --kept runs/smollm2-135m-squad-cpu/round_0/kept.jsonl --out runs/update_budget/e8-lr5e-4 \
        --num_train_epochs 8 --learning_rate 5e-4

Trains the generator exactly as the loop's update of that round does (the recipe's model, LoRA and SFT
settings, a fresh copy of the recipe's base) except for the overrides after the named flags (any recipe field,
TrlParser syntax), and writes it to `<out>/update/generator` with its record (`seal_update.json`: training
loss, examples). Evaluate it with the evaluation harness's `--eval_generator <out>/update/generator`. A
finished update is read back, not retrained.
"""

from __future__ import annotations

import argparse

from seal.cli import parse_args
from seal.models import resolve_model_path
from seal.update import finished_update, update_generator
from seal.utils import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the recipe whose update to redo")
    parser.add_argument("--kept", required=True, help="a round's kept.jsonl (prompt and completion per row)")
    parser.add_argument("--out", required=True, help="output dir; the generator goes to <out>/update")
    cli, overrides = parser.parse_known_args()
    args = parse_args(["--config", cli.config, *overrides])
    kept = read_jsonl(cli.kept)
    missing = [
        f"{cli.kept}: record {i}: field '{f}' missing"
        for i, row in enumerate(kept)
        for f in ("prompt", "completion")
        if not isinstance(row.get(f), str)
    ]
    if missing or not kept:
        raise SystemExit("\n".join(missing) or f"{cli.kept}: no kept self-edits")
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

"""Command line: `seal {knowledge,evaluate,label,push,review,review-labels} ...` (`--config recipe.yaml`).

`seal knowledge` also runs under accelerate launch; `seal push` shares a finished run on the Hub (seal.hub).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import TypeVar

from trl import TrlParser

from seal.config import EvalArgs, LabelArgs, SealArgs
from seal.evaluate import evaluate as run_evaluation
from seal.hub import push as push_run
from seal.label import label_documents
from seal.label_review import main as review_labels_main
from seal.loop import run
from seal.models import DEFAULT_MODEL
from seal.review import main as review_main
from seal.run_dir import SUMMARY_JSON

Bundle = TypeVar("Bundle", SealArgs, EvalArgs, LabelArgs)


def _parse(bundle: type[Bundle], argv: list[str] | None) -> Bundle:
    """A YAML recipe (`--config`) with CLI overrides, parsed into `bundle` (one dataclass per concern, in its
    field order: TRL's ModelConfig and SFTConfig, and seal's own); no model named: the embedded one."""
    args = bundle(*TrlParser(tuple(typing.get_type_hints(bundle).values())).parse_args_and_config(argv))
    if args.model.model_name_or_path is None:
        args.model.model_name_or_path = DEFAULT_MODEL
    return args


def parse_args(argv: list[str] | None = None) -> SealArgs:
    """Parse a YAML recipe (`--config`) with CLI overrides into `SealArgs`."""
    return _parse(SealArgs, argv)


def knowledge(argv: list[str] | None = None) -> None:
    """Run SEAL knowledge incorporation (ReST-EM rounds) from a recipe."""
    run(parse_args(argv))


def parse_eval_args(argv: list[str] | None = None) -> EvalArgs:
    """Parse an evaluation recipe (`--config`) with CLI overrides into `EvalArgs`."""
    return _parse(EvalArgs, argv)


def evaluate(argv: list[str] | None = None) -> None:
    """Run the held-out QA evaluation from a recipe and print its tables."""
    command = sys.orig_argv if argv is None else ["seal", "evaluate", *argv]  # recorded with the results
    args = parse_eval_args(argv)
    run_evaluation(args, argv=command)
    print(Path(args.eval.eval_output_dir, "results.md").read_text(), flush=True)


def parse_label_args(argv: list[str] | None = None) -> LabelArgs:
    """Parse a labelling recipe (`--config`, or flags alone) into `LabelArgs`."""
    return _parse(LabelArgs, argv)


def label(argv: list[str] | None = None) -> None:
    """Pseudo-label raw documents: `seal label --dataset_name docs/ --label_output_dir out/ [--field v]`."""
    args = parse_label_args(argv)
    label_documents(args)
    print(Path(args.label.label_output_dir, SUMMARY_JSON).read_text(), flush=True)


def push(argv: list[str] | None = None) -> None:
    """Share a finished run on the Hub: `seal push --config recipe.yaml --hub_model_id me/x [--dry_run]`."""
    push_run(parse_args(argv))


def review(argv: list[str] | None = None) -> None:
    """A round's review page, or import of its exported decisions: `seal review RUN_DIR [--decisions F]`."""
    review_main(argv)


def review_labels(argv: list[str] | None = None) -> None:
    """Pseudo-label review page, or import of its decisions: `seal review-labels DIR [--decisions F]`."""
    review_labels_main(argv)


COMMANDS = {
    "knowledge": knowledge,
    "evaluate": evaluate,
    "label": label,
    "push": push,
    "review": review,
    "review-labels": review_labels,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: seal {{{','.join(COMMANDS)}}} --config RECIPE.yaml [--field value ...]", file=sys.stderr
        )
        sys.exit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()

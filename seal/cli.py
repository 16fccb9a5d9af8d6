"""Command line: `seal knowledge --config recipe.yaml [--field value ...]`, also under accelerate launch."""

from __future__ import annotations

import sys
import typing

from trl import TrlParser

from seal.loop import SealArgs, run
from seal.models import DEFAULT_MODEL

# One dataclass per concern, in SealArgs' field order: TRL's ModelConfig and SFTConfig, and seal's own.
ARG_TYPES = tuple(typing.get_type_hints(SealArgs).values())


def parse_args(argv: list[str] | None = None) -> SealArgs:
    """Parse a YAML recipe (`--config`) with CLI overrides into `SealArgs`."""
    args = SealArgs(*TrlParser(ARG_TYPES).parse_args_and_config(argv))
    if args.model.model_name_or_path is None:
        args.model.model_name_or_path = DEFAULT_MODEL
    return args


def knowledge(argv: list[str] | None = None) -> None:
    """Run SEAL knowledge incorporation (ReST-EM rounds) from a recipe."""
    run(parse_args(argv))


COMMANDS = {"knowledge": knowledge}


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

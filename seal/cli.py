"""Command line: `seal knowledge --config recipe.yaml [--field value ...]`, also under accelerate launch."""

from __future__ import annotations

import sys

from trl import ModelConfig, SFTConfig, TrlParser

from seal.config import DataConfig, FilterConfig, GenerateConfig, LoopConfig, RewardConfig, TTTConfig
from seal.loop import SealArgs, run

ARG_TYPES = (
    ModelConfig,
    DataConfig,
    GenerateConfig,
    TTTConfig,
    RewardConfig,
    FilterConfig,
    LoopConfig,
    SFTConfig,
)


def parse_args(argv: list[str] | None = None) -> SealArgs:
    """Parse a YAML recipe (`--config`) with CLI overrides into `SealArgs`."""
    parser = TrlParser(ARG_TYPES)
    model, data, generate, ttt, reward, filter_, loop, sft = parser.parse_args_and_config(argv)
    if model.model_name_or_path is None:
        from seal.models import DEFAULT_MODEL

        model.model_name_or_path = DEFAULT_MODEL
    return SealArgs(model, data, generate, ttt, reward, filter_, loop, sft)


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

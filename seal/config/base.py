"""The vocabularies of recipe fields and the base of every config dataclass (`Checked`)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, ClassVar, Literal

# Vocabularies: a field typed with one of these accepts only its values (TrlParser turns them into choices).
Backend = Literal["auto", "hf", "vllm"]
TemplateName = Literal["implications", "rewrite", "self-qa", "custom"]
ParserName = Literal["lines", "paragraphs", "qa", "whole"]
Overlong = Literal["split", "error"]
TTTLoss = Literal["all", "completion"]
Autocast = Literal["auto", "bfloat16", "none"]
LRScheduler = Literal["constant", "linear"]
TTTMode = Literal["batched", "sequential"]
TTTModel = Literal["generator", "base"]
GraderName = Literal["exact_match", "f1", "contains", "judge"]
FilterStrategy = Literal["top_k", "threshold", "gain"]
EvalCondition = Literal["base", "passage", "base_generator", "trained_generator"]
EvalSetting = Literal["single", "cpt"]
Labels = Literal["gold", "pseudo"]
Confidence = Literal["agreement", "token_prob", "both"]


def choices(vocabulary: Any) -> tuple[str, ...]:
    """The values of a vocabulary, e.g. ``choices(TTTMode) == ("batched", "sequential")``."""
    return typing.get_args(vocabulary)


GRADER_NAMES = choices(GraderName)


@functools.cache
def _vocabularies(cls: type) -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(cls)
    return {
        f.name: choices(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }


def one_of(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


class Checked:
    """A config dataclass that refuses bad values when it is made (and whenever `check()` is called again):
    a field typed with a vocabulary accepts only its values, the fields in `at_least_one` only counts >= 1;
    a subclass adds its own rules by extending `check`."""

    at_least_one: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name, allowed in _vocabularies(type(self)).items():
            one_of(name, getattr(self, name), allowed)
        for name in self.at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

"""The generator interface every backend implements (HF transformers now; vLLM plugs in the same way)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Generator(Protocol):
    """Completes already-rendered prompts, optionally through a named LoRA adapter the backend knows."""

    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None = None
    ) -> list[list[str]]:
        """Return `sampling.n` completions per prompt (new text only, special tokens removed)."""
        ...


def per_prompt_adapters(adapter: str | None | Sequence[str | None], n: int) -> list[str | None]:
    """`adapter` as one entry per prompt: one name (or None) for all n prompts, or a list of n names."""
    adapters = [adapter] * n if adapter is None or isinstance(adapter, str) else list(adapter)
    if len(adapters) != n:
        raise ValueError(f"{len(adapters)} adapters for {n} prompts")
    return adapters

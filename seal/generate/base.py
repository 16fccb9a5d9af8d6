"""The engine contract every backend implements (HF transformers, vLLM offline, a running vLLM server)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


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


class Engine(ABC):
    """What samples self-edits and answers questions: completes already-rendered prompts, each through a
    LoRA adapter the engine serves (by the name `add_adapter` returned) or through the bare weights (None).

    Every backend implements the three abstract methods; the others default to what a backend with nothing
    to do there does (no live TTT weights to serve, nothing to free or to shut down).
    """

    @abstractmethod
    def generate(
        self, prompts: Sequence[str], sampling: Sampling, adapter: str | None | Sequence[str | None] = None
    ) -> list[list[str]]:
        """Return `sampling.n` completions per prompt (new text only, special tokens removed); `adapter`: one
        name for every prompt, or one per prompt."""

    @abstractmethod
    def add_adapter(self, path: str, name: str | None = None) -> str:
        """Serve the PEFT adapter directory `path`; return the name to ask for it by, fresh for every call
        (an engine caches adapters by name, so new weights never reuse one)."""

    @abstractmethod
    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter `add_adapter` returned."""

    def serves_live(self, model: Any) -> bool:
        """True when the engine generates with `model` itself, so freshly trained adapters need no export."""
        return False

    def serve_stack(self, stack: Any) -> None:
        """Answer the names ``stack:<k>`` with the stacked TTT adapters of `stack` (engines that serve live
        weights only)."""
        raise NotImplementedError(f"{type(self).__name__} does not serve stacked adapters from memory")

    def sleep(self) -> None:
        """Free accelerator memory for a training phase."""
        return None  # nothing to do by default

    def wake_up(self) -> None:
        """Undo `sleep`."""
        return None  # nothing to do by default

    def close(self) -> None:
        """Release the engine's processes and memory; it is not used afterwards."""
        return None  # nothing to do by default


def per_prompt_adapters(adapter: str | None | Sequence[str | None], n: int) -> list[str | None]:
    """`adapter` as one entry per prompt: one name (or None) for all n prompts, or a list of n names."""
    adapters = [adapter] * n if adapter is None or isinstance(adapter, str) else list(adapter)
    if len(adapters) != n:
        raise ValueError(f"{len(adapters)} adapters for {n} prompts")
    return adapters

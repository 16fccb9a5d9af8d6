"""A sampled self-edit and its training data (what a self-edit is per task: seal.domain)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from seal.templates import TrainExample


@dataclass
class SelfEdit:
    """One sampled self-edit. `status` is ok, empty (no text) or unparseable (text, but no items)."""

    passage_id: str
    index: int
    prompt: str
    completion: str
    examples: list[TrainExample] = field(default_factory=list)
    status: str = "ok"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["examples"] = [{"prompt": e.prompt, "completion": e.completion} for e in self.examples]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SelfEdit:
        examples = [TrainExample(e["prompt"], e["completion"]) for e in d.get("examples", [])]
        return cls(d["passage_id"], d["index"], d["prompt"], d["completion"], examples, d.get("status", "ok"))


def edit_status(completion: str, examples: Sequence[TrainExample]) -> str:
    """ok (training data), empty (no text) or unparseable (text, but no training data)."""
    return "ok" if examples else ("empty" if not completion.strip() else "unparseable")

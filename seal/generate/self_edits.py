"""The generate stage: sample self-edits for passages and parse each into TTT training examples."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from transformers import PreTrainedTokenizerBase

from seal.config import GenerateConfig
from seal.data import DataValidationError, Passage
from seal.generate.base import Engine, Sampling
from seal.templates import (
    TrainExample,
    build_prompt,
    get_template,
    passage_examples,
    render_chat,
    training_examples,
)

logger = logging.getLogger(__name__)


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


def make_self_edits(passage: Passage, completions: Sequence[str], cfg: GenerateConfig) -> list[SelfEdit]:
    """Parse completions (sampled, or read from a file) for one passage; never raises on bad text."""
    template = get_template(cfg)
    prompt = build_prompt(template, passage)
    edits = []
    for i, completion in enumerate(completions):
        examples = training_examples(completion, passage, template, cfg)
        status = "ok" if examples else ("empty" if not completion.strip() else "unparseable")
        if status != "ok":
            logger.warning("self-edit %d of passage %s is %s; its reward will be 0", i, passage.id, status)
        edits.append(SelfEdit(passage.id, i, prompt, completion, examples, status))
    return edits


def generate_self_edits(
    generator: Engine,
    tokenizer: PreTrainedTokenizerBase,
    passages: Sequence[Passage],
    cfg: GenerateConfig,
    seed: int,
    adapter: str | None = None,
) -> list[list[SelfEdit]]:
    """Sample `cfg.num_self_edits` self-edits per passage (one batched call) and parse them."""
    template = get_template(cfg)
    prompts = [render_chat(tokenizer, build_prompt(template, p), cfg.use_chat_template) for p in passages]
    sampling = Sampling(
        n=cfg.num_self_edits,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=seed,
    )
    completions = generator.generate(prompts, sampling, adapter=adapter)
    return [make_self_edits(p, c, cfg) for p, c in zip(passages, completions, strict=True)]


def check_prompt_lengths(
    passages: Sequence[Passage], tokenizer: PreTrainedTokenizerBase, cfg: GenerateConfig, max_model_len: int
) -> None:
    """Refuse, before any model loads, every passage whose self-edit prompt (rendered exactly as it is sampled
    from) plus `max_new_tokens` does not fit in `max_model_len` tokens; a DataValidationError names each.

    The limit is the recipe's `vllm_max_model_len` for either backend (HF too, where it stands in for the
    model's context window), so a recipe is refused the same whichever engine serves it.
    """
    template = get_template(cfg)
    problems = []
    for p in passages:
        prompt = render_chat(tokenizer, build_prompt(template, p), cfg.use_chat_template)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n + cfg.max_new_tokens > max_model_len:
            problems.append(
                f"record {p.id}: field 'context': the self-edit prompt is {n} tokens, + max_new_tokens "
                f"{cfg.max_new_tokens} = {n + cfg.max_new_tokens} > vllm_max_model_len={max_model_len}"
            )
    if problems:
        raise DataValidationError(problems)


def self_edit_data(edit: SelfEdit, passage: Passage, gen: GenerateConfig) -> list[TrainExample]:
    """A self-edit's TTT data in an evaluation; one that parsed into nothing leaves the passage alone (if
    included), so a condition's unparsed self-edits still count as passage-only TTT."""
    return edit.examples or (passage_examples(passage, gen) if gen.include_passage else [])

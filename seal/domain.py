"""Domains: the seam between the ReST-EM machinery and one kind of task.

A domain says what a self-edit is: the prompt the generator completes for an item, how a completion becomes
TTT training data, and the control data (the item alone); where a round's items come from (the dataset, or
pseudo-labels written anew each round); and what is refused before a model loads. The adapted model is
rewarded on the item's questions, answered without the item (seal.reward). The loop, the held-out
evaluation and the evaluation harness use only this interface, so a new domain is a subclass of `Domain`
and a line in `build_domain`.

    Knowledge   SEAL's knowledge incorporation: passages with gold question-answer pairs
    LabelFree   the same self-edits on raw documents, with questions pseudo-labelled every round
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from seal.config import DataConfig, GenerateConfig, ReviewConfig, SealArgs
from seal.data import DataValidationError, Passage, load_passages
from seal.documents import load_documents
from seal.generate.base import Engine, Sampling
from seal.generate.hf import HFEngine
from seal.generate.self_edits import SelfEdit, edit_status
from seal.label import LabelledPassage, Labeller, build_labeller, label_summary, tokens_counter
from seal.label_review import review_labels
from seal.templates import (
    TrainExample,
    build_prompt,
    get_template,
    passage_examples,
    render_chat,
    training_examples,
)

logger = logging.getLogger("seal")

Records = list[dict[str, Any]]  # labelled items as JSON records (journaled, reviewed, saved)


@dataclass(frozen=True)
class Policy:
    """The model that writes now: `engine` through `adapter` (None: the engine's own weights); `scorer`, an
    HF engine on the same weights (None when there is none), gives token probabilities."""

    engine: Engine
    adapter: str | None = None
    scorer: HFEngine | None = None


class Domain(ABC):
    """What a self-edit is for one kind of item, and where a round's items come from."""

    relabels: ClassVar[bool] = False  # True: every round writes new questions for the items (`label`)

    def __init__(self, gen: GenerateConfig):
        self.gen = gen

    @abstractmethod
    def load(self, data: DataConfig, tokenizer: Callable[[], PreTrainedTokenizerBase]) -> list[Passage]:
        """The run's items, validated (a DataValidationError names file, record and field); `tokenizer` loads
        the model's tokenizer for a domain that needs it."""

    @abstractmethod
    def prompt(self, item: Passage) -> str:
        """The text the generator completes with a self-edit for `item` (before the chat template)."""

    @abstractmethod
    def examples(self, item: Passage, completion: str) -> list[TrainExample]:
        """A completion's TTT training data; [] when it holds no self-edit."""

    @abstractmethod
    def control_examples(self, item: Passage) -> list[TrainExample]:
        """The TTT data of the no-self-edit control (the item alone)."""

    def edit_examples(self, edit: SelfEdit, item: Passage) -> list[TrainExample]:
        """A self-edit's TTT data in an evaluation: its own, or the control's when it parsed into nothing and
        `include_passage` is set (so a condition's unparsed self-edits still count as the control)."""
        return edit.examples or (self.control_examples(item) if self.gen.include_passage else [])

    def parse(self, item: Passage, completions: Sequence[str]) -> list[SelfEdit]:
        """Self-edits from completions (sampled, or read from a file); never raises on bad text."""
        prompt = self.prompt(item)
        edits = []
        for i, completion in enumerate(completions):
            examples = self.examples(item, completion)
            status = edit_status(completion, examples)
            if status != "ok":
                logger.warning("self-edit %d of passage %s is %s; its reward will be 0", i, item.id, status)
            edits.append(SelfEdit(item.id, i, prompt, completion, examples, status))
        return edits

    def sample(
        self,
        policy: Policy,
        tokenizer: PreTrainedTokenizerBase,
        items: Sequence[Passage],
        seed: int,
        n: int | None = None,
    ) -> list[list[SelfEdit]]:
        """`n` (default `num_self_edits`) self-edits per item, sampled in one batched call, parsed."""
        gen = self.gen
        prompts = [self.rendered(tokenizer, item) for item in items]
        sampling = Sampling(
            n=gen.num_self_edits if n is None else n,
            temperature=gen.temperature,
            top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens,
            seed=seed,
        )
        completions = policy.engine.generate(prompts, sampling, adapter=policy.adapter)
        return [self.parse(item, c) for item, c in zip(items, completions, strict=True)]

    def rendered(self, tokenizer: PreTrainedTokenizerBase, item: Passage) -> str:
        """The prompt exactly as it is sampled from."""
        return render_chat(tokenizer, self.prompt(item), self.gen.use_chat_template)

    def check_prompts(
        self, items: Sequence[Passage], tokenizer: PreTrainedTokenizerBase, max_model_len: int
    ) -> None:
        """Refuse, before any model loads, every item whose rendered prompt plus `max_new_tokens` does not fit
        in `max_model_len` tokens (the recipe's `vllm_max_model_len`, for either backend); a
        DataValidationError names each."""
        problems, new = [], self.gen.max_new_tokens
        for item in items:
            n = len(tokenizer(self.rendered(tokenizer, item), add_special_tokens=False)["input_ids"])
            if n + new > max_model_len:
                problems.append(
                    f"record {item.id}: field 'context': the self-edit prompt is {n} tokens, "
                    f"+ max_new_tokens {new} = {n + new} > vllm_max_model_len={max_model_len}"
                )
        if problems:
            raise DataValidationError(problems)

    # Relabelling domains only (relabels = True): the loop journals, broadcasts and reviews the records.
    def label(
        self, r: int, items: Sequence[Passage], policy: Policy, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> Records:
        """Round `r`'s labelled items as JSON records, written by `policy` (main process)."""
        raise NotImplementedError(f"{type(self).__name__} does not relabel its items")

    def review(self, round_dir: Path, cfg: ReviewConfig) -> Records | None:
        """The round's records after a person's review (round_dir holds labels.jsonl); None while waiting."""
        raise NotImplementedError(f"{type(self).__name__} does not relabel its items")

    def labelled(self, round_dir: Path, records: Records) -> tuple[list[Passage], dict[str, Any]]:
        """(the round's items, their label counts for the round summary) from the records."""
        raise NotImplementedError(f"{type(self).__name__} does not relabel its items")


class Knowledge(Domain):
    """Knowledge incorporation (SEAL §3.1): a passage's self-edit is text the template asks for
    (implications, rewrites, self-QA), split into items; the control is TTT on the passage itself."""

    def load(self, data: DataConfig, tokenizer: Callable[[], PreTrainedTokenizerBase]) -> list[Passage]:
        return load_passages(
            data.dataset_name,
            split=data.dataset_split,
            config=data.dataset_config,
            limit=data.num_passages,
            max_questions=data.max_questions_per_passage,
        )

    def prompt(self, item: Passage) -> str:
        return build_prompt(get_template(self.gen), item)

    def examples(self, item: Passage, completion: str) -> list[TrainExample]:
        return training_examples(completion, item, get_template(self.gen), self.gen)

    def control_examples(self, item: Passage) -> list[TrainExample]:
        return passage_examples(item, self.gen)


class LabelFree(Knowledge):
    """Knowledge incorporation from raw documents: documents split into passages of at most
    `document_max_tokens` tokens, whose questions (and answers) the round's model, or the recipe's labeller,
    writes every round; only confident pseudo-labels are kept (seal.label)."""

    relabels = True

    def __init__(self, gen: GenerateConfig, args: SealArgs):
        super().__init__(gen)
        self.args = args
        self._fixed: Labeller | None = None  # the recipe's own labeller model or endpoint, loaded once

    def load(self, data: DataConfig, tokenizer: Callable[[], PreTrainedTokenizerBase]) -> list[Passage]:
        return load_documents(
            data.dataset_name, data.dataset_split, data.dataset_config, data.num_passages,
            data.document_max_tokens, tokens_counter(tokenizer()), data.document_text_field,
        )  # fmt: skip

    def labeller(self, policy: Policy, tokenizer: PreTrainedTokenizerBase) -> Labeller:
        """The recipe's labeller (label_model / label_url), else the policy itself."""
        args = self.args
        if args.label.label_url or args.label.label_model:
            if self._fixed is None:  # HF: a second vLLM engine in one process is not supported
                self._fixed = build_labeller(
                    args.label, args.model, args.generate, args.vllm, "hf", args.loop.model_cache_dir
                )
            return self._fixed
        use_chat = self.gen.use_chat_template
        return Labeller(policy.engine, tokenizer, args.label, use_chat, policy.scorer, policy.adapter)

    def label(
        self, r: int, items: Sequence[Passage], policy: Policy, tokenizer: PreTrainedTokenizerBase, seed: int
    ) -> Records:
        return [lp.to_record() for lp in self.labeller(policy, tokenizer).label(items, seed)]

    def review(self, round_dir: Path, cfg: ReviewConfig) -> Records | None:
        return review_labels(round_dir, cfg)

    def labelled(self, round_dir: Path, records: Records) -> tuple[list[Passage], dict[str, Any]]:
        labelled = [LabelledPassage.from_record(d) for d in records]
        items = [lp.as_passage() for lp in labelled if lp.kept]
        counts = label_summary(labelled)
        logger.info("%s pseudo-labels: %s", round_dir.name, counts)
        if not items:
            raise RuntimeError(
                f"{round_dir.name}: no pseudo-label passed label_threshold="
                f"{self.args.label.label_threshold}; "
                f"see {round_dir / 'labels.jsonl'} (lower it, or check the labeller)"
            )
        return items, counts


def build_domain(args: SealArgs) -> Domain:
    """The recipe's domain: gold question-answer passages, or documents with pseudo-labels."""
    if args.data.dataset_labels == "pseudo":
        return LabelFree(args.generate, args)
    return Knowledge(args.generate)

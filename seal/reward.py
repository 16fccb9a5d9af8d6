"""The reward stage: a model answers a passage's questions without seeing the passage, and is graded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from seal.config import RewardConfig
from seal.data import Passage
from seal.generate.base import Engine, Sampling, per_prompt_adapters
from seal.graders import Grader, make_grader
from seal.templates import render_chat

QA_PROMPT = "Answer the question directly and concisely, with a short phrase.\nQuestion: {question}"


@dataclass
class PassageScore:
    """A model's no-context answers to one passage's questions and their grades."""

    passage_id: str
    answers: list[str]
    scores: list[float]

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    def to_dict(self) -> dict:
        return {
            "passage_id": self.passage_id,
            "answers": self.answers,
            "scores": self.scores,
            "accuracy": self.accuracy,
        }


class Rewarder:
    """Answers questions greedily (batched, through the engine) and grades the answers."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        grader: Grader,
        cfg: RewardConfig,
        use_chat_template: bool = True,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.grader = grader
        self.cfg = cfg
        self.use_chat_template = use_chat_template

    def answer(
        self, questions: Sequence[str], adapter: str | None | Sequence[str | None] = None
    ) -> list[str]:
        """Greedy answers; `adapter` is one name for all questions or one per question."""
        prompts = [
            render_chat(self.tokenizer, QA_PROMPT.format(question=q), self.use_chat_template)
            for q in questions
        ]
        if not (adapter is None or isinstance(adapter, str)) and len(set(adapter)) == 1:
            adapter = adapter[0]  # one model for all: generators need not support per-prompt adapters
        sampling = Sampling(n=1, temperature=0.0, max_new_tokens=self.cfg.answer_max_new_tokens)
        return [c[0].strip() for c in self.engine.generate(prompts, sampling, adapter=adapter)]

    def score(
        self, passages: Sequence[Passage], adapter: str | None | Sequence[str | None] = None
    ) -> list[PassageScore]:
        """Score every question of every passage in one batched pass.

        `adapter` names the model that answers: one for all passages, or one per passage (e.g. each
        passage's own TTT adapter, all answered in the same batch).
        """
        if adapter is not None and not isinstance(adapter, str) and len(adapter) != len(passages):
            raise ValueError(f"{len(adapter)} adapters for {len(passages)} passages")
        qas = [(p.id, q) for p in passages for q in p.questions]
        per_passage = per_prompt_adapters(adapter, len(passages))
        per_question = [a for p, a in zip(passages, per_passage, strict=True) for _ in p.questions]
        predictions = self.answer([q.question for _, q in qas], per_question)
        grades = self.grader.grade([q.question for _, q in qas], predictions, [q.answers for _, q in qas])
        out, i = [], 0
        for p in passages:
            n = len(p.questions)
            out.append(PassageScore(p.id, predictions[i : i + n], [float(g) for g in grades[i : i + n]]))
            i += n
        return out


def build_grader(cfg: RewardConfig, local_judge: Engine | None, tokenizer: PreTrainedTokenizerBase) -> Grader:
    """The recipe's grader; a local judge answers through `local_judge` (greedy, a few tokens)."""

    def complete(prompts: list[str]) -> list[str]:
        rendered = [render_chat(tokenizer, p) for p in prompts]
        return [
            c[0] for c in local_judge.generate(rendered, Sampling(n=1, temperature=0.0, max_new_tokens=4))
        ]

    return make_grader(
        cfg.reward_grader,
        complete=complete if local_judge is not None else None,
        judge_url=cfg.judge_url,
        judge_model=cfg.judge_model,
        judge_api_key_env=cfg.judge_api_key_env,
    )


def reward(adapted_accuracies: Sequence[float], base_accuracy: float, cfg: RewardConfig) -> float:
    """Mean adapted accuracy over TTT repeats, minus the base model's when `reward_subtract_baseline`."""
    mean = sum(adapted_accuracies) / len(adapted_accuracies) if adapted_accuracies else 0.0
    return mean - base_accuracy if cfg.reward_subtract_baseline else mean

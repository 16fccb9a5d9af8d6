"""Pseudo-labels for raw documents: questions and answers written with the passage in context, kept by
confidence.

For each passage the labeller (the current model by default) writes up to `label_num_questions` questions,
then answers each `label_num_samples` times with the passage in context. The pseudo-label is the consensus
answer (:func:`consensus`; with `label_require_support`, chosen among the samples whose every content word
occurs in the passage). Its confidence is how much all the samples agree with it (`agreement`), its
geometric-mean token probability under the labeller (`token_prob`, teacher-forced on a local model), or the
smaller of the two (`both`). It is kept when the confidence reaches `label_threshold` and, with
`label_require_support`, it is supported by the passage. The kept pseudo-labels are
a SQuAD-style dataset (`questions` with `answer`/`answers`) that `seal.data.load_passages` reads like gold
data; the rejected ones are kept beside them for review.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl import ModelConfig

from seal.config import GenerateConfig, LabelArgs, LabelConfig, VLLMConfig
from seal.data import QA, Passage
from seal.describe import STOPWORDS, words
from seal.documents import load_documents
from seal.generate.base import Engine, Sampling
from seal.generate.engine import build_engine
from seal.generate.hf import HFEngine
from seal.generate.server import ServerEngine
from seal.graders import normalize_answer, token_f1
from seal.journal import Journal
from seal.models import load_model, load_tokenizer, resolve_model_path
from seal.run_dir import JOURNAL, LABELS, SUMMARY_JSON
from seal.templates import render_chat
from seal.utils import setup_logging, task_seed, write_json, write_jsonl

logger = logging.getLogger("seal")

QUESTION_PROMPT = (
    "Read the passage and write {n} different quiz questions about it, one per line. Each question asks for "
    "one fact stated in the passage: a name, a number, a date or a place.\n\nPassage:\n{title}\n{context}"
    "\n\nQuestions:"
)
ANSWER_PROMPT = (
    "Read the passage and answer the question with a short phrase from the passage.\n\nPassage:\n{title}\n"
    "{context}\n\nQuestion: {question}"
)
_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\(?\d+[.)]|Q(?:uestion)?\s*\d*\s*[:.])\s*", re.IGNORECASE)


@dataclass
class PseudoLabel:
    """One question's pseudo-label: the answer, the samples it was chosen from, and why it is (not) kept."""

    question: str
    answer: str
    samples: list[str]
    agreement: float
    token_prob: float | None
    supported: bool
    confidence: float
    kept: bool
    reviewed: bool = False  # a person decided (seal.label_review)
    corrected: bool = False  # a person replaced the answer

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "answers": [self.answer]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PseudoLabel:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class LabelledPassage:
    """A passage with every pseudo-label written for it (kept or not)."""

    passage: Passage
    labels: list[PseudoLabel] = field(default_factory=list)

    @property
    def kept(self) -> list[PseudoLabel]:
        return [label for label in self.labels if label.kept]

    def to_record(self) -> dict[str, Any]:
        """SQuAD-style: `questions` are the kept pseudo-labels (what a reward uses), `rejected` the others."""
        p = self.passage
        return {
            "id": p.id,
            "title": p.title,
            "context": p.context,
            "questions": [label.to_dict() for label in self.kept],
            "rejected": [label.to_dict() for label in self.labels if not label.kept],
        }

    def as_passage(self) -> Passage:
        """The passage with its kept pseudo-labels as its questions."""
        qas = [QA(label.question, [label.answer]) for label in self.kept]
        return dataclasses.replace(self.passage, questions=qas)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LabelledPassage:
        passage = Passage(record["id"], record["title"], record["context"], [])
        labels = [PseudoLabel.from_dict(d) for d in [*record["questions"], *record["rejected"]]]
        return cls(passage, labels)


def parse_questions(text: str, limit: int) -> list[str]:
    """Questions from a completion: one per line, numbering and 'Question:' prefixes dropped, only lines
    with a question mark (cut after the first), duplicates (normalised) dropped; at most `limit`."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = _NUMBERING.sub("", line.strip().strip("*")).strip(" *")
        if "?" not in line:
            continue
        question = line[: line.index("?") + 1].strip()
        if len(question) > 3:
            out.setdefault(normalize_answer(question), question)
    return list(out.values())[:limit]


def clean_answer(text: str) -> str:
    """A sampled answer's first line, without an 'Answer:' prefix, quotes or a trailing full stop."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:\*\*)?answer(?:\*\*)?\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip(" \"'*").rstrip(".").strip()


# Words about the task rather than the passage ("The answer is 1847", "as the passage says"): never an answer.
META_WORDS = frozenset("answer answers question questions passage text mentioned says states stated".split())


def extract_answer(answer: str, question: str) -> str:
    """The answer without the words it repeats from the question: its longest run of words the question does
    not use (function words allowed inside a run, not at its ends; a capitalised word right after it kept,
    as part of a name), e.g. "Ravelthorpe was born in the town of Whitlow Bridge" to "Whitlow Bridge" for
    "In which town was Ravelthorpe born?". An answer whose every word is in the question is returned whole."""
    stems = {w[: max(4, len(w) - 2)] for w in words(question)}  # "study" also asks "studied"

    def asked(w: str) -> bool:
        return any(w.startswith(stem) for stem in stems if len(stem) >= 4) or w in stems

    tokens = answer.split()
    filler = STOPWORDS | META_WORDS
    new = [bool(ws := words(t)) and any(not asked(w) and w not in filler for w in ws) for t in tokens]
    best, start = (0, 0, 0), None  # (new words, start, end) of the best run
    for i, token in enumerate([*tokens, ""]):
        is_new = i < len(tokens) and new[i]
        inner = i < len(tokens) and start is not None and all(w in filler for w in words(token))
        if is_new and start is None:
            start = i
        elif not is_new and not inner and start is not None:
            end = max(j for j in range(start, i) if new[j]) + 1  # drop trailing function words
            count = sum(new[start:end])
            if count > best[0]:
                best = (count, start, end)
            start = None
    if best[0] == 0:
        return answer
    _, start, end = best
    while end < len(tokens) and tokens[end][:1].isupper() and tokens[end - 1][-1:].isalnum():
        end += 1  # a proper name goes on with a word the question used: "Gellert Medal"
    return " ".join(tokens[start:end]).strip(" ,;:\"'()")


def consensus(samples: Sequence[str], candidates: Sequence[str] | None = None) -> tuple[str, float]:
    """The candidate (by default each sample) that agrees most with the samples, and how much they agree
    with it.

    Agreement of two answers is SQuAD token F1 (1 for equal normalised answers), so free-form answers that
    share their key words agree partly. The chosen answer maximises its summed agreement with all samples
    (itself included when it is one; ties: the first candidate), and its agreement is that sum over the
    number of samples: the share of samples equal to it when answers are short phrases. Empty answers agree
    with nothing.
    """
    pool = samples if candidates is None else candidates
    scores = [sum(token_f1(other, [c]) for other in samples) if normalize_answer(c) else 0.0 for c in pool]
    if not pool or max(scores) == 0.0:
        return "", 0.0
    best = scores.index(max(scores))
    return pool[best], scores[best] / len(samples)


def supported(answer: str, passage: Passage) -> bool:
    """True when the answer has content words and every one of them occurs in the passage (title included)."""
    content = [w for w in words(answer) if w not in STOPWORDS]
    vocabulary = set(words(f"{passage.title} {passage.context}"))
    return bool(content) and all(w in vocabulary for w in content)


def grounded_consensus(samples: Sequence[str], passage: Passage) -> tuple[str, float]:
    """The consensus among the samples the passage supports, its agreement counted over all samples (a
    confident invented majority does not hide a supported answer, nor lend it its confidence); the plain
    consensus, which the support rule then rejects, when no sample is supported."""
    grounded = [s for s in samples if supported(s, passage)]
    return consensus(samples, grounded) if grounded else consensus(samples)


def confidence(agreement: float, token_prob: float | None, measure: str) -> float:
    """The recipe's confidence measure of one pseudo-label (see LabelConfig.label_confidence)."""
    if measure == "agreement":
        return agreement
    if token_prob is None:
        raise ValueError(f"label_confidence: {measure} needs token probabilities (a local labeller)")
    return token_prob if measure == "token_prob" else min(agreement, token_prob)


class Labeller:
    """Writes and answers questions about passages with `engine` (through `adapter`); `scorer`, an HF engine
    on the same weights, gives token probabilities when the confidence measure needs them."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        cfg: LabelConfig,
        use_chat_template: bool = True,
        scorer: HFEngine | None = None,
        adapter: str | None = None,
    ):
        if cfg.label_confidence != "agreement" and scorer is None:
            raise ValueError(f"label_confidence: {cfg.label_confidence} needs a local labeller (scorer)")
        self.engine, self.tokenizer, self.cfg = engine, tokenizer, cfg
        self.use_chat_template, self.scorer, self.adapter = use_chat_template, scorer, adapter

    def _render(self, text: str) -> str:
        return render_chat(self.tokenizer, text, self.use_chat_template)

    def questions(self, passages: Sequence[Passage], seed: int) -> list[list[str]]:
        """Up to `label_num_questions` questions per passage, written with the passage in context."""
        cfg = self.cfg
        prompts = [
            self._render(QUESTION_PROMPT.format(n=cfg.label_num_questions, title=p.title, context=p.context))
            for p in passages
        ]
        sampling = Sampling(
            n=1,
            temperature=cfg.label_question_temperature,
            max_new_tokens=cfg.label_question_max_new_tokens,
            seed=seed,
        )
        completions = self.engine.generate(prompts, sampling, adapter=self.adapter)
        return [parse_questions(c[0], cfg.label_num_questions) for c in completions]

    def _answer_prompt(self, passage: Passage, question: str) -> str:
        return self._render(
            ANSWER_PROMPT.format(title=passage.title, context=passage.context, question=question)
        )

    def sample_answers(
        self, passages: Sequence[Passage], questions: Sequence[Sequence[str]], seed: int
    ) -> list[list[list[str]]]:
        """`label_num_samples` answers per question, its passage in context, each cut to its first line:
        [passage][question][sample], from one batched engine call."""
        cfg = self.cfg
        pairs = [(p, q) for p, qs in zip(passages, questions, strict=True) for q in qs]
        sampling = Sampling(
            n=cfg.label_num_samples,
            temperature=cfg.label_temperature,
            max_new_tokens=cfg.label_max_new_tokens,
            seed=seed,
        )
        prompts = [self._answer_prompt(p, q) for p, q in pairs]
        sampled = iter(self.engine.generate(prompts, sampling, adapter=self.adapter))
        return [[[clean_answer(s) for s in next(sampled)] for _ in qs] for qs in questions]

    def judge(
        self,
        passages: Sequence[Passage],
        questions: Sequence[Sequence[str]],
        samples: Sequence[Sequence[list[str]]],
    ) -> list[LabelledPassage]:
        """Each question's consensus answer over its samples (shortened with `label_extract`) and its
        confidence (token probabilities scored in one pass when the measure needs them), kept or not by the
        recipe's rule."""
        cfg = self.cfg
        items = [
            (p, q, [extract_answer(s, q) for s in row] if cfg.label_extract else list(row))
            for p, qs, rows in zip(passages, questions, samples, strict=True)
            for q, row in zip(qs, rows, strict=True)
        ]
        chosen = [
            grounded_consensus(row, p) if cfg.label_require_support else consensus(row) for p, _, row in items
        ]
        probs: list[float | None] = [None] * len(items)
        if cfg.label_confidence != "agreement":
            scored = [i for i, (answer, _) in enumerate(chosen) if answer]
            logps = self.scorer.mean_logprobs(
                [self._answer_prompt(items[i][0], items[i][1]) for i in scored],
                [chosen[i][0] for i in scored],
                adapter=self.adapter,
            )
            probs = [0.0] * len(items)
            for i, logp in zip(scored, logps, strict=True):
                probs[i] = math.exp(logp)
        out = {p.id: LabelledPassage(p) for p in passages}
        for (p, q, row), (answer, agreement), prob in zip(items, chosen, probs, strict=True):
            grounded = supported(answer, p)
            conf = confidence(agreement, prob, cfg.label_confidence)
            grounded_enough = grounded or not cfg.label_require_support
            kept = bool(answer) and conf >= cfg.label_threshold and grounded_enough
            out[p.id].labels.append(PseudoLabel(q, answer, row, agreement, prob, grounded, conf, kept))
        return list(out.values())

    def answer(
        self, passages: Sequence[Passage], questions: Sequence[Sequence[str]], seed: int
    ) -> list[LabelledPassage]:
        """Each question answered `label_num_samples` times with its passage in context, then judged."""
        return self.judge(passages, questions, self.sample_answers(passages, questions, seed))

    def label(self, passages: Sequence[Passage], seed: int) -> list[LabelledPassage]:
        """Questions written, then answered and filtered (two batched engine calls)."""
        logger.info("labelling %d passages: writing questions", len(passages))
        questions = self.questions(passages, seed)
        n = sum(map(len, questions))
        logger.info("answering %d questions x %d samples", n, self.cfg.label_num_samples)
        return self.answer(passages, questions, seed + 1)


def label_summary(labelled: Sequence[LabelledPassage]) -> dict[str, Any]:
    """How many pseudo-labels were written and kept, their mean confidence, passages left without one."""
    every = [label for lp in labelled for label in lp.labels]
    kept = [label for label in every if label.kept]
    return {
        "labels_written": len(every),
        "labels_kept": len(kept),
        "label_confidence": round(fmean(label.confidence for label in kept), 4) if kept else None,
        "passages_unlabelled": sum(1 for lp in labelled if not lp.kept),
    }


def tokens_counter(tokenizer: PreTrainedTokenizerBase):
    """Passage length in the labeller's tokens, for splitting documents."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_labeller(
    cfg: LabelConfig,
    model_args: ModelConfig,
    generate: GenerateConfig,
    vllm: VLLMConfig,
    backend: str,
    cache_dir: str | None = None,
) -> Labeller:
    """A labeller of its own: the endpoint `label_url`, or the local model `label_model` (default: the
    recipe's model) sampled by `backend` (hf, vllm or auto) and scored by HF on the same weights."""
    if cfg.label_url:  # the tokenizer renders prompts (and splits documents) as the recipe's model's would
        tokenizer = load_tokenizer(resolve_model_path(model_args.model_name_or_path, cache_dir))
        engine = ServerEngine(cfg.label_url, cfg.label_model, cfg.label_api_key_env)
        return Labeller(engine, tokenizer, cfg, generate.use_chat_template)
    path = resolve_model_path(cfg.label_model or model_args.model_name_or_path, cache_dir)
    tokenizer = load_tokenizer(path, revision=None if cfg.label_model else model_args.model_revision)
    model = load_model(path, model_args.dtype, None if cfg.label_model else model_args.model_revision)
    hf = HFEngine(model, tokenizer, generate.generation_batch_size)
    seed = task_seed(cfg.label_seed, "label-engine")
    engine = build_engine(backend, model_args, hf, vllm, path, 16, seed)
    return Labeller(engine, tokenizer, cfg, generate.use_chat_template, hf)


def label_documents(args: LabelArgs, chunk: int = 64) -> list[LabelledPassage]:
    """`seal label`: pseudo-label raw documents and write `<label_output_dir>/dataset.jsonl` (passages with a
    kept pseudo-label, SQuAD-style), `labels.jsonl` (every pseudo-label, kept or not) and `summary.json`.

    Passages are labelled `chunk` at a time and journaled, so a rerun of the same command resumes.
    """
    cfg = args.label
    out = Path(cfg.label_output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out)
    data = args.data
    counter = tokens_counter(load_tokenizer(resolve_model_path(args.model.model_name_or_path)))
    passages = load_documents(  # validated before any model is loaded
        data.dataset_name, data.dataset_split, data.dataset_config, data.num_passages,
        data.document_max_tokens, counter, data.document_text_field,
    )  # fmt: skip
    logger.info("%d passages from %s", len(passages), data.dataset_name)
    labeller = build_labeller(cfg, args.model, args.generate, args.vllm, args.generate.generator_backend)
    journal = Journal(out / JOURNAL)
    labelled: list[LabelledPassage] = []
    try:
        for start in range(0, len(passages), chunk):
            key = ("labels", start, chunk)
            if journal.get(*key) is None:
                seed = task_seed(cfg.label_seed, "label", start)
                part = labeller.label(passages[start : start + chunk], seed)
                journal.append(key, records=[lp.to_record() for lp in part])
            labelled.extend(LabelledPassage.from_record(r) for r in journal.get(*key)["records"])
    finally:
        labeller.engine.close()
    write_jsonl(out / LABELS, [lp.to_record() for lp in labelled])
    write_jsonl(out / "dataset.jsonl", [lp.to_record() for lp in labelled if lp.kept])
    summary = label_summary(labelled)
    write_json(out / SUMMARY_JSON, {"passages": len(labelled), **summary})
    logger.info("pseudo-labels: %s", summary)
    return labelled

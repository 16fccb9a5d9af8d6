"""Graders that score a model's short answer to a question against gold answers.

Three string metrics in the SQuAD tradition (:func:`exact_match`, :func:`token_f1`,
:func:`gold_contained`) and two LLM judges in the style of SEAL's knowledge-incorporation
grader: :class:`LocalJudge` (calls a local model through a batched callable) and
:class:`EndpointJudge` (any OpenAI-compatible ``/chat/completions`` endpoint, standard library
only, through :mod:`seal.http`). Every grader exposes ``name`` and a batched
``grade(questions, predictions, answers)`` returning one score in ``[0, 1]`` per item. Use
:func:`make_grader` to build one by name.
"""

from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

from seal.config import GRADER_NAMES
from seal.http import EndpointError, JSONClient, redact_url

__all__ = [
    "GRADER_NAMES",
    "JUDGE_PROMPT",
    "EndpointJudge",
    "FunctionGrader",
    "Grader",
    "JudgeError",
    "LocalJudge",
    "exact_match",
    "format_gold",
    "gold_contained",
    "make_grader",
    "normalize_answer",
    "parse_judgement",
    "token_f1",
]

# --------------------------------------------------------------------------------------------
# String metrics
# --------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = (text or "").lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _as_answer_list(answers: Sequence[str] | str) -> list[str]:
    """Return ``answers`` as a list of strings; a bare string counts as a single gold answer."""
    if isinstance(answers, str):
        return [answers]
    return [a for a in answers if a is not None]


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in _as_answer_list(answers)))


def _f1_single(prediction: str, gold: str) -> float:
    """SQuAD token F1 between one prediction and one gold answer."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v2 convention: F1 is 1 only if both are empty.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token-level F1, maximised over the gold answers (0.0 if there are none)."""
    golds = _as_answer_list(answers)
    if not golds:
        return 0.0
    return max(_f1_single(prediction, gold) for gold in golds)


def gold_contained(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any non-empty normalised gold appears in the normalised prediction as whole words."""
    pred = f" {normalize_answer(prediction)} "
    for gold in _as_answer_list(answers):
        norm_gold = normalize_answer(gold)
        if norm_gold and f" {norm_gold} " in pred:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------
# Grader protocol and metric wrapper
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Grader(Protocol):
    """Batched grader: one score in ``[0, 1]`` per (question, prediction, gold answers) item."""

    name: str

    def grade(
        self,
        questions: Sequence[str],
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
    ) -> list[float]:
        """Score each prediction against its gold answers."""
        ...


def _check_lengths(
    questions: Sequence[str], predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> None:
    """Raise ``ValueError`` unless the batch sequences have equal length (``TypeError`` for a bare str)."""
    if isinstance(questions, str) or isinstance(predictions, str):
        raise TypeError("questions and predictions must be sequences of strings, not a single string")
    if not (len(questions) == len(predictions) == len(answers)):
        raise ValueError(
            "questions, predictions and answers must have the same length, got "
            f"{len(questions)}, {len(predictions)} and {len(answers)}"
        )


_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": exact_match,
    "f1": token_f1,
    "contains": gold_contained,
}


class FunctionGrader:
    """Grader wrapping a per-item metric ``fn(prediction, answers) -> float``.

    ``FunctionGrader("exact_match")``, ``FunctionGrader("f1")`` and ``FunctionGrader("contains")``
    wrap the built-in metrics; pass ``fn`` to wrap a custom metric under any name.
    """

    def __init__(self, name: str, fn: Callable[[str, Sequence[str]], float] | None = None) -> None:
        """Create a grader called ``name`` using ``fn`` (or the built-in metric of that name)."""
        if fn is None:
            if name not in _METRICS:
                raise ValueError(f"unknown metric {name!r}; built-in metrics are {sorted(_METRICS)}")
            fn = _METRICS[name]
        self.name = name
        self.fn = fn

    def grade(
        self,
        questions: Sequence[str],
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
    ) -> list[float]:
        """Apply the metric to each item (questions are only used for length checking)."""
        _check_lengths(questions, predictions, answers)
        return [min(1.0, max(0.0, float(self.fn(p, a)))) for p, a in zip(predictions, answers, strict=True)]

    def __repr__(self) -> str:
        return f"FunctionGrader(name={self.name!r})"


# --------------------------------------------------------------------------------------------
# LLM judges
# --------------------------------------------------------------------------------------------


class JudgeError(EndpointError):
    """An LLM judge could not produce a grade (transport failure, HTTP error, malformed reply)."""


JUDGE_PROMPT = (
    "You are checking whether a student answered a question correctly.\n"
    "\n"
    "Question: {question}\n"
    "Gold answer(s): {gold}\n"
    "Student's answer: {prediction}\n"
    "\n"
    "Using only the gold answer(s) as the reference, decide whether the student's answer is "
    'correct. Reply strictly with a single word, "yes" or "no".'
)


def format_gold(answers: Sequence[str] | str) -> str:
    """Render the gold answers for :data:`JUDGE_PROMPT` (several golds are joined with ``" | "``)."""
    golds = [a.strip() for a in _as_answer_list(answers)]
    golds = [g for g in golds if g]
    return " | ".join(golds) if golds else "(none)"


def _build_prompts(
    questions: Sequence[str], predictions: Sequence[str], answers: Sequence[Sequence[str]]
) -> list[str]:
    """Fill :data:`JUDGE_PROMPT` for every item of a batch."""
    _check_lengths(questions, predictions, answers)
    return [
        JUDGE_PROMPT.format(question=q.strip(), gold=format_gold(a), prediction=(p or "").strip())
        for q, p, a in zip(questions, predictions, answers, strict=True)
    ]


_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_VERDICT_PREFIX_RE = re.compile(r"^(?:final\s+)?(?:answer|verdict|judgement|judgment|grade)\s*[:\-]\s*")
_YES_WORDS = frozenset({"yes", "y", "correct", "true"})


def parse_judgement(text: str) -> float:
    """Return 1.0 if a judge reply means "yes", otherwise 0.0 ("no", empty or unparseable). Never raises."""
    if not isinstance(text, str):
        return 0.0
    reply = _THINK_RE.sub(" ", text).strip().lower()
    reply = reply.lstrip(" \t\r\n\"'`*_#>([{-:.")
    reply = _VERDICT_PREFIX_RE.sub("", reply).lstrip(" \t\r\n\"'`*_#>([{-:.")
    match = re.match(r"[a-z]+", reply)
    return 1.0 if match is not None and match.group(0) in _YES_WORDS else 0.0


class LocalJudge:
    """LLM judge that asks a local model through a callable."""

    name = "judge"

    def __init__(self, complete: Callable[[list[str]], list[str]]) -> None:
        """``complete(prompts)`` must return one reply string per prompt (batched)."""
        if not callable(complete):
            raise TypeError("complete must be callable: complete(prompts) -> list of replies")
        self.complete = complete

    def grade(
        self,
        questions: Sequence[str],
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
    ) -> list[float]:
        """Build one judge prompt per item, call ``complete`` once with all of them, parse the replies."""
        prompts = _build_prompts(questions, predictions, answers)
        if not prompts:
            return []
        replies = list(self.complete(prompts))
        if len(replies) != len(prompts):
            raise JudgeError(f"complete() returned {len(replies)} replies for {len(prompts)} prompts")
        return [parse_judgement(r) for r in replies]

    def __repr__(self) -> str:
        return f"LocalJudge(complete={getattr(self.complete, '__name__', type(self.complete).__name__)})"


class EndpointJudge:
    """LLM judge on any OpenAI-compatible chat-completions endpoint.

    Requests are sent concurrently (``max_workers`` threads) through a :class:`seal.http.JSONClient`:
    connection errors, timeouts, HTTP 429 and HTTP 5xx are retried up to ``max_retries`` extra times with
    exponential backoff ``backoff * 2**attempt`` seconds (capped at ``max_backoff``); other HTTP errors and
    malformed replies raise :class:`JudgeError` immediately. The API key is read from
    ``os.environ[api_key_env]`` at request time, is never stored on the instance and is
    redacted from every error message.
    """

    name = "judge"
    _PATH = "chat/completions"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        max_workers: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
    ) -> None:
        """Configure the endpoint (``base_url`` like ``"http://127.0.0.1:8000/v1"``) and retry policy."""
        if not model:
            raise ValueError("model must be a non-empty string")
        if max_workers < 1:
            raise ValueError("max_workers must be >= 1")
        self.client = JSONClient(
            base_url,
            api_key_env=api_key_env,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            error_cls=JudgeError,
            label="judge request",
        )
        self.base_url = self.client.base_url
        self.url = self.client.url(self._PATH)
        self.model = model
        self.max_workers = int(max_workers)

    @property
    def api_key_env(self) -> str | None:
        return self.client.api_key_env

    @property
    def timeout(self) -> float:
        return self.client.timeout

    @property
    def max_retries(self) -> int:
        return self.client.max_retries

    def __repr__(self) -> str:
        return (
            f"EndpointJudge(base_url={redact_url(self.base_url)!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, timeout={self.timeout}, max_retries={self.max_retries}, "
            f"max_workers={self.max_workers})"
        )

    def _request(self, prompt: str) -> str:
        """Send one chat-completion request (with retries) and return the reply text."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 4,
        }
        status, body = self.client.request("POST", self._PATH, payload)
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise self.client.malformed(self._PATH, status, "no choices[0].message.content", body)
        return content

    def complete(self, prompts: Sequence[str]) -> list[str]:
        """Send every prompt concurrently and return the replies in order."""
        prompts = list(prompts)
        if not prompts:
            return []
        workers = min(self.max_workers, len(prompts))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seal-judge")
        try:
            futures: list[Future[str]] = [executor.submit(self._request, p) for p in prompts]
            return [f.result() for f in futures]
        finally:
            executor.shutdown(wait=True, cancel_futures=True)

    def grade(
        self,
        questions: Sequence[str],
        predictions: Sequence[str],
        answers: Sequence[Sequence[str]],
    ) -> list[float]:
        """Ask the endpoint to judge every item and return 1.0 for "yes" and 0.0 otherwise."""
        prompts = _build_prompts(questions, predictions, answers)
        return [parse_judgement(r) for r in self.complete(prompts)]


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def make_grader(
    name: str,
    *,
    complete: Callable[[list[str]], list[str]] | None = None,
    judge_url: str | None = None,
    judge_model: str | None = None,
    judge_api_key_env: str | None = "OPENAI_API_KEY",
) -> Grader:
    """Build a grader by name: ``"exact_match"``, ``"f1"``, ``"contains"`` or ``"judge"``.

    ``"judge"`` uses :class:`EndpointJudge` when ``judge_url`` is given (``judge_model`` is then
    required), else :class:`LocalJudge` wrapping ``complete``.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _METRICS:
        return FunctionGrader(key)
    if key == "judge":
        if judge_url:
            if not judge_model:
                raise ValueError("the 'judge' grader with judge_url also needs judge_model")
            return EndpointJudge(judge_url, judge_model, api_key_env=judge_api_key_env)
        if complete is not None:
            return LocalJudge(complete)
        raise ValueError("the 'judge' grader needs either judge_url (+ judge_model) or a complete callable")
    raise ValueError(f"unknown grader {name!r}; valid names are: {', '.join(GRADER_NAMES)}")

"""Passage datasets: SEAL/SQuAD-style JSON or JSONL files, Hub datasets, and the packaged sample set.

Every record is validated before any model is loaded; errors name the file, the record and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

SAMPLE = "sample"


@dataclass
class QA:
    """A question with its acceptable short answers (the first is the canonical one)."""

    question: str
    answers: list[str]

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass
class Passage:
    """A passage the model should learn, its held-out questions, and optionally precomputed self-edits."""

    id: str
    title: str
    context: str
    questions: list[QA]
    completions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "context": self.context,
            "questions": [
                {"question": q.question, "answer": q.answer, "answers": q.answers} for q in self.questions
            ],
        }


class DataValidationError(ValueError):
    """Malformed records; the message lists each as `source: record N (id=...): field: problem`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} problem(s) in the passage data:\n  {shown}{more}")


def context_key(text: str) -> str:
    """A passage's context with whitespace normalised: two records hold the same passage when these match."""
    return " ".join(text.split())


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _validate_answers(q: Mapping[str, Any], where: str, problems: list[str]) -> list[str]:
    """Accepts `answer: str`, `answers: [str, ...]` or SQuAD's `answers: {text: [...]}`."""
    if "answer" in q:
        if not _nonempty_str(q["answer"]):
            problems.append(f"{where}.answer': expected a non-empty string, got {q['answer']!r:.60}")
            return []
        return [q["answer"].strip()]
    answers = q.get("answers")
    if isinstance(answers, Mapping):
        answers = answers.get("text")
    if not isinstance(answers, list) or not answers or not all(_nonempty_str(a) for a in answers):
        problems.append(
            f"{where}': needs 'answer' (non-empty string) or 'answers' (non-empty list of strings)"
        )
        return []
    return list(dict.fromkeys(a.strip() for a in answers))


def parse_record(record: Any, source: str, index: int, problems: list[str]) -> Passage | None:
    """Validate one raw record; append problems (naming source, record and field) and return None if bad."""
    rid = record.get("id") if isinstance(record, Mapping) else None
    where = f"{source}: record {index}" + (f" (id={rid})" if rid is not None else "")
    if not isinstance(record, Mapping):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    before = len(problems)
    title = record.get("title", "")
    if not isinstance(title, str):
        problems.append(f"{where}: field 'title': expected a string, got {type(title).__name__}")
    context = record.get("context")
    if not _nonempty_str(context):
        problems.append(f"{where}: field 'context': expected a non-empty string, got {context!r:.60}")
    questions = record.get("questions")
    qas: list[QA] = []
    if not isinstance(questions, list) or not questions:
        problems.append(f"{where}: field 'questions': expected a non-empty list, got {questions!r:.60}")
    else:
        for j, q in enumerate(questions):
            qwhere = f"{where}: field 'questions[{j}]"
            if not isinstance(q, Mapping):
                problems.append(f"{qwhere}': expected an object with 'question' and 'answer'")
                continue
            if not _nonempty_str(q.get("question")):
                problems.append(
                    f"{qwhere}.question': expected a non-empty string, got {q.get('question')!r:.60}"
                )
            answers = _validate_answers(q, qwhere, problems)
            if _nonempty_str(q.get("question")) and answers:
                qas.append(QA(q["question"].strip(), answers))
    completions = record.get("completions", [])
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        problems.append(f"{where}: field 'completions': expected a list of strings")
    if len(problems) > before:
        return None
    return Passage(
        id=str(rid) if rid is not None else f"{Path(source).stem}-{index}",
        title=title.strip(),
        context=context.strip(),
        questions=qas,
        completions=list(completions),
    )


def read_text(path: Path) -> str:
    """The file's text; non-UTF-8 bytes are a DataValidationError naming the file, line and byte offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataValidationError(
            [f"{path}: line {line}, byte {e.start}: not valid UTF-8 ({e.reason}); save the file as UTF-8"]
        ) from None


def read_records(path: Path) -> list[Any]:
    text = read_text(path)
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataValidationError([f"{path}: line {lineno}: invalid JSON ({e.msg})"]) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataValidationError([f"{path}: invalid JSON at line {e.lineno} ({e.msg})"]) from None
    if isinstance(data, Mapping) and "data" in data:  # {"data": [...]} wrappers
        data = data["data"]
    if not isinstance(data, list):
        raise DataValidationError([f"{path}: expected a JSON list of passage records"])
    return data


def group_squad_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group SQuAD's flat (id, title, context, question, answers) rows into one record per context."""
    grouped: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["context"]
        if key not in grouped:
            grouped[key] = {
                "id": row.get("id"),
                "title": row.get("title", ""),
                "context": key,
                "questions": [],
            }
        grouped[key]["questions"].append({"question": row.get("question"), "answers": row.get("answers")})
    return list(grouped.values())


def _read_hub(name: str, split: str, config: str | None) -> list[Any]:
    ds = datasets.load_dataset(name, config, split=split)
    rows = list(ds)
    if rows and "questions" not in rows[0] and "question" in rows[0]:
        return group_squad_rows(rows)
    return rows


def load_passages(
    source: str,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    max_questions: int | None = None,
) -> list[Passage]:
    """Load and validate passages from `sample`, a .json/.jsonl file, or a `datasets` name/directory."""
    path = Path(source)
    if source == SAMPLE:
        sample = resources.files("seal") / "sample_data" / f"{split}.jsonl"
        if not sample.is_file():
            raise FileNotFoundError(f"The sample data has splits 'train' and 'eval', not '{split}'")
        path = Path(str(sample))
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"Dataset file not found: {path}")
        raw, label = read_records(path), str(path)
    else:
        raw, label = _read_hub(source, split, config), f"{source}[{split}]"
    if limit is not None:
        raw = raw[:limit]
    problems: list[str] = []
    passages = [p for i, r in enumerate(raw) if (p := parse_record(r, label, i, problems)) is not None]
    if not passages and not problems:
        problems.append(f"{label}: no passage records")
    ids = [p.id for p in passages]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        problems.append(f"{label}: record id '{dup}' appears more than once (field 'id' must be unique)")
    if problems:
        raise DataValidationError(problems)
    if max_questions is not None:
        for p in passages:
            p.questions = p.questions[:max_questions]
    return passages

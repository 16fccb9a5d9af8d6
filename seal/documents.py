"""Raw documents in, passages out: text without question-answer pairs, for learning without labels.

Sources: `sample-documents` (the packaged folder), a `.txt`/`.md` file or a folder of them (read
recursively, in path order), a `.json`/`.jsonl` file of records with `context` (optional `title` and `id`;
any `questions` are ignored), or a `datasets` name or directory with a text column. Text is split into
passages at blank lines, consecutive paragraphs merged up to `max_tokens`; a paragraph longer than that is
split at sentence ends (a sentence longer still at word boundaries), so no text is ever dropped. A Markdown
heading starts a new passage and titles the passages under it (a sub-heading as ``<first heading>:
<sub-heading>``); before any heading the title is the file's name (or the record's title). Passage ids are
``<file or record>#<k>``: text for records and reports, never a path (see :mod:`seal.paths`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from seal.data import DataValidationError, Passage, read_records, read_text

SAMPLE_DOCUMENTS = "sample-documents"  # the packaged folder of invented-entity documents
TEXT_SUFFIXES = (".txt", ".md")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<title>.+?)\s*#*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

CountTokens = Callable[[str], int]


def count_words(text: str) -> int:
    """The default length measure when no tokenizer is given: whitespace-separated words."""
    return len(text.split())


def _pieces(paragraph: str, max_tokens: int, count: CountTokens) -> list[str]:
    """`paragraph` as pieces of at most `max_tokens` (sentences, then words when a sentence is longer);
    joining the pieces with spaces gives the paragraph back up to whitespace."""
    if count(paragraph) <= max_tokens:
        return [paragraph]
    out: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if count(sentence) <= max_tokens:
            out.append(sentence)
            continue
        current: list[str] = []
        for word in sentence.split():
            if current and count(" ".join([*current, word])) > max_tokens:
                out.append(" ".join(current))
                current = []
            current.append(word)
        if current:
            out.append(" ".join(current))
    return out


def split_text(text: str, max_tokens: int, count: CountTokens = count_words) -> list[str]:
    """Paragraphs (blank-line separated) merged greedily into chunks of at most `max_tokens`.

    Invariant: every word of `text` is in exactly one chunk, in order; a chunk exceeds `max_tokens` only
    when a single word does.
    """
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    current = ""
    for paragraph in paragraphs:
        for piece in _pieces(paragraph, max_tokens, count):
            joined = f"{current}\n\n{piece}" if current else piece
            if current and count(joined) > max_tokens:
                chunks.append(current)
                joined = piece
            current = joined
    if current:
        chunks.append(current)
    return chunks


def _sections(text: str, default_title: str) -> list[tuple[str, str]]:
    """(title, body) per Markdown section; text before the first heading is titled `default_title`."""
    sections: list[tuple[str, list[str]]] = [(default_title, [])]
    top = None  # the first heading: the document's own title
    for line in text.splitlines():
        if m := _HEADING.match(line):
            top = top or m["title"]
            sections.append((m["title"] if m["title"] == top else f"{top}: {m['title']}", []))
        else:
            sections[-1][1].append(line)
    return [(title, "\n".join(lines)) for title, lines in sections if "".join(lines).strip()]


def _title_from(path: Path) -> str:
    """``quillon-river_ferry.txt`` -> ``Quillon river ferry``."""
    words = " ".join(re.split(r"[_\-\s]+", path.stem)).strip() or path.stem
    return words[:1].upper() + words[1:]


def _passages(
    name: str, sections: list[tuple[str, str]], max_tokens: int, count: CountTokens
) -> list[Passage]:
    out: list[Passage] = []
    for title, body in sections:
        for chunk in split_text(body, max_tokens, count):
            out.append(Passage(id=f"{name}#{len(out)}", title=title, context=chunk, questions=[]))
    return out


def _text_files_in(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() and p.suffix in TEXT_SUFFIXES for p in folder.rglob("*"))


def _text_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix not in TEXT_SUFFIXES:
            raise DataValidationError([f"{root}: not a .txt or .md file"])
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise DataValidationError([f"{root}: an empty folder (no .txt or .md files)"])
    return files


def _from_records(
    records: list[Any], label: str, text_field: str, max_tokens: int, count: CountTokens
) -> tuple[list[Passage], list[str]]:
    problems: list[str] = []
    out: list[Passage] = []
    for i, record in enumerate(records):
        rid = record.get("id") if isinstance(record, Mapping) else None
        where = f"{label}: record {i}" + (f" (id={rid})" if rid is not None else "")
        if not isinstance(record, Mapping):
            problems.append(f"{where}: expected an object with '{text_field}', got {type(record).__name__}")
            continue
        text, title = record.get(text_field), record.get("title", "")
        if not isinstance(text, str) or not text.strip():
            problems.append(f"{where}: field '{text_field}': expected a non-empty string, got {text!r:.60}")
            continue
        if not isinstance(title, str):
            problems.append(f"{where}: field 'title': expected a string, got {type(title).__name__}")
            continue
        name = str(rid) if rid is not None else f"{Path(label).stem}-{i}"
        out.extend(_passages(name, [(title.strip(), text)], max_tokens, count))
    return out, problems


def load_documents(
    source: str,
    split: str = "train",
    config: str | None = None,
    limit: int | None = None,
    max_tokens: int = 256,
    count_tokens: CountTokens = count_words,
    text_field: str = "text",
) -> list[Passage]:
    """Passages (without questions) from raw documents; a DataValidationError names every bad file or record
    before any model is loaded. `limit` keeps the first N passages. JSON records read `context` as their text
    (SEAL's format), `datasets` rows `text_field`."""
    if max_tokens < 1:
        raise ValueError(f"document_max_tokens must be >= 1, got {max_tokens}")
    path = (
        Path(str(resources.files("seal") / "sample_data" / "documents"))
        if source == SAMPLE_DOCUMENTS
        else Path(source)
    )
    problems: list[str] = []
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"Document file not found: {path}")
        passages, problems = _from_records(read_records(path), str(path), "context", max_tokens, count_tokens)
    elif path.is_file() or _text_files_in(path) or (path.is_dir() and not any(path.iterdir())):
        passages = []
        for file in _text_files(path):
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            text = read_text(file)
            if not text.strip():
                problems.append(f"{file}: the file holds no text")
                continue
            passages.extend(_passages(name, _sections(text, _title_from(file)), max_tokens, count_tokens))
    else:  # a dataset name, or a folder of data files (read as `datasets` reads a Hub dataset)
        rows = list(datasets.load_dataset(source, config, split=split))
        if rows and text_field not in rows[0]:
            raise DataValidationError(
                [f"{source}[{split}]: no column '{text_field}' ({sorted(rows[0])}); see document_text_field"]
            )
        passages, problems = _from_records(rows, f"{source}[{split}]", text_field, max_tokens, count_tokens)
    if not passages and not problems:
        problems.append(f"{source}: no text")
    for dup in sorted(i for i, n in Counter(p.id for p in passages).items() if n > 1):
        problems.append(f"{source}: passage id '{dup}' appears more than once (field 'id' must be unique)")
    if problems:
        raise DataValidationError(problems)
    return passages[:limit] if limit is not None else passages

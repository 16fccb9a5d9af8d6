"""What a self-edit is made of, measured against its passage: length, copying, and words from elsewhere.

Words are lowercased runs of letters and digits (any script). A self-edit *sentence* is copied when its
word sequence occurs contiguously in the passage's (title + context). A content word (not in `STOPWORDS`)
is *novel* when the passage never uses it: an upper bound on hallucination, since a correct paraphrase or
another inflection ("built" for "build") counts as novel too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from statistics import fmean
from typing import Any

from seal.data import Passage

WORD = re.compile(r"[^\W_]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

# English function words: they carry no fact, so they neither count as novel nor as content.
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your yours
    yourself yourselves s t""".split()
)

FIELDS = ("edit_words", "edit_copied", "edit_novel")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def sentences(text: str) -> list[list[str]]:
    """The word lists of a text's sentences (split at . ! ? followed by space, and at line breaks)."""
    return [ws for part in SENTENCE_END.split(text) if (ws := words(part))]


def _occurs(needle: Sequence[str], haystack: Sequence[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == list(needle) for i in range(len(haystack) - n + 1))


def describe(self_edit: str, passage: str) -> dict[str, float | int] | None:
    """`edit_words` (words in the self-edit), `edit_copied` (share of its sentences copied verbatim from the
    passage) and `edit_novel` (share of its content words the passage never uses); None for an empty one."""
    source = words(passage)
    parts = sentences(self_edit)
    if not parts:
        return None
    vocabulary = set(source)
    content = [w for ws in parts for w in ws if w not in STOPWORDS]
    return {
        "edit_words": sum(len(ws) for ws in parts),
        "edit_copied": sum(_occurs(ws, source) for ws in parts) / len(parts),
        "edit_novel": sum(w not in vocabulary for w in content) / len(content) if content else 0.0,
    }


def describe_all(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Means of `describe` over (self-edit, passage) pairs, and `described`, how many were not empty."""
    stats = [d for edit, passage in pairs if (d := describe(edit, passage)) is not None]
    out: dict[str, Any] = {"described": len(stats)}
    for key in FIELDS:
        out[key] = round(fmean(d[key] for d in stats), 4) if stats else None
    return out


def describe_rows(rows: Iterable[Mapping[str, Any]], passages: Mapping[str, Passage]) -> dict[str, Any]:
    """`describe_all` of the parsed self-edits among `rows` (dicts with `status`, `completion` and
    `passage_id`, e.g. `SelfEdit.to_dict()`), each against its passage's title and context."""
    return describe_all(
        (row["completion"], f"{passages[row['passage_id']].title}\n{passages[row['passage_id']].context}")
        for row in rows
        if row.get("status", "ok") == "ok"
    )

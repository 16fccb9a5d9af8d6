"""File names made from data: a record's id (user input) never reaches the file system raw.

:func:`safe_name` turns any text (a passage id, a job name built from one) into one safe path component: a
readable ASCII slug plus a hash of the whole text, so ``../x``, ``/tmp/evil`` or ``a/b`` stay inside the
directory they are joined to, and distinct texts never share a name. The text itself is kept as it is in
records, journal keys and reports; only paths use the safe form. :func:`adapter_label` does the same for the
names engines register adapters under (PEFT module names cannot hold ``.``).
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata

SLUG_CHARS = 40  # readable part of a safe name, at most
HASH_CHARS = 10  # hex digits of sha256 of the full text (40 bits)
LABEL_CHARS = 64  # readable stem of an adapter name, at most


def _ascii(text: str) -> str:
    """`text` in ASCII: accents dropped (é -> e), every other non-ASCII character replaced by ``_``."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c if c.isascii() else "" if unicodedata.combining(c) else "_" for c in decomposed)


def digest(text: str) -> str:
    """A short, machine-independent hash of `text` (any str, lone surrogates included)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]


def safe_name(text: str) -> str:
    """One path component for `text`: ``<slug>-<hash>`` (or ``<hash>`` when nothing readable is left).

    Invariant: the result is non-empty ASCII of letters, digits, ``-``, ``_`` and ``.`` only, never starts
    with ``.`` or ``-`` (so it is never ``.``/``..``, hidden, or an option), is at most
    SLUG_CHARS + 1 + HASH_CHARS long, is the same on every machine, and differs for different texts (the
    hash is of the whole text, so texts whose slugs agree, e.g. ``a/b`` and ``a?b``, still differ).
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", _ascii(text)).lstrip("._-")[:SLUG_CHARS]
    return f"{slug}-{digest(text)}" if slug else digest(text)


def adapter_label(path: str | os.PathLike[str], name: str | None = None) -> str:
    """The readable stem of an engine's adapter name: `name`, else the last component of `path`.

    Invariant: non-empty, at most LABEL_CHARS of ASCII letters, digits, ``-`` and ``_`` (valid as a PEFT
    adapter / torch module name and a vLLM LoRA name); engines append a counter that makes names unique.
    """
    stem = name if name else os.path.basename(os.path.normpath(os.fspath(path)))
    label = re.sub(r"[^A-Za-z0-9_-]+", "_", _ascii(stem)).strip("_")[:LABEL_CHARS]
    return label or "adapter"

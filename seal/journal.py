"""An append-only JSONL journal of finished work, so a crashed run resumes without redoing anything.

Under several processes each rank appends to its own file (``journal.rank<r>.jsonl`` beside ``journal.jsonl``)
so no two processes write one file; every rank reads all of them, so a run resumes whatever the number of
processes it ran with before. Records another rank made in this run are merged in memory (:meth:`merge`).

A crash (kill -9, power loss) can cut the last append short. Opening a journal repairs the file it appends
to, so every record it appends starts on a line of its own: a torn last line is cut off (that task reruns),
a complete record that only lacks its newline gets one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RECORD_START = '{"key": '  # how json.dumps begins every record; finds one glued after a torn line


class Journal:
    """Records keyed by a tuple; each append is flushed and fsynced before the next task starts.

    Invariant: the file this journal appends to holds whole lines only (each a record) once it is open.
    """

    def __init__(self, path: str | os.PathLike, rank: int | None = None):
        base = Path(path)
        self.path = base if rank is None else base.with_name(f"{base.stem}.rank{rank}{base.suffix}")
        self.records: dict[tuple, dict[str, Any]] = {}
        if self.path.exists():
            repair_torn_tail(self.path)  # only our own file: other ranks repair theirs
        for file in [base, *sorted(base.parent.glob(f"{base.stem}.rank*{base.suffix}"))]:
            if file.exists():
                self._read(file)
        if self.records:  # the caller says how many of *its* tasks these are (see `done`)
            logger.info("journal %s: %d finished tasks found", base, len(self.records))

    def _read(self, file: Path) -> None:
        with open(file, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = glued_record(line)
                    if record is None:  # the torn tail of another rank's file (that rank cuts it off)
                        logger.warning("%s:%d: ignoring a partially written record; it reruns", file, lineno)
                        continue
                    # an older version appended this right after a torn record, on the same line
                    logger.warning("%s:%d: recovered a record written after a torn one", file, lineno)
                self.records[tuple(record["key"])] = record

    def get(self, *key: Any) -> dict[str, Any] | None:
        return self.records.get(tuple(key))

    def append(self, key: tuple, **record: Any) -> dict[str, Any]:
        record = {"key": list(key), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[tuple(key)] = record
        return record

    def done(self, keys: Iterable[tuple]) -> int:
        """How many of `keys` are journaled (finished): a resumed run's progress, e.g. 21 of 90."""
        return sum(tuple(key) in self.records for key in keys)

    def merge(self, records: Iterable[dict[str, Any]]) -> None:
        """Take in records another process journaled in its own file (not written again here)."""
        for record in records:
            self.records[tuple(record["key"])] = record

    def __len__(self) -> int:
        return len(self.records)


def glued_record(line: str) -> dict[str, Any] | None:
    """The whole record in a torn `line` (``<torn bytes>{"key": ...}``), or None: the first record start
    after the torn bytes that parses to the end of the line."""
    start = line.find(RECORD_START, 1)
    while start > 0:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line[start:])
            if isinstance(record, dict) and "key" in record:
                return record
        start = line.find(RECORD_START, start + 1)
    return None


def is_record(text: str) -> bool:
    """True if `text` is one whole record (possibly glued after torn bytes)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return glued_record(text) is not None
    return isinstance(record, dict) and "key" in record


def repair_torn_tail(file: Path) -> None:
    """Make `file` end with a newline: cut off a torn last line, or terminate a whole record lacking one."""
    with open(file, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1  # 0 when the torn record is the only line
        lineno = data.count(b"\n") + 1
        if is_record(data[cut:].decode("utf-8", errors="replace")):
            f.write(b"\n")
            logger.warning("%s:%d: the last record lacked its newline (a crash); added it", file, lineno)
        else:
            f.truncate(cut)
            logger.warning(
                "%s:%d: cut off a partially written record (%d bytes, a crash mid-append); that task reruns",
                *(file, lineno, len(data) - cut),
            )
        f.flush()
        os.fsync(f.fileno())

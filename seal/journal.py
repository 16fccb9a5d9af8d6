"""An append-only JSONL journal of finished work, so a crashed run resumes without redoing anything.

Under several processes each rank appends to its own file (``journal.rank<r>.jsonl`` beside ``journal.jsonl``)
so no two processes write one file; every rank reads all of them, so a run resumes whatever the number of
processes it ran with before. Records another rank made in this run are merged in memory (:meth:`merge`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Journal:
    """Records keyed by a tuple; each append is flushed and fsynced before the next task starts."""

    def __init__(self, path: str | os.PathLike, rank: int | None = None):
        base = Path(path)
        self.path = base if rank is None else base.with_name(f"{base.stem}.rank{rank}{base.suffix}")
        self.records: dict[tuple, dict[str, Any]] = {}
        for file in [base, *sorted(base.parent.glob(f"{base.stem}.rank*{base.suffix}"))]:
            if file.exists():
                self._read(file)
        if self.records:
            logger.info("resuming: %d finished tasks in %s", len(self.records), base.parent)

    def _read(self, file: Path) -> None:
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    # Only a crash mid-write produces this, and only on the last line: that task reruns.
                    logger.warning("%s:%d: ignoring a partially written record", file, lineno)
                    continue
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

    def merge(self, records: Iterable[dict[str, Any]]) -> None:
        """Take in records another process journaled in its own file (not written again here)."""
        for record in records:
            self.records[tuple(record["key"])] = record

    def __len__(self) -> int:
        return len(self.records)

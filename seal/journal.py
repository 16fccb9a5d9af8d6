"""An append-only JSONL journal of finished work, so a crashed run resumes without redoing anything."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Journal:
    """Records keyed by a tuple; each append is flushed and fsynced before the next task starts."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: dict[tuple, dict[str, Any]] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        # Only a crash mid-write produces this, and only on the last line: that task reruns.
                        logger.warning("%s:%d: ignoring a partially written record", self.path, lineno)
                        continue
                    self.records[tuple(record["key"])] = record
            if self.records:
                logger.info("resuming: %d finished tasks in %s", len(self.records), self.path)

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

    def __len__(self) -> int:
        return len(self.records)

"""The batch's JSONL manifest: one line per event, appended and synced as it happens.

Events: `queued` (a turn went to ComfyUI, with its prompt id and the server's address), `done` (its outputs
are on disk; the server that ran it) and `error` (it failed for good, with ComfyUI's error text). A re-run
reads the manifest and skips turns that are done; a turn that was queued but never finished is looked up by
its prompt id in the history of the server it went to, so work ComfyUI finished after we stopped listening
is collected instead of redone. Appending one synced line per event means a crash loses at most the line
being written, which is ignored on reading.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


class Manifest:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.records: list[dict] = []
        self._last: dict[tuple[str, int], dict] = {}  # (job key, turn) -> latest record
        self._torn = False  # the file ends without a newline: a crash cut its last line
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        content = self.path.read_bytes()
        self._torn = bool(content) and not content.endswith(b"\n")
        lines = content.splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # Only the last line can be torn (a crash mid-append); anything else is damage worth saying.
                where = "its last line (cut off by an interrupted write)" if number == len(lines) else f"line {number}"
                print(f"kontext-batch: ignoring {where} of {self.path}: not JSON", file=sys.stderr)
                continue
            self._index(record)

    def _index(self, record: dict) -> None:
        self.records.append(record)
        if "key" in record and "turn" in record:
            self._last[(record["key"], record["turn"])] = record

    def append(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with open(self.path, "ab") as handle:
            # A torn last line from a crash must not swallow this record.
            handle.write((b"\n" if self._torn else b"") + line)
            handle.flush()
            os.fsync(handle.fileno())
        self._torn = False
        self._index(record)
        return record

    def last(self, key: str, turn: int) -> dict | None:
        return self._last.get((key, turn))

    def turn_done(self, key: str, turn: int) -> dict | None:
        record = self.last(key, turn)
        return record if record and record["event"] == "done" else None

    def turn_failed(self, key: str, turn: int) -> dict | None:
        record = self.last(key, turn)
        return record if record and record["event"] == "error" else None

    def unfinished(self, key: str, turn: int) -> dict | None:
        """The `queued` record of a turn that was queued and never recorded as done or failed."""
        record = self.last(key, turn)
        return record if record and record["event"] == "queued" else None

    def unfinished_prompt(self, key: str, turn: int) -> str | None:
        record = self.unfinished(key, turn)
        return record["prompt_id"] if record else None

    def next_turn(self, key: str, turns: int) -> int:
        """The first turn of a job that is not done (== turns when the job is complete)."""
        turn = 0
        while turn < turns and self.turn_done(key, turn):
            turn += 1
        return turn

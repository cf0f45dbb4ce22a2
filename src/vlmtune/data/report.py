"""Bad-input policy: every rejected sample is a `BadSample` naming file, line/index and reason.

With `on_bad_sample: skip` it is counted once in a `SkipReport` (which keeps one record per skipped sample,
for `skipped.jsonl`) and logged: the first `LOG_FIRST` of each reason, then only counted, so fifty thousand
identical problems do not flood the terminal. With `error` it is raised.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

from vlmtune.errors import DataError

log = logging.getLogger("vlmtune.data")

LOG_FIRST = 5  # skips logged per reason; later ones of that reason are only counted

# Reason keys, in the order the count table prints them.
REASONS = (
    "malformed_json",
    "invalid_text",
    "bad_structure",
    "unknown_role",
    "empty_content",
    "no_assistant_turn",
    "placeholder_mismatch",
    "media_outside_dataset_dir",
    "missing_image",
    "corrupt_image",
    "unsupported_image",
    "aspect_ratio",
    "image_too_small",
    "decompression_bomb",
    "missing_video",
    "corrupt_video",
    "over_long",
)


class BadSample(DataError):
    """One unusable sample. `reason` is a key of REASONS; `where` is e.g. 'line 12' or 'index 3'.

    Raised in DataLoader worker processes too, so it pickles (by its four fields)."""

    def __init__(self, reason: str, message: str, file: str | None = None, where: str | None = None):
        if reason not in REASONS:
            raise AssertionError(f"unknown bad-sample reason {reason!r}")
        self.reason, self.detail, self.file, self.where = reason, message, file, where
        super().__init__(self._text())

    def __reduce__(self):
        return (BadSample, (self.reason, self.detail, self.file, self.where))

    def located(self, file: str | None, where: str | None) -> BadSample:
        if self.file is None:
            self.file, self.where = file, where
            self.args = (self._text(),)
        return self

    def record(self) -> dict:
        """The sample's line in `skipped.jsonl`."""
        return {"file": self.file, "where": self.where, "reason": self.reason, "message": self.detail}

    def _text(self) -> str:
        loc = f"{self.file}, {self.where}: " if self.file else ""
        return f"{loc}{self.reason}: {self.detail}"


class SkipReport:
    """Skipped samples: one record each (a sample found bad again, in a later epoch or on another rank, is
    counted once), counts by reason, and how many records the dataset files held (`read`)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.records: list[dict] = []
        self.read = 0
        self._seen: set = set()

    def add(self, err: BadSample) -> bool:
        """Count `err`'s sample; False when that sample was counted before."""
        return self.add_record(err.record())

    def add_record(self, record: dict) -> bool:
        if record["file"] is not None:
            key = (record["file"], record["where"])
            if key in self._seen:
                return False
            self._seen.add(key)
        self.records.append(record)
        self.counts[record["reason"]] += 1
        self.examples.setdefault(record["reason"], _text(record))
        return True

    def merge(self, other: SkipReport) -> None:
        for record in other.records:
            self.add_record(record)

    def has(self, file: str, where: str) -> bool:
        return (file, where) in self._seen

    @property
    def total(self) -> int:
        return len(self.records)

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": self.by_reason(), "first_example": dict(self.examples)}

    def by_reason(self) -> dict[str, int]:
        return {r: self.counts[r] for r in REASONS if self.counts[r]}

    def table(self) -> str:
        if not self.total:
            return "skipped samples: none"
        lines = [f"skipped samples: {self.total}", f"  {'reason':<28}{'count':>8}"]
        lines += [f"  {r:<28}{n:>8}" for r, n in self.by_reason().items()]
        return "\n".join(lines)

    def write(self, path: str) -> None:
        """Every record as one JSON line (written whole, then renamed: a reader never sees half a file)."""
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        os.replace(path + ".tmp", path)

    def load(self, path: str) -> None:
        """Add the records of a `skipped.jsonl` written by `write` (a resumed run keeps what it found)."""
        with open(path) as f:
            for line in f:
                if line.strip():
                    self.add_record(json.loads(line))


def _text(record: dict) -> str:
    loc = f"{record['file']}, {record['where']}: " if record["file"] else ""
    return f"{loc}{record['reason']}: {record['message']}"


def handle_bad(err: BadSample, policy: str, report: SkipReport) -> None:
    """Apply `on_bad_sample`: raise on 'error', else count the sample (once) and log the first few of its
    reason."""
    if policy == "error":
        raise err
    if not report.add(err):
        return
    n = report.counts[err.reason]
    if n <= LOG_FIRST:
        log.warning("skipping sample: %s", err)
    if n == LOG_FIRST:
        log.warning(
            "(%d samples skipped for %s: further ones are counted, not logged; the skip report lists them)",
            n,
            err.reason,
        )

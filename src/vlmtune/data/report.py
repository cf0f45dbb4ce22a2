"""Bad-input policy: every rejected sample is a `BadSample` naming file, line/index and reason.

With `on_bad_sample: skip` it is logged and counted in a `SkipReport`; with `error` it is raised.
"""

from __future__ import annotations

import logging
from collections import Counter

from vlmtune.errors import DataError

log = logging.getLogger("vlmtune.data")

# Reason keys, in the order the count table prints them.
REASONS = (
    "malformed_json",
    "bad_structure",
    "unknown_role",
    "empty_content",
    "no_assistant_turn",
    "placeholder_mismatch",
    "media_outside_dataset_dir",
    "missing_image",
    "corrupt_image",
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

    def _text(self) -> str:
        loc = f"{self.file}, {self.where}: " if self.file else ""
        return f"{loc}{self.reason}: {self.detail}"


class SkipReport:
    """Skipped samples by reason; `table()` prints the per-reason counts."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, str] = {}

    def add(self, err: BadSample) -> None:
        self.counts[err.reason] += 1
        self.examples.setdefault(err.reason, str(err))

    def merge(self, other: SkipReport) -> None:
        for k, v in other.counts.items():
            self.counts[k] += v
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "by_reason": dict(self.counts), "first_example": dict(self.examples)}

    def table(self) -> str:
        if not self.total:
            return "skipped samples: none"
        lines = [f"skipped samples: {self.total}", f"  {'reason':<28}{'count':>8}"]
        for r in REASONS:
            if self.counts[r]:
                lines.append(f"  {r:<28}{self.counts[r]:>8}")
        return "\n".join(lines)


def handle_bad(err: BadSample, policy: str, report: SkipReport) -> None:
    """Apply `on_bad_sample`: raise on 'error', else log the sample and count it."""
    if policy == "error":
        raise err
    log.warning("skipping sample: %s", err)
    report.add(err)

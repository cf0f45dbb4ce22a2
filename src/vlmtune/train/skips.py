"""What a run says about the samples it skipped, and the per-step agreement that carries it: one `SkipReport` for the whole run (read, measured and
decoded, on every rank), shared between the ranks, written to `output_dir/skipped.jsonl` (one line per
skipped sample: file, line or index, reason, message) and summed up at the end so that

    samples read = training samples + validation samples + skipped (+ unused: mix_ratios below 1)
"""

from __future__ import annotations

import os

from vlmtune.data import SkipReport
from vlmtune.errors import raise_on_all_ranks
from vlmtune.parallel.collectives import all_gather_object, all_reduce_host

SKIPPED_FILE = "skipped.jsonl"


class RunSkips:
    """The run's skip report and how much of it the ranks have already shared."""

    def __init__(self, output_dir: str, main: bool):
        self.report = SkipReport()
        self.path = os.path.join(output_dir, SKIPPED_FILE)
        self.main = main
        self.shared = 0  # records[:shared] are known to every rank

    def keep_previous(self) -> None:
        """A resumed run starts from the skips the interrupted one had found (decoded samples it passed)."""
        if os.path.exists(self.path):
            self.report.load(self.path)

    def pending(self) -> list[dict]:
        """Skips this rank found that the other ranks have not seen yet."""
        return self.report.records[self.shared :]

    def share(self, world: int) -> None:
        """Collective: every rank adds every other rank's pending skips (a sample counts once)."""
        if world > 1:
            for records in all_gather_object(self.pending()):
                for record in records:
                    self.report.add_record(record)
        self.shared = len(self.report.records)

    def agree(self, fetch, world: int):
        """`fetch()` (a rank-local step that can fail, such as reading micro-batches) on every rank, then one
        host all-reduce: if any rank failed every rank raises its error (no rank waits in the next
        collective for ever), and skips found since the last call are shared so every rank counts the same."""
        error = out = None
        try:
            out = fetch()
        except Exception as e:
            error = e
        if world == 1:
            if error is not None:
                raise error
            self.shared = len(self.report.records)
            return out
        failed, found = all_reduce_host([error is not None, len(self.pending())])
        if failed:
            raise_on_all_ranks(error)
        if found:
            self.share(world)
        return out

    def write(self) -> None:
        if self.main:
            self.report.write(self.path)

    def metrics(self) -> dict:
        return {"skipped_samples": self.report.total, "skipped_by_reason": self.report.by_reason()}

    def summary(self, train: list[dict], val: list[dict]) -> dict:
        """Counts of distinct samples: read, training, validation, skipped (by reason), unused."""
        r = self.report

        def usable(samples: list[dict]) -> int:
            keys = {(s["_file"], s["_where"]) for s in samples}
            return sum(1 for k in keys if not r.has(*k))

        out = {"read": r.read, "train": usable(train), "validation": usable(val), "skipped": r.total}
        out["unused"] = max(0, out["read"] - out["train"] - out["validation"] - out["skipped"])
        out["skipped_by_reason"] = r.by_reason()
        return out

    def summary_lines(self, counts: dict) -> list[str]:
        line = (
            f"samples: {counts['read']} read = {counts['train']} for training + {counts['validation']} for "
            f"validation + {counts['skipped']} skipped"
        )
        if counts["unused"]:
            line += f" + {counts['unused']} unused (mix_ratios)"
        lines = [line, self.report.table()]
        if counts["skipped"]:
            lines.append(f"every skipped sample (file, line, reason): {self.path}")
        return lines

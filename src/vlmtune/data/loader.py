"""Token-budget packing, a deterministic data-parallel sampler with exact mid-epoch resume, and the loader.

Lengths come from `lengths.measure_lengths` (media headers only, cached). Each epoch the samples are
packed first-fit-decreasing into micro-batches of at most `max_tokens` tokens (ties broken by a seeded
shuffle) and put in a seeded global order. That order is cut into step groups of G micro-batches (G = the
micro-batches of one optimizer step over all data-parallel ranks); each group is spread over the ranks with
equal counts and balanced token sums. What one optimizer step sees therefore depends on (seed, epoch, G)
only, not on the number of data-parallel ranks: a run can resume on another data-parallel size with the
same G and continue exactly. `state_dict()` = (epoch, micro-batches consumed by all ranks).
"""

from __future__ import annotations

import bisect
import logging
import random

import torch
from torch.utils.data import DataLoader, Dataset

from vlmtune.constants import IGNORE_INDEX
from vlmtune.errors import CheckpointError, DataError, VlmtuneError

from .batch import PackedBatch, pack
from .config import DataConfig
from .lengths import measure_lengths, reasons
from .report import BadSample, SkipReport, handle_bad
from .samples import sample_id
from .tables import fetch_all

log = logging.getLogger("vlmtune.data")


# ---------------------------------------------------------------------------------------------- packing


def first_fit_decreasing(items: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Bins of item ids with summed length <= budget; items taken longest first (stable for ties).

    A max-segment-tree over the bins' free space finds the first bin that fits in O(log n).
    """
    order = sorted(items, key=lambda i: -lengths[i])
    size = 1
    while size < max(1, len(order)):
        size *= 2
    free = [0] * (2 * size)  # unopened bins have 0 free space until opened
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        if free[1] >= need:
            node = 1
            while node < size:
                node = 2 * node if free[2 * node] >= need else 2 * node + 1
            b = node - size
        else:
            b = len(bins)
            bins.append([])
            node = b + size
            free[node] = budget
        bins[b].append(i)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pad_bins(bins: list[list[int]], lengths: list[int], multiple: int) -> list[list[int]]:
    """Bins split (or, with only single-sample bins left, the smallest repeated) until their count divides
    by `multiple`, so every rank steps in lockstep."""
    bins = [list(b) for b in bins]
    while len(bins) % multiple:
        multi = [k for k, b in enumerate(bins) if len(b) > 1]
        if multi:
            k = max(multi, key=lambda k: len(bins[k]))
            half = len(bins[k]) // 2
            bins.append(bins[k][half:])
            bins[k] = bins[k][:half]
        else:
            bins.append(list(min(bins, key=lambda b: lengths[b[0]])))
    return bins


def shard_bins(bins: list[list[int]], lengths: list[int], dp_size: int) -> list[list[list[int]]]:
    """Equal bin counts per rank with balanced tokens (after `pad_bins` to a multiple of dp_size)."""
    bins = pad_bins(bins, lengths, dp_size)
    quota = len(bins) // dp_size
    tokens = [sum(lengths[i] for i in b) for b in bins]
    ranks: list[list[list[int]]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for k in sorted(range(len(bins)), key=lambda k: -tokens[k]):
        r = min((r for r in range(dp_size) if len(ranks[r]) < quota), key=lambda r: load[r])
        ranks[r].append(bins[k])
        load[r] += tokens[k]
    _rebalance(ranks, [[sum(lengths[i] for i in b) for b in rank] for rank in ranks], load)
    return ranks


def _rebalance(ranks, tokens, load, rounds: int = 64) -> None:
    """Swap bins between the heaviest and the lightest rank while that narrows their gap."""
    for _ in range(rounds):
        hi = max(range(len(ranks)), key=lambda r: load[r])
        lo = min(range(len(ranks)), key=lambda r: load[r])
        gap = load[hi] - load[lo]
        if gap <= 0:
            return
        order = sorted(range(len(tokens[lo])), key=lambda k: tokens[lo][k])
        small = [tokens[lo][k] for k in order]
        best = None  # (new gap, x in hi, y in lo)
        for x, tx in enumerate(tokens[hi]):
            # moving tx - ty from hi to lo leaves a gap |gap - 2 (tx - ty)|: best ty is near tx - gap / 2
            j = bisect.bisect_left(small, tx - gap / 2)
            for jj in (j - 1, j):
                if 0 <= jj < len(small) and 0 < tx - small[jj] < gap:
                    cand = abs(gap - 2 * (tx - small[jj]))
                    if best is None or cand < best[0]:
                        best = (cand, x, order[jj])
        if best is None or best[0] >= gap:
            return
        _, x, y = best
        ranks[hi][x], ranks[lo][y] = ranks[lo][y], ranks[hi][x]
        tokens[hi][x], tokens[lo][y] = tokens[lo][y], tokens[hi][x]
        load[hi] += tokens[hi][x] - tokens[lo][y]
        load[lo] += tokens[lo][y] - tokens[hi][x]


# ---------------------------------------------------------------------------------------------- loader


class _BinDataset(Dataset):
    """dataset[bin] -> packed micro-batch. Nothing raised here crosses the worker boundary as an exception
    (DataLoader rebuilds those from their message): bad samples are dropped and, like any other VlmtuneError,
    travel in `batch.skipped` to the main process, which applies the policy."""

    def __init__(self, processor, samples, dataset_dir):
        self.processor, self.samples, self.dataset_dir = processor, samples, dataset_dir

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item: list[int]) -> PackedBatch:
        encoded, problems = [], []
        try:  # table rows: read each row group once for the whole micro-batch
            samples = fetch_all([self.samples[i] for i in item])
        except VlmtuneError as e:
            samples = [None] * len(item)
            problems.append(e)
        for i, sample in zip(item, samples):
            if sample is None:
                continue
            try:
                enc = self.processor.encode(sample, self.dataset_dir)
            except VlmtuneError as e:
                problems.append(e)
                continue
            enc["sample_id"] = sample_id(self.samples[i])
            encoded.append(enc)
        if not encoded:  # keep ranks in lockstep: a text-only sample that trains nothing
            enc = self.processor.encode(PLACEHOLDER_SAMPLE)
            enc["labels"] = torch.full_like(enc["labels"], IGNORE_INDEX)
            enc["sample_id"] = "(placeholder: every sample of this micro-batch was bad)"
            encoded.append(enc)
        batch = pack(encoded)
        batch.skipped = problems
        return batch


PLACEHOLDER_SAMPLE = {"messages": [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]}


def _identity(x):
    return x


class PackedLoader:
    """Iterates this rank's packed micro-batches, epoch after epoch; resumable mid-epoch."""

    def __init__(self, cfg, processor, samples, lengths, *, dp_rank, dp_size, seed, max_tokens, report):
        self.cfg, self.processor, self.samples, self.lengths = cfg, processor, samples, lengths
        self.dp_rank, self.dp_size, self.seed, self.max_tokens = dp_rank, dp_size, seed, max_tokens
        self.step_group = dp_size  # micro-batches per optimizer step over all ranks (set_step_group)
        self.skip_report = report
        self.valid = [i for i, n in enumerate(lengths) if n is not None]
        if not self.valid:
            raise DataError(
                f"none of the {len(samples)} samples is usable (skipped: {reasons(report)}); e.g. "
                f"{next(iter(report.examples.values()), '?')}"
            )
        self.epoch, self.batch_index = 0, 0
        self._plans: dict[int, list[list[int]]] = {}
        self._all_bins: dict[int, int] = {}

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of sample indices) for an epoch, in iteration order."""
        if epoch not in self._plans:
            rng = random.Random(f"{self.seed}:{epoch}")
            items = list(self.valid)
            rng.shuffle(items)
            bins = first_fit_decreasing(items, self.lengths, self.max_tokens)
            rng.shuffle(bins)
            g = self.step_group
            bins = pad_bins(bins, self.lengths, g)
            mine = []
            for start in range(0, len(bins), g):
                # Which rank gets which bin of a step changes nothing in the step's gradient.
                mine.extend(shard_bins(bins[start : start + g], self.lengths, self.dp_size)[self.dp_rank])
            self._plans = {epoch: mine}
            self._all_bins[epoch] = len(bins)
        return self._plans[epoch]

    def __len__(self) -> int:
        return len(self.epoch_plan(self.epoch))

    def fill_ratio(self) -> float:
        """Tokens of all valid samples / (micro-batches of all ranks * max_tokens)."""
        self.epoch_plan(self.epoch)
        total = sum(self.lengths[i] for i in self.valid)
        return total / (self._all_bins[self.epoch] * self.max_tokens)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_index = epoch, 0

    def set_step_group(self, micro_batches_per_step: int) -> None:
        """G: micro-batches of one optimizer step over all data-parallel ranks (a multiple of dp_size)."""
        if micro_batches_per_step < 1 or micro_batches_per_step % self.dp_size:
            raise ValueError(
                f"micro-batches per step ({micro_batches_per_step}) must be a positive multiple of the "
                f"data-parallel size {self.dp_size}"
            )
        if micro_batches_per_step != self.step_group:
            self.step_group = micro_batches_per_step
            self._plans, self._all_bins = {}, {}

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "global_index": self.batch_index * self.dp_size,  # micro-batches all ranks consumed this epoch
            "seed": self.seed,
            "dp_size": self.dp_size,
            "step_group": self.step_group,
            "max_tokens": self.max_tokens,
            "num_samples": len(self.samples),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position; a different data-parallel size works when the step group is the
        same and the position is a step boundary on the new ranks (checkpoints are saved between steps)."""
        for key in ("seed", "max_tokens", "num_samples", "step_group"):
            mine = self.state_dict()[key]
            if state.get(key, self.dp_size if key == "step_group" else None) != mine:
                raise CheckpointError(
                    f"cannot resume the data loader: checkpoint has {key}={state.get(key)}, this run has {mine}; "
                    "resume with the same data, seed, max_tokens and micro-batches per step"
                )
        global_index = int(state.get("global_index", int(state["batch_index"]) * int(state["dp_size"])))
        if global_index % self.dp_size:
            raise CheckpointError(
                f"cannot resume the data loader on {self.dp_size} data-parallel ranks: the checkpoint is "
                f"{global_index} micro-batches into the epoch, not a multiple of {self.dp_size}"
            )
        self.epoch, self.batch_index = int(state["epoch"]), global_index // self.dp_size

    def __iter__(self):
        plan = self.epoch_plan(self.epoch)
        dataset = _BinDataset(self.processor, self.samples, self.cfg.dataset_dir)
        workers = self.cfg.num_workers
        loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=plan[self.batch_index :],
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            collate_fn=_identity,
        )
        for batch in loader:
            for err in batch.skipped:
                if not isinstance(err, BadSample):
                    raise err  # not a sample's fault (a broken chat template, ...): stop with its message
                handle_bad(err, self.cfg.on_bad_sample, self.skip_report)
            batch.skipped = []
            self.batch_index += 1  # before yielding: a state_dict taken now points at the next batch
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0


def build_loader(
    cfg: DataConfig,
    processor,
    *,
    samples,
    max_tokens: int,
    seed: int = 42,
    dp_rank: int = 0,
    dp_size: int = 1,
    report: SkipReport | None = None,
):
    """Packed micro-batch loader for this data-parallel rank (see module docstring): micro-batches of at most
    `max_tokens` tokens (`train.micro_batch_tokens`), order seeded by `seed` (`train.seed`). Skipped samples
    are counted in `report` (default: a new one), also those found later while decoding."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
    report = SkipReport() if report is None else report
    lengths = measure_lengths(cfg, processor, samples, report, max_tokens)
    loader = PackedLoader(
        cfg,
        processor,
        samples,
        lengths,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        max_tokens=max_tokens,
        report=report,
    )
    log.info(
        "data: %d samples (%d skipped in all), %d micro-batches per epoch per rank, fill %.1f%% of %d tokens",
        len(loader.valid),
        report.total,
        len(loader),
        100 * loader.fill_ratio(),
        max_tokens,
    )
    return loader

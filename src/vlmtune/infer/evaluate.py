"""Evaluation on messages-format samples: token-mean loss and perplexity over the assistant tokens, and
optionally generated short answers scored against the reference (`generation/answers.py`: exact match,
contains match, token F1), generated in length-sorted, left-padded batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data.batch import MEDIA_KEYS
from vlmtune.data.report import BadSample
from vlmtune.errors import DataError
from vlmtune.generation.answers import DEFAULT_METRICS, check_metrics, reference_answer, score, summarize
from vlmtune.generation.batched import generate_batched

from .load import pad_token_id, stop_token_ids


@torch.no_grad()
def answer_token_loss(model, encoded: dict) -> tuple[float, int]:
    """(summed next-token cross-entropy over the labelled tokens, their count) for one processor output.

    Only the labelled positions go through the lm_head, so a long sample never builds `[L, vocab]` logits.
    """
    device = next(model.parameters()).device
    labels = encoded["labels"].reshape(-1)
    targets = labels[1:].to(device)
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return 0.0, 0
    media = {k: encoded[k].to(device) for k in MEDIA_KEYS if encoded.get(k) is not None}
    out = model(
        encoded["input_ids"].reshape(1, -1).to(device),
        position_ids=encoded["position_ids"].reshape(3, 1, -1).to(device),
        return_hidden=True,
        **media,
    )
    hidden = out.hidden_states[0, :-1][keep]
    logits = model.lm_head(hidden).float()
    return F.cross_entropy(logits, targets[keep], reduction="sum").item(), count


def evaluate(
    model,
    processor,
    samples: list[dict],
    *,
    dataset_dir: str | None = None,
    generate: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    metrics=DEFAULT_METRICS,
    eos_token_ids: list[int] | None = None,
    progress: bool = False,
    on_bad_sample: str = "error",
) -> dict:
    """Token-mean loss over every sample's assistant tokens (and `ppl = exp(loss)`); with `generate`, greedy
    answers to each sample's prompt (the conversation up to its last user turn), `batch_size` prompts at a
    time (sorted by length, left-padded: the answers equal one-at-a-time generation), scored against the
    assistant turn after it with `metrics` (`exact` -> `exact_match`, `contains` -> `contains_match`, `f1`).
    Returns `n`, `tokens`, `loss`, `ppl` and, with `generate`, each metric's mean and per-sample
    `predictions`. `on_bad_sample="skip"` leaves out samples the processor rejects (a corrupt image, ...)
    and lists them under `skipped`; "error" raises.
    """
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    if not samples:
        raise ValueError("evaluate: no samples")
    metrics = check_metrics(metrics)
    total, tokens, good, skipped = 0.0, 0, [], []
    for i, sample in enumerate(tqdm(samples, desc="eval loss", disable=not progress, unit="sample")):
        try:
            encoded = processor.encode(sample, dataset_dir=dataset_dir)
        except BadSample as e:
            if on_bad_sample == "error":
                raise
            skipped.append(str(e))
            continue
        loss_sum, n = answer_token_loss(model, encoded)
        if n == 0:
            raise DataError(f"{_where(sample, i)}: no assistant tokens to score")
        total += loss_sum
        tokens += n
        good.append(sample)
    if not good:
        raise DataError(f"evaluate: every sample was rejected, e.g. {skipped[0]}")
    loss = total / tokens
    report = {"n": len(good), "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 700.0))}
    if skipped:
        report["skipped"] = skipped
    if generate:
        eos = eos_token_ids
        eos = (
            eos
            if eos is not None
            else stop_token_ids(processor.tokenizer, getattr(model, "source_dir", None))
        )
        predictions = answer_samples(
            model, processor, good, dataset_dir=dataset_dir, max_new_tokens=max_new_tokens,
            batch_size=batch_size, eos_token_ids=eos, metrics=metrics, progress=progress,
        )  # fmt: skip
        report.update(summarize(predictions, metrics))
        report["predictions"] = predictions
    return report


def answer_samples(
    model,
    processor,
    samples,
    *,
    dataset_dir,
    max_new_tokens,
    batch_size,
    eos_token_ids,
    metrics,
    progress=False,
) -> list[dict]:
    """Greedy answers to every sample's prompt, each scored against its reference (`score`)."""
    refs = [reference_answer(s, where=_where(s, i)) for i, s in enumerate(samples)]
    prompts = [processor.encode(s, dataset_dir=dataset_dir, add_generation_prompt=True) for s in samples]
    with tqdm(total=len(samples), desc="eval generate", disable=not progress, unit="sample") as bar:
        outs = generate_batched(
            model, prompts, batch_size=batch_size, pad_token_id=pad_token_id(processor.tokenizer),
            max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
        )  # fmt: skip
        bar.update(len(samples))
    tokenizer = processor.tokenizer
    texts = [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outs]
    return [score(text, ref, metrics) for text, ref in zip(texts, refs)]


def _where(sample: dict, index: int) -> str:
    """`file:line` (or `file:index`) when the sample came from `load_samples`, else its position in the list."""
    if isinstance(sample, dict) and sample.get("_file"):
        return f"{sample['_file']} {sample.get('_where', '')}".strip()
    return f"sample {index}"

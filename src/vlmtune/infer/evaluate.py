"""Evaluation on messages-format samples: token-mean loss and perplexity over the assistant tokens, and
optionally exact-match / contains-match accuracy of generated short answers against the reference."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data.batch import MEDIA_KEYS
from vlmtune.data.report import BadSample
from vlmtune.data.samples import to_messages
from vlmtune.errors import DataError

from .generate import generate as generate_tokens
from .generate import left_pad
from .load import pad_token_id, stop_token_ids

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_TRAILING_PUNCT = ".!?,;:。！？"


def normalize_answer(text: str) -> str:
    """Lower case, no reasoning block, single spaces, no surrounding quotes or trailing punctuation."""
    text = _THINK.sub("", text)
    text = " ".join(text.split()).lower()
    return text.strip().strip("\"'").rstrip(_TRAILING_PUNCT).strip()


def reference_answer(sample: dict, where: str = "sample") -> str:
    """The answer to the sample's last user turn (the assistant turn after it), in either dataset format.

    The prompt for that answer is what `processor.encode(sample, add_generation_prompt=True)` builds: the
    conversation up to and including the last user turn.
    """
    messages, _, _ = to_messages(sample)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    answers = [
        m for m in messages[(last_user + 1 if last_user is not None else 0) :] if m["role"] == "assistant"
    ]
    if last_user is None or not answers:
        raise DataError(f"{where}: no assistant turn after the last user turn to use as the reference answer")
    return answers[0]["content"]


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
    eos_token_ids: list[int] | None = None,
    progress: bool = False,
    on_bad_sample: str = "error",
) -> dict:
    """Token-mean loss over every sample's assistant tokens (and `ppl = exp(loss)`); with `generate`, greedy
    answers to each sample's prompt (the conversation up to its last user turn) scored against the assistant
    turn after it: `exact_match` (normalised strings equal) and `contains_match` (normalised reference inside
    the answer). Returns `n`, `tokens`, `loss`, `ppl` and, with `generate`, the two accuracies and
    per-sample `predictions`. `on_bad_sample="skip"` leaves out samples the processor rejects (a corrupt
    image, ...) and lists them under `skipped`; "error" raises.
    """
    if on_bad_sample not in ("skip", "error"):
        raise ValueError(f"on_bad_sample must be 'skip' or 'error', got {on_bad_sample!r}")
    if not samples:
        raise ValueError("evaluate: no samples")
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
        report.update(
            _answer_accuracy(
                model, processor, good, dataset_dir, max_new_tokens, batch_size, eos_token_ids, progress
            )
        )
    return report


def _answer_accuracy(model, processor, samples, dataset_dir, max_new_tokens, batch_size, eos_ids, progress):
    tokenizer = processor.tokenizer
    eos_ids = (
        eos_ids if eos_ids is not None else stop_token_ids(tokenizer, getattr(model, "source_dir", None))
    )
    pad = pad_token_id(tokenizer)
    predictions = []
    bar = tqdm(total=len(samples), desc="eval generate", disable=not progress, unit="sample")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        prompts, refs = [], []
        for j, sample in enumerate(chunk):
            refs.append(reference_answer(sample, where=_where(sample, start + j)))
            prompts.append(processor.encode(sample, dataset_dir=dataset_dir, add_generation_prompt=True))
        outs = generate_tokens(
            model, left_pad(prompts, pad), max_new_tokens=max_new_tokens, eos_token_ids=eos_ids
        )
        for ref, out in zip(refs, outs):
            text = tokenizer.decode(out, skip_special_tokens=True).strip()
            pred, gold = normalize_answer(text), normalize_answer(ref)
            predictions.append(
                {
                    "reference": ref,
                    "prediction": text,
                    "exact": pred == gold,
                    "contains": bool(gold) and gold in pred,
                }
            )
        bar.update(len(chunk))
    bar.close()
    n = len(predictions)
    return {
        "exact_match": sum(p["exact"] for p in predictions) / n,
        "contains_match": sum(p["contains"] for p in predictions) / n,
        "predictions": predictions,
    }


def _where(sample: dict, index: int) -> str:
    """`file:line` (or `file:index`) when the sample came from `load_samples`, else its position in the list."""
    if isinstance(sample, dict) and sample.get("_file"):
        return f"{sample['_file']} {sample.get('_where', '')}".strip()
    return f"sample {index}"

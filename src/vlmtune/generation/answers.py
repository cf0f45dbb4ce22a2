"""Answers scored against references: the normalisation, the reference of a sample, and the metrics that
`vlmtune eval --generate` reports and the trainer logs (`eval.metrics`).

A sample's reference is the assistant turn after its last user turn; the prompt is the conversation up to
and including that user turn (what `processor.encode(sample, add_generation_prompt=True)` builds).
"""

from __future__ import annotations

import re
from collections import Counter

from vlmtune.data.samples import to_messages
from vlmtune.errors import DataError

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_TRAILING_PUNCT = ".!?,;:。！？"


def normalize_answer(text: str) -> str:
    """Lower case, no reasoning block, single spaces, no surrounding quotes or trailing punctuation."""
    text = _THINK.sub("", text)
    text = " ".join(text.split()).lower()
    return text.strip().strip("\"'").rstrip(_TRAILING_PUNCT).strip()


def reference_answer(sample: dict, where: str = "sample") -> str:
    """The answer to the sample's last user turn (the assistant turn after it), in either dataset format."""
    messages, _, _ = to_messages(sample)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    answers = [
        m for m in messages[(last_user + 1 if last_user is not None else 0) :] if m["role"] == "assistant"
    ]
    if last_user is None or not answers:
        raise DataError(f"{where}: no assistant turn after the last user turn to use as the reference answer")
    return answers[0]["content"]


def _exact(pred: str, gold: str) -> bool:
    return pred == gold


def _contains(pred: str, gold: str) -> bool:
    return bool(gold) and gold in pred


def _f1(pred: str, gold: str) -> float:
    """Harmonic mean of word precision and recall (SQuAD's token F1, on the normalised strings)."""
    p, g = pred.split(), gold.split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


# name -> (per-answer score on normalised strings, key of its mean in reports and logs)
METRICS = {
    "exact": (_exact, "exact_match"),
    "contains": (_contains, "contains_match"),
    "f1": (_f1, "f1"),
}
DEFAULT_METRICS = ("exact", "contains")


def check_metrics(metrics) -> list[str]:
    """The metric names, checked; a ValueError names the unknown ones and lists the known."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"unknown answer metric(s) {unknown or '(none given)'}; choose from {sorted(METRICS)}"
        )
    return list(metrics)


def score(prediction: str, reference: str, metrics=DEFAULT_METRICS) -> dict:
    """One answer: the reference, the prediction and each metric's value (`exact`: True / False, ...)."""
    pred, gold = normalize_answer(prediction), normalize_answer(reference)
    out = {"reference": reference, "prediction": prediction}
    out.update({name: METRICS[name][0](pred, gold) for name in metrics})
    return out


def summarize(scored: list[dict], metrics=DEFAULT_METRICS) -> dict:
    """Means of the per-answer values: `{"exact_match": ..., "contains_match": ..., "f1": ...}`."""
    n = max(len(scored), 1)
    return {METRICS[name][1]: sum(float(s[name]) for s in scored) / n for name in metrics}

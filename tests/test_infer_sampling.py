"""Logit processing equals transformers' processors (same order, same definitions)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from vlmtune.generation.sampling import SamplingOptions, choose_tokens, process_logits


def reference(logits, history, opts):
    scores = RepetitionPenaltyLogitsProcessor(opts.repetition_penalty)(history, logits.clone())
    if opts.greedy:
        return scores
    for warp in (
        TemperatureLogitsWarper(opts.temperature),
        TopKLogitsWarper(opts.top_k) if opts.top_k else None,
        TopPLogitsWarper(opts.top_p) if opts.top_p < 1 else None,
    ):
        if warp is not None:
            scores = warp(history, scores)
    return scores


@pytest.mark.parametrize(
    "opts",
    [
        SamplingOptions(),
        SamplingOptions(repetition_penalty=1.5),
        SamplingOptions(temperature=0.6, top_k=7),
        SamplingOptions(temperature=1.3, top_p=0.8),
        SamplingOptions(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.2),
        SamplingOptions(temperature=1.0, top_p=0.01),  # only the most likely token survives
    ],
)
def test_processed_logits_equal_transformers(opts):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 500, generator=g) * 3
    logits[0, :5] = logits[0, 10]  # ties at the top-k boundary
    history = torch.randint(0, 500, (3, 30), generator=g)
    seen = torch.zeros(3, 500, dtype=torch.bool).scatter_(1, history, True)
    ours = process_logits(logits, opts, seen)
    ref = reference(logits, history, opts)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = ~torch.isinf(ref)
    assert torch.allclose(ours[finite], ref[finite], rtol=0, atol=1e-6)


def test_greedy_is_argmax_after_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    seen = torch.tensor([[False, True, False]])
    assert choose_tokens(logits, SamplingOptions(), seen).tolist() == [1]
    assert choose_tokens(logits, SamplingOptions(repetition_penalty=1.1), seen).tolist() == [2]


def test_top_k_one_samples_the_argmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(3))
    opts = SamplingOptions(temperature=2.0, top_k=1)
    assert torch.equal(choose_tokens(logits, opts), logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_invalid_options_name_the_option(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SamplingOptions(**kwargs)

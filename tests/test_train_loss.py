"""Loss modes: chunked cross-entropy equals the full one, and gradient accumulation is exact."""

from __future__ import annotations

import pytest
import torch

from test_train_utils import grads, labels_of, max_rel_diff, pack, random_sample, small_vocab_model, step_loss
from vlmtune.parallel.loss import chunked_token_losses
from vlmtune.train.loss import (
    MicroBatchCounts,
    StepNormalizers,
    aux_loss_weight,
    count_labels,
    microbatch_loss,
    step_normalizers,
    token_weights,
)
from vlmtune.train.step import TrainModule


@pytest.fixture(scope="module")
def model64():
    return small_vocab_model(torch.float64)


@pytest.fixture(scope="module")
def samples():
    # Unequal lengths and label counts, one with an image: the three modes then give different gradients.
    return [
        random_sample(0, 20, answer=3, image=True),
        random_sample(1, 9, answer=6),
        random_sample(2, 30, answer=2),
        random_sample(3, 14, answer=8, image=True),
    ]


def step_grads(model, micro_batches, loss_type):
    root = TrainModule(model, chunk_size=5)
    model.zero_grad(set_to_none=True)
    loss = step_loss(root, micro_batches, loss_type)
    return loss, grads(model)


def test_chunked_ce_matches_full_logits(model64):
    torch.manual_seed(0)
    hidden = torch.randn(23, model64.args.text.hidden_size, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 1000, (23,))
    w = model64.lm_head.weight
    full = torch.nn.functional.cross_entropy(hidden @ w.t(), target, reduction="none")
    chunked = chunked_token_losses(hidden, w, target, chunk_size=4)
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-12)
    g_full = torch.autograd.grad(full.sum(), hidden)[0]
    g_chunk = torch.autograd.grad(chunked_token_losses(hidden, w, target, 4).sum(), hidden)[0]
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-12, atol=1e-12)


def test_token_mean_equals_model_loss(model64, samples):
    batch = pack(samples)
    ref = model64(**batch.model_inputs(), labels=labels_of(samples)).loss
    c = count_labels(batch)
    assert c.tokens == sum(int((s["labels"] != -100).sum()) for s in samples)  # shifted left by one
    assert c.samples == 4
    out = model64(**batch.model_inputs(), return_hidden=True)
    weights = token_weights(batch, c, step_normalizers([c]), "token_mean")
    ours = microbatch_loss(out.hidden_states, model64.lm_head.weight, batch, weights, 3)
    torch.testing.assert_close(ours.float(), ref, rtol=1e-6, atol=0)  # the model's loss is fp32


@pytest.mark.parametrize("loss_type", ["token_mean", "sample_mean"])
def test_accumulation_is_exact(model64, samples, loss_type):
    loss_a, g_a = step_grads(model64, [pack(samples)], loss_type)  # micro-batch 4, accumulation 1
    loss_b, g_b = step_grads(model64, [pack([s]) for s in samples], loss_type)  # 1, accumulation 4
    loss_c, g_c = step_grads(model64, [pack(samples[:2]), pack(samples[2:])], loss_type)
    assert loss_a == pytest.approx(loss_b, rel=1e-10) == pytest.approx(loss_c, rel=1e-10)
    assert max_rel_diff(g_b, g_a) <= 1e-6
    assert max_rel_diff(g_c, g_a) <= 1e-6


def test_sample_mean_is_mean_of_sample_means(model64, samples):
    loss, _ = step_grads(model64, [pack(samples)], "sample_mean")
    per_sample = []
    for s in samples:
        b = pack([s])
        c = count_labels(b)
        per_sample.append(step_grads(model64, [b], "token_mean")[0])
        assert c.samples == 1
    assert loss == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-10)


def test_microbatch_mean_differs_as_documented(model64, samples):
    mbs = [pack([s]) for s in samples]
    loss_mb, g_mb = step_grads(model64, mbs, "microbatch_mean")
    # Legacy behaviour: each micro-batch's own token mean, averaged over micro-batches ...
    means = [step_grads(model64, [b], "token_mean")[0] for b in mbs]
    assert loss_mb == pytest.approx(sum(means) / len(means), rel=1e-10)
    # ... which weights the tokens of short answers more than token_mean does, so gradients differ.
    loss_tok, g_tok = step_grads(model64, mbs, "token_mean")
    assert abs(loss_mb - loss_tok) > 1e-4
    assert max_rel_diff(g_mb, g_tok) > 1e-3
    # With one micro-batch the two modes coincide.
    assert step_grads(model64, [pack(samples)], "microbatch_mean")[0] == pytest.approx(
        step_grads(model64, [pack(samples)], "token_mean")[0], rel=1e-12
    )


def test_aux_loss_weights_average_over_the_step():
    counts = [MicroBatchCounts(tokens=3, samples=1), MicroBatchCounts(tokens=9, samples=3)]
    other_rank = [MicroBatchCounts(tokens=4, samples=2), MicroBatchCounts(tokens=0, samples=0)]
    norm = StepNormalizers(tokens=16, samples=6, microbatches=4)  # what the all-reduce gives for both ranks
    for mode in ("token_mean", "sample_mean", "microbatch_mean"):
        # The step's aux loss is a weighted mean of the per-forward ones.
        weights = [aux_loss_weight(c, norm, mode) for c in counts + other_rank]
        assert sum(weights) == pytest.approx(1.0)
    assert aux_loss_weight(counts[1], norm, "token_mean") == pytest.approx(9 / 16)
    assert aux_loss_weight(counts[1], norm, "sample_mean") == pytest.approx(3 / 6)


def test_moe_aux_loss_joins_the_loss_with_the_router_coefficient(samples):
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.25)
    model = small_vocab_model(torch.float64, moe=moe)
    assert model.args.text.router_aux_loss_coef == 0.25
    batch = pack(samples)
    c = count_labels(batch)
    norm = step_normalizers([c])
    w, aux_w = token_weights(batch, c, norm, "token_mean"), aux_loss_weight(c, norm, "token_mean")
    with torch.no_grad():
        total = TrainModule(model, 4, aux_coef=0.25)(batch, w, aux_w)
        lm_only = TrainModule(model, 4, aux_coef=0.0)(batch, w, aux_w)
        aux = model.aux_loss()
    assert aux is not None and float(aux) > 0
    assert float(total) == pytest.approx(float(lm_only) + 0.25 * float(aux), rel=1e-12)

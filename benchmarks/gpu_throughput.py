"""The throughput section of `benchmarks/gpu.py`: one training configuration, vlmtune against transformers.

Both sides: random init, float32 master weights with bf16 compute on CUDA, full activation checkpointing,
AdamW, gradient clipping at 1.0, one warm-up step then `ctx["steps"]` timed ones on the same micro-batch of
samples (an image and text each; labels on the answer text only). vlmtune trains them packed in one row
through the trainer's own step (`DataParallelStep`, FSDP2, chunked loss); transformers trains them as one
right-padded batch (sdpa attention, autocast bf16, `outputs.loss`, its default MoE experts). Tokens/s counts
real tokens only; MFU uses the same FLOPs per token for both (`vlmtune.train.metrics`).
"""

from __future__ import annotations

import time

import gpu_checks as checks
import torch

IMAGE, START, END = 151655, 151652, 151653
# (image rows, image cols) in patches per sample of a micro-batch; merged tokens = rows * cols / 4.
REAL_IMAGES = [(32, 32), (48, 32), (24, 40), (16, 16), (40, 40), (32, 24), (64, 32), (28, 36)]
TOY_IMAGES = [(4, 4), (4, 8)]


def samples(dry: bool) -> list[dict]:
    """The micro-batch: 16384 tokens in 8 samples (toy: 2 samples, 96 tokens), prompt text, an image, then
    the answer text, which alone is labelled."""
    from model_inputs import build_sample

    images, total, prompt = (TOY_IMAGES, 96, 8) if dry else (REAL_IMAGES, 16384, 32)
    lengths = checks.split_lengths(total, len(images), seed=1)
    out = []
    for i, ((h, w), n) in enumerate(zip(images, lengths)):
        answer = n - prompt - 2 - h * w // 4
        if answer < 8:
            raise ValueError(f"sample {i}: {n} tokens cannot hold a {h}x{w} image")
        s = build_sample([prompt, ("image", h, w), answer], seed=i)
        labels = torch.full_like(s["input_ids"], -100)
        labels[:, -answer:] = s["input_ids"][:, -answer:]
        s["labels"] = labels
        out.append(s)
    return out


def _flops_per_token(kind: str, sample_lengths, grids=()) -> float:
    """Model FLOPs per token of the measured micro-batch (train/flops.py: active experts, per-sample
    attention, the vision tower per image), all parameters trained."""
    from vlmtune.models.qwen3_vl import args_from_hf_dict
    from vlmtune.train.flops import flops_per_token

    return flops_per_token(args_from_hf_dict(checks.model_config(kind)), sample_lengths, grids=grids)


def _measure(step, ctx, rows: list[dict], kind: str) -> dict:
    """Run one warm-up and the timed steps on `rows` (the samples of one step); tokens/s, MFU and peak memory.
    Tokens are real (unpadded) tokens on both sides; MFU counts the model FLOPs of those samples."""
    from vlmtune.train.metrics import peak_tflops

    device = ctx["device"]
    step()
    checks.synchronize(device)
    t = time.perf_counter()
    for _ in range(ctx["steps"]):
        step()
    checks.synchronize(device)
    lengths = [s["input_ids"].shape[1] for s in rows]
    grids = [g for s in rows if s.get("image_grid_thw") is not None for g in s["image_grid_thw"].tolist()]
    tokens = sum(lengths)
    tps = tokens * ctx["steps"] / (time.perf_counter() - t)
    peak = peak_tflops(device, 0.0) * 1e12
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"tokens_per_s": tps, "mfu": tps * _flops_per_token(kind, lengths, grids) / peak if peak else None,
            "max_memory_allocated_gib": mem, "tokens_per_step": tokens}  # fmt: skip


@torch.no_grad()
def init_weights(model) -> None:
    """Random init after allocation: N(0, 0.02) matrices, ones for norm weights, zeros for biases."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)


def run_vlmtune(kind: str, ctx) -> dict:
    from vlmtune.models.qwen3_vl import args_from_hf_dict, build_model, materialize
    from vlmtune.parallel.fsdp import parallelize
    from vlmtune.train.config import TrainConfig
    from vlmtune.train.optim import build_optimizer
    from vlmtune.train.step import DataParallelStep, TrainModule, finish_step

    from model_inputs import as_packed_batch, packed_row

    info, device = ctx["info"], ctx["device"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(args_from_hf_dict(checks.model_config(kind)))
    root = TrainModule(model, chunk_size=4096, aux_coef=0.001 if model.args.is_moe else 0.0)
    precision = "bf16" if device.type == "cuda" else "fp32"
    parallelize(
        root, model, info, dtype=torch.float32, mixed_precision=precision, activation_checkpointing="full"
    )
    materialize(root, device)
    init_weights(model)
    optimizer = build_optimizer(model, TrainConfig())
    strategy = DataParallelStep(root, device, info.dp_size, info.dp_group)
    rows = samples(ctx["dry"])
    row = packed_row(rows)
    row["labels"] = torch.cat([s["labels"] for s in rows], dim=1)
    micro = [as_packed_batch(row)]

    def step():
        loss, tokens, labels = strategy.forward_backward(micro)
        finish_step(optimizer, micro, loss, tokens, labels, 1.0, "skip", 0)

    return _measure(step, ctx, rows, kind)


def padded_batch(rows: list[dict], device) -> dict:
    """The same samples as one right-padded batch, in transformers' keywords."""
    length = max(s["input_ids"].shape[1] for s in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(rows):
        n = s["input_ids"].shape[1]
        ids[i, :n], labels[i, :n], mask[i, :n] = s["input_ids"][0], s["labels"][0], 1
    batch = {
        "input_ids": ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": (ids == IMAGE).long(),
        "pixel_values": torch.cat([s["pixel_values"] for s in rows]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in rows]),
    }  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def run_transformers(kind: str, ctx) -> dict:
    from transformers import AutoConfig, AutoModelForImageTextToText

    device = ctx["device"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = checks.model_config(kind)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rows = samples(ctx["dry"])
    batch = padded_batch(rows, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = _measure(step, ctx, rows, kind)
    result["padded_tokens_per_step"] = int(batch["input_ids"].numel())
    result["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    return result

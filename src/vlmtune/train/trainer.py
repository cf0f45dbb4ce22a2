"""`vlmtune train`: data -> sharded model -> steps -> checkpoints, metrics and an HF export."""

from __future__ import annotations

import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmtune.models.qwen3_vl import load_config
from vlmtune.parallel.fsdp import build_sharded_model
from vlmtune.parallel.mesh import close_distributed, init_distributed
from vlmtune.parallel.pipeline import build_sharded_pipeline

from . import checkpoint
from .config import TrainConfig, TrainConfigError
from .freeze import apply_freeze
from .metrics import MetricsLogger, flops_per_token, peak_memory_gb, peak_tflops, plot
from .optim import Schedule, build_optimizer
from .step import TrainModule, eval_loss, pipeline_train_step, train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def accumulation_steps(cfg: TrainConfig, micro_batches_per_epoch: int, n_train: int, world: int) -> int:
    """Micro-batches per rank per optimizer step, derived from the global batch
    (`micro_batches_per_epoch` is this rank's count)."""
    t = cfg.train
    if t.global_batch_tokens:
        return max(1, round(t.global_batch_tokens / (t.micro_batch_tokens * world)))
    if t.global_batch_samples:
        per_micro = n_train / max(1, micro_batches_per_epoch * world)  # mean samples in a packed micro-batch
        return max(1, round(t.global_batch_samples / (per_micro * world)))
    return 1


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int, accum: int) -> int:
    if cfg.train.train_iters:
        return cfg.train.train_iters
    return max(1, math.ceil(cfg.train.epochs * max(1, micro_batches_per_epoch // accum)))


def _aux_coef(cfg: TrainConfig, model) -> float:
    """MoE aux-loss coefficient: configured, else the checkpoint's `router_aux_loss_coef` (0 for dense)."""
    return (
        cfg.loss.aux_loss_coef if cfg.loss.aux_loss_coef is not None else model.args.text.router_aux_loss_coef
    )


class _Stop:
    """SIGTERM sets the flag; the loop saves at the end of the current step (all ranks agree via all-reduce)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([float(self.requested)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _build_data(cfg: TrainConfig, rank: int, world: int):
    from vlmtune.data import build_loader, build_processor, load_samples

    processor = build_processor(cfg.model.init_from_hf, **cfg.data.processor_options())
    train_samples, val_samples, report = load_samples(cfg.data)
    if not train_samples:
        raise ValueError(f"data.dataset {cfg.data.dataset}: no training samples (skipped: {report.total})")
    kw = dict(dp_rank=rank, dp_size=world, seed=cfg.train.seed, max_tokens=cfg.train.micro_batch_tokens)
    loader = build_loader(cfg.data, processor, samples=train_samples, **kw)
    if cfg.eval.max_samples:
        val_samples = val_samples[: cfg.eval.max_samples]
    val_loader = build_loader(cfg.data, processor, samples=val_samples, **kw) if val_samples else None
    return processor, loader, val_loader, len(train_samples)


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary (final step, loss, paths)."""
    info = init_distributed(cfg.train.device, cfg.parallel, load_config(cfg.model.init_from_hf))
    try:
        return _train(cfg, info)
    finally:
        close_distributed()


def _train(cfg: TrainConfig, info) -> dict:
    rank, world, device = info.rank, info.world_size, info.device
    main = rank == 0
    seed_everything(cfg.train.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    # Ranks that differ only in tensor parallelism read the same data: shard by the data-parallel rank.
    processor, loader, val_loader, n_train = _build_data(cfg, info.dp_rank, info.dp_size)
    accum = accumulation_steps(cfg, len(loader), n_train, info.dp_size)
    # What one optimizer step trains on depends on the micro-batches per step, not on the data-parallel
    # size: a checkpoint resumes on another layout with the same data.
    loader.set_step_group(accum * info.dp_size)
    n_steps = total_steps(cfg, len(loader), accum)

    build = dict(
        dtype=getattr(torch, cfg.model.dtype),
        mixed_precision=cfg.train.mixed_precision,
        activation_checkpointing=cfg.model.activation_checkpointing,
        prepare=lambda m: apply_freeze(m, cfg.freeze),
    )
    pp = info.parallel.pp > 1
    if pp:
        _check_pipeline(cfg, load_config(cfg.model.init_from_hf), val_loader, accum)
        dp = info.dp_size
        pipe, stages = build_sharded_pipeline(
            cfg.model.init_from_hf,
            info,
            loss_fn=lambda out, weights: (out.float() * weights).sum() * dp,  # undo FSDP's dp average
            n_microbatches=accum,
            length=cfg.train.micro_batch_tokens,
            chunk_size=cfg.loss.chunk_size,
            **build,
        )
        root, model = stages[0], stages[0].model
    else:
        root, model = build_sharded_model(
            cfg.model.init_from_hf,
            lambda m: TrainModule(m, cfg.loss.type, cfg.loss.chunk_size, _aux_coef(cfg, m)),
            info,
            device,
            **build,
        )
    root.train()
    optimizer = build_optimizer(model, cfg)
    schedule = Schedule(optimizer, n_steps, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    step, consumed = 0, 0
    c = cfg.checkpoint
    # output_dir's own latest wins: a run started from checkpoint.load and later interrupted resumes itself.
    source = (checkpoint.latest(cfg.output_dir) if c.auto_resume else None) or c.load or None
    if source:
        path = checkpoint.resolve(source)
        meta = checkpoint.load(
            path,
            model=model,
            optimizer=optimizer,
            loader=loader,
            no_load_optim=c.no_load_optim,
            no_load_rng=c.no_load_rng,
            dp_rank=info.dp_rank,
            dp_size=info.dp_size,
        )
        # As in Megatron: the step count, schedule and data position continue; the flags only skip state.
        step, consumed = meta["step"], meta.get("consumed_samples", 0)
        if "schedule" in meta:  # absent in checkpoints converted from HF (`vlmtune convert`)
            schedule.load_state_dict(meta["schedule"])
        if main:
            print(f"resumed from {path} at step {step}", flush=True)

    logger = MetricsLogger(cfg.output_dir, cfg, rank=rank, resume_step=step)
    peak = peak_tflops(device, cfg.logging.peak_tflops) * 1e12
    fpt = flops_per_token(model)
    if pp:  # each stage holds part of the model
        t = torch.tensor([fpt], dtype=torch.float64)
        dist.all_reduce(t, group=info.mesh["pp"].get_group())
        fpt = float(t.item())
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop) if c.save_on_sigterm else None
    if main:
        print(
            f"training: {n_steps} steps, {accum} micro-batch(es) of <= {cfg.train.micro_batch_tokens} tokens "
            f"per rank per step, {world} rank(s), {n_trainable:,}/{n_params:,} parameters trainable",
            flush=True,
        )
        lp = info.parallel
        print(
            f"layout: pp {lp.pp} x dp_replicate {lp.dp_replicate} x dp_shard {lp.dp_shard} x tp {lp.tp} "
            f"(ep {lp.ep}); this rank's stage holds {len(model.language_model.layers)} decoder layer(s)"
            + (" and the vision tower" if model.visual is not None else ""),
            flush=True,
        )

    def save(at: int) -> None:
        meta = {"consumed_samples": consumed, "schedule": schedule.state_dict(), "config": cfg.to_dict()}
        checkpoint.save(
            cfg.output_dir, at, model=model, optimizer=optimizer, loader=loader, meta=meta,
            source_dir=cfg.model.init_from_hf, no_save_optim=c.no_save_optim, no_save_rng=c.no_save_rng,
            keep_last=c.keep_last, dp_rank=info.dp_rank, dp_size=info.dp_size,
        )  # fmt: skip

    batches = iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # the loader moved to the next epoch
            batches = iter(loader)
            return next(batches)

    bar = tqdm(total=n_steps, initial=step, disable=not (main and cfg.logging.progress_bar), unit="step")
    last = {}
    window_tokens, window_start = 0, time.perf_counter()
    start_step = step
    while step < n_steps:
        micro = [next_batch() for _ in range(accum)]
        lr = schedule.set(step)
        if pp:
            result = pipeline_train_step(
                pipe, stages, optimizer, micro, length=cfg.train.micro_batch_tokens, loss_type=cfg.loss.type,
                dp_size=info.dp_size, dp_group=info.dp_group, pp_group=info.mesh["pp"].get_group(),
                clip_grad=cfg.optim.clip_grad, on_nan=cfg.train.on_nan, step=step + 1,
            )  # fmt: skip
        else:
            result = train_step(
                root, optimizer, micro, device=device, dp_size=info.dp_size, dp_group=info.dp_group,
                clip_grad=cfg.optim.clip_grad, on_nan=cfg.train.on_nan, step=step + 1,
            )  # fmt: skip
        step += 1
        n_samples = torch.tensor([float(sum(len(b.get("sample_ids", [])) for b in micro))])
        if dist.is_initialized():
            dist.all_reduce(n_samples, group=info.dp_group)
        consumed += int(n_samples.item())
        window_tokens += result.tokens
        if step % cfg.logging.log_interval == 0 or step == n_steps:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            last = {
                "step": step,
                "loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens": result.tokens,
                "label_tokens": result.label_tokens,
                "consumed_samples": consumed,
                "tokens_per_s": tps,
                "mfu": (tps * fpt / world / peak) if peak > 0 else None,
                "peak_mem_gb": peak_memory_gb(device),
                "skipped": result.skipped,
            }
            logger.log(last)
            window_tokens, window_start = 0, time.perf_counter()
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if val_loader is not None and cfg.eval.interval and step % cfg.eval.interval == 0:
            _validate(root, val_loader, device, logger, step, info.dp_group)
        sigterm = stop.agreed()
        if (c.save_interval and step % c.save_interval == 0) or sigterm or step == n_steps:
            save(step)
        if sigterm:
            if main:
                print(
                    f"SIGTERM: saved step {step} to {cfg.output_dir}; rerun the same command to resume",
                    flush=True,
                )
            break
    bar.close()
    summary = {
        "step": step,
        "loss": last.get("loss"),
        "output_dir": cfg.output_dir,
        "steps_run": step - start_step,
    }
    if (
        val_loader is not None
        and step == n_steps
        and not (cfg.eval.interval and step % cfg.eval.interval == 0)
    ):
        summary["val_loss"] = _validate(root, val_loader, device, logger, step, info.dp_group)
    if step == n_steps and c.save_hf:
        hf_dir = os.path.join(cfg.output_dir, "hf")
        if pp:  # no rank holds the whole model: stream the checkpoint just saved
            from .convert import native_to_hf

            if main:
                native_to_hf(checkpoint.latest(cfg.output_dir), hf_dir)
            dist.barrier()
        else:
            from .export import export_model

            export_model(model, hf_dir, source_dir=cfg.model.init_from_hf)
        summary["hf"] = hf_dir
    logger.close()
    if main and os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
        try:
            summary["plot"] = plot(cfg.output_dir)
        except ImportError:
            print("no loss plot: `pip install matplotlib`, then `vlmtune plot OUTPUT_DIR`", flush=True)
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
    return summary


def _check_pipeline(cfg: TrainConfig, args, val_loader, accum: int) -> None:
    """What `parallel.pp > 1` does not support yet, said before anything runs."""
    p = cfg.parallel
    problems = []
    if p.pp_schedule != "1f1b":
        problems.append("parallel.pp_schedule: the trainer runs 1f1b (one stage per rank) for now")
    if p.tp > 1:
        problems.append("parallel.tp with parallel.pp: not combined yet; use pp with dp_shard / ep")
    if args.tie_word_embeddings:
        problems.append("tied embeddings (Qwen3-VL 2B/4B) span the first and last stage: not supported yet")
    if args.is_moe:
        problems.append("MoE router aux loss across stages: not supported yet (use ep / dp_shard)")
    if p.pp_microbatches and p.pp_microbatches != accum:
        problems.append(
            f"parallel.pp_microbatches={p.pp_microbatches}: the pipeline's micro-batches are the step's {accum} "
            "gradient-accumulation micro-batches (set it to 0, or change train.global_batch_tokens)"
        )
    if accum < p.pp:
        problems.append(
            f"{accum} micro-batch(es) per step cannot fill {p.pp} stages: raise train.global_batch_tokens to at "
            f"least {p.pp} x train.micro_batch_tokens per data-parallel rank"
        )
    if val_loader is not None:
        problems.append(
            "validation (eval.interval / data.val_*) under pipeline parallelism: not supported yet"
        )
    if cfg.loss.aux_loss_coef:
        problems.append("loss.aux_loss_coef under pipeline parallelism: not supported yet")
    if problems:
        raise TrainConfigError("parallel.pp > 1: " + "; ".join(problems))


def _validate(root, val_loader, device, logger, step, dp_group=None) -> float:
    root.eval()
    loss, tokens = eval_loss(root, list(iter(val_loader)), device, dp_group)
    root.train()
    logger.log({"step": step, "val_loss": loss, "val_tokens": tokens})
    return loss

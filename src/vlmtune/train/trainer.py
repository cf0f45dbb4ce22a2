"""`vlmtune train`: the Trainer — data -> sharded model -> steps -> checkpoints, metrics and an HF export.

`train(cfg)` checks everything the config alone decides (`run_setup.check_config`: parallel sizes against the
model, pipeline limits, LoRA targets) before any process group, data or weights; then a `Trainer` builds,
resumes, steps, validates, saves and finishes. The layout is chosen once, as a step strategy
(`DataParallelStep` or `PipelineStep`).
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch
from torch import nn
from tqdm import tqdm

from vlmtune.checkpoint import dcp as checkpoint
from vlmtune.checkpoint.convert import native_to_hf
from vlmtune.checkpoint.export import export_model
from vlmtune.checkpoint.lora import export_adapter
from vlmtune.data import build_loader, build_processor, load_samples
from vlmtune.errors import ConfigError, DataError, before_process_group, ranks_agree
from vlmtune.generation.tokens import pad_token_id, stop_token_ids
from vlmtune.models.qwen3_vl import ModelArgs, load_config
from vlmtune.parallel.collectives import all_reduce_host, barrier
from vlmtune.parallel.context import context_parallel, whole_sequences
from vlmtune.parallel.mesh import DistInfo, close_distributed, init_distributed, world_size
from vlmtune.parallel.pipeline_rank import rank_model

from .answer_eval import answer_on_ranks, answer_record, answerable, write_generations
from .build import build_sharded_model, build_sharded_pipeline
from .config import TrainConfig
from .flops import Trainable
from .freeze import apply_freeze
from .lora import LoraSetup, analytic_trainable
from .metrics import MetricsLogger, micro_batch_flops, peak_memory_gb, peak_tflops, plot
from .optim import Schedule, build_optimizer
from .qlora import build_quantized_model
from .run_setup import (
    accumulation_steps,
    aux_coef,
    check_config,
    make_output_dir,
    seed_everything,
    total_steps,
)
from .skips import RunSkips
from .step import DataParallelStep, PipelineStep, StepResult, TrainModule, finish_step

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns a summary (final step, loss, paths, sample counts)."""
    with before_process_group():  # every rank reads the same files and fails alike: one message
        args = load_config(cfg.model.init_from_hf)
        check_config(cfg, args, world_size())
        info = init_distributed(cfg.train.device, cfg.parallel, args)
    try:
        return Trainer(cfg, info, args).run()
    finally:
        close_distributed()


class StopRequest:
    """SIGTERM sets the flag; the loop saves at the end of the current step (all ranks agree)."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True

    def agreed(self) -> bool:
        return all_reduce_host([float(self.requested)], op="max")[0] > 0


class Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo, args: ModelArgs):
        self.cfg, self.info, self.args = cfg, info, args
        self.main = info.rank == 0
        self.step, self.consumed, self.accum = 0, 0, 1

    # ------------------------------------------------------------------------------------------ build
    def build_data(self) -> None:
        """Processor, samples and this data shard's loaders; the accumulation and the step count. Every
        skip (read, measured or later decoded) goes into the run's one report, `self.skips`."""
        cfg, info = self.cfg, self.info
        self.skips = RunSkips(cfg.output_dir, self.main)
        if cfg.checkpoint.auto_resume and checkpoint.latest(cfg.output_dir):
            self.skips.keep_previous()
        self.processor = build_processor(cfg.model.init_from_hf, cfg.data)
        report = self.skips.report
        train_samples, val_samples, _ = load_samples(cfg.data, seed=cfg.train.seed, report=report)
        if not train_samples:
            raise DataError(
                f"data.dataset {cfg.data.dataset}: no usable training samples ({report.read} read, "
                f"{report.total} skipped: {report.by_reason()}); e.g. {next(iter(report.examples.values()), '-')}"
            )
        # Ranks that differ only in tensor, context (or pipeline) parallelism read the same data shard.
        kw = dict(
            dp_rank=info.dp_rank, dp_size=info.dp_size, seed=cfg.train.seed,
            max_tokens=cfg.train.micro_batch_tokens, report=report,
        )  # fmt: skip
        self.loader = build_loader(cfg.data, self.processor, samples=train_samples, **kw)
        if cfg.eval.max_samples:
            val_samples = val_samples[: cfg.eval.max_samples]
        self.val_loader = (
            build_loader(cfg.data, self.processor, samples=val_samples, **kw) if val_samples else None
        )
        self.train_samples, self.val_samples = train_samples, val_samples
        self.skips.shared = len(report.records)  # reading and measuring gave every rank the same skips
        self.skips.write()
        self.accum = accumulation_steps(cfg, len(self.loader), len(train_samples), info.dp_size)
        # What one optimizer step trains on depends on the micro-batches per step, not on the data-parallel
        # size: a checkpoint resumes on another layout with the same data.
        self.loader.set_step_group(self.accum * info.dp_size)
        self.n_steps = total_steps(cfg, len(self.loader), self.accum)
        self._check_pipeline_fill()

    def _check_pipeline_fill(self) -> None:
        p = self.info.parallel
        if p.pp == 1:
            return
        if p.pp_microbatches and p.pp_microbatches != self.accum:
            raise ConfigError(
                f"parallel.pp_microbatches={p.pp_microbatches}: the pipeline's micro-batches are the step's "
                f"{self.accum} gradient-accumulation micro-batches (set it to 0, or change train.global_batch_tokens)"
            )
        if self.accum < p.pp or (p.pp_schedule == "interleaved" and self.accum % p.pp):
            need = "a multiple of" if p.pp_schedule == "interleaved" else "at least"
            raise ConfigError(
                f"{self.accum} micro-batch(es) per step cannot fill {p.pp} pipeline stages ({p.pp_schedule} needs "
                f"{need} pp): set train.global_batch_tokens to {need} {p.pp} x train.micro_batch_tokens per "
                "data-parallel rank"
            )

    def build_model(self) -> None:
        """The sharded model, its step strategy, the optimizer and the lr schedule."""
        cfg, info = self.cfg, self.info
        dtype = getattr(torch, cfg.model.dtype)
        self.lora = None
        if cfg.lora.rank:
            compute = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else dtype
            self.lora = LoraSetup(
                cfg, self.args, seed=cfg.train.seed, master_dtype=dtype, compute_dtype=compute
            )
        build = dict(
            dtype=dtype,
            mixed_precision=cfg.train.mixed_precision,
            activation_checkpointing=cfg.model.activation_checkpointing,
            compile=cfg.model.compile,
            prepare=lambda m: apply_freeze(m, cfg.freeze),
            lora=self.lora,
        )
        if info.parallel.pp > 1:
            pipe, stages, tied = build_sharded_pipeline(
                cfg.model.init_from_hf, info, n_microbatches=self.accum, length=cfg.train.micro_batch_tokens,
                chunk_size=cfg.loss.chunk_size, **build,
            )  # fmt: skip
            # The stages of this rank (several under the interleaved schedule), and one model over them.
            self.root, self.model = nn.ModuleList(stages), rank_model([s.model for s in stages])
            self.strategy = PipelineStep(
                pipe, stages, info, n_microbatches=self.accum, length=cfg.train.micro_batch_tokens,
                loss_type=cfg.loss.type, aux_coef=aux_coef(cfg, self.args), tied=tied,
            )  # fmt: skip
        else:
            coef, context = aux_coef(cfg, self.args), context_parallel(info, self.args)
            builder = build_quantized_model if cfg.lora.base_quant == "nf4" else build_sharded_model
            self.root, self.model = builder(
                cfg.model.init_from_hf, lambda m: TrainModule(m, cfg.loss.chunk_size, coef, context), info,
                **build,
            )  # fmt: skip
            self.strategy = DataParallelStep(
                self.root, info.device, info.dp_size, info.dp_group, cfg.loss.type, context
            )
        self.root.train()
        self.optimizer = build_optimizer(self.model, cfg)
        if isinstance(self.strategy, PipelineStep):
            self.strategy.exclude_tied_copy(self.optimizer)
        self.schedule = Schedule(self.optimizer, self.n_steps, cfg)

    def resume(self) -> None:
        """Continue from output_dir's own latest checkpoint (a run started from checkpoint.load and later
        interrupted resumes itself), else from checkpoint.load, else start fresh."""
        c = self.cfg.checkpoint
        with ranks_agree():
            source = (checkpoint.latest(self.cfg.output_dir) if c.auto_resume else None) or c.load or None
            path = checkpoint.resolve(source) if source else None
        if not path:
            return
        meta = checkpoint.load(
            path, model=self.model, optimizer=self.optimizer, loader=self.loader, no_load_optim=c.no_load_optim,
            no_load_rng=c.no_load_rng, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size,
            trainable_only=self.lora is not None,
        )  # fmt: skip
        # As in Megatron: the step count, schedule and data position continue; the flags only skip state.
        self.step, self.consumed = meta["step"], meta.get("consumed_samples", 0)
        if "schedule" in meta:  # absent in checkpoints converted from HF (`vlmtune convert`)
            self.schedule.load_state_dict(meta["schedule"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------------ loop
    def train_step(self, micro) -> StepResult:
        t = self.cfg.train
        loss, tokens, label_tokens = self.strategy.forward_backward(micro)
        pp_group = self.strategy.pp_group if isinstance(self.strategy, PipelineStep) else None
        result = finish_step(
            self.optimizer, micro, loss, tokens, label_tokens, self.cfg.optim.clip_grad, t.on_nan,
            self.step + 1, pp_group,
        )  # fmt: skip
        if isinstance(self.strategy, PipelineStep):
            self.strategy.after_step()
        self.step += 1
        # Samples and model FLOPs of the step over all data shards (tensor / pipeline ranks share theirs).
        trainable = Trainable.from_freeze(self.cfg.freeze)
        lora = self.lora.spec if self.lora is not None else None  # adapters as placed on the whole model
        flops = sum(micro_batch_flops(self.args, b, trainable, lora=lora) for b in micro)
        samples, result.flops = all_reduce_host(
            [sum(len(b.sample_ids) for b in micro), flops], self.info.dp_group
        )
        self.consumed += int(samples)
        return result

    def agreed(self, fetch):
        """`fetch()` (reading micro-batches) on every rank, agreed before the next collective."""
        return self.skips.agree(fetch, self.info.world_size)

    def validate(self) -> float:
        batches = self.agreed(lambda: list(iter(self.val_loader)))
        self.root.eval()
        loss, tokens = self.strategy.eval_loss(batches)
        self.root.train()
        self.logger.log({"step": self.step, "val_loss": loss, "val_tokens": tokens})
        if self.cfg.eval.generate:
            self.validate_answers()
        return loss

    def validate_answers(self) -> dict:
        """Greedy answers to the validation prompts, scored with eval.metrics and logged (eval.generate)."""
        c, tokenizer = self.cfg, self.processor.tokenizer
        pairs = answerable(self.val_samples, self.val_loader.valid, self.skips.report)
        self.root.eval()
        with whole_sequences(self.model):
            scored = answer_on_ranks(
                self.root, self.model, self.processor, pairs, info=self.info, eval_cfg=c.eval,
                dataset_dir=c.data.dataset_dir, eos=stop_token_ids(tokenizer, c.model.init_from_hf),
                pad=pad_token_id(tokenizer), agree=self.agreed,
            )  # fmt: skip
        self.root.train()
        record = answer_record(self.step, scored, c.eval.metrics)
        if self.main:
            write_generations(c.output_dir, self.step, scored)
        self.logger.log(record)
        return record

    def save(self) -> None:
        c = self.cfg.checkpoint
        meta = {
            "consumed_samples": self.consumed,
            "schedule": self.schedule.state_dict(),
            "config": self.cfg.to_dict(),
        }
        checkpoint.save(
            self.cfg.output_dir, self.step, model=self.model, optimizer=self.optimizer, loader=self.loader,
            meta=meta, source_dir=self.cfg.model.init_from_hf, no_save_optim=c.no_save_optim,
            no_save_rng=c.no_save_rng, keep_last=c.keep_last, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size,
            trainable_only=self.lora is not None,
        )  # fmt: skip
        self.skips.write()  # a resumed run continues from what was found up to here

    def _batches(self):
        """The loader's micro-batches, epoch after epoch."""
        while True:
            yield from self.loader

    def _announce(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        lp = self.info.parallel
        log.info(
            "training: %d steps, %d micro-batch(es) of <= %d tokens per rank per step, %d rank(s), %s/%s "
            "parameters trainable", self.n_steps, self.accum, self.cfg.train.micro_batch_tokens,
            self.info.world_size, f"{n_trainable:,}", f"{n_params:,}",
        )  # fmt: skip
        log.info(
            "layout: pp %d x dp_replicate %d x dp_shard %d x cp %d x tp %d (ep %d); this rank's stage holds %d "
            "decoder layer(s)%s", lp.pp, lp.dp_replicate, lp.dp_shard, lp.cp, lp.tp, lp.ep,
            len(self.model.language_model.layers),
            f" and {len(self.model.visual.blocks)} vision block(s)" if self.model.visual is not None else "",
        )  # fmt: skip
        if self.lora is not None:
            log.info(
                "LoRA rank %d on %d module(s): %s trainable parameters by the model's dimensions",
                self.lora.spec.rank, len(self.lora.linears) + len(self.lora.experts),
                f"{analytic_trainable(self.args, self.lora):,}",
            )  # fmt: skip

    def loop(self) -> dict:
        cfg, c = self.cfg, self.cfg.checkpoint
        peak = peak_tflops(self.info.device, cfg.logging.peak_tflops) * 1e12
        last, start_step = {}, self.step
        window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
        bar = tqdm(
            total=self.n_steps,
            initial=self.step,
            disable=not (self.main and cfg.logging.progress_bar),
            unit="step",
        )
        batches = self._batches()
        while self.step < self.n_steps:
            micro = self.agreed(lambda: [next(batches) for _ in range(self.accum)])
            lr = self.schedule.set(self.step)
            result = self.train_step(micro)
            window_tokens, window_flops = window_tokens + result.tokens, window_flops + result.flops
            if self.step % cfg.logging.log_interval == 0 or self.step == self.n_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                tps = window_tokens / elapsed
                # MFU: the model FLOPs that ran (train/flops.py), per GPU, over the device's peak.
                mfu = window_flops / elapsed / self.info.world_size / peak if peak > 0 else None
                last = self._log_step(result, lr, tps, mfu)
                window_tokens, window_flops, window_start = 0, 0.0, time.perf_counter()
                bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
            bar.update(1)
            if self.val_loader is not None and cfg.eval.interval and self.step % cfg.eval.interval == 0:
                self.validate()
            sigterm = self.stop.agreed()
            if (c.save_interval and self.step % c.save_interval == 0) or sigterm or self.step == self.n_steps:
                self.save()
            if sigterm:
                log.info(
                    "SIGTERM: saved step %d to %s; rerun the same command to resume",
                    self.step,
                    cfg.output_dir,
                )
                break
        bar.close()
        return {
            "step": self.step,
            "loss": last.get("loss"),
            "output_dir": cfg.output_dir,
            "steps_run": self.step - start_step,
        }

    def _log_step(self, result: StepResult, lr: float, tps: float, mfu: float | None) -> dict:
        record = {
            "step": self.step, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
            "tokens": result.tokens, "label_tokens": result.label_tokens, "consumed_samples": self.consumed,
            "tokens_per_s": tps, "mfu": mfu,
            "peak_mem_gb": peak_memory_gb(self.info.device), "skipped": result.skipped, **self.skips.metrics(),
        }  # fmt: skip
        self.logger.log(record)
        return record

    def finish(self, summary: dict) -> dict:
        """Final validation (unless the last step just ran one), the HF export and the loss plot."""
        cfg, done = self.cfg, self.step == self.n_steps
        if (
            self.val_loader is not None
            and done
            and not (cfg.eval.interval and self.step % cfg.eval.interval == 0)
        ):
            summary["val_loss"] = self.validate()
        if done and cfg.checkpoint.save_hf and self.lora is not None:
            # Adapters only, in PEFT format, from the checkpoint just saved (`vlmtune export` does the same).
            if self.main:
                summary["adapter"] = export_adapter(
                    checkpoint.latest(cfg.output_dir), os.path.join(cfg.output_dir, "adapter")
                )
            barrier()
        elif done and cfg.checkpoint.save_hf:
            hf_dir = os.path.join(cfg.output_dir, "hf")
            if self.info.parallel.pp > 1:  # no rank holds the whole model: stream the checkpoint just saved
                if self.main:
                    native_to_hf(checkpoint.latest(cfg.output_dir), hf_dir)
                barrier()
            else:
                export_model(self.model, hf_dir, source_dir=cfg.model.init_from_hf)
            summary["hf"] = hf_dir
        self.logger.close()
        summary["samples"] = self.skips.summary(self.train_samples, self.val_samples)
        self.skips.write()
        if self.main:
            for line in self.skips.summary_lines(summary["samples"]):
                log.info("%s", line)
        if self.main and os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl")):
            try:
                summary["plot"] = plot(cfg.output_dir)
            except ImportError:
                log.warning("no loss plot: `pip install matplotlib`, then `vlmtune plot %s`", cfg.output_dir)
        return summary

    def run(self) -> dict:
        """Each phase checks its own inputs on every rank, and the ranks agree before the next collective:
        bad input on one rank stops all of them with one message, never a hang."""
        seed_everything(self.cfg.train.seed)
        with ranks_agree():
            make_output_dir(self.cfg.output_dir)
            self.build_data()
        with ranks_agree():
            self.build_model()
        self.resume()
        with ranks_agree():  # rank 0 rewrites metrics.jsonl up to the resumed step
            self.logger = MetricsLogger(
                self.cfg.output_dir, self.cfg, rank=self.info.rank, resume_step=self.step
            )
        if self.main:
            self._announce()
        self.stop = StopRequest()
        previous = signal.signal(signal.SIGTERM, self.stop) if self.cfg.checkpoint.save_on_sigterm else None
        try:
            return self.finish(self.loop())
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

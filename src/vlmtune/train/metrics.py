"""What a run reports: metrics.jsonl, TensorBoard, optional W&B, the loss/lr plot, and an MFU estimate."""

from __future__ import annotations

import json
import os
import resource
import time

import torch

from vlmtune.data.batch import PackedBatch
from vlmtune.errors import VlmtuneError

from .flops import Trainable, model_flops, peak_tflops_for

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def peak_tflops(device: torch.device, configured: float) -> float:
    """The device's peak dense TFLOP/s: configured (`logging.peak_tflops`), else the GPU table of
    `train/flops.py` (0 for a GPU it does not know: no MFU), else a measured fp32 matmul on this CPU."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        return peak_tflops_for(torch.cuda.get_device_name(device)) or 0.0
    a = torch.randn(512, 512)
    a @ a  # warm up
    t = time.perf_counter()
    for _ in range(8):
        a @ a
    return 8 * 2 * 512**3 / (time.perf_counter() - t) / 1e12


def micro_batch_flops(args, batch: PackedBatch, trainable: Trainable, lora=None) -> float:
    """Model FLOPs (forward + backward) of one packed micro-batch, counted from its host-side shape: its
    samples' lengths, its images' and videos' grids and its label tokens (see `train/flops.py`)."""
    cu = batch.cu_seqlens.tolist()
    grids = [g for key in ("image_grid_thw", "video_grid_thw") if getattr(batch, key) is not None
             for g in getattr(batch, key).tolist()]  # fmt: skip
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return model_flops(
        args, lengths, grids, label_tokens=batch.num_label_tokens, trainable=trainable, lora=lora
    ).total


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Rank 0 writes; other ranks' calls are no-ops."""

    def __init__(self, output_dir: str, cfg, *, rank: int, resume_step: int = 0):
        self.output_dir, self.rank, self.cfg = output_dir, rank, cfg
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tb = self.wandb = None
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        truncate(self.path, resume_step)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional dependency (tensorboard)

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step + 1)
        if cfg.logging.wandb:
            import wandb  # optional dependency

            self.wandb = wandb.init(project=cfg.logging.wandb_project, dir=output_dir, config=cfg.to_dict())

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                if self.tb is not None:
                    self.tb.add_scalar(
                        f"train/{key}" if not key.startswith("val_") else f"val/{key[4:]}", value, step
                    )
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def truncate(path: str, step: int) -> None:
    """Drop records after `step` (a resumed run logs those steps again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


def read_metrics(output_dir: str) -> list[dict]:
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.exists(path):
        raise VlmtuneError(f"{path}: no metrics; is {output_dir!r} the output_dir of a training run?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


ANSWER_KEYS = ("val_exact_match", "val_contains_match", "val_f1")  # eval.generate's metrics (answer_eval.py)


def plot(output_dir: str, out: str | None = None) -> str:
    """Loss (and validation loss), the validation answer metrics (eval.generate) when logged, and lr
    against step, as a PNG; returns its path."""
    import matplotlib  # optional dependency, only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    answers = [r for r in records if "val_answers" in r]
    rows = 3 if answers else 2
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3 * rows), sharex=True)
    ax1, ax2 = axes[0], axes[-1]
    if answers:
        _answer_panel(axes[1], answers)
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax1.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = out or os.path.join(output_dir, PLOT_FILE)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _answer_panel(ax, records: list[dict]) -> None:
    for key in ANSWER_KEYS:
        if key in records[0]:
            ax.plot([r["step"] for r in records], [r[key] for r in records], "o-", label=key[4:])
    ax.set_ylabel("validation answers")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)

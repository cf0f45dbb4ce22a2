"""Helpers shared by the trainer tests (no tests here): random encoded samples and a packer for them."""

from __future__ import annotations

import torch

from vlmtune.data import pack as pack_samples
from vlmtune.models.qwen3_vl.rope import sample_positions
from vlmtune.train.step import DataParallelStep, finish_step

# Small-vocab models keep the full-vocab lm_head matmuls (and float64 gradient checks) fast.
SMALL_VOCAB = 1024
IMAGE_TOKEN = 1000


def small_vocab_model(dtype=torch.float64, seed: int = 0, **kwargs):
    """Random tiny Qwen3VL with a 1024-token vocabulary (vision tokens 1000..1003)."""
    from vlmtune.models.qwen3_vl import Qwen3VL, args_from_hf_dict
    from vlmtune.testing import tiny_config_dict

    cfg = tiny_config_dict(vocab_size=SMALL_VOCAB, **kwargs)
    cfg.update(image_token_id=1000, video_token_id=1001, vision_start_token_id=1002, vision_end_token_id=1003)
    torch.manual_seed(seed)
    model = Qwen3VL(args_from_hf_dict(cfg))
    for name, p in model.named_parameters():
        if "norm" not in name:  # default inits leave tiny models nearly linear; widen them a little
            torch.nn.init.normal_(p, std=0.05)
    return model.to(dtype)


def random_sample(seed: int, length: int, *, image: bool = False, answer: int = 4, vocab: int = 999) -> dict:
    """An encoded sample as the processor returns it: the last `answer` tokens are labelled.

    With `image=True` a 2x4-patch image (2 merged tokens) sits at the start of the sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (length,), generator=g)
    out = {}
    grids = []
    if image:
        grid = torch.tensor([[1, 2, 4]])
        ids[1:3] = IMAGE_TOKEN
        out["pixel_values"] = torch.randn(8, 1536, generator=g)
        out["image_grid_thw"] = grid
        grids = [tuple(grid[0].tolist())]
    labels = torch.full_like(ids, -100)
    labels[-answer:] = ids[-answer:]
    pos = sample_positions(
        ids, iter(grids), iter([]), image_token_id=IMAGE_TOKEN, video_token_id=1001, spatial_merge_size=2
    )
    out.update(input_ids=ids, labels=labels, position_ids=pos, sample_id=seed)
    return out


def pack(samples: list[dict]):
    """Encoded samples -> one packed micro-batch (`vlmtune.data.pack`: a PackedBatch)."""
    return pack_samples(samples)


def labels_of(samples: list[dict]) -> torch.Tensor:
    """The packed row's unshifted labels `[1, L]` (what transformers-style `labels=` takes)."""
    return torch.cat([s["labels"] for s in samples])[None]


def step_loss(root, micro_batches, loss_type: str = "token_mean", dp_size: int = 1, device="cpu"):
    """Accumulate one step's gradients through the data-parallel step strategy; returns its loss."""
    strategy = DataParallelStep(root, torch.device(device), dp_size, None, loss_type)
    return strategy.forward_backward(micro_batches)[0]


def run_step(
    root, optimizer, micro_batches, *, step: int, on_nan="stop", clip_grad=1.0, dp_size=1, device="cpu"
):
    """One optimizer step (accumulate, clip, step); returns the StepResult."""
    strategy = DataParallelStep(root, torch.device(device), dp_size)
    loss, tokens, label_tokens = strategy.forward_backward(micro_batches)
    return finish_step(optimizer, micro_batches, loss, tokens, label_tokens, clip_grad, on_nan, step)


def grads(module) -> dict[str, torch.Tensor]:
    """Full (unsharded) gradients by parameter name."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            out[name] = g.detach().clone()
    return out


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)) for k in a)


def make_run_checkpoint(out_dir: str) -> str:
    """A tiny random HF checkpoint with the real tokenizer, tied embeddings and a narrow width, so full
    training runs (checkpoints of model + optimizer every step) stay quick."""
    from vlmtune.testing import make_tiny_checkpoint

    make_tiny_checkpoint(
        out_dir, seed=0, text_hidden=32, text_layers=2, heads=2, kv_heads=1, head_dim=16,
        vision_hidden=32, vision_depth=2, deepstack=(0,), tie_word_embeddings=True,
    )  # fmt: skip
    return out_dir


def run_config(out, ckpt, data_dir, *, steps: int, keep_last: int = 2, **sections) -> dict:
    """A full `vlmtune train` config on the demo's VQA data (written by `make_dataset`), small and fast."""
    raw = {
        "output_dir": str(out),
        "model": {"init_from_hf": ckpt},
        "data": {"dataset": "train.json", "dataset_dir": data_dir, "num_workers": 0,
                 "image_min_pixels": 4096, "image_max_pixels": 9216},
        "train": {"train_iters": steps, "micro_batch_tokens": 300, "global_batch_tokens": 600, "seed": 3},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "checkpoint": {"save_interval": 1, "keep_last": keep_last, "save_hf": False},
        "logging": {"tensorboard": False, "progress_bar": False},
    }  # fmt: skip
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw

"""What `vlmtune verify` compares and when it passes: logits, loss and greedy tokens of two runs of the
same inputs, and a checkpoint against its re-saved copy, tensor by tensor.

Tolerances (`Tolerance`):
- fp32: logits within 1e-4 max-abs. Both implementations compute the same float32 operations, so what
  remains is summation order; that stays near 1e-5 at 8B widths (docs/verify.md).
- bf16: logits within 16 bf16 ulps at the largest reference logit (`2**(floor(log2 max|z|) - 3)`, i.e.
  1/16 to 1/8 of it) and mean-abs within `2**-5` of the mean |logit| (8x bf16's unit round-off `2**-8`).
  Every rounding of a bf16 activation may differ by one ulp between two implementations that fuse or order
  operations differently; the bound leaves room for that to compound over the layers, and is far below what
  a wrong rope section, norm or vision merge produces (an error of the order of the logits themselves).
- loss: within twice the max-abs bound: per token the cross-entropy's gradient with respect to the logits is
  `softmax - onehot`, whose L1 norm is at most 2, so `|dCE| <= 2 * max|dz|`.
- greedy tokens: equal for all N steps, or the first different token is a near tie: the reference's margin
  between its token and ours is within twice the max-abs bound (either logit may be off by the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tqdm import tqdm

from vlmtune.checkpoint.hf import checkpoint_files
from vlmtune.models.qwen3_vl import load_config
from vlmtune.models.qwen3_vl.state_dict_adapter import hf_to_native_name, recorded_layout, tensors_from_hf

FP32_MAX_ABS = 1e-4
BF16_MAX_ULPS_LOG2 = 3  # 2**(floor(log2 max|z|) - 3): 16 ulps of an 8-bit significand
BF16_MEAN_REL = 2.0**-5


@dataclass(frozen=True)
class Tolerance:
    dtype: str  # "fp32" | "bf16"

    def logits(self, ref: torch.Tensor) -> tuple[float, float]:
        """(max-abs bound, mean-abs bound) for logits compared with the reference logits `ref`."""
        if self.dtype == "fp32":
            return FP32_MAX_ABS, FP32_MAX_ABS
        top = float(ref.abs().max()) if ref.numel() else 0.0
        exponent = math.floor(math.log2(top)) if top > 0 else 0
        return 2.0 ** (exponent - BF16_MAX_ULPS_LOG2), BF16_MEAN_REL * float(ref.abs().mean())

    def describe(self) -> str:
        if self.dtype == "fp32":
            return f"max-abs <= {FP32_MAX_ABS:g}; loss <= {2 * FP32_MAX_ABS:g}"
        return (
            "max-abs <= 16 bf16 ulps at the largest |logit| (2**(floor(log2 max|z|) - 3)); "
            "mean-abs <= 2**-5 * mean|logit|; loss <= 2 * the max-abs bound"
        )


def token_mean_loss(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Next-token cross-entropy averaged over every labelled target of `rows` ((logits [L, V], labels [L]))."""
    total, count = 0.0, 0
    for logits, labels in rows:
        target = labels[1:].to(logits.device)
        total += float(F.cross_entropy(logits[:-1].float(), target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    return total / max(count, 1)


def compare_greedy(ours: dict, ref: dict, tie_bound: float) -> dict:
    """Tokens agreed on before the first difference (the smallest over the batch rows); a difference is
    excused when it is a near tie for the reference (see the module docstring)."""
    mine, theirs = ours["tokens"], ref["tokens"]
    steps = mine.shape[1]
    agree, ties, ok = steps, [], True
    for row in range(mine.shape[0]):
        n = min(steps, theirs.shape[1])
        same = (mine[row, :n] == theirs[row, :n]).tolist() + [False] * (steps - n)
        k = same.index(False) if False in same else steps
        agree = min(agree, k)
        if k == steps:
            continue
        if k >= theirs.shape[1]:
            ok = False
            continue
        step_logits = ref["step_logits"][row, k]
        margin = float(step_logits[theirs[row, k]] - step_logits[mine[row, k]])
        if margin <= tie_bound:
            ties.append(f"row {row} step {k}: near tie (margin {margin:.2g})")
        else:
            ok = False
    return {"agree": agree, "steps": steps, "ties": ties, "passed": ok}


def compare_records(kind: str, ours: dict, ref: dict, tol: Tolerance) -> dict:
    """One report row: logits max/mean-abs difference, loss difference, greedy agreement, PASS/FAIL."""
    a, b = ours["logits"].float(), ref["logits"].float()
    if a.shape != b.shape:
        return {
            "kind": kind,
            "passed": False,
            "failures": [f"logits shape {tuple(a.shape)} vs {tuple(b.shape)}"],
        }
    diff = a.sub(b).abs_()
    max_bound, mean_bound = tol.logits(b)
    row = {
        "kind": kind,
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_bound": max_bound,
        "mean_abs_bound": mean_bound,
        "loss": ours["loss"],
        "ref_loss": ref["loss"],
        "loss_diff": abs(ours["loss"] - ref["loss"]),
        "loss_bound": 2 * max_bound,
    }
    failures = []
    if not row["max_abs"] <= max_bound:  # `not <=` so that NaN fails
        failures.append(f"logits max-abs {row['max_abs']:.3g} > {max_bound:.3g}")
    if not row["mean_abs"] <= mean_bound:
        failures.append(f"logits mean-abs {row['mean_abs']:.3g} > {mean_bound:.3g}")
    if not row["loss_diff"] <= row["loss_bound"]:
        failures.append(f"loss differs by {row['loss_diff']:.3g} > {row['loss_bound']:.3g}")
    if "tokens" in ours and "tokens" in ref:
        greedy = compare_greedy(ours, ref, 2 * max_bound)
        row["greedy"] = greedy
        if not greedy["passed"]:
            failures.append(f"greedy tokens differ after {greedy['agree']} of {greedy['steps']}")
    row["failures"] = failures
    row["passed"] = not failures
    return row


# ------------------------------------------------------------------------------------------ round trip


def _tensor_files(path: str) -> dict[str, str]:
    out = {}
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            out.update({key: file for key in f.keys()})
    return out


def _read(file: str, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaNs included, -0.0 distinct from 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def compare_checkpoints(src: str, dst: str, progress: bool = False) -> dict:
    """Every tensor of HF checkpoint `src` against its re-saved copy `dst`, one pair in memory at a time.

    Tensors are compared in vlmtune's layout (`tensors_from_hf` on each side with that side's config), so a
    MoE checkpoint written by transformers 5 (experts transposed) is compared with its re-save in the hub
    layout value by value; every other tensor is compared as stored."""
    src_args, dst_args = load_config(src), load_config(dst)
    src_files, dst_files = _tensor_files(src), _tensor_files(dst)
    src_ctx, dst_ctx = {"checkpoint_dir": src}, {"checkpoint_dir": dst}
    mismatches, notes, count, nbytes = [], [], 0, 0
    for name in tqdm(sorted(src_files), desc="round trip", unit="tensor", disable=not progress):
        if name not in dst_files:
            if name == "lm_head.weight" and src_args.tie_word_embeddings:
                notes.append("lm_head.weight is tied to the embedding and not saved again")
            else:
                mismatches.append(f"{name}: missing from the re-saved checkpoint")
            continue
        a, b = _read(src_files[name], name), _read(dst_files[name], name)
        native = hf_to_native_name(name)
        pa = dict(tensors_from_hf(native, a, src_args, src_ctx))
        pb = dict(tensors_from_hf(native, b, dst_args, dst_ctx))
        if a.dtype != b.dtype:
            mismatches.append(f"{name}: dtype {a.dtype} re-saved as {b.dtype}")
        elif pa.keys() != pb.keys() or not all(bitwise_equal(pa[k], pb[k]) for k in pa):
            mismatches.append(f"{name}: values differ")
        count += 1
        nbytes += a.numel() * a.element_size()
    mismatches += [f"{n}: not in the source checkpoint" for n in sorted(dst_files.keys() - src_files.keys())]
    if src_args.is_moe:
        layouts = recorded_layout(src_args.hf_config)[0], recorded_layout(dst_args.hf_config)[0]
        if layouts[0] != layouts[1]:
            notes.append(
                f"expert tensors re-saved in the {layouts[1]} layout (source: {layouts[0] or 'by shape'})"
            )
    return {
        "tensors": count,
        "bytes": nbytes,
        "mismatches": mismatches,
        "notes": notes,
        "passed": not mismatches,
    }

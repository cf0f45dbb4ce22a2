"""Sparse mixture-of-experts MLP of Qwen3-VL-MoE (30B-A3B, 235B-A22B), its router loss and expert layouts.

Routing (as transformers 4.57 and 5.x): router logits in the activation dtype, softmax in fp32, top-k, the
k weights always renormalised to sum to 1 (`norm_topk_prob` is not read by transformers; neither by us).

Our expert parameters use the hub layout, `gate_up_proj [E, H, 2I]` and `down_proj [E, I, H]`: it is what
real checkpoints store (no transpose on load or save) and it is the `x @ W[e]` operand grouped GEMM takes.
transformers 5.x holds and saves the transpose; `state_dict_adapter.py` converts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextArgs

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
# Up to torch 2.10 the CPU grouped GEMM needs 16-byte aligned data; later releases take any pointer.
_CPU_NEEDS_ALIGNED = torch.torch_version.TorchVersion(torch.__version__) < "2.11"


@torch.compiler.assume_constant_result
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether PyTorch has a grouped GEMM kernel for `x`'s device and dtype (and these expert weights).
    Decided from devices, dtypes and shapes alone, so it traces under `torch.compile`."""
    if _grouped_mm is None:
        return False
    # Both kernels need every row stride to be a multiple of 16 bytes (bf16 LoRA experts of rank 4 are not).
    size = x.element_size()
    strides = x.shape[-1] * size % 16 == 0 and all(d * size % 16 == 0 for w in weights for d in w.shape[1:])
    if x.device.type == "cuda":
        # torch._grouped_mm alone (torch < 2.10) is Hopper-only; F.grouped_mm runs on sm80+. bf16 only.
        need = (8, 0) if hasattr(F, "grouped_mm") else (9, 0)
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return x.dtype == torch.bfloat16 and strides and _cuda_capability(index) >= need
    if x.device.type == "cpu":
        # The CPU kernel exists from torch 2.9 (F.grouped_mm from 2.10) and takes fp32 too, but the compiler's
        # shape function accepts bf16 only.
        if torch.compiler.is_compiling():
            return hasattr(F, "grouped_mm") and x.dtype == torch.bfloat16 and strides
        aligned = not _CPU_NEEDS_ALIGNED or all(t.data_ptr() % 16 == 0 for t in (x, *weights))
        return hasattr(F, "grouped_mm") and aligned and strides and x.dtype in (torch.float32, torch.bfloat16)
    return False


def count_per_expert(index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`[E]` int64 (token, expert) assignment counts of `index`. A scatter-add of fixed size: unlike
    `torch.bincount`, whose output size depends on the data, it never waits for the GPU."""
    flat = index.reshape(-1)
    return flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))


def swiglu_by_expert(
    rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor, *, grouped: bool
) -> torch.Tensor:
    """SwiGLU of rows already grouped by expert (`counts[e]` consecutive rows for expert e), `[R, H] -> [R, H]`:
    one grouped GEMM per projection, or one matmul per active expert. Idle experts cost nothing."""
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = _grouped_mm(rows, gate_up, offs=offs).chunk(2, dim=-1)
        return _grouped_mm(F.silu(gate) * up, down, offs=offs)
    # The fallback loop needs the sizes on the host (one sync); the grouped path never does.
    # split/unbind (not slicing): their backward writes one gradient tensor, not one per expert.
    sizes = counts.tolist()
    parts = []
    for r, w1, w2, c in zip(rows.split(sizes), gate_up.unbind(0), down.unbind(0), sizes):
        if c:
            gate, up = (r @ w1).chunk(2, dim=-1)
            parts.append((F.silu(gate) * up) @ w2)
    return torch.cat(parts) if parts else rows.new_zeros(0, down.shape[-1])


def expert_mlp(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    *,
    grouped: bool,
    swiglu=swiglu_by_expert,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_j weights[n, j] * SwiGLU_{index[n, j]}(x[n])` for `x [N, H]`; returns (out [N, H], counts [E]).

    The N*k (token, slot) pairs are sorted by expert so each expert sees one contiguous block of rows. The k
    results of a token are summed by a reduction (fp32 accumulation, deterministic), not an index_add.
    """
    n, k = index.shape
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: each expert's rows stay in token order
    counts = count_per_expert(flat, gate_up.shape[0])
    y = swiglu(x[order // k], gate_up, down, counts, grouped=grouped)
    y = y * weights.reshape(-1)[order, None]
    # Back to (token, slot) order, then sum the k slots of each token.
    y = torch.zeros_like(y).index_copy(0, order, y)
    return y.view(n, k, -1).sum(1).to(x.dtype), counts


class Experts(nn.Module):
    """E SwiGLU experts with gate and up fused, stored in the hub layout (see module docstring)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * intermediate))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        # None: grouped GEMM where the device supports it; True/False force a path (tests, benchmark).
        self.use_grouped_mm: bool | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=0.02)  # transformers' initializer_range default
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(self, x, index, weights):
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = grouped_mm_supported(x, self.gate_up_proj, self.down_proj)
        return expert_mlp(
            x, self.gate_up_proj, self.down_proj, index, weights, grouped=grouped, swiglu=self.swiglu
        )

    def swiglu(self, rows, gate_up, down, counts, *, grouped):
        """SwiGLU of rows grouped by expert; LoRA (lora.py's `LoRAExperts`) adds its per-expert adapters here."""
        return swiglu_by_expert(rows, gate_up, down, counts, grouped=grouped)


class SparseMoE(nn.Module):
    """Router + experts. After each forward:

    - `last_tokens_per_expert` [E] int64: (token, expert) assignments, for logging expert load;
    - `last_aux_loss`: this layer's share of the model's load-balancing loss, filled in by
      `load_balancing_loss` (`Qwen3VL.forward` runs it); the shares sum to the model's `aux_loss`.
    """

    def __init__(self, args: TextArgs):
        super().__init__()
        self.num_experts = args.num_experts
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size)
        self.last_tokens_per_expert: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None
        self._probs: torch.Tensor | None = None  # [N, E] fp32, until the model's aux loss consumed it
        self._index: torch.Tensor | None = None  # [N, k]
        self._rows_shape: tuple[int, int] = (0, 0)  # (B, L) of the last input

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (probs [N, E] fp32, top-k weights [N, k] in x.dtype, top-k expert index [N, k])."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        top, index = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return probs, top.to(x.dtype), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, weights, index = self.route(flat)
        out, counts = self.experts(flat, index, weights)
        # Inside backward this is an activation-checkpoint recompute: the forward already recorded this
        # routing, and holding the recomputed graph on the module would undo the checkpoint's memory saving.
        # (A compiled block recomputes inside its own backward graph, never through this Python code.)
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            self.last_tokens_per_expert = counts.detach()
            self.last_aux_loss = None  # set by `load_balancing_loss` (the model runs it after every forward)
            self._probs, self._index, self._rows_shape = probs, index, (shape[0], flat.shape[0] // shape[0])
        return out.view(shape)


def sparse_blocks(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def load_balancing_loss(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """The router aux loss of the model's last forward: transformers' `load_balancing_loss_func` (its
    `aux_loss` output; no `router_aux_loss_coef`, the trainer scales it). None for a dense model.

    `E * sum_e f_e * P_e`: `f_e` the top-k assignments to expert e and `P_e` its summed router probability,
    both pooled over all sparse layers and divided by the (layer, token) row count; `attention_mask` drops
    padding rows. Pooled, so not a sum of per-layer losses. Each block's `last_aux_loss` becomes its share
    (`P` of that layer alone; the shares sum to the total) and the per-token routing state is freed; a
    second call returns the total from the shares.
    """
    blocks = sparse_blocks(model)
    ran = [b for b in blocks if b._probs is not None]
    if not ran:
        shares = [b.last_aux_loss for b in blocks if b.last_aux_loss is not None]
        return torch.stack(shares).sum() if shares else None
    bsz, seq = ran[0]._rows_shape
    if attention_mask is None:
        w = None
    else:
        if attention_mask.ndim != 2 or attention_mask.shape[0] != bsz or attention_mask.shape[1] < seq:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not cover the {bsz}x{seq} routed tokens"
            )
        # With a KV cache the mask covers cached + new tokens; the routed rows are the last `seq`.
        w = attention_mask[:, -seq:].reshape(-1).to(ran[0]._probs.device, torch.float32)
    per_layer = [_layer_statistics(b, w) for b in ran]
    total = per_layer[0]
    for s in per_layer[1:]:
        total = total + s  # layer by layer, as `router_statistics` folds them across pipeline stages
    rows = (w.sum() if w is not None else torch.tensor(float(bsz * seq), device=total.device)) * len(ran)
    f = total[0].detach() / rows
    for b, s in zip(ran, per_layer):
        b.last_aux_loss = b.num_experts * (f * s[1] / rows).sum()
    return pooled_aux_loss(total, rows)


def _layer_statistics(block: SparseMoE, row_weights: torch.Tensor | None) -> torch.Tensor:
    """`[2, E]` fp32 of one layer's last forward: top-k assignments per expert (no gradient: they come from
    topk, as in transformers) and summed router probabilities, rows weighted by `row_weights [N]`. Frees
    the per-token routing state."""
    probs, index = block._probs, block._index
    w = row_weights if row_weights is not None else probs.new_ones(probs.shape[0])
    with torch.no_grad():
        assigned = probs.new_zeros(block.num_experts).scatter_add(
            0, index.reshape(-1), w.repeat_interleave(block.top_k)
        )
    block._probs = block._index = None
    return torch.stack([assigned, (probs * w[:, None]).sum(0)])


def router_statistics(
    model: nn.Module, row_weights: torch.Tensor | None = None, into: torch.Tensor | None = None
) -> torch.Tensor | None:
    """The load-balancing statistics of the sparse layers this model ran in its last forward, `[2, E]` fp32
    (assignments, summed probabilities; see `_layer_statistics`), added layer by layer onto `into` (the
    statistics of earlier pipeline stages). `row_weights [B*L]` (1 real token, 0 padding) drops rows. With
    `pooled_aux_loss` on the last stage this is `load_balancing_loss` of the whole model, summed in the same
    order. Frees the per-token routing state; returns `into` when no sparse layer ran."""
    total = into
    for b in sparse_blocks(model):
        if b._probs is not None:
            s = _layer_statistics(b, row_weights)
            total = s if total is None else total + s
    return total


def pooled_aux_loss(stats: torch.Tensor, rows: torch.Tensor | float) -> torch.Tensor:
    """`E * sum_e f_e * P_e` from the pooled `[2, E]` statistics and the (layer, token) row count."""
    f = stats[0].detach() / rows
    return stats.shape[1] * (f * stats[1] / rows).sum()


def tokens_per_expert(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: [E] assignment counts of the last forward} for every sparse layer (expert-load logging)."""
    return {
        name: m.last_tokens_per_expert
        for name, m in model.named_modules()
        if isinstance(m, SparseMoE) and m.last_tokens_per_expert is not None
    }

"""MoE layer forward+backward on CPU: our grouped paths vs a naive per-token loop vs transformers' experts.

    python benchmarks/bench_moe.py [--tokens 2048 --hidden 512 --inter 256 --experts 32 --top-k 4 --repeat 5] [--smoke]

Every variant runs the same router and weights (copied into transformers' block) on the same tokens; the
table prints the median fwd+bwd time and the ratio to our default path, and checks the outputs agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from vlmtune.models.qwen3_vl.config import TextArgs
from vlmtune.models.qwen3_vl.moe import SparseMoE, grouped_mm_supported


def naive_per_token(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Each (token, expert) pair as its own pair of matmuls: what a straightforward port does."""
    flat = x.reshape(-1, x.shape[-1])
    _, weights, index = block.route(flat)
    # unbind once: indexing gate_up_proj[e] per pair would add a full-size zero gradient per pair in backward
    gate_up, down = block.experts.gate_up_proj.unbind(0), block.experts.down_proj.unbind(0)
    rows = []
    for n in range(flat.shape[0]):
        acc = 0
        for j in range(index.shape[1]):
            e = int(index[n, j])
            gate, up = (flat[n] @ gate_up[e]).chunk(2)
            acc = acc + weights[n, j] * ((F.silu(gate) * up) @ down[e])
        rows.append(acc)
    return torch.stack(rows).view(x.shape)


def transformers_block(block: SparseMoE, args: TextArgs, impl: str):
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    cfg = Qwen3VLMoeTextConfig(
        hidden_size=args.hidden_size,
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
    )
    cfg._experts_implementation = impl
    ref = Qwen3VLMoeTextSparseMoeBlock(cfg)
    with torch.no_grad():
        ref.gate.weight.copy_(block.gate.weight)
        ref.experts.gate_up_proj.copy_(block.experts.gate_up_proj.transpose(1, 2))
        ref.experts.down_proj.copy_(block.experts.down_proj.transpose(1, 2))
    return ref


def fwd_bwd(fn, x: torch.Tensor, params) -> tuple[float, torch.Tensor]:
    for p in params:
        p.grad = None
    xi = x.detach().requires_grad_()
    t0 = time.perf_counter()
    out = fn(xi)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - t0, out.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256, help="moe_intermediate_size")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--naive-tokens", type=int, default=128, help="tokens for the per-token loop (slow)")
    ap.add_argument("--smoke", action="store_true", help="a tiny layer, one repeat: seconds (CI)")
    a = ap.parse_args()
    if a.smoke:
        a.tokens, a.hidden, a.inter, a.experts, a.top_k, a.repeat, a.naive_tokens = 256, 64, 32, 8, 2, 1, 16
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    args = TextArgs(
        vocab_size=1,
        hidden_size=a.hidden,
        intermediate_size=1,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=2,
        rope_theta=1.0,
        mrope_section=[1],
        num_experts=a.experts,
        num_experts_per_tok=a.top_k,
        moe_intermediate_size=a.inter,
    )
    block = SparseMoE(args)
    x = torch.randn(1, a.tokens, a.hidden)
    ours_params = list(block.parameters())

    def ours(path):
        def run(xi):
            block.experts.use_grouped_mm = path
            return block(xi)

        return run

    rows = []
    if grouped_mm_supported(x, block.experts.gate_up_proj, block.experts.down_proj):
        rows.append(("vlmtune grouped_mm (default here)", ours(True), ours_params, a.tokens))
    rows.append(("vlmtune sorted, one matmul per expert", ours(False), ours_params, a.tokens))
    rows.append(("naive per-token loop", lambda xi: naive_per_token(block, xi), ours_params, a.naive_tokens))
    for impl in ("eager", "grouped_mm"):
        ref = transformers_block(block, args, impl)
        rows.append((f"transformers 5.24 experts={impl}", ref, list(ref.parameters()), a.tokens))

    print(
        f"MoE layer fwd+bwd, CPU fp32, {torch.get_num_threads()} threads: tokens={a.tokens} hidden={a.hidden} "
        f"moe_intermediate={a.inter} experts={a.experts} top_k={a.top_k} (median of {a.repeat})"
    )
    print(f"{'variant':42s} {'ms':>10s} {'ms/1k tok':>10s} {'vs ours':>8s} {'max|out-ours|':>14s}")
    # Round-robin over the variants so a busy neighbour slows all of them alike; round 0 warms up.
    times: list[list[float]] = [[] for _ in rows]
    outs = [None] * len(rows)
    for r in range(a.repeat + 1):
        for v, (_, fn, params, tokens) in enumerate(rows):
            sec, outs[v] = fwd_bwd(fn, x[:, :tokens], params)
            if r:
                times[v].append(sec)
    base_ms = None
    for v, (name, _, _, tokens) in enumerate(rows):
        sec = statistics.median(times[v])
        per_k = 1000 * sec * 1000 / tokens
        base_ms = base_ms or per_k
        diff = (outs[v] - outs[0][:, :tokens]).abs().max().item()
        print(f"{name:42s} {sec * 1000:10.1f} {per_k:10.2f} {per_k / base_ms:7.2f}x {diff:14.2e}")


if __name__ == "__main__":
    main()

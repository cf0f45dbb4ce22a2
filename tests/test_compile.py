"""No host sync in a layer: one decoder layer (dense, and MoE without expert parallelism) and one vision block,
forward and backward on a packed row, under `torch.compile(fullgraph=True)` with AOTAutograd.

Since torch 2.13 Dynamo captures `.item()`, `int(tensor)`, `.tolist()` and data-dependent output shapes
(bincount, nonzero) into the graph as unbacked symbols instead of refusing them, so `backend="aot_eager"`
alone would pass a layer full of syncs. The backend here is aot_eager plus an inspection of the forward and
backward graphs: any `_local_scalar_dense` (a device -> host read) or unbacked symbol (a data-dependent shape)
fails the test. Both attention paths are checked: the CPU one (SDPA with the model's prebuilt mask) and the
CUDA one (varlen FlashAttention), the latter through a CPU stand-in for `varlen_attn` (a custom op, opaque
to the compiler exactly like the real kernel), so the layer code that feeds it runs as it does on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols

import vlmtune.models.qwen3_vl.attention as attention_mod
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.models.qwen3_vl.attention import build_mask
from vlmtune.models.qwen3_vl.moe import SparseMoE
from vlmtune.models.qwen3_vl.rope import text_rope_cos_sin, vision_rope_cos_sin
from vlmtune.models.qwen3_vl.text import DecoderLayer
from vlmtune.models.qwen3_vl.vision import VisionBlock, vision_segments
from vlmtune.parallel.fsdp import _recompute_in_backward, apply_compile
from vlmtune.testing import tiny_config_dict

MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=48, decoder_sparse_step=1)
LENGTHS = [5, 11, 8]  # a packed row of three samples
GRIDS = [[1, 4, 4], [2, 2, 4]]  # one image, one video of two frame-pairs: segments 16, 8, 8


def host_reads(gm: torch.fx.GraphModule) -> list[str]:
    """Nodes of an AOT graph that read a device value on the host or have a data-dependent shape."""
    bad = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if "_local_scalar_dense" in str(node.target) or (val is not None and free_unbacked_symbols(val)):
            code = [line for line in node.meta.get("stack_trace", "").splitlines() if line.strip(" ^")]
            bad.append(f"{node.target}: {code[-1].strip() if code else '?'}")
    return bad


def inspecting_backend(graphs: list):
    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


# -- a CPU stand-in for torch.nn.attention.varlen.varlen_attn: per-segment SDPA inside custom ops -------
CALLS = {"fwd": 0, "bwd": 0}


def _probs(q, k, causal: bool):
    """Softmax attention weights `[H, Lq, Lk]` of one segment (`[L, H, D]` inputs, k heads repeated)."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def _segment_bounds(cu: torch.Tensor, max_seqlen: int) -> list[tuple[int, int]]:
    bounds = cu.tolist()  # fine here: the real kernel reads cu_seqlens on the device, opaque to the compiler
    assert max(b - a for a, b in zip(bounds, bounds[1:])) == max_seqlen, "max_seqlen is not the longest"
    return list(zip(bounds, bounds[1:]))


def _segments(q, k, v, cu, max_seqlen: int, causal: bool):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = [
        torch.einsum("hqk,khd->qhd", _probs(q[a:b], k[a:b], causal), v[a:b])
        for a, b in _segment_bounds(cu, max_seqlen)
    ]
    return torch.cat(out)


@torch.library.custom_op("vlmtune_test::varlen", mutates_args=())
def _varlen_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool
) -> torch.Tensor:
    CALLS["fwd"] += 1
    return _segments(q, k, v, cu, max_seqlen, causal)


@_varlen_op.register_fake
def _(q, k, v, cu, max_seqlen, causal):
    return torch.empty_like(q)


@torch.library.custom_op("vlmtune_test::varlen_bwd", mutates_args=())
def _varlen_bwd(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    max_seqlen: int,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention's backward by hand (autograd does not record inside a custom op)."""
    CALLS["bwd"] += 1
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kr), torch.zeros_like(vr)
    for a, b in _segment_bounds(cu, max_seqlen):
        p, g = _probs(q[a:b], kr[a:b], causal), grad[a:b]
        dv[a:b] = torch.einsum("hqk,qhd->khd", p, g)
        dp = torch.einsum("qhd,khd->hqk", g, vr[a:b])
        ds = p * (dp - (dp * p).sum(-1, keepdim=True)) / q.shape[-1] ** 0.5
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kr[a:b])
        dk[a:b] = torch.einsum("hqk,qhd->khd", ds, q[a:b])
    fold = (k.shape[0], k.shape[1], rep, k.shape[2])  # sum the repeated heads' gradients back
    return dq, dk.view(fold).sum(2), dv.view(fold).sum(2)


@_varlen_bwd.register_fake
def _(grad, q, k, v, cu, max_seqlen, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu, max_seqlen, causal = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.max_seqlen, ctx.causal = max_seqlen, causal


def _backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    return (*_varlen_bwd(grad, q, k, v, cu, ctx.max_seqlen, ctx.causal), None, None, None)


_varlen_op.register_autograd(_backward, setup_context=_setup)


def cpu_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False):
    return _varlen_op(q, k, v, cu_q, max_q, tuple(window_size) == (-1, 0))


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Route packed attention to the CPU stand-in, as `attention()` routes it to FlashAttention on CUDA."""
    monkeypatch.setattr(attention_mod, "varlen_attn", cpu_varlen_attn)
    monkeypatch.setattr(attention_mod, "_VARLEN_ARGS", {"window_size", "enable_gqa"})
    monkeypatch.setattr(attention_mod, "uses_varlen", lambda x: True)
    CALLS.update(fwd=0, bwd=0)
    return CALLS


# -- the layers and their packed inputs ------------------------------------------------------------------
def text_layer(moe: bool):
    """MoE in bf16: the compiler's shape function of the grouped GEMM takes bf16 only (as the CUDA kernel)."""
    args = args_from_hf_dict(tiny_config_dict(vocab_size=1024, moe=MOE if moe else None))
    dtype = torch.bfloat16 if moe else torch.float32
    torch.manual_seed(0)
    layer = DecoderLayer(args.text, 0).to(dtype)
    assert isinstance(layer.mlp, SparseMoE) == moe
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    n = int(cu[-1])
    pos = torch.cat([torch.arange(m) for m in LENGTHS]).expand(3, 1, n)
    t = args.text
    cos, sin = text_rope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section, dtype)
    x = torch.randn(1, n, t.hidden_size, dtype=dtype)
    mask = build_mask(n, n, causal=True, attention_mask=None, cu_seqlens=cu, device=x.device)
    return layer, x, (cos, sin), dict(cu_seqlens=cu, max_seqlen=max(LENGTHS)), mask


def vision_block():
    args = args_from_hf_dict(tiny_config_dict(vocab_size=1024)).vision
    torch.manual_seed(0)
    block = VisionBlock(args)
    cu, max_seqlen = vision_segments(GRIDS, "cpu")
    cos, sin = vision_rope_cos_sin(
        torch.tensor(GRIDS), args.head_dim, args.rope_theta, args.spatial_merge_size
    )
    n = int(cu[-1])
    x = torch.randn(n, args.hidden_size)
    mask = build_mask(n, n, causal=False, attention_mask=None, cu_seqlens=cu, device=x.device)
    return block, x, (cos, sin), dict(cu_seqlens=cu, max_seqlen=max_seqlen), mask


def run(module, x, rope, packed, mask, compiled: bool, graphs: list | None = None):
    """Forward + backward; returns the output and every gradient (input and parameters)."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    fn = module
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(module, fullgraph=True, backend=inspecting_backend(graphs))
    if isinstance(module, VisionBlock):
        out = fn(x, *rope, packed["cu_seqlens"], mask, packed["max_seqlen"])
    else:
        out = fn(x, *rope, mask=mask, **packed)
    out.pow(2).sum().backward()
    return [out.detach(), x.grad, *[p.grad for p in module.parameters()]]


CASES = {
    "dense decoder layer": lambda: text_layer(moe=False),
    "MoE decoder layer": lambda: text_layer(moe=True),
    "vision block": vision_block,
}


@pytest.mark.parametrize("path", ["mask", "varlen"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_compiles_as_one_graph_without_host_reads(case, path, request):
    calls = request.getfixturevalue("varlen_on_cpu") if path == "varlen" else None
    module, x, rope, packed, mask = CASES[case]()
    mask = mask if path == "mask" else None  # callers build no mask where FlashAttention runs
    eager = run(module, x, rope, packed, mask, compiled=False)
    graphs: list = []
    compiled = run(module, x, rope, packed, mask, compiled=True, graphs=graphs)
    assert len(graphs) == 2, "expected one forward and one backward graph"
    assert [host_reads(g) for g in graphs] == [[], []]
    tol = dict(rtol=1e-5, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, **tol)
    if calls is not None:  # the packed path really ran through the varlen kernel, forward and backward
        assert calls["fwd"] >= 2 and calls["bwd"] >= 2


@pytest.mark.parametrize("sync", ["per-expert loop", "max_seqlen per call"])
def test_the_check_catches_a_host_read(sync, monkeypatch, varlen_on_cpu):
    """Negative controls, each must fail the check (by a compile error or a flagged node): the per-expert
    loop (the MoE fallback without a grouped GEMM) reads the expert counts on the host (`.tolist()`); the
    attention this issue replaced read the longest segment from `cu_seqlens` in every call (`int(max)`).
    (`torch.bincount`, the other replaced sync, is not visible here: the compiler sizes it by `minlength`;
    on CUDA its eager kernel syncs, which benchmarks/gpu.py counts with the sync debug mode.)"""
    module, x, rope, packed, mask = text_layer(moe=True)
    if sync == "per-expert loop":
        module.mlp.experts.use_grouped_mm = False
    else:
        varlen = attention_mod._varlen

        def old_varlen(q, k, v, cu, max_seqlen, causal):
            return varlen(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), causal)

        monkeypatch.setattr(attention_mod, "_varlen", old_varlen)
        mask = None
    graphs: list = []
    try:
        run(module, x, rope, packed, mask, compiled=True, graphs=graphs)
    except (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode) as e:
        assert "data-dependent" in str(e) or "data dependent" in str(e)
        return
    assert any(host_reads(g) for g in graphs)


def test_apply_compile_keeps_names_and_results():
    """`model.compile: true` compiles each block in place (eager backend on the CPU): the same parameter
    names, the same outputs."""
    module, x, rope, packed, mask = text_layer(moe=False)
    names = [n for n, _ in module.named_parameters()]
    eager = run(module, x, rope, packed, mask, compiled=False)

    class Holder(torch.nn.Module):  # `blocks()` walks a model's decoder layers and vision blocks
        def __init__(self, layer):
            super().__init__()
            self.visual = None
            self.language_model = torch.nn.Module()
            self.language_model.layers = torch.nn.ModuleDict({"0": layer})

    torch._dynamo.reset()
    apply_compile(Holder(module), backend="eager")
    assert [n for n, _ in module.named_parameters()] == names
    compiled = run(module, x, rope, packed, mask, compiled=False)  # module.forward is now compiled
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_checkpointed_moe_layer_compiles_and_records_its_routing_once():
    """Under full activation checkpointing the MoE layer's routing state is recorded by the forward and not
    again by the recompute in backward (as eagerly), and the layer still compiles as one graph without host
    reads, with the eager gradients."""
    module, x, rope, packed, mask = text_layer(moe=True)
    _recompute_in_backward(module)
    eager = run(module, x, rope, packed, mask, compiled=False)
    graphs: list = []
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True):
        fn = torch.compile(module, fullgraph=True, backend=inspecting_backend(graphs))
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        out = fn(leaf, *rope, mask=mask, **packed)
        assert module.mlp._probs is not None  # recorded by the forward
        module.mlp._probs = None
        out.pow(2).sum().backward()
    assert module.mlp._probs is None  # not recorded again by the recompute
    assert len(graphs) == 2 and [host_reads(g) for g in graphs] == [[], []]
    compiled = [out.detach(), leaf.grad, *[p.grad for p in module.parameters()]]
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_model_compile_through_fsdp_and_checkpointing_equals_eager(tmp_path):
    """`model.compile: true` end to end on the CPU (eager backend): a MoE model under FSDP2 with full
    activation checkpointing trains two steps with the losses of the uncompiled model."""
    from test_train_utils import pack, random_sample, run_step, small_vocab_model
    from vlmtune import save_pretrained
    from vlmtune.parallel.mesh import close_distributed, init_distributed
    from vlmtune.train.build import build_sharded_model
    from vlmtune.train.config import TrainConfig
    from vlmtune.train.optim import build_optimizer
    from vlmtune.train.step import TrainModule

    save_pretrained(small_vocab_model(torch.float32, moe=MOE), str(tmp_path))
    batches = [pack([random_sample(0, 40, image=True), random_sample(1, 30)]), pack([random_sample(2, 50)])]
    info = init_distributed("cpu")
    losses = {}
    try:
        for compile in (False, True):
            torch._dynamo.reset()
            root, model = build_sharded_model(
                str(tmp_path), lambda m: TrainModule(m, aux_coef=0.01), info,
                activation_checkpointing="full", compile=compile,
            )  # fmt: skip
            cfg = TrainConfig()
            cfg.optim.lr = 1e-3
            optimizer = build_optimizer(model, cfg)
            losses[compile] = [run_step(root, optimizer, batches, step=s).loss for s in range(2)]
    finally:
        close_distributed()
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_the_trainer_gives_every_attention_call_its_max_seqlen(varlen_on_cpu, caplog):
    """Through `TrainModule` (the trainer's forward), every decoder layer and vision block reaches the varlen
    kernel with the right host `max_seqlen` (the stand-in checks it against `cu_seqlens`), so none falls
    back to reading it from the device."""
    from test_train_utils import pack, random_sample, small_vocab_model, step_loss
    from vlmtune.train.step import TrainModule

    attention_mod._warn_once_max_seqlen.cache_clear()
    model = small_vocab_model(torch.float32)
    batch = pack([random_sample(0, 20, image=True), random_sample(1, 12), random_sample(2, 17)])
    step_loss(TrainModule(model, chunk_size=8), [batch])
    layers = len(model.language_model.layers) + len(model.visual.blocks)
    assert varlen_on_cpu == {"fwd": layers, "bwd": layers}
    assert "without max_seqlen" not in caplog.text

"""Qwen3-VL-MoE vs transformers' Qwen3VLMoeForConditionalGeneration (eager experts, fp32): logits, router
aux loss, gradients, both checkpoint expert layouts, export."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmtune import load_pretrained, save_pretrained
from vlmtune.errors import CheckpointError, ConfigError
from vlmtune.models.qwen3_vl import args_from_hf_dict
from vlmtune.models.qwen3_vl.moe import (
    SparseMoE,
    expert_mlp,
    load_balancing_loss,
    tokens_per_expert,
)
from vlmtune.models.qwen3_vl.state_dict_adapter import LAYOUT_KEY
from vlmtune.testing import make_tiny_checkpoint, tiny_config_dict

from model_inputs import build_sample, hf_kwargs, ours_kwargs, pad_batch

# hidden 64: 2I = 96 != H (every expert tensor's shape names its layout) and 2I = 64 == H (gate_up is square).
MOE = {
    "rect": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1]),
    "square": dict(num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
}
CASES = {
    "text": [17],
    "image": [5, ("image", 4, 6), 7],
    "video": [4, ("video", 2, 4, 4), 6],
}
COEF = 0.001


def max_abs(a, b):
    return (a - b).abs().max().item()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def as_hub_checkpoint(src: str, dst: str, transformers_version: str | None = "4.57.1") -> str:
    """Copy of a transformers-5 save with the expert tensors in the hub layout and the given config facts."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    state = load_file(file)
    for k, v in state.items():
        if ".mlp.experts." in k:
            state[k] = v.transpose(1, 2).contiguous()
    save_file(state, file, metadata={"format": "pt"})
    set_config_facts(dst, transformers_version)
    return dst


def set_config_facts(path: str, transformers_version: str | None, layout: str | None = None) -> None:
    cfg_file = os.path.join(path, "config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.pop("transformers_version", None)
    cfg.pop(LAYOUT_KEY, None)
    if transformers_version is not None:
        cfg["transformers_version"] = transformers_version
    if layout is not None:
        cfg[LAYOUT_KEY] = layout
    with open(cfg_file, "w") as f:
        json.dump(cfg, f, indent=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{kind: (transformers-5 save dir, hub-layout copy dir, transformers model)}."""
    out = {}
    for kind, moe in MOE.items():
        d = str(tmp_path_factory.mktemp(f"moe_{kind}"))
        hf = make_tiny_checkpoint(os.path.join(d, "t5"), seed=3, moe=moe, assets=False).eval()
        hub = as_hub_checkpoint(os.path.join(d, "t5"), os.path.join(d, "hub"))
        out[kind] = (os.path.join(d, "t5"), hub, hf)
    return out


@pytest.fixture(scope="module")
def models(ckpts):
    return {kind: load_pretrained(t5).eval() for kind, (t5, _, _) in ckpts.items()}


def test_sparse_layers_follow_config(models):
    kinds = {
        k: [type(layer.mlp).__name__ for layer in m.language_model.layers.values()] for k, m in models.items()
    }
    assert kinds["rect"] == ["SparseMoE", "MLP", "SparseMoE"]  # mlp_only_layers=[1]
    assert kinds["square"] == ["SparseMoE"] * 3


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", list(MOE))
def test_logits_and_aux_loss_match_transformers(ckpts, models, kind, case):
    hf, ours = ckpts[kind][2], models[kind]
    inputs = build_sample(CASES[case], seed=1)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs), labels=labels, output_router_logits=True)
        out = ours(**ours_kwargs(inputs), labels=labels)
    assert max_abs(out.logits, ref.logits) <= 1e-5
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6
    # transformers folds coef * aux into its loss; ours is the LM loss alone, aux separate for the trainer.
    lm_only = ref.loss - hf.config.text_config.router_aux_loss_coef * ref.aux_loss
    assert abs(out.loss.item() - lm_only.item()) <= 1e-6 * lm_only.item()


@pytest.mark.parametrize("side", ["left", "right"])
def test_aux_loss_drops_padding_as_transformers(ckpts, models, side):
    hf, ours = ckpts["rect"][2], models["rect"]
    inputs = pad_batch([build_sample(CASES["image"], 4), build_sample([9], 5)], side)
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs), output_router_logits=True)
        out = ours(**ours_kwargs(inputs))
    keep = inputs["attention_mask"].bool()
    assert max_abs(out.logits[keep], ref.logits[keep]) <= 1e-5
    assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-6


def test_layer_shares_sum_to_aux_loss_and_counts_match_routing(ckpts, models):
    hf, ours = ckpts["square"][2], models["square"]
    inputs = build_sample(CASES["image"], seed=2)
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs), output_router_logits=True)
        out = ours(**ours_kwargs(inputs))
    blocks = [m for m in ours.modules() if isinstance(m, SparseMoE)]
    shares = torch.stack([b.last_aux_loss for b in blocks])
    assert abs(shares.sum().item() - out.aux_loss.item()) <= 1e-6
    assert abs(ours.aux_loss().item() - out.aux_loss.item()) <= 1e-6  # a second call: same total
    counts = tokens_per_expert(ours)
    assert list(counts) == [f"language_model.layers.{i}.mlp" for i in range(3)]
    n = inputs["input_ids"].numel()
    for layer_counts, logits in zip(counts.values(), ref.router_logits):
        expected = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=5)
        assert torch.equal(layer_counts, expected) and int(layer_counts.sum()) == 2 * n


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "per_expert_loop"])
def test_gradients_match_transformers(ckpts, models, grouped):
    hf, ours = ckpts["rect"][2], models["rect"]
    for m in ours.modules():
        if hasattr(m, "use_grouped_mm"):
            m.use_grouped_mm = grouped
    inputs = build_sample([3, ("image", 4, 4), 5, ("video", 2, 4, 4), 4], seed=6)
    labels = inputs["input_ids"].clone()
    ours.zero_grad()
    hf.zero_grad()
    out = ours(**ours_kwargs(inputs), labels=labels)
    (out.loss + COEF * out.aux_loss).backward()
    hf.config.text_config.router_aux_loss_coef = COEF
    hf(**hf_kwargs(inputs), labels=labels, output_router_logits=True).loss.backward()
    ref = dict(hf.named_parameters())
    params = dict(ours.named_parameters())
    transposed = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")  # transformers 5 holds [E, out, in]
    for layer in ("0", "2"):
        for tail in ("mlp.gate.weight", *transposed, "self_attn.q_proj.weight"):
            name = f"language_model.layers.{layer}.{tail}"
            g, r = params[name].grad, ref["model." + name].grad
            if tail in transposed:
                r = r.transpose(1, 2)
            assert rel(g, r) <= 1e-4, name
    for name in (
        "language_model.layers.1.mlp.up_proj.weight",
        "visual.merger.linear_fc1.weight",
        "lm_head.weight",
    ):
        assert rel(params[name].grad, ref["model." + name if name != "lm_head.weight" else name].grad) <= 1e-4
    for m in ours.modules():
        if hasattr(m, "use_grouped_mm"):
            m.use_grouped_mm = None
    ours.zero_grad()
    hf.zero_grad()


def test_router_gradient_from_aux_loss_alone(ckpts, models):
    """The aux term's gradient reaches the router through the probabilities, as in transformers."""
    hf, ours = ckpts["square"][2], models["square"]
    inputs = build_sample([21], seed=8)
    ours.zero_grad()
    hf.zero_grad()
    ours(**ours_kwargs(inputs)).aux_loss.backward()
    hf(**hf_kwargs(inputs), output_router_logits=True).aux_loss.backward()
    for i in range(3):
        name = f"language_model.layers.{i}.mlp.gate.weight"
        g = dict(ours.named_parameters())[name].grad
        r = dict(hf.named_parameters())["model." + name].grad
        assert g.abs().sum() > 0 and rel(g, r) <= 1e-4
    ours.zero_grad()
    hf.zero_grad()


def test_activation_checkpoint_recompute_keeps_the_forward_routing(models):
    """Non-reentrant checkpointing: the recompute inside backward leaves the recorded routing alone, and the
    aux loss (computed outside the checkpointed block) still sends its gradient to the router."""
    from torch.utils.checkpoint import checkpoint

    block = models["rect"].language_model.layers["0"].mlp
    x = torch.randn(2, 5, 64)
    grads = []
    for use_checkpoint in (False, True):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        y = checkpoint(block, xi, use_reentrant=False) if use_checkpoint else block(xi)
        counts, probs = block.last_tokens_per_expert, block._probs
        aux = load_balancing_loss(block)
        (y.square().sum() + aux).backward()
        assert block.last_tokens_per_expert is counts and block._probs is None and probs is not None
        grads.append((xi.grad, block.gate.weight.grad.clone(), block.experts.down_proj.grad.clone()))
    for plain, ckpt in zip(*grads):
        assert torch.equal(plain, ckpt)
    block.zero_grad()


class ListCache:
    """Minimal KV cache (the protocol the model expects)."""

    def __init__(self):
        self.seq_len, self.kv = 0, {}

    def update(self, layer_idx, k, v):
        if layer_idx in self.kv:
            k = torch.cat([self.kv[layer_idx][0], k], 2)
            v = torch.cat([self.kv[layer_idx][1], v], 2)
        self.kv[layer_idx] = (k, v)
        return k, v


def test_cached_decode_step_matches_full_forward(models):
    ours = models["square"]
    ids = build_sample([12], seed=9)["input_ids"]
    pos = torch.arange(12).view(1, 1, -1).expand(3, 1, -1)
    cache = ListCache()
    with torch.no_grad():
        full = ours(ids, position_ids=pos)
        ours(ids[:, :11], position_ids=pos[..., :11], attention_mask=torch.ones(1, 11), cache=cache)
        cache.seq_len = 11
        step = ours(ids[:, 11:], position_ids=pos[..., 11:], attention_mask=torch.ones(1, 12), cache=cache)
    assert max_abs(step.logits[0, -1], full.logits[0, -1]) <= 1e-5
    assert step.aux_loss is not None  # over the one routed token: the mask's last column


# ------------------------------------------------------------------------------------------------------
# Expert compute paths


def naive_per_token(x, gate_up, down, index, weights):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(index.shape[1]):
            e = index[n, j]
            gate, up = (x[n] @ gate_up[e]).chunk(2)
            out[n] += weights[n, j] * ((torch.nn.functional.silu(gate) * up) @ down[e])
    return out


def test_grouped_and_loop_paths_equal_per_token_reference():
    g = torch.Generator().manual_seed(0)
    n, h, i, e, k = 37, 16, 24, 6, 2
    x = torch.randn(n, h, generator=g)
    gate_up = torch.randn(e, h, 2 * i, generator=g)
    down = torch.randn(e, i, h, generator=g)
    index = torch.randint(0, e - 1, (n, k), generator=g)  # the last expert gets no token
    index[:, 1] = (index[:, 0] + 1) % (e - 1)
    weights = torch.rand(n, k, generator=g)
    results = {}
    for name in ("grouped", "loop", "naive"):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
        if name == "naive":
            out = naive_per_token(leaves[0], leaves[1], leaves[2], index, leaves[3])
        else:
            out, counts = expert_mlp(
                leaves[0], leaves[1], leaves[2], index, leaves[3], grouped=name == "grouped"
            )
            assert counts.tolist() == torch.bincount(index.flatten(), minlength=e).tolist()
        out.backward(torch.randn(n, h, generator=torch.Generator().manual_seed(1)))
        results[name] = (out.detach(), *[t.grad for t in leaves])
    for name in ("grouped", "loop"):
        for got, want in zip(results[name], results["naive"]):
            assert max_abs(got, want) <= 1e-4 * want.abs().max().item()
        assert results[name][2][e - 1].abs().max() == 0  # idle expert: no work, no gradient


# ------------------------------------------------------------------------------------------------------
# Checkpoint layouts


def assert_same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize("kind", list(MOE))
def test_both_layouts_load_bitwise_identically(ckpts, models, kind):
    t5, hub, _ = ckpts[kind]
    with open(os.path.join(t5, "config.json")) as f:
        assert json.load(f)["transformers_version"].startswith("5.")
    assert_same_params(load_pretrained(hub), models[kind])


def test_ambiguous_layout_without_facts_is_refused(ckpts, tmp_path):
    hub = as_hub_checkpoint(ckpts["square"][0], str(tmp_path / "nofacts"), transformers_version=None)
    with pytest.raises(CheckpointError, match="identical in both expert layouts.*" + LAYOUT_KEY):
        load_pretrained(hub)


def test_ambiguous_layout_decided_by_our_metadata(ckpts, models, tmp_path):
    hub = as_hub_checkpoint(ckpts["square"][0], str(tmp_path / "ours"), transformers_version=None)
    set_config_facts(hub, None, layout="hub")
    assert_same_params(load_pretrained(hub), models["square"])


def test_facts_contradicted_by_a_tensor_are_refused(ckpts, tmp_path):
    """transformers 5 tensors under a 4.57 config: down_proj shows it, so the square gate_up is not trusted."""
    d = str(tmp_path / "lying")
    shutil.copytree(ckpts["square"][0], d)
    set_config_facts(d, "4.57.1")
    with pytest.raises(CheckpointError, match="cannot be checked by shape"):
        load_pretrained(d)


def test_unambiguous_shapes_decide_for_themselves(ckpts, models, tmp_path):
    d = as_hub_checkpoint(ckpts["rect"][0], str(tmp_path / "rect"), transformers_version=None)
    assert_same_params(load_pretrained(d), models["rect"])


def test_save_writes_hub_layout_and_metadata(models, tmp_path):
    out = str(tmp_path / "export_square")
    save_pretrained(models["square"], out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg[LAYOUT_KEY] == "hub" and "transformers_version" not in cfg
    state = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(out, name)))
    assert tuple(state["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape) == (5, 64, 64)
    assert tuple(state["model.language_model.layers.0.mlp.experts.down_proj"].shape) == (5, 32, 64)
    assert_same_params(load_pretrained(out), models["square"])  # square, decided by our metadata


def test_export_reloads_in_transformers_with_equal_logits(models, tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    ours = models["rect"]
    out = str(tmp_path / "export_rect")
    save_pretrained(ours, out)
    state = load_file(os.path.join(out, "model-00001-of-00001.safetensors"))
    assert tuple(state["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 64, 96)
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    inputs = build_sample(CASES["video"] + [("image", 4, 4), 2], seed=3)
    with torch.no_grad():
        ref = hf(**hf_kwargs(inputs), output_router_logits=True)
        got = ours(**ours_kwargs(inputs))
    assert max_abs(got.logits, ref.logits) <= 1e-5
    assert abs(got.aux_loss.item() - ref.aux_loss.item()) <= 1e-6
    # transformers re-saves in its own layout and writes transformers_version: that fact outranks our stale key.
    resaved = str(tmp_path / "resaved_by_transformers")
    hf.save_pretrained(resaved)
    with open(os.path.join(resaved, "config.json")) as f:
        cfg = json.load(f)
    assert cfg[LAYOUT_KEY] == "hub" and cfg["transformers_version"].startswith("5.")
    assert_same_params(load_pretrained(resaved), ours)


# ------------------------------------------------------------------------------------------------------
# Config


def test_num_local_experts_and_validation():
    cfg = tiny_config_dict(moe=dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=8))
    assert args_from_hf_dict(cfg).text.num_experts == 4
    cfg["text_config"]["num_experts"] = 6
    with pytest.raises(ConfigError, match="'num_experts' 6 contradicts 'num_local_experts' 4"):
        args_from_hf_dict(cfg)
    cfg = tiny_config_dict(moe=dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8))
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        args_from_hf_dict(cfg)
    cfg = tiny_config_dict(
        moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, norm_topk_prob=False)
    )
    with pytest.warns(UserWarning, match="norm_topk_prob"):
        args_from_hf_dict(cfg)


# ------------------------------------------------------------------------------------------------------
# GPU: the grouped GEMM kernel in bf16


@pytest.mark.gpu
def test_grouped_mm_bf16_on_cuda_matches_loop():
    from vlmtune.models.qwen3_vl.moe import grouped_mm_supported

    g = torch.Generator(device="cuda").manual_seed(0)
    n, h, i, e, k = 1000, 256, 128, 16, 4
    x = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    if not grouped_mm_supported(x):
        pytest.skip("this GPU has no bf16 grouped GEMM (needs sm80+)")
    gate_up = (torch.randn(e, h, 2 * i, device="cuda", generator=g) * 0.05).bfloat16()
    down = (torch.randn(e, i, h, device="cuda", generator=g) * 0.05).bfloat16()
    index = torch.rand(n, e, device="cuda", generator=g).topk(k, dim=-1).indices
    weights = torch.rand(n, k, device="cuda", generator=g).softmax(-1).bfloat16()
    grad = torch.randn(n, h, device="cuda", generator=g).bfloat16()
    results = []
    for grouped in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
        out, _ = expert_mlp(*leaves[:3], index, leaves[3], grouped=grouped)
        out.backward(grad)
        results.append([out.float(), *[t.grad.float() for t in leaves]])
    for got, want in zip(*results):
        assert rel(got, want) <= 2e-2

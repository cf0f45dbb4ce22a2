"""KV-cache generation vs transformers' `generate` (tiny fp32 model, real Qwen3 tokenizer) and vs the uncached
forward of our own model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vlmtune import load_pretrained
from vlmtune.infer import KVCache, SamplingOptions, generate, left_pad, stream
from vlmtune.testing import make_tiny_checkpoint, qwen_tokenizer_dir

IMAGE, VIDEO, IM_END, PAD = 151655, 151656, 151645, 151643


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    path, hf = tiny_ckpt
    return load_pretrained(path).eval(), hf.eval()


def chat_prompt(tok, text: str, *, image=None, video=None, seed: int = 0) -> dict:
    """A Qwen3-VL user turn + assistant header, vision blocks expanded by hand; random patches.

    `image=(h, w)` and `video=(t, h, w)` are grids in patch units (merged tokens = h * w / 4 per frame-pair).
    """
    g = torch.Generator().manual_seed(seed)
    blocks, media = "", {}
    if image is not None:
        h, w = image
        blocks += "<|vision_start|>" + "<|image_pad|>" * (h * w // 4) + "<|vision_end|>"
        media["pixel_values"] = torch.randn(h * w, 1536, generator=g)
        media["image_grid_thw"] = torch.tensor([[1, h, w]])
    if video is not None:
        t, h, w = video
        for i in range(t):  # one timestamped block per frame-pair
            blocks += f"<{i:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // 4) + "<|vision_end|>"
        media["pixel_values_videos"] = torch.randn(t * h * w, 1536, generator=g)
        media["video_grid_thw"] = torch.tensor([[t, h, w]])
    text = f"<|im_start|>user\n{blocks}{text}<|im_end|>\n<|im_start|>assistant\n"
    return {"input_ids": torch.tensor(tok(text)["input_ids"]), **media}


PROMPTS = {
    "text": dict(text="Hello there, how are you today?"),
    "image": dict(text="Describe this picture.", image=(4, 6)),
    "video": dict(text="What happens in the clip?", video=(3, 4, 2)),
}


def batch_of(tok, names_and_seeds) -> dict:
    prompts = [chat_prompt(tok, **PROMPTS[n], seed=s) for n, s in names_and_seeds]
    return left_pad(prompts, PAD)


MIXED = [("text", 1), ("image", 2), ("video", 3), ("image", 4)]


def hf_generate(hf, batch: dict, n: int, eos: int, **kw) -> torch.Tensor:
    ids = batch["input_ids"]
    ids = ids[None] if ids.ndim == 1 else ids
    types = (ids == IMAGE).long() + 2 * (ids == VIDEO).long()
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "position_ids")}
    with torch.no_grad():
        return hf.generate(
            input_ids=ids,
            mm_token_type_ids=types,
            **extra,
            max_new_tokens=n,
            eos_token_id=eos,
            pad_token_id=PAD,
            return_dict_in_generate=True,
            output_logits=True,
            **kw,
        )


def never_emitted(result, candidates=(IM_END, PAD, 0, 1, 2)) -> int:
    """A stop token none of the rows produced, so both sides run all `max_new_tokens` steps."""
    used = {t for row in result for t in row}
    return next(c for c in candidates if c not in used)


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_matches_transformers(models, tok, name):
    ours, hf = models
    prompt = chat_prompt(tok, **PROMPTS[name])
    got = generate(ours, prompt, max_new_tokens=12, eos_token_ids=[IM_END])
    eos = never_emitted(got)
    if eos != IM_END:
        got = generate(ours, prompt, max_new_tokens=12, eos_token_ids=[eos])
    ref = hf_generate(hf, prompt, 12, eos)
    assert len(got[0]) == 12
    assert got == ref.sequences[:, prompt["input_ids"].shape[0] :].tolist()
    # The step logits agree too, not just their argmax.
    steps = list(stream(ours, prompt, max_new_tokens=12, eos_token_ids=[eos]))
    for step, ref_logits in zip(steps, ref.logits, strict=True):
        assert (step.logits - ref_logits).abs().max().item() <= 1e-5


def test_left_padded_mixed_batch_matches_transformers(models, tok):
    ours, hf = models
    batch = batch_of(tok, MIXED)
    assert (batch["attention_mask"] == 0).any(), "prompts of different lengths must be padded"
    got = generate(ours, batch, max_new_tokens=10, eos_token_ids=[IM_END])
    eos = never_emitted(got)
    got = generate(ours, batch, max_new_tokens=10, eos_token_ids=[eos])
    ref = hf_generate(hf, batch, 10, eos)
    assert got == ref.sequences[:, batch["input_ids"].shape[1] :].tolist()


def test_rows_stop_at_their_eos_like_transformers(models, tok):
    ours, hf = models
    batch = batch_of(tok, MIXED)
    free = generate(ours, batch, max_new_tokens=10, eos_token_ids=[])
    eos = free[1][3]  # row 1 stops after 3 tokens; other rows stop wherever they meet it, or run out
    got = generate(ours, batch, max_new_tokens=10, eos_token_ids=[eos])
    ref = hf_generate(hf, batch, 10, eos).sequences[:, batch["input_ids"].shape[1] :].tolist()
    for row, (g, r) in enumerate(zip(got, ref)):
        cut = r.index(eos) if eos in r else len(r)  # transformers keeps the eos, then pads
        assert g == r[:cut], f"row {row}"
        assert g == free[row][: len(g)]
    assert len(got[1]) == 3
    assert max(len(g) for g in got) == 10, "other rows keep generating after row 1 stopped"


def test_cached_decode_logits_equal_uncached_forward(models, tok):
    """At every step each active row's cached logits equal a full forward over prompt + generated tokens;
    a stop token mid-way drops a row from the cache, which must not disturb the others."""
    ours, _ = models
    batch = batch_of(tok, MIXED)
    free = generate(ours, batch, max_new_tokens=8, eos_token_ids=[])
    eos = free[2][2]
    generated = [[] for _ in MIXED]
    checked_rows = set()
    for step in stream(ours, batch, max_new_tokens=8, eos_token_ids=[eos]):
        n = len(generated[int(step.rows[0])])  # rows still active have all generated n tokens so far
        ids = torch.cat([batch["input_ids"], _fill(generated, n)], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(MIXED), n, dtype=torch.long)], dim=1)
        media = {
            k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        }
        with torch.no_grad():
            full = ours(ids, attention_mask=mask, **media).logits[:, -1]
        for i, row in enumerate(step.rows.tolist()):
            assert (step.logits[i] - full[row]).abs().max().item() <= 1e-5, f"row {row}, step {n}"
            checked_rows.add(row)
            generated[row].append(int(step.tokens[i]))
    assert checked_rows == set(range(len(MIXED)))
    assert len(generated[2]) == 3 and max(len(g) for g in generated) == 8


def _fill(generated, n) -> torch.Tensor:
    """Finished rows are absent from later steps; give them dummy tokens so the full batch stays rectangular
    (their logits are not compared)."""
    return torch.tensor([g + [PAD] * (n - len(g)) for g in generated], dtype=torch.long).view(
        len(generated), n
    )


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny_moe"))
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, mlp_only_layers=[1])
    hf = make_tiny_checkpoint(d, seed=3, moe=moe, assets=False).eval()
    return load_pretrained(d).eval(), hf


def test_moe_batch_matches_transformers_and_uncached_forward(moe_models, tok):
    """The generator only calls `model.forward`: the MoE model decodes like transformers' Qwen3-VL-MoE."""
    ours, hf = moe_models
    assert any(type(layer.mlp).__name__ == "SparseMoE" for layer in ours.language_model.layers.values())
    batch = batch_of(tok, MIXED)
    eos = never_emitted(generate(ours, batch, max_new_tokens=8, eos_token_ids=[]))
    steps = list(stream(ours, batch, max_new_tokens=8, eos_token_ids=[eos]))
    got = torch.stack([s.tokens for s in steps], 1)
    ref = hf_generate(hf, batch, 8, eos)
    assert torch.equal(got, ref.sequences[:, batch["input_ids"].shape[1] :])
    for step, ref_logits in zip(steps, ref.logits, strict=True):
        assert (step.logits - ref_logits).abs().max().item() <= 1e-5
    ids = torch.cat([batch["input_ids"], got[:, :-1]], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(got[:, :-1])], 1)
    media = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")}
    with torch.no_grad():
        full = ours(ids, attention_mask=mask, **media).logits
    length = batch["input_ids"].shape[1]
    for i, step in enumerate(steps):
        assert (step.logits - full[:, length - 1 + i]).abs().max().item() <= 1e-5


def test_sampling_matches_transformers_with_same_seed(models, tok):
    ours, hf = models
    prompt = chat_prompt(tok, **PROMPTS["image"], seed=5)
    opts = dict(temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(1234)
    got = generate(ours, prompt, max_new_tokens=10, eos_token_ids=[IM_END], sampling=SamplingOptions(**opts))
    torch.manual_seed(1234)
    ref = hf_generate(hf, prompt, 10, IM_END, do_sample=True, **opts).sequences[
        :, prompt["input_ids"].shape[0] :
    ]
    ref = ref[0].tolist()
    if IM_END in ref:
        ref = ref[: ref.index(IM_END)]
    assert got[0] == ref
    torch.manual_seed(99)
    other = generate(
        ours, prompt, max_new_tokens=10, eos_token_ids=[IM_END], sampling=SamplingOptions(**opts)
    )
    assert other != got, "a different seed should sample differently"


def test_generator_makes_sampling_reproducible(models, tok):
    ours, _ = models
    prompt = chat_prompt(tok, **PROMPTS["text"])
    runs = [
        generate(
            ours,
            prompt,
            max_new_tokens=6,
            sampling=SamplingOptions(temperature=1.0),
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_list_of_prompts_is_left_padded(models, tok):
    ours, _ = models
    prompts = [chat_prompt(tok, **PROMPTS["text"], seed=1), chat_prompt(tok, **PROMPTS["image"], seed=2)]
    together = generate(ours, prompts, max_new_tokens=5, pad_token_id=PAD)
    alone = [generate(ours, p, max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_kv_cache_protocol():
    cache = KVCache(5)
    k, v = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4)
    k_all, v_all = cache.update(0, k, v)
    assert torch.equal(k_all, k) and torch.equal(v_all, v)
    cache.advance(3)
    k2, v2 = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    k_all, _ = cache.update(0, k2, v2)
    assert cache.seq_len == 3 and torch.equal(k_all, torch.cat([k, k2], 2))
    cache.advance(1)
    cache.reorder(torch.tensor([1]))
    k_all, _ = cache.update(0, k2[:1], v2[:1])
    assert torch.equal(k_all[:, :, :4], torch.cat([k, k2], 2)[1:])
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))


def test_bad_arguments_are_explained(models, tok):
    ours, _ = models
    prompts = [chat_prompt(tok, **PROMPTS["text"], seed=1), chat_prompt(tok, **PROMPTS["image"], seed=2)]
    right = left_pad(prompts, PAD)
    right["input_ids"] = right["input_ids"].flip(1)
    right["attention_mask"] = right["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, right, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, prompts[0], max_new_tokens=2, sampling=SamplingOptions(top_p=0.0))
    with pytest.raises(ValueError, match="pad_token_id"):
        generate(ours, prompts, max_new_tokens=2)


@pytest.mark.gpu
def test_cuda_generation_matches_cpu_and_bf16_cache_matches_uncached(tiny_ckpt, models, tok):
    """fp32 on CUDA picks the CPU's tokens; in bf16 the cached decode stays close to the uncached forward."""
    path, _ = tiny_ckpt
    cpu, _ = models
    batch = batch_of(tok, MIXED)
    want = list(stream(cpu, batch, max_new_tokens=6))
    gpu = load_pretrained(path, device="cuda").eval()
    got = list(stream(gpu, batch, max_new_tokens=6))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.tokens.cpu(), b.tokens)
        assert (a.logits.cpu() - b.logits).abs().max().item() <= 1e-4

    bf16 = load_pretrained(path, dtype=torch.bfloat16, device="cuda").eval()
    steps = list(stream(bf16, batch, max_new_tokens=6))
    ids = torch.cat([batch["input_ids"], torch.stack([s.tokens.cpu() for s in steps[:-1]], 1)], 1).cuda()
    mask = torch.ones_like(ids)
    mask[:, : batch["input_ids"].shape[1]] = batch["attention_mask"]
    media = {
        k: batch[k].cuda()
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    }
    with torch.no_grad():
        full = bf16(ids, attention_mask=mask, **media).logits.float()
    length = batch["input_ids"].shape[1]
    for i, s in enumerate(steps):
        ref = full[:, length - 1 + i]
        err = (s.logits.float() - ref).abs().max().item()
        assert err <= 0.05 * ref.abs().max().item(), f"step {i}: bf16 cached vs uncached differ by {err}"

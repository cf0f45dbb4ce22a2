"""Generation metrics during training (`eval.generate`): at each validation, greedy answers to the validation
prompts, scored against their references with `eval.metrics` exactly as `vlmtune eval --generate` scores
them (`generation/answers.py`), logged as `val_<metric>` (`val_exact_match`, `val_contains_match`, `val_f1`).

Every data-parallel rank answers its share of the prompts with the sharded model (tensor-parallel ranks of a
shard answer the same prompts together), in length-sorted batches of `eval.batch_size`. FSDP gathers
weights in every forward, so the ranks step in lockstep (`generation/batched.py` `in_lockstep`): a rank
whose rows have all stopped runs idle one-token forwards until no rank has a row left, and a prefill
without images runs the vision tower on a dummy grid, as training does. The answers of all ranks are
gathered; rank 0 writes them to `output_dir/generations/step_N.jsonl`.
"""

from __future__ import annotations

import json
import os
import types

import torch
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

from vlmtune.data.samples import sample_id
from vlmtune.errors import VlmtuneError
from vlmtune.generation.answers import reference_answer, score, summarize
from vlmtune.generation.batched import in_lockstep
from vlmtune.parallel.collectives import all_gather_object, all_reduce_host

GENERATIONS_DIR = "generations"


def answerable(samples: list[dict], usable: list[int], skipped) -> list[tuple[dict, str]]:
    """(sample, reference) of the validation samples that are usable (`usable`: indices with a length, not
    skipped since) and end with an answer to their last user turn."""
    out = []
    for i in usable:
        s = samples[i]
        if skipped.has(s.get("_file"), s.get("_where")):
            continue
        try:
            out.append((s, reference_answer(s)))
        except VlmtuneError:  # a conversation that ends with a user turn has nothing to compare with
            continue
    return out


def _generation_forward(self, *args, vision_dummy: bool = False, **kwargs):
    """The model's forward from the FSDP root (whose own parameters, e.g. the final norm, it gathers). A
    prefill without media runs the vision tower on a dummy grid first: the ranks that have images run it too."""
    if vision_dummy:
        self.model.visual.dummy_pass(kwargs["position_ids"].device)
    return self.model(*args, **kwargs)


def generation_entry(root):
    """`forward(input_ids, **model_kwargs)` for `Decoding`, and `idle(prefill)`, through `root`."""
    if not hasattr(root, "generation_forward"):
        root.generation_forward = types.MethodType(_generation_forward, root)
        if isinstance(root, FSDPModule):
            register_fsdp_forward_method(root, "generation_forward")

    def forward(input_ids, **kwargs):
        cache = kwargs.get("cache")
        prefill = cache is not None and cache.seq_len == 0
        media = kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None
        return root.generation_forward(input_ids, vision_dummy=prefill and not media, **kwargs)

    def idle(prefill: bool) -> None:
        device = next(root.parameters()).device
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        pos = torch.zeros(3, 1, 1, dtype=torch.long, device=device)
        root.generation_forward(ids, position_ids=pos, vision_dummy=prefill, logits_to_keep=1)

    return forward, idle


def _any_rank(flag: bool) -> bool:
    return all_reduce_host([float(flag)], op="max")[0] > 0


def answer_on_ranks(root, model, processor, pairs, *, info, eval_cfg, dataset_dir, eos, pad, agree) -> list:
    """This shard's share of `pairs` answered in lockstep; every shard's scored answers, in `pairs` order.
    `agree(fetch)` runs the prompt encoding on every rank and agrees on failures (the trainer's `agreed`)."""
    mine = list(range(info.dp_rank, len(pairs), info.dp_size))
    prompts = agree(
        lambda: [processor.encode(pairs[i][0], dataset_dir, add_generation_prompt=True) for i in mine]
    )
    forward, idle = generation_entry(root)
    outs = in_lockstep(
        model, prompts, batch_size=eval_cfg.batch_size, pad_token_id=pad, any_rank=_any_rank, idle=idle,
        forward=forward, max_new_tokens=eval_cfg.max_new_tokens, eos_token_ids=eos,
    )  # fmt: skip
    decode = processor.tokenizer.decode
    scored = [
        (i, {**score(decode(out, skip_special_tokens=True).strip(), pairs[i][1], eval_cfg.metrics),
             "sample": sample_id(pairs[i][0])})
        for i, out in zip(mine, outs)
    ]  # fmt: skip
    gathered = [x for part in all_gather_object(scored, info.dp_group) for x in part]
    return [s for _, s in sorted(gathered, key=lambda x: x[0])]


def write_generations(output_dir: str, step: int, scored: list[dict]) -> str:
    """Rank 0's record of every answer of one validation (written whole, then renamed)."""
    folder = os.path.join(output_dir, GENERATIONS_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in scored)
    os.replace(path + ".tmp", path)
    return path


def answer_record(step: int, scored: list[dict], metrics) -> dict:
    """The metrics.jsonl record: `val_<metric key>` means and the number of answers."""
    means = summarize(scored, metrics)
    return {"step": step, **{f"val_{k}": v for k, v in means.items()}, "val_answers": len(scored)}

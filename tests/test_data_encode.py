"""Encoding: tokens vs the real Qwen tokenizer + chat template with expanded vision blocks, labels on assistant
answers only, positions vs transformers' get_rope_index."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoTokenizer

from vlmtune.data import BadSample, build_processor
from vlmtune.data.processor import Processor

IMG, VID = 151655, 151656


@pytest.fixture(scope="session")
def proc(tiny_ckpt):
    return build_processor(tiny_ckpt[0], image_max_pixels=200_000)


@pytest.fixture(scope="session")
def photo_dir(photo_paths):
    return os.path.dirname(photo_paths["astronaut"])


def expand_reference(tokenizer, conversation, grids, add_generation_prompt=False):
    """The reference: template text, each image placeholder expanded to t*h*w/4 pads, tokenized at once."""
    text = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    for t, h, w in grids:
        text = text.replace("<|image_pad|>", "<|IMG|>" * (t * h * w // 4), 1)
    text = text.replace("<|IMG|>", "<|image_pad|>")
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def labeled_runs(tokenizer, out):
    lab = out["labels"]
    mask = (lab != -100).tolist()
    runs, cur = [], []
    for i, m in enumerate(mask):
        if m:
            cur.append(int(lab[i]))
        elif cur:
            runs.append(tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(tokenizer.decode(cur))
    return runs


CASES = {
    "single_turn": (
        {
            "messages": [
                {"role": "user", "content": "<image>What is shown?"},
                {"role": "assistant", "content": "A cat."},
            ],
            "images": ["chelsea.png"],
        },
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
            {"role": "assistant", "content": "A cat."},
        ],
    ),
    "multi_turn": (
        {
            "messages": [
                {"role": "user", "content": "Look: <image>\nDescribe it."},
                {"role": "assistant", "content": "An astronaut in a suit."},
                {"role": "user", "content": "What colour is the flag?"},
                {"role": "assistant", "content": " Red, white and blue.\n"},
            ],
            "images": ["astronaut.png"],
        },
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Look: "},
                    {"type": "image"},
                    {"type": "text", "text": "\nDescribe it."},
                ],
            },
            {"role": "assistant", "content": "An astronaut in a suit."},
            {"role": "user", "content": "What colour is the flag?"},
            {"role": "assistant", "content": " Red, white and blue.\n"},
        ],
    ),
    "multi_image": (
        {
            "conversations": [
                {"from": "human", "value": "<image><image>Which one is a rocket?"},
                {"from": "gpt", "value": "The second."},
            ],
            "image": ["coffee.png", "rocket.jpg"],
        },
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image"},
                    {"type": "text", "text": "Which one is a rocket?"},
                ],
            },
            {"role": "assistant", "content": "The second."},
        ],
    ),
    "system_prompt": (
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "<image>Name it."},
                {"role": "assistant", "content": "Camera man."},
            ],
            "images": ["camera.png"],
        },
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name it."}]},
            {"role": "assistant", "content": "Camera man."},
        ],
    ),
    "text_only": (
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_labels_positions(proc, photo_dir, tiny_ckpt, case):
    sample, conversation = CASES[case]
    out = proc.encode(sample, dataset_dir=photo_dir)
    grids = out["image_grid_thw"].tolist() if "image_grid_thw" in out else []
    ref = expand_reference(proc.tokenizer, conversation, grids)
    assert out["input_ids"].tolist() == ref
    answers = [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
    assert labeled_runs(proc.tokenizer, out) == answers
    if grids:
        assert out["pixel_values"].shape == (sum(t * h * w for t, h, w in grids), 1536)
    # positions vs transformers
    ids = out["input_ids"][None]
    mm = (ids == IMG).int() + 2 * (ids == VID).int()
    ref_pos, _ = tiny_ckpt[1].model.get_rope_index(ids, mm, out.get("image_grid_thw"), None)
    assert torch.equal(out["position_ids"], ref_pos[:, 0])


def test_measure_equals_encode(proc, photo_dir):
    for sample, _ in CASES.values():
        total, visual = proc.measure(sample, photo_dir)
        out = proc.encode(sample, photo_dir)
        assert total == out["input_ids"].numel()
        assert visual == int((out["input_ids"] == IMG).sum())


def test_system_prompt_option_and_generation_prompt(tiny_ckpt, photo_dir):
    p = build_processor(tiny_ckpt[0], system_prompt="Be brief.", image_max_pixels=200_000)
    sample, conversation = CASES["multi_turn"]
    out = p.encode(sample, photo_dir, add_generation_prompt=True)
    conv = [{"role": "system", "content": "Be brief."}, *conversation[:3]]
    ref = expand_reference(p.tokenizer, conv, out["image_grid_thw"].tolist(), add_generation_prompt=True)
    assert out["input_ids"].tolist() == ref
    assert p.tokenizer.decode(out["input_ids"][-3:]) == "<|im_start|>assistant\n"
    assert bool((out["labels"] == -100).all())
    prompt_only = {"messages": [{"role": "user", "content": "<image>What is it?"}], "images": ["chelsea.png"]}
    gen = p.encode(prompt_only, photo_dir, add_generation_prompt=True)
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]
    ref = expand_reference(p.tokenizer, conv, gen["image_grid_thw"].tolist(), add_generation_prompt=True)
    assert gen["input_ids"].tolist() == ref


def test_train_on_prompt_and_mask_history(tiny_ckpt, photo_dir):
    sample, conversation = CASES["multi_turn"]
    hist = build_processor(tiny_ckpt[0], mask_history=True, image_max_pixels=200_000)
    assert labeled_runs(hist.tokenizer, hist.encode(sample, photo_dir)) == [
        " Red, white and blue.\n<|im_end|>"
    ]
    full = build_processor(tiny_ckpt[0], train_on_prompt=True, image_max_pixels=200_000)
    out = full.encode(sample, photo_dir)
    vision = (out["input_ids"] == IMG) | (out["input_ids"] == VID)
    expected = ~vision
    expected[-1] = False  # the newline after the last <|im_end|> is never trained
    assert torch.equal(out["labels"] != -100, expected)
    both = build_processor(tiny_ckpt[0], train_on_prompt=True, mask_history=True, image_max_pixels=200_000)
    runs = labeled_runs(both.tokenizer, both.encode(sample, photo_dir))
    assert runs == [
        "\n<|im_start|>user\nWhat colour is the flag?<|im_end|>\n<|im_start|>assistant\n Red, white and blue.\n<|im_end|>"
    ]


# A Qwen3-style hybrid template: `enable_thinking=False` adds an empty think block to the generation prompt
# and to the final assistant turn; history turns render without it.
THINKING_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and loop.last and enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor -%}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.mark.parametrize("enable_thinking", [None, False])
def test_enable_thinking(tiny_ckpt, enable_thinking):
    tok = AutoTokenizer.from_pretrained(tiny_ckpt[0])
    tok.chat_template = THINKING_TEMPLATE
    p = Processor(tok, build_processor(tiny_ckpt[0]).media, enable_thinking=enable_thinking)
    sample = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"},
            {
                "role": "assistant",
                "content": "<think>\nadd\n</think>\n\n4" if enable_thinking is None else "4",
            },
        ]
    }
    out = p.encode(sample)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    conv = [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]
    text = tok.apply_chat_template(conv, tokenize=False, **kwargs)
    assert out["input_ids"].tolist() == tok(text, add_special_tokens=False)["input_ids"]
    last = "<think>\nadd\n</think>\n\n4<|im_end|>" if enable_thinking is None else "4<|im_end|>"
    assert labeled_runs(tok, out) == ["hello<|im_end|>", last]
    gen = p.encode(sample, add_generation_prompt=True)
    text = tok.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True, **kwargs)
    assert gen["input_ids"].tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_cutoff_truncates_text_but_never_a_vision_block(tiny_ckpt, photo_dir):
    long_answer = "word " * 300
    sample = {
        "messages": [
            {"role": "user", "content": "<image>Describe."},
            {"role": "assistant", "content": long_answer},
        ],
        "images": ["chelsea.png"],
    }
    p = build_processor(tiny_ckpt[0], image_max_pixels=200_000, cutoff_len=400)
    out = p.encode(sample, photo_dir)
    assert out["input_ids"].numel() == 400 and out["position_ids"].shape == (3, 400)
    assert bool((out["labels"] != -100).any())
    tight = build_processor(tiny_ckpt[0], image_max_pixels=200_000, cutoff_len=100)
    with pytest.raises(BadSample, match="over_long.*vision block"):
        tight.encode(sample, photo_dir)

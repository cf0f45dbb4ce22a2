"""Inference speed-ups that must not change an answer: a chat that keeps the KV cache of earlier turns answers
like re-running the whole conversation (also when a later turn adds an image or a video), `vlmtune eval`'s
length-sorted batches answer like one prompt at a time, and the chat template options (`--enable-thinking`,
`--system`) reach the template."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vlmtune.cli import main
from vlmtune.data import build_processor
from vlmtune.generation.batched import length_batches
from vlmtune.generation.conversation import ConversationCache
from vlmtune.generation.generate import stream
from vlmtune.infer import ChatSession, evaluate, generate, load_model, stop_token_ids
from vlmtune.testing import CHAT_TEMPLATE

THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}",
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif -%}"
    "{% endif -%}",
)


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    path, _ = tiny_ckpt
    return path, load_model(path), build_processor(path, video_max_pixels=128 * 224 * 4)


@pytest.fixture(scope="module")
def photos(photo_paths, tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera"):
        img = Image.open(photo_paths[name])
        img.thumbnail((128, 128))
        out[name] = str(root / f"{name}.png")
        img.save(out[name])
    return out


class PrefillLengths:
    """Records how many tokens each prefill (a forward of more than one token) feeds."""

    def __init__(self, model):
        self.model, self.lengths, self.forward = model, [], model.forward

    def __enter__(self):
        def forward(input_ids, *args, **kwargs):
            if input_ids.shape[-1] > 1:
                self.lengths.append(int(input_ids.shape[-1]))
            return self.forward(input_ids, *args, **kwargs)

        self.model.forward = forward
        return self

    def __exit__(self, *exc):
        self.model.forward = self.forward


def next_prompt(session: ChatSession, text: str, images: list, videos: list):
    """The ids of the whole conversation with the next user turn, as a prompt for generation."""
    content = "<image>" * len(images) + "<video>" * len(videos) + text
    sample = {
        "messages": [*session.messages, {"role": "user", "content": content}],
        "images": session.images + images,
        "videos": session.videos + videos,
    }
    return session.processor.encode(sample, add_generation_prompt=True)["input_ids"]


def test_chat_keeps_the_cache_and_answers_like_the_whole_conversation(setup, photos, video_paths):
    _, model, processor = setup
    turns = [
        ("What is in the picture?", [photos["chelsea"]], []),
        ("And the colour?", [], []),
        ("Compare it with this one.", [photos["coffee"]], []),  # a later turn adds an image
        ("What happens here?", [], [video_paths[0]]),  # and a video
        ("Thanks. One word?", [], []),
    ]
    cached = ChatSession(model, processor, system="Be brief.", max_new_tokens=8)
    fresh = ChatSession(model, processor, system="Be brief.", max_new_tokens=8, reuse_cache=False)
    previous = 0  # tokens of the previous turn's prompt
    for k, (text, images, videos) in enumerate(turns):
        full = next_prompt(cached, text, images, videos)
        held = list(cached.conversation.ids)
        with PrefillLengths(model) as mine:
            answer = cached.ask(text, images=images, videos=videos)
        with PrefillLengths(model) as whole:
            assert fresh.ask(text, images=images, videos=videos) == answer, f"turn {k}"
        assert whole.lengths == [len(full)]
        # Only what the cache does not hold is prefilled: the new turn (and any part of the last answer that
        # renders differently from the generated tokens), never the earlier prompts.
        (prefilled,) = mine.lengths
        shared = len(full) - prefilled
        assert full[:shared].tolist() == held[:shared] and shared >= previous
        previous = len(full)
    assert cached.messages == fresh.messages


def test_cached_turn_logits_equal_a_full_prefill(setup, photos):
    """The first answer step of a turn that adds an image: cached continuation vs the whole conversation."""
    _, model, processor = setup
    session = ChatSession(model, processor, max_new_tokens=6)
    session.ask("Describe it.", images=[photos["astronaut"]])
    session.messages.append({"role": "user", "content": "<image>And this?"})
    session.images.append(photos["rocket"])
    encoded = processor.encode(session.sample(), add_generation_prompt=True)
    conversation: ConversationCache = session.conversation
    batch, history = conversation.split(encoded)
    assert batch["image_grid_thw"].shape[0] == 1, "only the new image is encoded by the vision tower"
    cached = [
        s.logits for s in stream(model, batch, max_new_tokens=4, cache=conversation.cache, history=history)
    ]
    whole = [s.logits for s in stream(model, encoded, max_new_tokens=4)]
    for a, b in zip(cached, whole):
        assert (a - b).abs().max() <= 1e-4


def eval_samples(photos) -> list[dict]:
    """Prompts of many lengths: text only, one image, two images, a multi-turn one."""

    def ask(text, images=(), answer="A thing."):
        return {"messages": [{"role": "user", "content": "<image>" * len(images) + text},
                             {"role": "assistant", "content": answer}], "images": list(images)}  # fmt: skip

    return [
        ask("Hi."),
        ask("What is it?", [photos["chelsea"]]),
        ask("Tell me a long story about the sea, the ships and the people on them, in three sentences."),
        ask("Which is bigger?", [photos["coffee"], photos["rocket"]]),
        ask("Colour?", [photos["camera"]]),
        ask("Name a prime."),
        {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}],
         "images": [photos["chelsea"]]},
    ]  # fmt: skip


def test_eval_batches_answer_like_one_prompt_at_a_time(setup, photos, tmp_path):
    path, model, processor = setup
    samples = eval_samples(photos)
    one = evaluate(model, processor, samples, generate=True, max_new_tokens=6, batch_size=1, metrics=["f1"])
    many = evaluate(model, processor, samples, generate=True, max_new_tokens=6, batch_size=3, metrics=["f1"])
    assert [p["prediction"] for p in many["predictions"]] == [p["prediction"] for p in one["predictions"]]
    assert many["f1"] == one["f1"] and many["loss"] == one["loss"]
    prompts = [processor.encode(s, add_generation_prompt=True) for s in samples]
    order = [i for b in length_batches(prompts, 3) for i in b]
    lengths = [prompts[i]["input_ids"].numel() for i in order]
    assert sorted(order) == list(range(7)) and lengths == sorted(lengths, reverse=True)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(s) + "\n" for s in samples))
    reports = []
    for size in ("1", "4"):
        out = tmp_path / f"r{size}.json"
        argv = ["eval", "--model", path, "--dataset", str(data), "--dataset-dir", os.path.dirname(photos["camera"]),
                "--generate", "--max-new-tokens", "6", "--batch-size", size, "--json", str(out)]  # fmt: skip
        assert main(argv) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["predictions"] == reports[1]["predictions"]
    assert [p["prediction"] for p in reports[0]["predictions"]] == [
        p["prediction"] for p in one["predictions"]
    ]


@pytest.fixture(scope="module")
def thinking_ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint with a template that reads enable_thinking (as Qwen3's hybrid templates do)."""
    d = tmp_path_factory.mktemp("thinking") / "ckpt"
    shutil.copytree(tiny_ckpt[0], d)
    (d / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return str(d)


def test_enable_thinking_and_system_reach_the_template(thinking_ckpt, tmp_path, capsys):
    model = load_model(thinking_ckpt)
    question = "Say something."
    sample = {"messages": [{"role": "user", "content": question}]}
    plain, off = build_processor(thinking_ckpt), build_processor(thinking_ckpt, enable_thinking=False)
    assert "<think>" not in plain.tokenizer.decode(
        plain.encode(sample, add_generation_prompt=True)["input_ids"]
    )
    prompt = off.encode(sample, add_generation_prompt=True)
    assert off.tokenizer.decode(prompt["input_ids"]).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    eos = stop_token_ids(off.tokenizer, thinking_ckpt)
    want = off.tokenizer.decode(
        generate(model, prompt, max_new_tokens=6, eos_token_ids=eos)[0], skip_special_tokens=True
    )
    assert (
        main(["chat", "--model", thinking_ckpt, "--max-new-tokens", "6", "--no-enable-thinking", question])
        == 0
    )
    assert capsys.readouterr().out == want + "\n"

    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"messages": [*sample["messages"], {"role": "assistant", "content": "Fine."}]}) + "\n"
    )
    reports = {}
    for name, extra in (
        ("plain", []),
        ("system", ["--system", "Be brief."]),
        ("off", ["--no-enable-thinking", "--generate", "--max-new-tokens", "6"]),
    ):
        out = tmp_path / f"{name}.json"
        argv = ["eval", "--model", thinking_ckpt, "--dataset", str(data), "--json", str(out), *extra]
        assert main(argv) == 0
        reports[name] = json.loads(out.read_text())
    system = build_processor(thinking_ckpt, system_prompt="Be brief.")
    direct = evaluate(model, system, [json.loads(data.read_text())])
    assert reports["system"]["loss"] == pytest.approx(direct["loss"], rel=1e-9)
    assert reports["system"]["loss"] != reports["plain"]["loss"]
    # The template adds the empty thinking block to the generation prompt only: eval answers like chat.
    assert reports["off"]["predictions"][0]["prediction"] == want.strip()
    capsys.readouterr()
    with pytest.raises(SystemExit) as usage:  # argparse: the usage line, the message, exit status 2
        main(["eval", "--model", thinking_ckpt, "--dataset", str(data), "--metrics", "exact,bleu"])
    assert usage.value.code == 2
    assert "unknown answer metric(s) ['bleu']" in capsys.readouterr().err

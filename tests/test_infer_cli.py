"""`vlmtune chat` / `vlmtune eval` and `evaluate()`: real photos through the data processor, numbers checked
against transformers' model on the same encoded inputs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from vlmtune.cli import main
from vlmtune.data import build_processor
from vlmtune.infer import ChatSession, evaluate, generate, load_model, normalize_answer, stop_token_ids

IMAGE, VIDEO = 151655, 151656


@pytest.fixture(scope="module")
def setup(tiny_ckpt):
    path, hf = tiny_ckpt
    return path, load_model(path), build_processor(path), hf.eval()


@pytest.fixture(scope="module")
def photos(photo_paths, tmp_path_factory):
    """Small copies of the real photos (a few hundred patches each keep the CPU tests quick)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    out = {}
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        img = Image.open(photo_paths[name])
        img.thumbnail((160, 160))
        out[name] = str(root / f"{name}.png")
        img.save(out[name])
    return out


def hf_inputs(encoded: dict) -> dict:
    ids = encoded["input_ids"][None]
    out = {"input_ids": ids, "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in encoded:
            out[key] = encoded[key]
    return out


def hf_greedy(hf, encoded: dict, n: int, eos: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(**hf_inputs(encoded), max_new_tokens=n, do_sample=False, eos_token_id=eos)
    new = out[0, encoded["input_ids"].shape[0] :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def user_sample(text: str, images=(), answer: str | None = None) -> dict:
    messages = [{"role": "user", "content": "<image>" * len(images) + text}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "images": list(images)} if images else {"messages": messages}


def test_chat_with_image_prints_the_library_answer(setup, photos, capsys):
    path, model, processor, hf = setup
    photo = photos["chelsea"]
    question = "What animal is in the picture?"
    assert main(["chat", "--model", path, "--image", photo, "--max-new-tokens", "12", question]) == 0
    printed = capsys.readouterr().out

    encoded = processor.encode(user_sample(question, [photo]), add_generation_prompt=True)
    eos = stop_token_ids(processor.tokenizer, path)
    tokens = generate(model, encoded, max_new_tokens=12, eos_token_ids=eos)[0]
    assert tokens == hf_greedy(hf, encoded, 12, eos), "library generation equals transformers on real pixels"
    answer = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    assert answer.strip()
    assert printed == answer + "\n"


def test_chat_streams_to_a_terminal(setup, photos, capsys, monkeypatch):
    path, model, processor, _ = setup
    pieces = []
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.setattr("vlmtune.infer.cli._echo", lambda piece: pieces.append(piece) or print(piece, end=""))
    assert main(["chat", "--model", path, "--image", photos["chelsea"], "--max-new-tokens", "12", "Hi?"]) == 0
    answer = ChatSession(model, processor, max_new_tokens=12).ask("Hi?", images=[photos["chelsea"]])
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert capsys.readouterr().out == answer + "\n"


def test_real_video_generation_matches_transformers(setup, video_paths):
    path, model, _, hf = setup
    processor = build_processor(
        path, video_max_pixels=128 * 224 * 10
    )  # a small frame budget keeps CPU time low
    sample = {"messages": [{"role": "user", "content": "<video>What happens?"}], "videos": [video_paths[0]]}
    encoded = processor.encode(sample, add_generation_prompt=True)
    assert encoded["video_grid_thw"][0, 0] >= 2, "several frame-pairs, each its own timestamped block"
    eos = stop_token_ids(processor.tokenizer, path)
    assert generate(model, encoded, max_new_tokens=8, eos_token_ids=eos)[0] == hf_greedy(hf, encoded, 8, eos)


def test_interactive_chat_keeps_history_and_resets(setup, photos, capsys, monkeypatch):
    path, model, processor, _ = setup
    photo = photos["coffee"]
    lines = iter(
        ["/image " + photo, "Describe it.", "And the colour?", "/image /no/such.png", "/reset", "Hi", "/quit"]
    )
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", path, "--max-new-tokens", "6", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out

    session = ChatSession(model, processor, system="Be brief.", max_new_tokens=6)
    first = session.ask("Describe it.", images=[photo])
    second = session.ask("And the colour?")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    third = session.ask("Hi")
    assert session.messages[0] == {"role": "system", "content": "Be brief."} and len(session.messages) == 3
    for answer in (first, second, third):
        assert f"model> {answer}\n" in out
    assert "/no/such.png: no such file" in out
    assert "(new conversation)" in out


def write_dataset(tmp_path, samples) -> str:
    file = tmp_path / "eval.jsonl"
    file.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return str(file)


def direct_loss(hf, processor, samples, dataset_dir) -> tuple[float, int]:
    """Token-mean next-token cross-entropy over the labelled tokens, from transformers' full logits."""
    total, count = 0.0, 0
    for s in samples:
        enc = processor.encode(s, dataset_dir=dataset_dir)
        with torch.no_grad():
            logits = hf(**hf_inputs(enc)).logits[0, :-1].float()
        target = enc["labels"][1:]
        total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    return total / count, count


def with_answer(sample: dict, answer: str) -> dict:
    return {**sample, "messages": sample["messages"] + [{"role": "assistant", "content": answer}]}


def test_eval_cli_numbers_equal_direct_computation(setup, photos, tmp_path):
    path, model, processor, hf = setup
    root = str(tmp_path)
    for name in ("astronaut", "rocket"):
        shutil.copy(photos[name], tmp_path / f"{name}.png")
    prompts = [
        user_sample("Who is this?", ["astronaut.png"]),
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "<image>What flies?"},
                {"role": "assistant", "content": "A rocket."},
                {"role": "user", "content": "And what colour is the sky?"},
            ],
            "images": ["rocket.png"],
        },
        user_sample("Name a prime number."),
    ]
    # The model's own greedy answers make references that must score as exact / contained / wrong.
    eos = stop_token_ids(processor.tokenizer, path)
    preds = []
    for p in prompts:
        enc = processor.encode(p, root, add_generation_prompt=True)
        tokens = generate(model, enc, max_new_tokens=8, eos_token_ids=eos)[0]
        preds.append(processor.tokenizer.decode(tokens, skip_special_tokens=True).strip())
    refs = [preds[0], normalize_answer(preds[1])[1:-1], "definitely not the answer"]
    samples = [with_answer(p, r) for p, r in zip(prompts, refs)]
    data = write_dataset(tmp_path, samples)
    out = tmp_path / "report.json"
    argv = [
        "eval",
        "--model",
        path,
        "--dataset",
        data,
        "--dataset-dir",
        root,
        "--generate",
        "--max-new-tokens",
        "8",
    ]
    assert main([*argv, "--batch-size", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    loss, count = direct_loss(hf, processor, samples, root)
    assert report["n"] == 3 and report["tokens"] == count
    assert abs(report["loss"] - loss) <= 1e-5 * loss
    assert abs(report["ppl"] - math.exp(loss)) <= 1e-5 * math.exp(loss)
    assert [p["prediction"] for p in report["predictions"]] == preds, "batched generation equals one by one"
    assert report["exact_match"] == pytest.approx(1 / 3)
    assert report["contains_match"] == pytest.approx(2 / 3)

    direct = evaluate(model, processor, samples, dataset_dir=root, max_new_tokens=8)
    assert direct["loss"] == pytest.approx(report["loss"], rel=1e-9) and "exact_match" not in direct
    assert (
        main(["eval", "--model", path, "--dataset", data, "--dataset-dir", root, "--max-samples", "1"]) == 0
    )


def test_normalize_answer():
    assert normalize_answer("  The  Cat.\n") == "the cat"
    assert normalize_answer("<think>\nhmm\n</think>\n\nRed!") == "red"
    assert normalize_answer('"Yes"') == "yes"


def test_cli_errors_say_what_to_do(tiny_ckpt, tmp_path, capsys):
    path, _ = tiny_ckpt
    assert main(["chat", "--model", path, "--image", str(tmp_path / "missing.png"), "hi"]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path / "nowhere"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "Hugging Face checkpoint directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", "--model", str(empty), "--dataset", str(tmp_path / "none.json")]) == 2
    assert "none.json" in capsys.readouterr().err


def test_training_checkpoint_loads_and_chats_like_the_model_it_saved(setup, tmp_path, capsys):
    from vlmtune.checkpoint import dcp as checkpoint

    path, _, processor, _ = setup
    trained = load_model(path)
    with torch.no_grad():  # a "trained" model that differs from the HF checkpoint
        for p in trained.language_model.layers["0"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = str(tmp_path / "run")
    checkpoint.save(
        run, 3, model=trained, optimizer=None, loader=None, meta={}, source_dir=path,
        no_save_optim=True, no_save_rng=True, keep_last=1,
    )  # fmt: skip
    loaded = load_model(run)  # the run directory: its `latest` pointer names the step
    question = "Say something."
    encoded = processor.encode(user_sample(question), add_generation_prompt=True)
    eos = stop_token_ids(processor.tokenizer, path)
    want = generate(trained, encoded, max_new_tokens=8, eos_token_ids=eos)
    assert generate(loaded, encoded, max_new_tokens=8, eos_token_ids=eos) == want
    assert want != generate(load_model(path), encoded, max_new_tokens=8, eos_token_ids=eos)
    assert main(["chat", "--model", run, "--max-new-tokens", "8", question]) == 0
    assert capsys.readouterr().out == processor.tokenizer.decode(want[0], skip_special_tokens=True) + "\n"


def test_eval_skips_or_stops_at_a_corrupt_image(setup, tmp_path, capsys):
    path, model, processor, _ = setup
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    samples = [
        with_answer(user_sample("Count to three."), "One two three."),
        with_answer(user_sample("What is shown?", ["broken.png"]), "Nothing."),
    ]
    data = write_dataset(tmp_path, samples)
    out = tmp_path / "r.json"
    argv = ["eval", "--model", path, "--dataset", data, "--dataset-dir", str(tmp_path)]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 1 and len(report["skipped"]) == 1 and "broken.png" in report["skipped"][0]
    alone = evaluate(model, processor, samples[:1], dataset_dir=str(tmp_path))
    assert report["loss"] == pytest.approx(alone["loss"], rel=1e-9)
    capsys.readouterr()
    assert main([*argv, "--on-bad-sample", "error"]) == 2
    assert "broken.png" in capsys.readouterr().err

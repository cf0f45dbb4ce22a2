"""Datasets, packing, the resumable data-parallel sampler, the length cache and the data CLI."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from vlmtune.cli import main as cli_main
from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import DataConfig, build_loader, build_processor, load_samples, pack
from vlmtune.data.loader import first_fit_decreasing, shard_bins
from vlmtune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def proc(tiny_ckpt):
    return build_processor(tiny_ckpt[0], image_max_pixels=100_000)


def text_samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(["cat", "dog", "red", "blue", "sky"]) for _ in range(rng.randint(1, 40)))
        a = " ".join(rng.choice(["yes", "no", "maybe"]) for _ in range(rng.randint(1, 60)))
        out.append(
            {"id": f"s{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        )
    return out


@pytest.fixture()
def text_dataset(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in text_samples(60)))
    return str(path)


def test_pack_round_trip(proc, photo_paths):
    root = os.path.dirname(photo_paths["chelsea"])
    samples = [
        {
            "messages": [
                {"role": "user", "content": "<image>What?"},
                {"role": "assistant", "content": "Cat."},
            ],
            "images": ["chelsea.png"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
        {
            "messages": [
                {"role": "user", "content": "<image>And?"},
                {"role": "assistant", "content": "Coffee."},
            ],
            "images": ["coffee.png"],
        },
    ]
    enc = [proc.encode(s, root) for s in samples]
    for k, e in enumerate(enc):
        e["sample_id"] = f"s{k}"
    batch = pack(enc)
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == batch.input_ids.shape[1]
    assert batch.position_ids.shape == (3, 1, cu[-1])
    assert batch.max_seqlen == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    for e, a, b in zip(enc, cu[:-1], cu[1:]):
        assert torch.equal(batch.input_ids[0, a:b], e["input_ids"])
        assert torch.equal(batch.position_ids[:, 0, a:b], e["position_ids"])
        # targets are the labels shifted once: position t predicts token t + 1 of the same sample
        assert torch.equal(batch.targets[0, a : b - 1], e["labels"][1:])
        assert batch.targets[0, b - 1] == IGNORE_INDEX
    assert torch.equal(batch.pixel_values, torch.cat([enc[0]["pixel_values"], enc[2]["pixel_values"]]))
    assert (
        batch.image_grid_thw.tolist() == enc[0]["image_grid_thw"].tolist() + enc[2]["image_grid_thw"].tolist()
    )
    assert batch.sample_ids == ["s0", "s1", "s2"]
    assert batch.num_label_tokens == sum(int((e["labels"][1:] != IGNORE_INDEX).sum()) for e in enc)


def test_packed_forward_matches_per_sample(tiny_ckpt, proc, photo_paths):
    from vlmtune import load_pretrained

    model = load_pretrained(tiny_ckpt[0], dtype=torch.float32).eval()
    root = os.path.dirname(photo_paths["chelsea"])
    samples = [
        {
            "messages": [
                {"role": "user", "content": "<image>What?"},
                {"role": "assistant", "content": "Cat."},
            ],
            "images": ["chelsea.png"],
        },
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    enc = [proc.encode(s, root) for s in samples]
    batch = pack(enc)
    with torch.no_grad():
        packed = model(**batch.model_inputs()).logits[0]
        cu = batch.cu_seqlens.tolist()
        for e, a, b in zip(enc, cu[:-1], cu[1:]):
            single = {k: e[k] for k in ("pixel_values", "image_grid_thw") if k in e}
            alone = model(e["input_ids"][None], position_ids=e["position_ids"][:, None], **single).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=2e-4, rtol=1e-4)


def naive_first_fit(lengths, budget):
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b in range(len(bins)):
            if loads[b] + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def test_first_fit_decreasing_matches_naive():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(500)]
    bins = first_fit_decreasing(list(range(500)), lengths, 1000)
    assert bins == naive_first_fit(lengths, 1000)
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins)


def test_shard_bins_equal_counts_balanced():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(101)]
    bins = first_fit_decreasing(list(range(101)), lengths, 300)
    shards = shard_bins(bins, lengths, 4)
    assert len({len(s) for s in shards}) == 1
    items = sorted(i for s in shards for b in s for i in b)
    assert items == list(range(101))
    loads = [sum(lengths[i] for b in s for i in b) for s in shards]
    assert max(loads) - min(loads) <= 300 // 2  # within half a micro-batch budget


def _cfg(path, **kw):
    kw.setdefault("num_workers", 0)
    return DataConfig(dataset=path, shuffle=False, **kw)


def _ids(batches):
    return [b.sample_ids for b in batches]


def test_sampler_resume_mid_epoch_with_workers(proc, text_dataset):
    cfg = _cfg(text_dataset, num_workers=2)
    train, _, _ = load_samples(cfg)
    full = build_loader(cfg, proc, samples=train, dp_rank=0, dp_size=1, seed=3, max_tokens=400)
    epoch0 = _ids(list(full))
    assert len(epoch0) == len(full) > 4
    assert sorted(i for b in epoch0 for i in b) == sorted(s["id"] for s in train)
    epoch1 = _ids(list(full))
    assert epoch1 != epoch0  # a new seeded order each epoch
    first = build_loader(cfg, proc, samples=train, dp_rank=0, dp_size=1, seed=3, max_tokens=400)
    it = iter(first)
    taken = [next(it).sample_ids for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_loader(cfg, proc, samples=train, dp_rank=0, dp_size=1, seed=3, max_tokens=400)
    resumed.load_state_dict(state)
    assert taken + _ids(list(resumed)) == epoch0
    assert _ids(list(resumed)) == epoch1  # continues into the next epoch
    resumed.set_epoch(0)
    assert _ids(list(resumed)) == epoch0
    other = build_loader(cfg, proc, samples=train, dp_rank=0, dp_size=2, seed=3, max_tokens=400)
    with pytest.raises(ValueError, match="step_group=1, this run has 2"):
        other.load_state_dict(state)


def test_steps_do_not_depend_on_the_data_parallel_size(proc, text_dataset):
    """With the same micro-batches per step (G = 4), one rank and two ranks train the same samples in every
    step, and a one-rank position resumes on two ranks at the next step."""
    cfg = _cfg(text_dataset)
    train, _, _ = load_samples(cfg)

    def loader(rank, size):
        lo = build_loader(cfg, proc, samples=train, dp_rank=rank, dp_size=size, seed=5, max_tokens=300)
        lo.set_step_group(4)
        return lo

    one = _ids(list(loader(0, 1)))
    two = [_ids(list(loader(r, 2))) for r in (0, 1)]
    steps_one = [sorted(i for b in one[k : k + 4] for i in b) for k in range(0, len(one), 4)]
    steps_two = [sorted(i for r in two for b in r[k : k + 2] for i in b) for k in range(0, len(two[0]), 2)]
    assert steps_one == steps_two and len(steps_one) > 2
    first = loader(0, 1)
    it = iter(first)
    for _ in range(4):  # one optimizer step
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = [loader(r, 2) for r in (0, 1)]
    for r in resumed:
        r.load_state_dict(state)
    rest = [_ids(list(r)) for r in resumed]
    assert [
        sorted(i for r in rest for b in r[k : k + 2] for i in b) for k in range(0, len(rest[0]), 2)
    ] == steps_one[1:]
    with pytest.raises(ValueError, match="multiple of the data-parallel size 2"):
        resumed[0].set_step_group(3)


def test_two_ranks_disjoint_and_covering(proc, text_dataset):
    cfg = _cfg(text_dataset)
    train, _, _ = load_samples(cfg)
    ranks = [
        build_loader(cfg, proc, samples=train, dp_rank=r, dp_size=2, seed=0, max_tokens=300) for r in (0, 1)
    ]
    seen = [[i for b in r for i in b.sample_ids] for r in ranks]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(s["id"] for s in train)
    assert all(b.num_tokens <= 300 for r in ranks for b in r)
    assert 0.5 < ranks[0].fill_ratio() <= 1.0


def test_length_cache_hit_and_stale(proc, text_dataset, tmp_path, monkeypatch):
    cfg = _cfg(text_dataset, cache_dir=str(tmp_path / "cache"))
    train, _, _ = load_samples(cfg)
    first = build_loader(cfg, proc, samples=train, seed=0, max_tokens=400)
    assert os.path.exists(tmp_path / "cache" / "length_index.json")
    calls = []
    real = type(proc).measure
    monkeypatch.setattr(type(proc), "measure", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    again = build_loader(cfg, proc, samples=train, seed=0, max_tokens=400)
    assert calls == [] and again.lengths == first.lengths
    train[0]["messages"][1]["content"] += " and more words here"
    stale = build_loader(cfg, proc, samples=train, seed=0, max_tokens=400)
    assert len(calls) == len(train) and stale.lengths[0] > first.lengths[0]


def test_config_unknown_and_invalid_keys():
    with pytest.raises(ConfigError, match="data.datset: unknown key"):
        DataConfig.from_dict({"datset": "a.json"})
    with pytest.raises(ConfigError, match="on_bad_sample"):
        DataConfig(dataset="a.json", on_bad_sample="ignore")
    with pytest.raises(ConfigError, match="mix_ratios"):
        DataConfig(dataset="a.json,b.json", mix_ratios=[1.0])
    assert DataConfig.from_dict({"dataset": "a.json,b.jsonl"}).dataset == ["a.json", "b.jsonl"]


def test_load_samples_formats_ratios_and_split(tmp_path):
    a = text_samples(10, seed=1)
    (tmp_path / "a.json").write_text(json.dumps(a))  # JSON list, found relative to dataset_dir
    llava = [
        {"id": f"l{i}", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
        for i in range(6)
    ]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(s) + "\n" for s in llava))
    cfg = DataConfig(dataset="a.json,b.jsonl", dataset_dir=str(tmp_path), mix_ratios=[0.5, 2.0])
    train, val, report = load_samples(cfg, seed=7)
    ids = [s["id"] for s in train]
    assert sum(i.startswith("s") for i in ids) == 5 and sum(i.startswith("l") for i in ids) == 12
    assert report.total == 0 and val == []
    assert train[0]["_where"].startswith(("index", "line"))
    assert load_samples(cfg, seed=7)[0] == train  # deterministic
    capped = load_samples(
        DataConfig(dataset="a.json", dataset_dir=str(tmp_path), max_samples=4, shuffle=False)
    )[0]
    assert [s["id"] for s in capped] == ["s0", "s1", "s2", "s3"]
    tr, va, _ = load_samples(DataConfig(dataset="a.json", dataset_dir=str(tmp_path), val_ratio=0.3))
    assert len(va) == 3 and len(tr) == 7 and not {s["id"] for s in tr} & {s["id"] for s in va}
    tr, va, _ = load_samples(DataConfig(dataset="a.json", val_dataset="b.jsonl", dataset_dir=str(tmp_path)))
    assert len(tr) == 10 and len(va) == 6
    with pytest.raises(DataError, match="nope.json"):
        load_samples(DataConfig(dataset="nope.json", dataset_dir=str(tmp_path)))


def test_convert_llava_cli(tmp_path, photo_paths, capsys):
    image_dir = os.path.dirname(photo_paths["chelsea"])
    src = [
        {
            "id": "1",
            "image": "chelsea.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Cat"}],
        },
        {
            "id": "2",
            "image": "missing.jpg",
            "conversations": [{"from": "human", "value": "<image>x"}, {"from": "gpt", "value": "y"}],
        },
        {
            "id": "3",
            "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(src))
    out = tmp_path / "data" / "mllm.json"
    rc = cli_main(
        [
            "data",
            "convert-llava",
            "--input",
            str(tmp_path / "llava.json"),
            "--image-dir",
            image_dir,
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    # the images are not under the output's folder: paths are relative to --image-dir, so none leads
    # outside data.dataset_dir (which training refuses by default)
    assert "skipped 1 with a missing image" in text and f"data.dataset_dir: {image_dir}" in text
    assert "warning" not in text
    got = json.loads(out.read_text())
    assert [s["id"] for s in got] == ["1", "3"]
    assert got[0]["images"] == ["chelsea.png"] and os.path.isfile(os.path.join(image_dir, "chelsea.png"))
    assert got[0]["messages"] == [
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "Cat"},
    ]
    train, _, report = load_samples(DataConfig(dataset=str(out), dataset_dir=image_dir))
    assert len(train) == 2 and report.total == 0
    argv = ["data", "convert-llava", "--input", str(tmp_path / "llava.json"), "--image-dir", image_dir]
    assert cli_main([*argv, "--output", str(out), "--dataset-dir", str(tmp_path)]) == 0
    assert "warning: 1 image path(s) lead outside" in capsys.readouterr().out
    src[2]["conversations"][0]["from"] = "bot"
    (tmp_path / "llava.json").write_text(json.dumps(src))
    rc = cli_main(
        [
            "data",
            "convert-llava",
            "--input",
            str(tmp_path / "llava.json"),
            "--image-dir",
            image_dir,
            "--output",
            str(out),
        ]
    )
    assert rc == 2 and "sample id '3'" in capsys.readouterr().err


def test_inspect_cli(tiny_ckpt, text_dataset, tmp_path, capsys):
    with open(text_dataset, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    plot = tmp_path / "lengths.png"
    args = ["data", "inspect", "--dataset", text_dataset, "--model", tiny_ckpt[0], "--max-tokens", "500"]
    assert cli_main([*args, "--json", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["samples"] == 60 and report["skipped"]["by_reason"] == {"no_assistant_turn": 1}
    assert report["visual_tokens"]["p100"] == 0 and report["text_tokens"]["p50"] > 10
    assert 0 < report["packing_fill"] <= 1 and report["steps_per_epoch_per_rank_1"] >= 1
    assert plot.exists()
    assert cli_main(args) == 0
    assert "fill" in capsys.readouterr().out

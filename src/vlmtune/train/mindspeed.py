"""MindSpeed-MM Qwen3-VL configs -> a vlmtune training config and a report of what became of every key.

`import_mindspeed(paths)` reads the files (`mindspeed_parse`), maps every key it understands into the
config dict (each value remembers its source keys), lists the rest as ignored (with the reason) or
unsupported (with what to do; `mindspeed_keys`), and validates the result with `config.from_dict`.
`mindspeed_cli` writes the config (each value with its source key as a comment) and the report.

Batch sizes are where the two systems differ most. MindSpeed-MM pads `micro_batch_size` samples of at most
`seq_length` tokens into a micro-batch; vlmtune packs whole samples into a micro-batch of at most
`train.micro_batch_tokens` tokens. `micro_batch_tokens = micro_batch_size x seq_length` keeps the largest
micro-batch (so peak activation memory) the same, and short samples then share a micro-batch instead of
padding it. `global_batch_size` stays a number of samples per optimizer step (`train.global_batch_samples`),
so `train_iters` steps see the same number of samples; the accumulation is derived from the measured mean
samples per packed micro-batch.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from vlmtune.errors import ConfigError
from vlmtune.train.config import from_dict
from vlmtune.train.mindspeed_keys import (
    BP,
    DIRECT,
    LORA_KINDS,
    LOSS_TYPES,
    MEGATRON_LORA,
    PP,
    SCHEDULES,
    VISION,
    classify,
    convert,
)
from vlmtune.train.mindspeed_parse import Setting, Sources, read_sources

DEFAULT_CUTOFF_LEN = 1024  # MindSpeed-MM's basic_parameters.cutoff_len default
DEFAULT_VIDEO_MAXLEN = 128  # MindSpeed-MM's video_maxlen default
SECTION_ORDER = ("output_dir", "model", "freeze", "optim", "data", "train", "loss", "checkpoint", "logging",
                 "eval", "parallel", "lora")  # fmt: skip


@dataclass
class Mapped:
    sources: list[Setting]
    target: str  # dotted vlmtune key
    value: object
    note: str = ""  # how the value was derived, when it is not copied


@dataclass
class Report:
    files: list[tuple[str, str]] = field(default_factory=list)  # (path, kind)
    mapped: list[Mapped] = field(default_factory=list)
    ignored: list[tuple[Setting, str]] = field(default_factory=list)
    unsupported: list[tuple[Setting, str]] = field(default_factory=list)
    launch: str = ""

    def summary(self) -> str:
        n = len({s.name for m in self.mapped for s in m.sources})
        return f"mapped {n} / ignored {len(self.ignored)} / unsupported {len(self.unsupported)}"


def import_mindspeed(paths: list[str], out_path: str = "vlmtune.yaml") -> tuple[dict, Report]:
    """Read MindSpeed-MM files, return (vlmtune config dict, report); raise ConfigError on bad input."""
    src = read_sources(paths)
    imp = _Importer(src, out_path)
    imp.run()
    _validate(imp.cfg, imp.report)
    return imp.cfg, imp.report


class _Importer:
    """One import: the sources, the config dict being built and the report."""

    def __init__(self, src: Sources, out_path: str):
        self.src, self.out_path = src, out_path
        self.cfg: dict = {}
        self.report = Report(files=list(src.files))
        self._by_target: dict[str, Mapped] = {}

    def run(self) -> None:
        self._require_files()
        for name, target, kind in DIRECT:
            s = self.src.take(name)
            if s is not None:
                self.put(target, convert(s, kind), [s])
        for rule in (self._betas, self._schedule, self._batch, self._loss_type, self._recompute, self._paths,
                     self._media, self._thinking, self._precision, self._parallel, self._lora_targets,
                     self._launch):  # fmt: skip
            rule()
        for s in self.src.rest():
            ignored, text = classify(s.name, s.value)
            (self.report.ignored if ignored else self.report.unsupported).append((s, text))

    def put(self, target: str, value, sources: list[Setting], note: str = "", written: bool = True) -> None:
        old = self._by_target.get(target)
        if old is not None:
            if old.value == value:
                old.sources += sources
                return
            for s in sources:
                first = old.sources[0].key if old.sources else "the default"
                self.unsupported(s, f"contradicts {first}; vlmtune uses {target}: {old.value!r}")
            return
        m = Mapped(sources, target, value, note)
        self.report.mapped.append(m)
        self._by_target[target] = m
        if written:
            section, _, key = target.partition(".")
            if key:
                self.cfg.setdefault(section, {})[key] = value
            else:
                self.cfg[section] = value

    def ignore(self, s: Setting, reason: str) -> None:
        self.report.ignored.append((s, reason))

    def unsupported(self, s: Setting, todo: str) -> None:
        self.report.unsupported.append((s, todo))

    def _args_file(self) -> str:
        return next((p for p, k in self.src.files if k in ("finetune script", "single YAML")), "")

    def _require_files(self) -> None:
        kinds = {k for _, k in self.src.files}
        if "single YAML" in kinds:
            return
        script = next((p for p, k in self.src.files if k == "finetune script"), None)
        if script is None:
            raise ConfigError(
                f"{', '.join(p for p, _ in self.src.files)}: no training arguments; also pass the "
                "finetune_*.sh that uses them (or import the single YAML)"
            )
        for kind, flag in (("data JSON", "args.mm_data"), ("model JSON", "args.mm_model")):
            if kind not in kinds:
                named = self.src.settings.get(flag)
                where = (
                    f"--{flag[5:].replace('_', '-')} {named.value}" if named else "no --mm-data/--mm-model"
                )
                raise ConfigError(f"{script}: {where}: no {kind} found; pass the {kind} as a further FILE")

    # ------------------------------------------------------------------------------------ mapping rules
    def _betas(self) -> None:
        b1, b2 = self.src.take("args.adam_beta1"), self.src.take("args.adam_beta2")
        if b1 or b2:
            value = [convert(b1, "float") if b1 else 0.9, convert(b2, "float") if b2 else 0.999]
            note = "" if b1 and b2 else "Megatron's default for the one not set"
            self.put("optim.betas", value, [s for s in (b1, b2) if s], note)

    def _schedule(self) -> None:
        s = self.src.take("args.lr_decay_style")
        if s is not None:
            style = convert(s, "str")
            if style in SCHEDULES:
                self.put("optim.schedule", style, [s])
            else:
                self.unsupported(
                    s, f"no {style!r} schedule: choose optim.schedule cosine, linear or constant"
                )

    def _batch(self) -> None:
        """Token budgets (see the module docstring), the per-sample cut and the validation size."""
        mbs = self.src.take("args.micro_batch_size")
        seq = [
            s for s in (self.src.take("args.seq_length"), self.src.take("model.text_decoder.seq_length")) if s
        ]
        if mbs is None or not seq:
            raise ConfigError(
                f"{self._args_file()}: micro_batch_size and seq_length are both needed for "
                "train.micro_batch_tokens; add them (--micro-batch-size, --seq-length)"
            )
        m, n = convert(mbs, "int"), convert(seq[0], "int")
        self.put(
            "train.micro_batch_tokens", m * n, [mbs, *seq], f"{m} x {n}: the same largest micro-batch, packed"
        )
        gbs = self.src.take("args.global_batch_size")
        pp = self._by_target["parallel.pp"].value if "parallel.pp" in self._by_target else 1
        if gbs is not None:
            g = convert(gbs, "int")
            note = "samples per optimizer step; the accumulation follows from the packed micro-batches"
            if pp > 1:  # packed steps have fewer micro-batches than MindSpeed-MM's; a pipeline needs >= pp
                note += f"; if pp {pp} is not filled, use train.global_batch_tokens: {g * n} instead"
            self.put("train.global_batch_samples", g, [gbs], note)
        cut = self.src.take(BP + "cutoff_len")
        limit = convert(cut, "int") if cut else DEFAULT_CUTOFF_LEN
        note = "" if cut else f"MindSpeed-MM's default {DEFAULT_CUTOFF_LEN}"
        if limit > m * n:
            note = f"{limit} capped at train.micro_batch_tokens: a sample must fit a micro-batch"
            limit = m * n
        self.put("data.cutoff_len", limit, [cut] if cut else [], note)
        iters = self.src.take("args.eval_iters")
        if iters is not None and convert(iters, "int") == 0:
            self.ignore(iters, "0: no validation; vlmtune validates only with data.val_dataset or val_ratio")
        elif iters is not None and gbs is not None:
            n_iters, g = convert(iters, "int"), convert(gbs, "int")
            self.put("eval.max_samples", n_iters * g, [iters, gbs], f"{n_iters} iterations x {g} samples")
        elif iters is not None:
            self.unsupported(iters, "set eval.max_samples (samples per validation)")

    def _loss_type(self) -> None:
        loss_cfg = self.src.take("model.loss_cfg.loss_type")
        flags = {k: self.src.take(f"args.calculate_per_{k}_loss") for k in ("token", "sample")}
        flags = {k: s for k, s in flags.items() if s is not None}
        on = [k for k, s in flags.items() if convert(s, "bool")]
        if loss_cfg is not None:
            kind = convert(loss_cfg, "str")
            for s in flags.values():
                self.ignore(s, "pretrain_transformers.py reads model.loss_cfg.loss_type instead of this flag")
            if kind in LOSS_TYPES:
                self.put("loss.type", LOSS_TYPES[kind], [loss_cfg])
            else:
                self.unsupported(
                    loss_cfg, f"no {kind!r} loss: choose loss.type (docs/training.md, Loss modes)"
                )
        elif len(on) == 2:
            s = flags["sample"]
            raise ConfigError(f"{s.file}: {s.key} together with --calculate-per-token-loss; keep one")
        else:
            value = {"token": "token_mean", "sample": "sample_mean"}[on[0]] if on else "microbatch_mean"
            note = "" if on else "MindSpeed-MM's default loss: the mean of each micro-batch, averaged"
            self.put("loss.type", value, list(flags.values()), note)

    def _recompute(self) -> None:
        names = ("args.recompute_granularity", "model.text_decoder.recompute_granularity",
                 VISION + "recompute_granularity")  # fmt: skip
        chosen = None
        for s in filter(None, map(self.src.take, names)):
            kind = convert(s, "str")
            if kind not in ("full", "selective"):
                self.unsupported(s, f"{kind!r}: choose model.activation_checkpointing none/selective/full")
            elif chosen is None or kind == chosen[1]:
                chosen = chosen or (s, kind)
                self.put("model.activation_checkpointing", kind, [s])
            else:
                self.unsupported(
                    s, f"vlmtune checkpoints every block alike; it uses {chosen[0].key}: {chosen[1]}"
                )

    def _paths(self) -> None:
        """The Hugging Face checkpoint, MindSpeed-MM's own checkpoint, and the output directory."""
        hf, tok = self.src.take("model.init_from_hf_path"), self.src.take(PP + "model_name_or_path")
        first = hf or tok
        if first is None:
            raise ConfigError(
                f"{', '.join(p for p, _ in self.src.files)}: no Hugging Face checkpoint; set the model's "
                "init_from_hf_path or the data's preprocess_parameters.model_name_or_path"
            )
        path = convert(first, "str")
        if hf and tok and convert(tok, "str") != path:
            self.put("model.init_from_hf", path, [hf])
            self.unsupported(tok, f"vlmtune reads tokenizer and processor from model.init_from_hf ({path})")
        else:
            self.put("model.init_from_hf", path, [s for s in (hf, tok) if s], "weights, tokenizer, processor")
        load = self.src.take("args.load")
        if load is not None and convert(load, "str"):
            self.unsupported(load, "a MindSpeed-MM checkpoint, which vlmtune cannot read: model.init_from_hf "
                             "loads the Hugging Face weights directly (or `vlmtune convert hf-to-native` them "
                             "once and set checkpoint.load); mm-convert mm_to_hf exports a fine-tuned one")  # fmt: skip
        elif load is not None:
            self.ignore(load, "empty: training starts from the Hugging Face weights")
        save = self.src.take("args.save")
        if save is not None and convert(save, "str"):
            self.put("output_dir", convert(save, "str"), [save], "checkpoints, metrics, TensorBoard, hf/")
        else:
            stem = re.sub(r"\.ya?ml$", "", self.out_path.replace("\\", "/").rsplit("/", 1)[-1])
            self.put("output_dir", f"runs/{stem}", [], "no save path in the source: choose one")
            missing = save or Setting("args.save", None, self._args_file(), "save")
            self.unsupported(missing, f"empty: output_dir is runs/{stem}; set it where the run should write")

    def _media(self) -> None:
        """Pixel bounds: MindSpeed-MM bounds each video frame, vlmtune all frames of a video together."""
        low = self.src.take(PP + "image_min_pixels")
        if low is not None and convert(low, "int") > 0:
            self.put("data.image_min_pixels", convert(low, "int"), [low])
        elif low is not None:
            self.ignore(low, "0: no lower bound; the checkpoint's lower bound applies")
        high = self.src.take(PP + "video_max_pixels")
        if high is not None:
            maxlen = self.src.settings.get(PP + "video_maxlen")
            frames = convert(maxlen, "int") if maxlen else DEFAULT_VIDEO_MAXLEN
            per_frame = convert(high, "int")
            note = f"{per_frame} per frame x {frames} frames: vlmtune budgets all frames of a video together"
            self.put("data.video_max_pixels", per_frame * frames, [high] + ([maxlen] if maxlen else []), note)
        vlow = self.src.take(PP + "video_min_pixels")
        if vlow is not None and convert(vlow, "int") > 0:
            self.unsupported(vlow, "a per-frame lower bound; data.video_min_pixels bounds all frames together: "
                             "set it to this times the frames you expect")  # fmt: skip
        elif vlow is not None:
            self.ignore(vlow, "0: no lower bound; the checkpoint's lower bound applies")

    def _thinking(self) -> None:
        """template + enable_thinking -> data.enable_thinking (vlmtune renders the checkpoint's template)."""
        tmpl, think = self.src.take(BP + "template"), self.src.take(BP + "enable_thinking")
        name = convert(tmpl, "str") if tmpl else None
        if name == "qwen3_vl_nothink":
            self.put("data.enable_thinking", False, [tmpl], "the template without a <think> block")
            if think is not None:
                self.ignore(think, "no effect with the qwen3_vl_nothink template")
            return
        if name not in (None, "qwen3_vl"):
            self.unsupported(
                tmpl, f"vlmtune renders the checkpoint's chat template: check it matches {name!r}"
            )
            tmpl = None
        if tmpl or think:
            value = convert(think, "bool") if think else True  # MindSpeed-MM's default: thinking on
            self.put("data.enable_thinking", value, [s for s in (tmpl, think) if s])

    def _precision(self) -> None:
        dtypes = {"bf16": "bf16", "bfloat16": "bf16", "fp32": "fp32", "float32": "fp32"}
        for s in filter(None, (self.src.take("args.bf16"), self.src.take("fsdp2.param_dtype"))):
            if s.name == "args.bf16":
                value = "bf16" if convert(s, "bool") else "fp32"
            else:
                value = dtypes.get(convert(s, "str"))
            if value:
                self.put("train.mixed_precision", value, [s], "fp32 master weights and reductions")
            else:
                self.unsupported(s, "vlmtune computes in fp32 or bf16: set train.mixed_precision")
        fsdp = self.src.take("args.fsdp2_config_path")
        if fsdp is not None and any(n.startswith("fsdp2.") for n in self.src.settings):
            self.ignore(fsdp, "read: its settings are listed under their own names")
        elif fsdp is not None:
            self.unsupported(fsdp, "not found: pass it as a further FILE, or set train.mixed_precision: bf16 "
                             "if its param_dtype is bf16 (as MindSpeed-MM's shipped one)")  # fmt: skip

    def _parallel(self) -> None:
        cp = self.src.take("args.context_parallel_size")
        if cp is not None and convert(cp, "int") == 1:
            self.put("parallel.cp", 1, [cp], "the default; not written", written=False)
        elif cp is not None:
            self.put(
                "parallel.cp", convert(cp, "int"), [cp], "Ulysses context parallelism (docs/parallel.md)"
            )
        shards = self.src.take("fsdp2.sharding_size")
        if shards is not None:
            value = -1 if shards.value == "auto" else convert(shards, "int")
            self.put(
                "parallel.dp_shard", value, [shards], "auto: every data-parallel rank" if value == -1 else ""
            )

    def _lora_targets(self) -> None:
        s = self.src.take("args.lora_target_modules")
        if s is None:
            return
        items = s.value if isinstance(s.value, list) else [s.value]
        names = [n for item in items for n in re.split(r"[,\s]+", str(item)) if n]
        kinds, unknown = [], []
        for n in names:
            found = (n,) if n in LORA_KINDS else MEGATRON_LORA.get(n, ())
            kinds += [k for k in found if k not in kinds]
            unknown += [] if found else [n]
        if kinds:
            self.put(
                "lora.targets",
                kinds,
                [s],
                "Megatron names as module kinds" if set(names) - set(kinds) else "",
            )
        if unknown:
            self.unsupported(s, f"{', '.join(unknown)}: lora.targets takes {', '.join(LORA_KINDS)}")

    def _launch(self) -> None:
        per_node = next(filter(None, map(self.src.take, ("launch.NPUS_PER_NODE", "launch.GPUS_PER_NODE",
                                                          "launch.NPROC_PER_NODE"))), None)  # fmt: skip
        nodes = self.src.take("launch.NNODES")
        n_proc = convert(per_node, "int") if per_node else "<GPUs per node>"
        n_nodes = convert(nodes, "int") if nodes else 1
        if n_nodes > 1:
            self.report.launch = (f"NNODES={n_nodes} NODE_RANK=<0..{n_nodes - 1}> MASTER_ADDR=<node 0> "
                                  f"NPUS_PER_NODE={n_proc} bash examples/launch.sh {self.out_path}")  # fmt: skip
        else:
            self.report.launch = f"torchrun --nproc_per_node {n_proc} -m vlmtune.cli train {self.out_path}"
        for s in filter(None, (per_node, nodes)):
            self.ignore(s, "a launch setting, not a config key: see the launch command")


def _validate(cfg: dict, report: Report) -> None:
    """The written config must load."""
    raw = copy.deepcopy(cfg)
    # TensorBoard is on by default; whether it is installed here says nothing about the imported values.
    raw.setdefault("logging", {}).setdefault("tensorboard", False)
    try:
        from_dict(raw, check_paths=False)
    except ConfigError as e:
        message = str(e)
        named = [m for m in report.mapped if m.target in message and m.sources]
        culprit = min(named, key=lambda m: message.index(m.target), default=None)  # the key it opens with
        where = f" (from {culprit.sources[0].file}: {culprit.sources[0].key})" if culprit else ""
        raise ConfigError(f"the imported config does not validate: {e}{where}; fix the source") from e

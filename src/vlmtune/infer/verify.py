"""`vlmtune verify`: prove that a checkpoint computes in vlmtune what it computes in transformers.

The same inputs (the user's samples or the synthetic set of `verify_inputs`) run through vlmtune and
through transformers' Qwen3-VL (eager attention, eager experts: the plain reference); logits, loss and
greedy tokens are compared with the tolerances of `verify_compare`. Then the export round trip: the HF
checkpoint loaded into vlmtune and saved again must be bitwise identical, tensor by tensor.

One model is in memory at a time: vlmtune runs every input and writes its results to the work directory,
is freed, and only then transformers is loaded and compared input by input. Peak memory is one model plus
the activations and logits of one input. Under torchrun, `tp` / `ep` first run the inputs in that layout
(each rank holds its shards); rank 0 then compares them with the one-process results.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental import implicit_replication
from tqdm import tqdm

from vlmtune.checkpoint.convert import native_to_hf
from vlmtune.checkpoint.dcp import HF_ASSETS, resolve
from vlmtune.checkpoint.hf import load_pretrained, load_weights, save_pretrained
from vlmtune.data import build_processor
from vlmtune.errors import CheckpointError, ConfigError, ParallelError
from vlmtune.generation.generate import MEDIA_KEYS, stream
from vlmtune.models.qwen3_vl import Qwen3VL, build_model, load_config, materialize
from vlmtune.parallel.collectives import barrier, broadcast_object
from vlmtune.parallel.expert import apply_expert_parallel
from vlmtune.parallel.layout import ParallelConfig
from vlmtune.parallel.mesh import close_distributed, init_distributed
from vlmtune.parallel.tensor import apply_tensor_parallel

from .load import is_hf_dir, load_model, pad_token_id
from .verify_compare import Tolerance, compare_checkpoints, compare_records, token_mean_loss
from .verify_inputs import BATCH_KINDS, Case, build_cases, synthetic_samples, user_samples, write_media

log = logging.getLogger(__name__)

MIN_TRANSFORMERS = (5, 0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class VerifyInputError(ConfigError):
    """Something about the command's input (paths, reference library, layout) that the user must fix."""


@dataclass
class VerifyOptions:
    model: str
    processor: str | None = None  # tokenizer / preprocessor directory (default: with the model)
    samples: list[dict] | None = None  # the user's samples (None: the synthetic set)
    dataset_dir: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    tokens: int = 8
    tp: int = 1
    ep: int = 1
    round_trip: bool = True
    work_dir: str | None = None  # None: a temporary directory, removed at the end
    progress: bool = False


def transformers_version() -> str:
    """The reference's version; raises VerifyInputError when transformers is missing or too old."""
    need = ".".join(map(str, MIN_TRANSFORMERS))
    try:
        import transformers  # the reference implementation, imported only by this command's checks
    except ImportError:
        raise VerifyInputError(
            f"transformers is not installed; verify compares against it: pip install 'transformers>={need}'"
        ) from None
    version = transformers.__version__
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_TRANSFORMERS:
        raise VerifyInputError(
            f"transformers {version} is too old for verify; pip install -U 'transformers>={need}'"
        )
    return version


def config_dir(path: str) -> str:
    """The directory holding `config.json`: the HF directory itself, or a training checkpoint's hf_assets."""
    if not os.path.isdir(path):
        raise VerifyInputError(
            f"{path}: no such directory; pass a Hugging Face checkpoint directory or a training checkpoint / "
            "run directory from `vlmtune train`"
        )
    if is_hf_dir(path):
        return path
    try:
        return os.path.join(resolve(path), HF_ASSETS)
    except CheckpointError as e:
        raise VerifyInputError(
            f"{e}; nor is it a Hugging Face checkpoint directory (no config.json)"
        ) from None


def _free() -> None:
    """Return the memory of a model whose last reference the caller has just deleted."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ vlmtune side


@torch.no_grad()
def vlmtune_record(model, case: Case, tokens: int) -> dict:
    """Logits at the real positions `[n, V]`, the model's loss, and `tokens` greedy tokens with their logits."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in case.forward.items()})
    record = {"logits": out.logits[case.keep.to(device)].cpu(), "loss": float(out.loss)}
    if case.prompt is not None and tokens > 0:
        steps = list(stream(model, case.prompt, max_new_tokens=tokens))
        record["tokens"] = torch.stack([s.tokens for s in steps], 1).cpu()  # [B, N]
        record["step_logits"] = torch.stack([s.logits.float() for s in steps], 1).cpu()  # [B, N, V]
    return record


def run_vlmtune(
    model, cases: list[Case], out_dir: str | None, tokens: int, desc: str, progress: bool
) -> None:
    """Every case through `model`; records written to `out_dir` (None: computed but not kept, other ranks)."""
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    for i, case in enumerate(tqdm(cases, desc=desc, unit="input", disable=not progress)):
        record = vlmtune_record(model, case, tokens)
        if out_dir is not None:
            torch.save(record, os.path.join(out_dir, f"{i:03d}.pt"))


def parallel_model(hf_dir: str, info, dtype: torch.dtype) -> Qwen3VL:
    """Built on the meta device, sharded by tensor / expert parallelism, then each rank's slices streamed in."""
    model = build_model(load_config(hf_dir), dtype=dtype)
    if info.parallel.tp > 1:
        apply_tensor_parallel(model, info.mesh["tp"], gather_logits=True)
    if info.parallel.ep > 1:
        apply_expert_parallel(model, info.mesh["ep"])
    materialize(model, info.device)
    with implicit_replication():  # a full checkpoint tensor copied into a sharded parameter keeps its slice
        load_weights(model, hf_dir)
    return model.eval()


# ------------------------------------------------------------------------------------------ reference side


def load_reference(hf_dir: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForImageTextToText  # the reference, checked by transformers_version()

    extra = {"experts_implementation": "eager"} if load_config(hf_dir).is_moe else {}
    model = AutoModelForImageTextToText.from_pretrained(
        hf_dir, dtype=dtype, attn_implementation="eager", **extra
    )
    return model.to(device).eval()


def _hf_inputs(batch: dict, image_id: int, video_id: int, device) -> dict:
    """transformers' keywords: no position_ids (it computes its own), `mm_token_type_ids` marking vision."""
    ids = batch["input_ids"]
    ids = ids[None] if ids.ndim == 1 else ids
    out = {"input_ids": ids, "mm_token_type_ids": (ids == image_id).long() + 2 * (ids == video_id).long()}
    out.update({k: batch[k] for k in ("attention_mask", *MEDIA_KEYS) if batch.get(k) is not None})
    return {k: v.to(device) for k, v in out.items()}


@torch.no_grad()
def reference_record(hf, case: Case, ours: dict, tokens: int, ids: tuple[int, int], pad_id: int) -> dict:
    """The reference's record of `case`: a packed row is run sample by sample (transformers has no packed
    rows with eager attention); generation stops at a token vlmtune never chose, so both run N steps."""
    device = hf.device
    parts = case.parts or [case.forward]
    rows = []
    for part in parts:
        logits = hf(**_hf_inputs(part, *ids, device)).logits
        labels = part["labels"].view(logits.shape[:2])
        keep = case.keep if case.parts is None else torch.ones_like(labels, dtype=torch.bool)
        rows += [(logits[b][keep[b].to(device)], labels[b][keep[b]]) for b in range(logits.shape[0])]
    record = {"logits": torch.cat([r[0] for r in rows]).cpu(), "loss": token_mean_loss(rows)}
    if case.prompt is not None and tokens > 0 and "tokens" in ours:
        used = set(ours["tokens"].flatten().tolist())
        sentinel = next(t for t in range(len(used) + 1) if t not in used)
        kwargs = _hf_inputs(case.prompt, *ids, device)
        out = hf.generate(
            **kwargs, max_new_tokens=tokens, do_sample=False, repetition_penalty=1.0, eos_token_id=sentinel,
            pad_token_id=pad_id, return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
        record["tokens"] = out.sequences[:, kwargs["input_ids"].shape[1] :].cpu()
        record["step_logits"] = torch.stack(out.logits, 1).float().cpu()
    return record


# ------------------------------------------------------------------------------------------ the command


def _prepare(opts: VerifyOptions) -> tuple[str, str, str | None]:
    """(work dir, HF directory, synthetic media dir): a training checkpoint is exported (streamed) so that
    transformers can load it; the synthetic images and video are drawn."""
    model_config = config_dir(opts.model)
    work = opts.work_dir or tempfile.mkdtemp(prefix="vlmtune-verify-")
    os.makedirs(work, exist_ok=True)
    hf_dir = opts.model
    if model_config != opts.model:
        log.info("exporting %s to a Hugging Face directory for transformers", opts.model)
        hf_dir = native_to_hf(opts.model, os.path.join(work, "hf"))
    media = write_media(os.path.join(work, "media")) if opts.samples is None else None
    return work, hf_dir, media


def _on_rank0(info, fn):
    """`fn()` on rank 0, its result (or its input error) given to every rank."""
    if info is None:
        return fn()
    payload = None
    if info.rank == 0:
        try:
            payload = ("ok", fn())
        except (OSError, ValueError) as e:
            payload = ("error", str(e))
    status, value = broadcast_object(payload, src=0)
    if status == "error":
        raise VerifyInputError(value)
    return value


def build_inputs(opts: VerifyOptions, hf_dir: str, media_dir: str | None) -> tuple[list[Case], int]:
    """(cases, pad token id): the user's samples, or the synthetic set, through the checkpoint's processor."""
    directory = opts.processor or hf_dir
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        raise VerifyInputError(
            f"{directory}: no tokenizer files (tokenizer_config.json); pass --processor DIR, a Hugging Face "
            "directory with the tokenizer and preprocessor configs"
        )
    processor = build_processor(directory)
    pad = pad_token_id(processor.tokenizer)
    if opts.samples is None:
        return build_cases(
            processor, synthetic_samples(), media_dir, pad, BATCH_KINDS, ", ".join(BATCH_KINDS)
        ), pad
    if not opts.samples:
        raise VerifyInputError("no samples to verify with; check --data and --max-samples")
    samples = user_samples(opts.samples)
    batch = list(samples)[:3]
    return build_cases(processor, samples, opts.dataset_dir, pad, batch, f"samples 0-{len(batch) - 1}"), pad


def _start_distributed(opts: VerifyOptions):
    """(DistInfo, whether we created the process group) under torchrun; (None, False) for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and opts.tp * opts.ep == 1:
        return None, False
    if world != opts.tp * opts.ep:
        raise VerifyInputError(
            f"--parallel.tp={opts.tp} x --parallel.ep={opts.ep} needs {opts.tp * opts.ep} processes (every rank "
            f"runs every input), but {world} were launched: "
            f"torchrun --nproc_per_node {opts.tp * opts.ep} -m vlmtune.cli verify ..."
        )
    owned = not dist.is_initialized()
    args = load_config(config_dir(opts.model))
    try:
        return init_distributed(opts.device, ParallelConfig(tp=opts.tp, ep=opts.ep), args), owned
    except ParallelError as e:
        raise VerifyInputError(str(e)) from None


def verify(opts: VerifyOptions) -> dict | None:
    """Run every check; the report on rank 0 (None on the other ranks of a parallel run)."""
    if opts.dtype not in DTYPES:
        raise VerifyInputError(f"--dtype {opts.dtype}: use one of {', '.join(DTYPES)}")
    version = transformers_version()
    info, owned = _start_distributed(opts)
    rank0 = info is None or info.rank == 0
    work, hf_dir, media = _on_rank0(info, lambda: _prepare(opts))
    try:
        cases, pad = build_inputs(opts, hf_dir, media)
        if info is not None:
            layout = f"tp{opts.tp} x ep{opts.ep}"
            model = parallel_model(hf_dir, info, DTYPES[opts.dtype])
            out = os.path.join(work, "parallel") if rank0 else None
            run_vlmtune(model, cases, out, opts.tokens, f"vlmtune {layout}", opts.progress and rank0)
            del model
            _free()
            barrier()
            if owned:
                close_distributed()
            if not rank0:
                return None
        checks = _one_process_checks(opts, hf_dir, cases, pad, work, info is not None)
        round_trip = None
        if opts.round_trip:
            round_trip = round_trip_check(hf_dir, os.path.join(work, "round_trip"), opts.progress)
        return report(opts, version, checks, round_trip)
    finally:
        if rank0 and opts.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def _one_process_checks(
    opts: VerifyOptions, hf_dir: str, cases: list[Case], pad: int, work: str, parallel: bool
):
    """vlmtune in one process (records to disk, model freed), the parallel records against them, then
    transformers input by input against them."""
    dtype, tol = DTYPES[opts.dtype], Tolerance(opts.dtype)
    ours_dir = os.path.join(work, "vlmtune")
    # A process group the caller created outlives the parallel pass; a DCP load (training checkpoint) on
    # rank 0 alone would wait for the other ranks, so rank 0 reads the HF export instead.
    model = load_model(hf_dir if dist.is_initialized() else opts.model, dtype=dtype, device=opts.device)
    run_vlmtune(model, cases, ours_dir, opts.tokens, f"vlmtune ({opts.dtype}, {opts.device})", opts.progress)
    del model
    _free()

    def ours(i: int, sub: str = "vlmtune") -> dict:
        return torch.load(os.path.join(work, sub, f"{i:03d}.pt"))

    checks = []
    if parallel:
        name = f"tp{opts.tp} x ep{opts.ep} vs one process"
        checks += [
            {"check": name, **compare_records(c.kind, ours(i, "parallel"), ours(i), tol)}
            for i, c in enumerate(cases)
        ]
    hf = load_reference(hf_dir, dtype, opts.device)
    args = load_config(hf_dir)
    ids = (args.image_token_id, args.video_token_id)
    for i, case in enumerate(tqdm(cases, desc="transformers", unit="input", disable=not opts.progress)):
        mine = ours(i)
        ref = reference_record(hf, case, mine, opts.tokens, ids, pad)
        checks.append({"check": "vs transformers", **compare_records(case.kind, mine, ref, tol)})
    del hf
    _free()
    return checks


def round_trip_check(hf_dir: str, out_dir: str, progress: bool = False) -> dict:
    """HF -> vlmtune (the checkpoint's own dtype) -> HF, compared bitwise tensor by tensor; the copy is removed."""
    model = load_pretrained(hf_dir)
    save_pretrained(model, out_dir)
    del model
    _free()
    try:
        return compare_checkpoints(hf_dir, out_dir, progress)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def report(opts: VerifyOptions, version: str, checks: list[dict], round_trip: dict | None) -> dict:
    failed = [c for c in checks if not c["passed"]]
    passed = not failed and (round_trip is None or round_trip["passed"])
    out = {
        "model": opts.model,
        "reference": f"transformers {version}",
        "dtype": opts.dtype,
        "device": opts.device,
        "tokens": opts.tokens,
        "inputs": "synthetic" if opts.samples is None else f"{len(opts.samples)} samples",
        "tolerance": Tolerance(opts.dtype).describe(),
        "checks": checks,
        "round_trip": round_trip,
        "passed": passed,
    }
    out["summary"] = summary(out)
    return out


def summary(rep: dict) -> str:
    """One line: PASS with the largest differences, or FAIL naming every input kind that failed and why."""
    checks, rt = rep["checks"], rep["round_trip"]
    if rep["passed"]:
        worst = max((c["max_abs"] for c in checks), default=0.0)
        groups = sorted({c["check"] for c in checks})
        text = f"PASS: {len(checks)} checks ({', '.join(groups)}; {rep['dtype']}), largest logits max-abs {worst:.2g}"
        return text + (f"; round trip bitwise identical ({rt['tensors']} tensors)" if rt else "")
    parts = []
    for group in dict.fromkeys(c["check"] for c in checks if not c["passed"]):
        bad = [c for c in checks if c["check"] == group and not c["passed"]]
        kinds = ", ".join(c["kind"] for c in bad)
        parts.append(f"{group}: {kinds} (e.g. {bad[0]['kind']}: {bad[0]['failures'][0]})")
    if rt and not rt["passed"]:
        parts.append(f"round trip: {len(rt['mismatches'])} tensor(s) differ, e.g. {rt['mismatches'][0]}")
    return "FAIL: " + "; ".join(parts)

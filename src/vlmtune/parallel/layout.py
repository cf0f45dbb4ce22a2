"""The `parallel:` section: sizes of every dimension, validated against the world and the model, and the one
DeviceMesh they describe.

World = pp x dp_replicate x dp_shard x cp x tp. Expert parallelism borrows from data parallelism: the
dp_shard ranks split into (dp_shard / ep, ep); experts are sharded over `ep` and FSDP-sharded over the rest,
every other parameter is FSDP-sharded over all of dp_shard (HSDP when dp_replicate > 1). Context parallel
ranks share one row (same data) but hold different tokens, so FSDP also shards over them (`dp_shard_cp`).

Mesh dimension names: "pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp", plus the flattened
"dp_shard" (dp_shard_mod_ep x ep), "dp" (every data shard: the loader and the loss normalisers), "dp_cp"
(dp x cp: every rank holding part of a step's loss), "dp_shard_cp" (FSDP of non-expert weights) and
"dp_shard_mod_ep_cp" (FSDP of experts).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import init_device_mesh

from vlmtune.errors import ParallelError
from vlmtune.models.qwen3_vl import ModelArgs
from vlmtune.options import option as _f

from .context import validate_context_parallel
from .expert import validate_expert_parallel
from .pipeline import plan_stages
from .tensor import validate_tensor_parallel


@dataclass
class ParallelConfig:
    dp_replicate: int = _f(1, "HSDP replicas (each holds a full FSDP-sharded copy)")
    dp_shard: int = _f(-1, "FSDP2 shards (-1: the rest of the world)")
    tp: int = _f(1, "tensor parallel size (attention heads, intermediate units, vocabulary)")
    pp: int = _f(1, "pipeline parallel size (stages cut by llm_pp_layers)")
    ep: int = _f(1, "expert parallel size (MoE); divides dp_shard and the number of experts")
    cp: int = _f(1, "context parallel size: each packed row split over cp ranks (Ulysses; long videos)")
    llm_pp_layers: list = _f([], "decoder layers per pipeline stage, e.g. [6, 10, 10, 10]")
    vit_pp_layers: list = _f(
        [], "vision blocks per stage from the first, e.g. [27, 0, 0, 0] or [10, 17, 0, 0]"
    )
    pp_schedule: str = _f("1f1b", "pipeline schedule", ("1f1b", "interleaved"))
    pp_microbatches: int = _f(0, "pipeline micro-batches per step (0: the gradient accumulation steps)")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard


def _ways(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def resolve(cfg: ParallelConfig, world_size: int, args: ModelArgs | None = None) -> ParallelConfig:
    """Fill dp_shard=-1 and check every size; errors say which sizes would work."""
    for name in ("dp_replicate", "tp", "pp", "ep", "cp"):
        if getattr(cfg, name) < 1:
            raise ParallelError(f"parallel.{name} must be >= 1, got {getattr(cfg, name)}")
    fixed = cfg.dp_replicate * cfg.tp * cfg.pp * cfg.cp
    if world_size % fixed:
        raise ParallelError(
            f"dp_replicate x tp x pp x cp = {fixed} does not divide the world size {world_size}; "
            f"their product must be one of {_ways(world_size)}"
        )
    dp_shard = world_size // fixed if cfg.dp_shard == -1 else cfg.dp_shard
    if fixed * dp_shard != world_size:
        raise ParallelError(
            f"dp_replicate {cfg.dp_replicate} x dp_shard {dp_shard} x tp {cfg.tp} x pp {cfg.pp} x cp {cfg.cp} = "
            f"{fixed * dp_shard}, but {world_size} processes were launched; set parallel.dp_shard: -1 or "
            f"{world_size // fixed}"
        )
    if dp_shard % cfg.ep:
        raise ParallelError(
            f"parallel.ep={cfg.ep} must divide dp_shard={dp_shard} (experts are spread over data-parallel ranks); "
            f"ep can be one of {_ways(dp_shard)}"
        )
    if cfg.pp_schedule not in ("1f1b", "interleaved"):
        raise ParallelError(f"parallel.pp_schedule must be '1f1b' or 'interleaved', got {cfg.pp_schedule!r}")
    out = ParallelConfig(**{**cfg.__dict__, "dp_shard": dp_shard})
    validate_context_parallel(out.cp, out.tp, out.pp, args)
    if args is not None:
        if out.tp > 1:
            validate_tensor_parallel(args, out.tp)
        if out.ep > 1:
            if not args.is_moe:
                raise ParallelError("parallel.ep > 1 needs a MoE model (qwen3_vl_moe)")
            validate_expert_parallel(args.text.num_experts, out.ep)
        if out.pp > 1:
            if not out.llm_pp_layers:
                raise ParallelError(
                    f"parallel.pp={out.pp} needs parallel.llm_pp_layers, e.g. {even_split(args.text.num_hidden_layers, out.pp)}"
                )
            plan_stages(args, out.llm_pp_layers, out.vit_pp_layers or None, out.pp)
            _check_schedule(out)
    return out


def _check_schedule(cfg: ParallelConfig) -> None:
    n = len(cfg.llm_pp_layers)
    if cfg.pp_schedule == "1f1b" and n != cfg.pp:
        raise ParallelError(
            f"parallel.pp_schedule 1f1b runs one stage per rank: llm_pp_layers needs {cfg.pp} entries, has {n} "
            "(several stages per rank: pp_schedule: interleaved)"
        )
    if cfg.pp_schedule == "interleaved" and n < 2 * cfg.pp:
        raise ParallelError(
            f"parallel.pp_schedule interleaved needs at least 2 stages per rank: llm_pp_layers has {n} entries "
            f"for pp={cfg.pp}; give it a multiple of {cfg.pp}, >= {2 * cfg.pp}"
        )


def even_split(n: int, parts: int) -> list[int]:
    """`n` layers over `parts` stages, the remainder on the last stages (the first carries the vision tower)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i >= parts - extra else 0) for i in range(parts)]


class LayoutMesh:
    """The root DeviceMesh plus its flattened dimensions, by name: `mesh["tp"]`, `mesh["dp"]`, ... and the
    2-D `mesh["dp_replicate", "dp_shard"]` for HSDP. (PyTorch asks callers to keep flattened meshes rather
    than slice them from the root again.)"""

    def __init__(self, root, flat: dict):
        self.root, self.flat = root, flat

    def __getitem__(self, name):
        if isinstance(name, str) and name in self.flat:
            return self.flat[name]
        if name == ("dp_replicate", "dp_shard"):
            return self.flat["hsdp"]
        return self.root[name]


def build_mesh(cfg: ParallelConfig, device_type: str) -> LayoutMesh:
    """The DeviceMesh of a resolved config (see the module docstring for the dimension names)."""
    # cp sits between dp_shard_mod_ep and ep so that the FSDP meshes (dp_shard_mod_ep x cp [x ep]) are
    # contiguous dimensions ahead of ep and tp: DTensor flattens a 2-D (FSDP, ep or tp) mesh only then.
    names = ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
    shape = (cfg.pp, cfg.dp_replicate, cfg.dp_shard // cfg.ep, cfg.cp, cfg.ep, cfg.tp)
    root = init_device_mesh(device_type, shape, mesh_dim_names=names)
    flat = {
        "dp_shard": root["dp_shard_mod_ep", "ep"]._flatten("dp_shard"),
        "dp": root["dp_replicate", "dp_shard_mod_ep", "ep"]._flatten("dp"),
        **_context_meshes(root),
    }
    if cfg.dp_replicate > 1:
        # HSDP: replicate over dp_replicate, shard over dp_shard x cp (the ep ranks included).
        shards = cfg.dp_shard * cfg.cp
        flat["hsdp"] = flat["dp_cp"]._unflatten(
            0, (cfg.dp_replicate, shards), ("dp_replicate", "dp_shard_cp")
        )
        experts = root["dp_replicate", "dp_shard_mod_ep", "cp"]._flatten("expert_dp")
        flat["expert_hsdp"] = experts._unflatten(
            0, (cfg.dp_replicate, shards // cfg.ep), ("dp_replicate", "dp_shard_mod_ep_cp")
        )
    return LayoutMesh(root, flat)


def _context_meshes(root) -> dict:
    """The flattened meshes that include cp (the same ranks as their cp-free names when cp is 1)."""
    return {
        "dp_cp": root["dp_replicate", "dp_shard_mod_ep", "cp", "ep"]._flatten("dp_cp"),
        "dp_shard_cp": root["dp_shard_mod_ep", "cp", "ep"]._flatten("dp_shard_cp"),
        "dp_shard_mod_ep_cp": root["dp_shard_mod_ep", "cp"]._flatten("dp_shard_mod_ep_cp"),
    }

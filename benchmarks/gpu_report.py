"""`benchmarks/gpu.py`'s report: gpu_report.json (everything) and gpu_report.md (the tables)."""

from __future__ import annotations

import json
import os


def _fmt(x, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _varlen(r: dict) -> list[str]:
    rows = [
        "| shape | path | tokens / samples | rel err out, dq, dk, dv | fwd+bwd ms |",
        "|---|---|---|---|---|",
    ]
    for name, v in r.items():
        if isinstance(v, dict) and "rel_err" in v:
            err = ", ".join(_fmt(e, ".1e") for e in v["rel_err"].values())
            rows.append(f"| {name} | {v['path']} ({v['dtype']}) | {v['tokens']} / {v['samples']} | {err} | "
                        f"{_fmt(v['fwd_bwd_ms'], '.2f')} |")  # fmt: skip
    return rows


def _grouped(r: dict) -> list[str]:
    if "rel_err" not in r:
        return [f"grouped GEMM: {r.get('grouped_mm')}"]
    err = ", ".join(f"{k} {_fmt(e, '.1e')}" for k, e in r["rel_err"].items())
    speed = r["loop_ms"] / r["grouped_ms"] if r.get("grouped_ms") else None
    return [
        "| shape | empty experts | rel err vs loop | grouped ms | loop ms | speed-up |",
        "|---|---|---|---|---|---|",
        f"| {r['shape']} | {r['empty_experts']} | {err} | {_fmt(r['grouped_ms'], '.2f')} | "
        f"{_fmt(r['loop_ms'], '.2f')} | {_fmt(speed, '.2f')}x |",
    ]


def _syncs(r: dict) -> list[str]:
    rows = ["| layer (forward + backward) | host syncs |", "|---|---|"]
    rows += [f"| {k} | {'not counted (CPU)' if v is None else v} |" for k, v in r.items() if k not in _META]
    return rows


def _throughput(r: dict) -> list[str]:
    rows = ["| model | implementation | tokens/s | MFU | peak memory GiB | tokens/s vs transformers |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for kind, sides in r.items():
        if kind in _META:
            continue
        base = sides.get("transformers", {}).get("tokens_per_s")
        for name, s in sides.items():
            if "error" in s:
                rows.append(f"| {kind} | {name} | failed: {s['error'][:80]} | | | |")
                continue
            ratio = s["tokens_per_s"] / base if base else None
            rows.append(f"| {kind} | {name} | {_fmt(s['tokens_per_s'], '.0f')} | {_fmt(s['mfu'], '.1%')} | "
                        f"{_fmt(s['max_memory_allocated_gib'], '.1f')} | {_fmt(ratio, '.2f')} |")  # fmt: skip
    return rows


def _context(r: dict) -> list[str]:
    from bench_cp import table

    return [*table(r).splitlines(), *[f"- skipped: {s}" for s in r.get("skipped", [])]]


def _lora(r: dict) -> list[str]:
    from bench_lora import table

    return ["```", *table(r["modes"], r["title"]).splitlines(), "```"]


_META = ("status", "seconds", "error")
_TABLES = {"varlen": _varlen, "grouped_gemm": _grouped, "syncs": _syncs, "throughput": _throughput,
           "context_parallel": _context, "lora": _lora}  # fmt: skip


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU report{' (dry run: toy sizes, measures nothing)' if report['dry_run'] else ''}", "",
             f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
             f"commit {env['commit']}; {report['seconds']} s in all", ""]  # fmt: skip
    for name, r in report["sections"].items():
        lines.append(f"## {name}: {r['status']} ({r['seconds']} s)")
        lines.append("")
        if r["status"] != "ok":
            lines += ["```", r.get("error", ""), "```"]
        elif name in _TABLES:
            lines += _TABLES[name](r)
        elif name == "pytest":
            lines += [f"`{r['summary']}`", *[f"- {f}" for f in r["failures"]]]
        else:
            lines.append(f"`{json.dumps({k: v for k, v in r.items() if k not in _META})}`")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    md = markdown(report)
    with open(os.path.join(out_dir, "gpu_report.md"), "w") as f:
        f.write(md + "\n")
    return md

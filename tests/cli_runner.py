"""Run `vlmtune` command lines quickly and in isolation, for tests that try many of them (no tests here).

Starting Python and importing torch + transformers costs seconds per command on a small machine, so a server
process imports `vlmtune.cli` once and forks a fresh child per command line: the child runs
`vlmtune.cli.main(argv)` -- exactly what the `vlmtune` console script runs -- with its stdout and stderr in a
file, in its own working directory and environment, and is killed when it overruns its timeout. Anything the
command leaves uncaught prints its traceback, as the console script would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")

SERVER = r"""
import json, os, sys, time, signal, traceback
from vlmtune.cli import main
import transformers.models.auto.tokenization_auto  # what most commands load next: import it once here

print("ready", flush=True)
for line in sys.stdin:
    case = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(case["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(case["cwd"])
        os.environ.update(case["env"])
        try:
            rc = main(case["argv"])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(rc)
    deadline, status = time.monotonic() + case["timeout"], None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.02)
    print(json.dumps({"rc": status}), flush=True)
"""


@dataclass
class Result:
    rc: int | str  # exit status, or "timeout"
    output: str  # stdout and stderr together


class CliServer:
    """`run(argv)` -> Result of `vlmtune argv` in a forked child of one long-lived Python process."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env["CUDA_VISIBLE_DEVICES"] = (
            ""  # the corpus is about input, not devices; forked children never init CUDA
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout.readline().strip() == "ready"
        self.count = 0

    def run(self, argv: list[str], *, cwd: str | None = None, env: dict | None = None, timeout: float = 60):
        self.count += 1
        out = os.path.join(self.workdir, f"case_{self.count:03d}.log")
        case = {"argv": argv, "cwd": cwd or self.workdir, "env": env or {}, "out": out, "timeout": timeout}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        with open(out, encoding="utf-8", errors="replace") as f:
            return Result(rc, f.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

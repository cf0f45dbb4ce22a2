"""Read MindSpeed-MM Qwen3-VL configs into one flat table of settings (`Sources`).

Each file is recognised by its content: a finetune shell script (Megatron flags in `GPT_ARGS`, or a launcher
that passes a YAML), a data JSON (`dataset_param`), a model JSON (`text_decoder` / `image_encoder`), the
single YAML (`gpt_args`, `data`, `model`, `lora_args`) or an FSDP2 settings YAML (`fsdp2_config_path`).
Every leaf becomes one `Setting` under a canonical name:

  args.<flag_with_underscores>   GPT_ARGS flags, gpt_args and lora_args (MindSpeed-MM turns the YAML's
                                 gpt_args/lora_args leaves into these same flags)
  data.<dotted path>             the data JSON, or the YAML's data section
  model.<dotted path>            the model JSON, or the YAML's model section
  fsdp2.<key>                    the FSDP2 settings YAML
  launch.<VAR> / yaml.<KEY>      launcher variables (NPUS_PER_NODE, NNODES) / the YAML's anchor holders

A shell script is not run: its own variables are expanded (`$X`, `${X}`, `$((arithmetic))`), comments
and line continuations are handled, and the flags are those of the `pretrain_*.py` command line.
"""

from __future__ import annotations

import ast
import json
import operator
import os
import re
from dataclasses import dataclass

import yaml

from vlmtune.errors import ConfigError

LAUNCH_VARS = ("NPUS_PER_NODE", "GPUS_PER_NODE", "NPROC_PER_NODE", "NNODES")
_COMMAND = re.compile(r"\b(pretrain|posttrain)_\w+\.py\b|\btrainer\.py\b")
_ASSIGN = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$", re.S)


@dataclass
class Setting:
    name: str  # canonical: args.lr, data.dataset_param.basic_parameters.dataset, ...
    value: object
    file: str  # the file as given or followed
    key: str  # as written in the file: --lr, gpt_args.lr, dataset_param.basic_parameters.dataset


class Sources:
    """Settings by canonical name, plus which were used by a mapping rule."""

    def __init__(self):
        self.settings: dict[str, Setting] = {}
        self.files: list[tuple[str, str]] = []  # (path, kind)
        self.used: set[str] = set()

    def add(self, s: Setting) -> None:
        old = self.settings.get(s.name)
        if old is not None and old.value != s.value and old.file != s.file:
            raise ConfigError(
                f"{s.file}: {s.key} = {s.value!r} contradicts {old.file}: {old.key} = {old.value!r}; "
                "keep one of them"
            )
        self.settings[s.name] = s

    def take(self, name: str) -> Setting | None:
        """The setting (marked as used), or None when no file sets it."""
        s = self.settings.get(name)
        if s is not None:
            self.used.add(name)
        return s

    def rest(self) -> list[Setting]:
        return [s for n, s in self.settings.items() if n not in self.used]


# ---------------------------------------------------------------------------------------------- files
def read_sources(paths: list[str]) -> Sources:
    """Read every file, then the data/model/YAML/FSDP2 files a script or YAML names, when they exist and no
    FILE of the same kind was given."""
    src, seen, queue = Sources(), set(), [(p, False) for p in paths]
    while queue:
        path, followed = queue.pop(0)
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        part = Sources()
        kind, named = _read_file(path, part)
        other = next((p for p, k in src.files if k == kind and kind != "finetune script"), None)
        if other is not None and followed:
            continue  # a FILE given on the command line wins over the one a script names
        if other is not None:
            raise ConfigError(f"{path}: a second {kind} after {other}; pass one {kind}")
        for setting in part.settings.values():
            src.add(setting)
        src.files.append((path, kind))
        queue.extend((p, True) for p in named)
    return src


def _read_file(path: str, src: Sources) -> tuple[str, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror}); check the path") from e
    if text.lstrip().startswith("{"):
        return _read_json(path, text, src)
    try:
        raw, bad_yaml = yaml.safe_load(text), None
    except yaml.YAMLError as e:
        raw, bad_yaml = None, e
    if isinstance(raw, dict):
        return _read_yaml(path, raw, src)
    if _looks_like_shell(text):
        return "finetune script", _read_script(path, text, src)
    if bad_yaml is not None:
        raise ConfigError(f"{path}: invalid YAML ({bad_yaml}); fix the file")
    return _read_yaml(path, raw, src)


def _looks_like_shell(text: str) -> bool:
    return text.startswith("#!") or bool(_COMMAND.search(text) or re.search(r"(?m)^\s*[A-Za-z_]\w*=", text))


def _read_json(path: str, text: str, src: Sources) -> tuple[str, list[str]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} ({e.msg}); fix the file") from e
    if isinstance(raw, dict) and "dataset_param" in raw:
        _add_tree(src, path, "data", raw, "")
        return "data JSON", []
    if isinstance(raw, dict) and {"text_decoder", "image_encoder"} & set(raw):
        _add_tree(src, path, "model", raw, "")
        return "model JSON", []
    raise ConfigError(
        f"{path}: a JSON file without dataset_param (data JSON) or text_decoder/image_encoder (model JSON); "
        "pass MindSpeed-MM's data_*.json or model_*.json"
    )


def _read_yaml(path: str, raw, src: Sources) -> tuple[str, list[str]]:
    if isinstance(raw, dict) and "gpt_args" in raw:
        return "single YAML", _read_single_yaml(path, raw, src)
    if isinstance(raw, dict) and {"param_dtype", "sharding_size"} & set(raw):
        for key, value in raw.items():
            src.add(Setting(f"fsdp2.{key}", value, path, key))
        return "FSDP2 settings", []
    if isinstance(raw, dict) and {"training", "features"} & set(raw):
        raise ConfigError(
            f"{path}: the native-FSDP2 trainer YAML (training/features sections) is not supported yet; "
            "import the pretrain_transformers.py form (gpt_args/data/model) of the same model"
        )
    raise ConfigError(
        f"{path}: not a MindSpeed-MM Qwen3-VL config (expected a finetune_*.sh, data_*.json, model_*.json "
        "or a YAML with gpt_args); pass those files"
    )


def _read_single_yaml(path: str, raw: dict, src: Sources) -> list[str]:
    for top, value in raw.items():
        if top in ("gpt_args", "lora_args"):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {top} must be a mapping of keys, got {value!r}")
            for key, leaf, dotted in _leaves(value, ""):
                src.add(Setting(f"args.{key}", leaf, path, f"{top}.{dotted}"))
        elif top in ("data", "model") and isinstance(value, dict):
            _add_tree(src, path, top, value, f"{top}.")
        else:
            src.add(Setting(f"yaml.{top}", value, path, top))
    fsdp = src.settings.get("args.fsdp2_config_path")
    return _existing([str(fsdp.value)], path) if fsdp else []


def _leaves(tree: dict, prefix: str):
    """(leaf key, value, dotted path) of every non-mapping value."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, dotted + ".")
        else:
            yield key, value, dotted


def _add_tree(src: Sources, path: str, section: str, tree: dict, label_prefix: str) -> None:
    for _, value, dotted in _leaves(tree, ""):
        src.add(Setting(f"{section}.{dotted}", value, path, label_prefix + dotted))


def _existing(candidates: list[str], base_file: str) -> list[str]:
    """Paths named in a file, when found: as given, beside that file, or by file name beside it."""
    here = os.path.dirname(os.path.abspath(base_file))
    found = []
    for p in candidates:
        for c in (p, os.path.join(here, p), os.path.join(here, os.path.basename(p))):
            if os.path.isfile(c):
                rel = os.path.relpath(c)
                found.append(c if rel.startswith("..") else rel)
                break
    return found


# --------------------------------------------------------------------------------------------- shell
def _read_script(path: str, text: str, src: Sources) -> list[str]:
    env: dict[str, str] = {}
    command = None
    for stmt in shell_statements(text):
        m = _ASSIGN.match(stmt)
        words = split_words(m.group(2), env, path, split=False) if m else []
        if m and len(words) <= 1:  # NAME=value (not `NAME=value command ...`)
            env[m.group(1)] = words[0] if words else ""
        elif _COMMAND.search(stmt):
            command = stmt
    for var in LAUNCH_VARS:
        if var in env:
            src.add(Setting(f"launch.{var}", env[var], path, var))
    if command is None:  # no launcher line: the usual argument groups
        command = "pretrain.py " + " ".join(
            f"${v}" for v in ("GPT_ARGS", "MM_ARGS", "OUTPUT_ARGS") if v in env
        )
    positional, flags = parse_flags(command_words(command, env, path))
    for flag, value in flags.items():
        src.add(Setting(f"args.{flag[2:].replace('-', '_')}", value, path, flag))
    named = [p for p in positional if p.endswith((".yaml", ".yml", ".json"))]
    named += [str(flags[f]) for f in ("--mm-data", "--mm-model", "--fsdp2-config-path") if f in flags]
    return _existing(named, path)


def shell_statements(text: str) -> list[str]:
    """Logical statements: comments dropped, backslash-newline joined, newlines inside quotes kept.

    A comment after a continuation backslash (`--no-load-optim \\  # note`, as the MindSpeed-MM guide
    writes inside GPT_ARGS) is dropped too, so the flags stay one list."""
    text = re.sub(r"\\[ \t]+#[^\n]*\n", "\\\n", text)
    out, cur, quote, i = [], [], None, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and quote != "'":
            if text[i + 1] != "\n":
                cur.append(text[i : i + 2])
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (not cur or cur[-1][-1:].isspace()):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif c in "\n;":
            out.append("".join(cur).strip())
            cur, i = [], i + 1
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur).strip())
    return [s for s in out if s]


def split_words(raw: str, env: dict, path: str, *, split: bool = True) -> list[str]:
    """Shell words of `raw` with the script's variables expanded; unquoted expansions are word-split when
    `split` (a command line), not in an assignment's value."""
    words, cur, started, i = [], [], False, 0
    while i < len(raw):
        c = raw[i]
        if c.isspace():
            if started:
                words.append("".join(cur))
            cur, started, i = [], False, i + 1
            continue
        if c == "'":
            j = raw.find("'", i + 1)
            j = len(raw) if j < 0 else j
            cur.append(raw[i + 1 : j])
            started, i = True, j + 1
        elif c == '"':
            j = _closing_quote(raw, i)
            cur.append(_expand(raw[i + 1 : j], env, path))
            started, i = True, j + 1
        elif c == "$":
            text, i = _expansion(raw, i, env, path)
            parts = text.split() if split else [text]
            if split and parts and text[:1].isspace() and started:
                words.append("".join(cur))
                cur, started = [], False
            for k, part in enumerate(parts):
                if k:
                    words.append("".join(cur))
                    cur = []
                cur.append(part)
                started = True
            if split and text[-1:].isspace() and started:
                words.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(raw[i + 1] if c == "\\" and i + 1 < len(raw) else c)
            started, i = True, i + (2 if c == "\\" else 1)
    if started:
        words.append("".join(cur))
    return words


def _closing_quote(raw: str, i: int) -> int:
    j = i + 1
    while j < len(raw) and raw[j] != '"':
        j += 2 if raw[j] == "\\" else 1
    return min(j, len(raw))


def _expand(text: str, env: dict, path: str) -> str:
    """Expansions inside double quotes (no word splitting)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$":
            value, i = _expansion(text, i, env, path)
            out.append(value)
        elif text[i] == "\\" and i + 1 < len(text) and text[i + 1] in '$"\\`':
            out.append(text[i + 1])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _expansion(text: str, i: int, env: dict, path: str) -> tuple[str, int]:
    """The value of the expansion starting at text[i] == '$', and the index after it."""
    if text.startswith("$((", i):
        end = text.find("))", i)
        if end < 0:
            raise ConfigError(f"{path}: unterminated $(( in {text[i : i + 40]!r}; fix the script")
        return str(_arithmetic(text[i + 3 : end], env, path)), end + 2
    if text.startswith("$(", i):  # command substitution (dates, ...): kept as written, never a setting
        end = text.find(")", i)
        end = len(text) - 1 if end < 0 else end
        return text[i : end + 1], end + 1
    m = re.match(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", text[i:])
    if not m:
        return "$", i + 1
    return env.get(m.group(1) or m.group(2), ""), i + m.end()


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: lambda a, b: int(a / b),  # shell integer division truncates
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _arithmetic(expr: str, env: dict, path: str) -> int:
    """`$((...))` over the script's integer variables (+ - * / % and parentheses)."""
    text = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", r"\1", expr)

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            raw = env.get(node.id, "0").strip() or "0"
            if not re.fullmatch(r"-?\d+", raw):
                raise ValueError(f"{node.id}={raw!r} is not an integer")
            return int(raw)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"unsupported part {ast.dump(node)[:40]}")

    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"{path}: cannot evaluate $(({expr})): {e}; use plain numbers") from e


def command_words(command: str, env: dict, path: str) -> list[str]:
    """The training program's arguments: the words after `*.py`, up to a pipe or redirection."""
    words = split_words(command, env, path)
    start = next((k + 1 for k, w in enumerate(words) if w.endswith(".py")), 0)
    out = []
    for w in words[start:]:
        if w in ("|", "||", "&&", "&") or re.match(r"^[0-9&]?>", w):
            break
        out.append(w)
    return out


def parse_flags(words: list[str]) -> tuple[list[str], dict[str, object]]:
    """(positional words, {"--flag": True | "value" | ["v1", "v2"]}); a repeated flag keeps its last value."""
    positional, flags, current = [], {}, None
    for w in words:
        if w.startswith("--"):
            name, eq, value = w.partition("=")
            current = name
            flags[name] = [value] if eq else []
        elif current is None:
            positional.append(w)
        else:
            flags[current].append(w)
    out = {f: (True if not v else v[0] if len(v) == 1 else v) for f, v in flags.items()}
    return positional, out

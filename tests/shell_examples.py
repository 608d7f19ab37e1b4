"""The shell examples of the README and the man pages: extracting them, checking their onnxpipe
invocations against the click definitions, and the working folder they run in.

Used by test_readme.py (which runs them) and test_man.py (which checks the ones it cannot run).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click

from onnxpipe.main import COMMANDS, cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
MAN_TEXT = REPO / "man" / "text"
# A fenced block right after this comment is shown but not run (it needs the hub, or is make itself).
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
OPERATORS = {"|", "||", "&&", ";", "&", "(", ")", "|&"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>"}


@dataclass
class Block:
    code: str
    line: int  # 1-based line of the opening fence
    run: bool
    why_not: str | None = None


def readme_blocks(text: str | None = None) -> list[Block]:
    """The ```sh blocks of the README, in order, each marked run or not."""
    lines = (text if text is not None else README.read_text(encoding="utf-8")).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            marker = NOT_RUN.search(prev)
            blocks.append(
                Block(
                    "\n".join(lines[start + 1 : j]),
                    start + 1,
                    run=marker is None,
                    why_not=marker.group(1) if marker else None,
                )
            )
            i = j
        i += 1
    return blocks


def man_examples(page: str) -> tuple[list[str], list[str]]:
    """(commands run, commands shown only) of a man page's hand-written text: `$ ` and two-space lines."""
    path = MAN_TEXT / f"{page}.txt"
    run, shown = [], []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        if line.startswith("$ "):
            run.append(line[2:])
        elif line.startswith("  ") and line.strip():
            shown.append(line[2:])
    return run, shown


def commands_of(code: str) -> list[str]:
    """The shell commands of a block: comments dropped, backslash continuations joined."""
    out, current = [], ""
    for line in code.splitlines():
        if not current and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


def invocations(command_line: str) -> list[list[str]]:
    """Every `onnxpipe ...` simple command in a shell command line, as its argument list."""
    # 2>FILE, 2>&1: the digits glued to a redirection name a descriptor, not an argument.
    command_line = re.sub(r"(?<![^\s])\d+(?=[<>])", "", command_line)
    lexer = shlex.shlex(command_line, posix=True, punctuation_chars="|&;()<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    found: list[list[str]] = []
    current: list[str] | None = None  # the arguments of the onnxpipe command being read
    started = False  # inside a simple command (ours or not)
    skip = False
    for token in tokens:
        if skip:  # the target of a redirection
            skip = False
        elif token in OPERATORS:
            if current is not None:
                found.append(current)
            current, started = None, False
        elif token in REDIRECTS:
            skip = True
        elif not started:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token):  # VAR=value before the command
                started = True
                current = [] if token == "onnxpipe" else None
        elif current is not None:
            current.append(token)
    if current is not None:
        found.append(current)
    return found


def check_invocation(args: list[str]) -> list[str]:
    """What is wrong with `onnxpipe ARGS` against the click definitions (unknown command or option, bad choice)."""
    problems = []
    root_ctx = click.Context(cli, info_name="onnxpipe", **cli.context_settings)
    args = list(args)
    root_opts = _options(cli, root_ctx)
    while args and args[0].startswith("-"):
        name = args.pop(0)
        if name not in root_opts:
            problems.append(f"unknown root option {name}")
    if not args:
        return problems
    name = args.pop(0)
    if name not in COMMANDS:
        return problems + [f"unknown command {name}"]
    command = cli.get_command(root_ctx, name)
    ctx = click.Context(command, info_name=name, parent=root_ctx)
    if isinstance(command, click.Group) and args and not args[0].startswith("-"):  # batch TASK ...
        sub = args.pop(0)
        task = command.get_command(ctx, sub)
        if task is None:
            return problems + [f"unknown command {name} {sub}"]
        command, ctx, name = task, click.Context(task, info_name=sub, parent=ctx), f"{name} {sub}"
    opts = _options(command, ctx)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        key, _, inline = token.partition("=")
        option = opts.get(key)
        if option is None and not token.startswith("--") and len(token) > 2:
            key, inline = token[:2], token[2:]  # -k3
            option = opts.get(key)
        if option is None:
            problems.append(f"onnxpipe {name}: unknown option {token}")
            continue
        if option.is_flag or option.count:
            continue
        value = inline or (args[i] if i < len(args) else None)
        if not inline:
            i += 1
        if value is None:
            problems.append(f"onnxpipe {name}: {key} needs a value")
        elif isinstance(option.type, click.Choice) and value not in option.type.choices:
            problems.append(f"onnxpipe {name}: {key} {value!r} is not one of {list(option.type.choices)}")
    return problems


def _options(command: click.Command, ctx: click.Context) -> dict[str, click.Option]:
    out = {}
    for p in command.get_params(ctx):
        if isinstance(p, click.Option):
            for opt in (*p.opts, *p.secondary_opts):
                out[opt] = p
    return out

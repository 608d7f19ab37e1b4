"""Generate the man pages in man/ from the click definitions and the hand-written text in man/text/.

    python man/build.py          # rewrite the pages (make man)
    python man/build.py --check  # exit 1 when a committed page is stale or missing

NAME, SYNOPSIS, DESCRIPTION and OPTIONS come from the click commands, so they cannot drift from
the CLI. EXAMPLES and any extra sections come from man/text/<page>.txt, where a line
`## SECTION` starts a section. The sections every page shares (EXIT STATUS, ENVIRONMENT, FILES)
live in man/text/common.txt.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
TEXT = HERE / "text"
sys.path.insert(0, str(HERE.parent / "cli"))

from onnxpipe import __version__  # noqa: E402
from onnxpipe.main import COMMANDS, cli  # noqa: E402


def esc(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line for line in text.split("\n"))


def sections(name: str) -> dict[str, str]:
    path = TEXT / f"{name}.txt"
    out: dict[str, str] = {}
    if not path.exists():
        return out
    current = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^## (.+)$", line)
        if m:
            current = m.group(1).strip().upper()
            out[current] = ""
        elif current:
            out[current] += line + "\n"
    return {k: v.strip("\n") for k, v in out.items()}


def render_text(body: str) -> str:
    """Hand-written text: paragraphs; lines starting with '$ ' are commands shown verbatim."""
    out = []
    for block in re.split(r"\n\s*\n", body.strip()):
        lines = block.split("\n")
        if all(l.startswith(("$ ", "  ")) for l in lines):
            out.append(".PP\n.nf\n.RS 4\n" + "\n".join(esc(l[2:]) for l in lines) + "\n.RE\n.fi")
        elif lines[0].startswith("- ") or lines[0].startswith("* "):
            for item in re.split(r"\n(?=[-*] )", block):
                out.append(".IP \\(bu 2\n" + esc(" ".join(s.strip() for s in item[2:].split("\n"))))
        elif re.match(r"^\S.*\t", lines[0]) or lines[0].startswith("@"):
            for l in lines:
                term, _, desc = l.lstrip("@").partition("\t")
                out.append(f".TP\n.B {esc(term.strip())}\n{esc(desc.strip())}")
        else:
            out.append(".PP\n" + esc(" ".join(l.strip() for l in lines)))
    return "\n".join(out)


def help_paragraphs(text: str) -> str:
    """click help text -> roff, keeping \\b (no-rewrap) blocks verbatim."""
    import inspect

    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if block.startswith("\b"):
            lines = [l.strip() for l in block.split("\n")[1:] if l.strip()]
            out.append(".PP\n.nf\n.RS 4\n" + "\n".join(esc(l) for l in lines) + "\n.RE\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(l.strip() for l in block.split("\n"))))
    return "\n".join(out)


def options(command: click.Command, ctx: click.Context) -> str:
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        term, desc = record
        out.append(f".TP\n.B {esc(term)}\n{esc(desc) if desc else ''}".rstrip())
    return "\n".join(out)


def page(name: str, command: click.Command, parent: click.Context | None) -> str:
    full = "onnxpipe" if parent is None else f"onnxpipe {name}"
    page_name = "onnxpipe" if parent is None else f"onnxpipe-{name}"
    ctx = click.Context(command, info_name=full if parent is None else name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    short = command.get_short_help_str(limit=200).rstrip(".")
    text = sections(page_name)
    common = sections("common")
    parts = [
        f'.TH {page_name.upper()} 1 "" "onnxpipe {__version__}" "onnxpipe manual"',
        ".SH NAME",
        f"{esc(page_name)} \\- {esc(short)}",
        ".SH SYNOPSIS",
        f".B {esc(full)}\n{esc(usage)}",
        ".SH DESCRIPTION",
        help_paragraphs(command.help or ""),
    ]
    if "DESCRIPTION" in text:
        parts.append(render_text(text.pop("DESCRIPTION")))
    if parent is None:
        parts.append(".SH COMMANDS")
        for sub in COMMANDS:
            cmd = cli.get_command(ctx, sub)
            parts.append(f".TP\n.BR onnxpipe\\-{esc(sub)} (1)\n{esc(cmd.get_short_help_str(limit=200))}")
    parts += [".SH OPTIONS", options(command, ctx)]
    for section in ("EXAMPLES", *[s for s in text if s not in ("EXAMPLES", "SEE ALSO")]):
        if section in text:
            parts += [f".SH {section}", render_text(text[section])]
    for section in ("EXIT STATUS", "ENVIRONMENT", "FILES"):
        if section in common:
            parts += [f".SH {section}", render_text(common[section])]
    see = ([] if parent is None else ["onnxpipe"]) + [f"onnxpipe-{c}" for c in COMMANDS if parent is None or c != name]
    parts.append(".SH SEE ALSO")
    parts.append("\n".join(f".BR {esc(s)} (1){',' if i < len(see) - 1 else ''}" for i, s in enumerate(see)))
    if "SEE ALSO" in text:
        parts.append(render_text(text["SEE ALSO"]))
    return "\n".join(p for p in parts if p) + "\n"


def build() -> dict[str, str]:
    root_ctx = click.Context(cli, info_name="onnxpipe")
    pages = {"onnxpipe.1": page("onnxpipe", cli, None)}
    for name in COMMANDS:
        pages[f"onnxpipe-{name}.1"] = page(name, cli.get_command(root_ctx, name), root_ctx)
    return pages


def main() -> int:
    check = "--check" in sys.argv[1:]
    pages = build()
    stale = []
    for fname, content in pages.items():
        path = HERE / fname
        if check:
            if not path.exists() or path.read_text(encoding="utf-8") != content:
                stale.append(fname)
        else:
            path.write_text(content, encoding="utf-8")
    extra = sorted(p.name for p in HERE.glob("*.1") if p.name not in pages)
    if check and (stale or extra):
        print("stale or missing man pages: " + ", ".join(stale + extra) + " (run: make man)", file=sys.stderr)
        return 1
    if not check:
        for p in extra:
            (HERE / p).unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

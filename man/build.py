"""Generate the man pages in man/ from the click definitions and the hand-written text in man/text/.

    python man/build.py          # rewrite the pages (make man)
    python man/build.py --check  # exit 1 when a committed page is stale or missing

NAME, SYNOPSIS, DESCRIPTION and OPTIONS come from the click commands, so they cannot drift from
the CLI. EXAMPLES, SEE ALSO and any extra sections come from man/text/<page>.txt, where a line
`## SECTION` starts a section. The sections every page shares (EXIT STATUS, ENVIRONMENT, FILES)
live in man/text/common.txt.

Text format: paragraphs separated by blank lines; a block of lines starting with `$ ` (a
command that tests/test_readme.py runs), two spaces (shown, not run: it needs the network) or
`# ` (a comment) is shown verbatim; `- ` starts a bullet; `@TERM<TAB>TEXT` lines are a term
list. In SEE ALSO, a first line of `name(N), ...` references becomes the usual bold
cross-references.
"""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
TEXT = HERE / "text"
sys.path.insert(0, str(HERE.parent / "cli"))

from onnxpipe import __version__  # noqa: E402
from onnxpipe.main import COMMANDS, cli  # noqa: E402

# The order of a page's sections, as man-pages(7) lists them.
ORDER = (
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "COMMANDS",
    "OPTIONS",
    "EXAMPLES",
    "EXIT STATUS",
    "ENVIRONMENT",
    "FILES",
    "SEE ALSO",
)
COMMON = ("EXIT STATUS", "ENVIRONMENT", "FILES")


def esc(text: str) -> str:
    """Plain text -> roff text: backslashes, hyphens as minus signs, leading control characters, non-ASCII."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join(("\\&" + line) if line[:1] in (".", "'") else line for line in text.split("\n"))


def macro_arg(text: str) -> str:
    """Text as one argument of a macro line (.B, .BR): quoted, with quotes escaped."""
    return '"' + esc(text).replace('"', "\\(dq") + '"'


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
    """Hand-written text -> roff (see the module docstring for the format)."""
    out = []
    for block in re.split(r"\n\s*\n", body.strip()):
        lines = block.split("\n")
        if all(l.startswith(("$ ", "  ", "# ")) for l in lines):
            out.append(
                ".PP\n.nf\n.RS 4\n" + "\n".join(esc(l if l.startswith("# ") else l[2:]) for l in lines) + "\n.RE\n.fi"
            )
        elif lines[0].startswith(("- ", "* ")):
            for item in re.split(r"\n(?=[-*] )", block):
                out.append(".IP \\(bu 2\n" + esc(" ".join(s.strip() for s in item[2:].split("\n"))))
        elif lines[0].startswith("@"):
            for l in lines:
                term, _, desc = l.lstrip("@").partition("\t")
                out.append(f".TP\n.B {macro_arg(term.strip())}\n{esc(desc.strip())}")
        else:
            out.append(".PP\n" + esc(" ".join(l.strip() for l in lines)))
    return "\n".join(out)


def help_paragraphs(text: str) -> str:
    """click help text -> roff, keeping \\b (no-rewrap) blocks verbatim."""
    out = []
    for block in re.split(r"\n\s*\n", inspect.cleandoc(text)):
        if block.startswith("\b"):
            lines = [l.strip() for l in block.split("\n")[1:] if l.strip()]
            out.append(".PP\n.nf\n.RS 4\n" + "\n".join(esc(l) for l in lines) + "\n.RE\n.fi")
        else:
            out.append(".PP\n" + esc(" ".join(l.strip() for l in block.split("\n"))))
    return "\n".join(out)


def options(command: click.Command, ctx: click.Context) -> str:
    """One term per option, exactly as --help shows it (arguments are described in DESCRIPTION)."""
    out = []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None:
            continue
        term, desc = record
        # \: after each | lets a long list of choices break across lines.
        term = macro_arg(term).replace("|", "|\\:")
        out.append(f".TP\n.B {term}\n{esc(desc) if desc else ''}".rstrip())
    return "\n".join(out)


REF = re.compile(r"([\w.+-]+)\((\d\w*)\)")


def see_also(refs: list[str], body: str = "") -> str:
    """References (`name(N)`) -> .BR lines; a first line of BODY made only of references adds to them."""
    first, _, rest = body.strip().partition("\n")
    if first and not REF.sub("", first).replace(",", "").strip():
        refs = refs + [r for r in (m.group(0) for m in REF.finditer(first)) if r not in refs]
    else:
        rest = body
    pairs = [REF.fullmatch(r).groups() for r in refs]
    lines = [f".BR {esc(name)} ({sec}){',' if i < len(pairs) - 1 else ''}" for i, (name, sec) in enumerate(pairs)]
    return "\n".join(lines + ([render_text(rest)] if rest.strip() else []))


def page(name: str, command: click.Command, parent: click.Context | None) -> str:
    root = parent is None
    full = "onnxpipe" if root else f"onnxpipe {name}"
    page_name = "onnxpipe" if root else f"onnxpipe-{name}"
    if root:
        ctx = click.Context(command, info_name="onnxpipe", **command.context_settings)
    else:
        ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    usage = " ".join(command.collect_usage_pieces(ctx))
    short = command.get_short_help_str(limit=200).rstrip(".")
    text = sections(page_name)
    common = sections("common")
    body: dict[str, str] = {
        "NAME": f"{esc(page_name)} \\- {esc(short)}",
        "SYNOPSIS": f".B {macro_arg(full)}\n{esc(usage)}",
        "DESCRIPTION": help_paragraphs(command.help or "")
        + ("\n" + render_text(text.pop("DESCRIPTION")) if "DESCRIPTION" in text else ""),
        "OPTIONS": options(command, ctx),
    }
    if root:
        body["COMMANDS"] = "\n".join(
            f".TP\n.BR onnxpipe\\-{esc(sub)} (1)\n{esc(cli.get_command(ctx, sub).get_short_help_str(limit=200))}"
            for sub in COMMANDS
        )
    for section, content in text.items():
        body[section] = render_text(content) if section != "SEE ALSO" else ""
    for section in COMMON:
        if section in common and section not in body:
            body[section] = render_text(common[section])
    own = ["onnxpipe(1)"] if not root else [f"onnxpipe-{c}(1)" for c in COMMANDS]
    body["SEE ALSO"] = see_also(own, text.get("SEE ALSO", ""))
    # Extra sections (SHELL COMPLETION, ...) go before EXIT STATUS, as man-pages(7) suggests.
    extra = [s for s in body if s not in ORDER]
    ordered = [s for s in ORDER if s in body]
    at = ordered.index("EXIT STATUS") if "EXIT STATUS" in ordered else len(ordered)
    ordered[at:at] = extra
    # .nh: option names and paths read better unhyphenated.
    parts = [f'.TH {page_name.upper()} 1 "" "onnxpipe {__version__}" "onnxpipe manual"', ".nh"]
    for section in ordered:
        if body[section]:
            parts += [f".SH {section}", body[section]]
    return "\n".join(parts) + "\n"


def build() -> dict[str, str]:
    """Every page's file name -> its roff text: onnxpipe.1 and one onnxpipe-COMMAND.1 per command."""
    root_ctx = click.Context(cli, info_name="onnxpipe", **cli.context_settings)
    pages = {"onnxpipe.1": page("onnxpipe", cli, None)}
    for name in COMMANDS:
        pages[f"onnxpipe-{name}.1"] = page(name, cli.get_command(root_ctx, name), root_ctx)
    return pages


def stale(pages: dict[str, str] | None = None, folder: Path = HERE) -> list[str]:
    """The pages in FOLDER that differ from what build() makes, are missing, or belong to no command."""
    pages = build() if pages is None else pages
    out = [
        f
        for f, content in pages.items()
        if not (folder / f).is_file() or (folder / f).read_text(encoding="utf-8") != content
    ]
    return out + sorted(p.name for p in folder.glob("*.1") if p.name not in pages)


def main() -> int:
    pages = build()
    if "--check" in sys.argv[1:]:
        bad = stale(pages)
        if bad:
            print("stale or missing man pages: " + ", ".join(bad) + " (run: make man)", file=sys.stderr)
            return 1
        return 0
    for fname, content in pages.items():
        (HERE / fname).write_text(content, encoding="utf-8")
    for p in HERE.glob("*.1"):
        if p.name not in pages:
            p.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

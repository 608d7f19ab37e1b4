"""The `onnxpipe` click group: it parses, dispatches and turns errors into exit codes.

Subcommands live one per module in `onnxpipe.commands` and are imported only when named (or
when `--help` lists them), so start-up never pays for a command that does not run. Command
modules import nothing heavy at module level.
"""

from __future__ import annotations

import os
import sys

if os.path.basename(sys.argv[0] if sys.argv else "") in ("onnxpipe", "onnxpipe.exe"):
    # The console script: take SIGINT/SIGTERM and fill closed std descriptors before the imports
    # below (click alone takes ~70 ms), so Ctrl-C at any moment ends quietly (onnxpipe.signals).
    from onnxpipe import signals as _signals

    _signals.install()

import errno
import importlib

import click

from onnxpipe import __version__
from onnxpipe.errors import ExitStatus, OnnxpipeError

# name -> "module:attribute". Order is the order of `onnxpipe --help`.
COMMANDS: dict[str, str] = {
    "export": "onnxpipe.commands.export:export",
    "models": "onnxpipe.commands.models:models",
    "info": "onnxpipe.commands.info:info",
    "verify": "onnxpipe.commands.verify:verify",
    "classify": "onnxpipe.commands.classify:classify",
    "rerank": "onnxpipe.commands.rerank:rerank",
    "embed": "onnxpipe.commands.embed:embed",
    "tag": "onnxpipe.commands.tag:tag",
    "fill-mask": "onnxpipe.commands.fill_mask:fill_mask",
    "answer": "onnxpipe.commands.answer:answer",
    "generate": "onnxpipe.commands.generate:generate",
    "translate": "onnxpipe.commands.translate:translate",
    "summarize": "onnxpipe.commands.summarize:summarize",
    "batch": "onnxpipe.commands.batch:batch",
    "finetune": "onnxpipe.commands.finetune:finetune",
    "eval": "onnxpipe.commands.eval:eval_command",
    "bench": "onnxpipe.commands.bench:bench",
    "doctor": "onnxpipe.commands.doctor:doctor",
    "serve": "onnxpipe.commands.serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context):
        from onnxpipe import signals

        show_traceback = bool(ctx.params.get("traceback"))  # --traceback or ONNXPIPE_TRACEBACK
        try:
            with signals.running():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except BaseException as exc:
            if isinstance(exc, BrokenPipeError):  # the reader went away: quietly, even with --traceback
                signals.discard_stdout()
                ctx.exit(int(ExitStatus.BROKEN_PIPE))
            interrupt = signals.interrupt_of(exc)  # Ctrl-C or SIGTERM, even when it surfaced as another error
            if isinstance(exc, SystemExit) or show_traceback:
                raise
            if interrupt is not None:
                _fail(ctx, *signals.message(interrupt))
            _fail(ctx, f"onnxpipe: error: {_describe(exc)}", int(getattr(exc, "exit_status", ExitStatus.ERROR)))


def _describe(exc: BaseException) -> str:
    """The one line for an error: domain errors say it themselves; the rest say what failed."""
    if isinstance(exc, OnnxpipeError):
        return str(exc)
    if isinstance(exc, OSError):
        return _os_error(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch-size or --max-batch-tokens)"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"unexpected {type(exc).__name__}: {detail} (a bug: rerun with --traceback and report it)"


def _fail(ctx: click.Context, line: str, status: int) -> None:
    """One line on stderr (if stderr can take it), stdout made safe for the final flush, then exit."""
    from onnxpipe import signals

    try:
        sys.stdout.flush()
    except (OSError, ValueError, AttributeError):
        signals.discard_stdout()
    try:
        click.echo(line, err=True)
    except (OSError, ValueError):
        pass
    ctx.exit(status)


def _os_error(exc: OSError) -> str:
    """An OSError that no command turned into a domain error: what failed, in the system's words."""
    reason = exc.strerror or str(exc)
    if exc.filename:
        return f"{exc.filename}: {reason}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF):
        return f"cannot write output: {reason}"
    return reason


def _version_message() -> str:
    try:
        import onnxruntime as ort

        providers = ", ".join(ort.get_available_providers())
        return f"onnxpipe {__version__}\nonnxruntime {ort.__version__} ({providers})"
    except ImportError:
        return f"onnxpipe {__version__}\nonnxruntime not installed"


def _print_version(ctx: click.Context, _param, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version_message())
        ctx.exit()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the onnxpipe, onnxruntime and provider versions.",
)
@click.option("-v", "--verbose", count=True, help="Say more on stderr (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings on stderr.")
@click.option("--traceback", is_flag=True, envvar="ONNXPIPE_TRACEBACK", help="Show the Python traceback on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool, traceback: bool) -> None:
    """Stream text through exported Transformer models with ONNX Runtime.

    Export a checkpoint once, then classify, embed, tag, fill masks, generate,
    translate or summarize one result per input line, on the GPU when there is one.

    \b
      onnxpipe export ./my-finetuned-bert --name sentiment
      cat reviews.txt | onnxpipe classify -m sentiment
    """
    from onnxpipe.console import VERBOSITY

    VERBOSITY["level"] = -1 if quiet else verbose
    ctx.ensure_object(dict)
    ctx.obj["traceback"] = traceback


def main() -> None:
    try:
        cli(prog_name="onnxpipe")
    except OSError as exc:  # --help or --version on a full or closed stdout, before any command ran
        from onnxpipe import signals

        signals.discard_stdout()
        try:
            click.echo(f"onnxpipe: error: {_os_error(exc)}", err=True)
        except (OSError, ValueError):
            pass
        sys.exit(int(ExitStatus.ERROR))


if __name__ == "__main__":
    main()

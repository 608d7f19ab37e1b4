"""The `onnxpipe` click group: it parses, dispatches and turns errors into exit codes.

Subcommands live one per module in `onnxpipe.commands` and are imported only when named (or
when `--help` lists them), so start-up never pays for a command that does not run. Command
modules import nothing heavy at module level.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from onnxpipe import __version__
from onnxpipe.errors import ExitStatus, OnnxpipeError

# name -> "module:attribute". Order is the order of `onnxpipe --help`.
COMMANDS: dict[str, str] = {
    "export": "onnxpipe.commands.export:export",
    "models": "onnxpipe.commands.models:models",
    "info": "onnxpipe.commands.info:info",
    "classify": "onnxpipe.commands.classify:classify",
    "embed": "onnxpipe.commands.embed:embed",
    "tag": "onnxpipe.commands.tag:tag",
    "fill-mask": "onnxpipe.commands.fill_mask:fill_mask",
    "generate": "onnxpipe.commands.generate:generate",
    "translate": "onnxpipe.commands.translate:translate",
    "summarize": "onnxpipe.commands.summarize:summarize",
    "finetune": "onnxpipe.commands.finetune:finetune",
    "eval": "onnxpipe.commands.eval:eval_command",
    "bench": "onnxpipe.commands.bench:bench",
    "doctor": "onnxpipe.commands.doctor:doctor",
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
        try:
            return super().invoke(ctx)
        except OnnxpipeError as exc:
            if ctx.obj and ctx.obj.get("traceback"):
                raise
            click.echo(f"onnxpipe: error: {exc}", err=True)
            ctx.exit(int(exc.exit_status))
        except KeyboardInterrupt:
            if ctx.obj and ctx.obj.get("traceback"):
                raise
            click.echo("onnxpipe: interrupted", err=True)
            ctx.exit(int(ExitStatus.INTERRUPTED))
        except BrokenPipeError:
            _silence_stdout()
            ctx.exit(int(ExitStatus.BROKEN_PIPE))


def _silence_stdout() -> None:
    """After the reader left, make the interpreter's final flush of stdout a no-op."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


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
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the onnxpipe, onnxruntime and provider versions.")
@click.option("-v", "--verbose", count=True, help="Say more on stderr (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and warnings on stderr.")
@click.option("--traceback", is_flag=True, envvar="ONNXPIPE_TRACEBACK",
              help="Show the Python traceback on errors.")
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
    cli(prog_name="onnxpipe")


if __name__ == "__main__":
    main()

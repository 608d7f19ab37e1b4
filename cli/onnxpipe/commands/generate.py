"""`onnxpipe generate`: complete each input line (or -p PROMPT) with a decoder-only export."""

from __future__ import annotations

import sys

import click

from onnxpipe.commands._options import StreamOptions, check_beams_option, model_option, stream_options


@click.command("generate")
@model_option
@stream_options(batch_size=16, max_batch_tokens=16384)
@click.option("-p", "--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Generate for TEXT instead of reading input lines (repeatable).")
@click.option("--chat", is_flag=True, help="Apply the model's chat template: each line is a user message.")
@click.option("--system", metavar="TEXT", help="With --chat: a system message before each user message.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), metavar="N",
              help="Generate at most N tokens per prompt. [default: the model's generation_config, else 256]")
@click.option("--min-new-tokens", type=click.IntRange(min=0), metavar="N", help="No end of text before N tokens.")
@click.option("--do-sample/--greedy", "do_sample", default=None,
              help="Sample, or take the most likely token. [default: the model's generation_config; "
                   "--temperature, --top-k or --top-p imply --do-sample]")
@click.option("--temperature", type=click.FloatRange(min=0.0), metavar="T",
              help="Sampling temperature (0 means --greedy). [default: 1.0]")
@click.option("--top-k", type=click.IntRange(min=0), metavar="K", help="Sample from the K most likely tokens (0: all). [default: 50]")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), metavar="P", help="Sample from the smallest set of tokens with probability P.")
@click.option("--seed", type=int, metavar="N",
              help="Seed for sampling: the same seed gives the same text for a line, whatever the batch size.")
@click.option("--num-beams", type=click.IntRange(min=1), metavar="N", callback=check_beams_option,
              help="Beam search with N beams (at most 64).")
@click.option("--length-penalty", type=float, metavar="X",
              help="Beam search: scores are divided by length**X (>0 favours longer text). [default: 1.0]")
@click.option("--early-stopping", type=click.Choice(["true", "false", "never"]),
              help="Beam search: stop when N hypotheses are done (true), by transformers' heuristic (false), "
                   "or only when no beam can improve (never). [default: false]")
@click.option("--num-return-sequences", type=click.IntRange(min=1), metavar="N", callback=check_beams_option,
              help="Beam search: the N best completions (JSONL field 'sequences').")
@click.option("--repetition-penalty", type=click.FloatRange(min=0.0, min_open=True), metavar="X",
              help="Penalise tokens already in the prompt or the output (>1 discourages repeats).")
@click.option("--no-repeat-ngram-size", type=click.IntRange(min=0), metavar="N", help="Never repeat an N-gram.")
@click.option("--stop", "stop", multiple=True, metavar="TEXT",
              help="End a completion before TEXT (repeatable); TEXT is not part of the result.")
def generate(model: str, stream: StreamOptions, prompts: tuple[str, ...], chat: bool, system: str | None,
             max_new_tokens: int | None, min_new_tokens: int | None, do_sample: bool | None,
             temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None,
             num_beams: int | None, length_penalty: float | None, early_stopping: str | None,
             num_return_sequences: int | None, repetition_penalty: float | None,
             no_repeat_ngram_size: int | None, stop: tuple[str, ...]) -> None:
    """Complete each input line with a text-generation export (GPT-2, Llama, SmolLM2, ...).

    Reads prompts from FILEs or stdin, one per line, or from -p, and writes one completion
    per prompt in input order. Text output keeps one line per prompt: newlines in a completion
    are written as \\n (and backslashes as \\\\). --format jsonl gives the exact text, the
    finish reason (eos, length or stop), token counts and the provider. With one -p prompt
    and a terminal on stdout, the text is printed as it is generated. Settings not given come
    from the model's generation_config.json. An empty line gets an empty completion.

    \b
      onnxpipe generate -m smollm2 --chat -p "Write a haiku about pipes"
      onnxpipe generate -m gpt2 --max-new-tokens 40 --do-sample --seed 1 < prompts.txt
      onnxpipe generate -m smollm2 --chat --format jsonl --stop "\\n\\n" questions.txt
    """
    from onnxpipe import console
    from onnxpipe.errors import UsageError
    from onnxpipe.stream.records import Record
    from onnxpipe.stream.run import run_stream_command
    from onnxpipe.tasks.causal import GenerateTask

    if prompts and stream.inputs != ("-",):
        raise UsageError("give prompts with -p or as input FILEs, not both")
    if system is not None and not chat:
        raise UsageError("--system needs --chat")
    if (num_return_sequences or 1) > 1 and stream.format != "jsonl":
        raise UsageError("--num-return-sequences needs --format jsonl (text output has one line per prompt)")
    if do_sample is None and (temperature or top_k or (top_p is not None and top_p < 1.0)):
        do_sample = True  # asking for a sampling setting means sampling
    if temperature == 0.0:
        do_sample, temperature = False, None
    overrides = dict(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, num_beams=num_beams,
        length_penalty=length_penalty, num_return_sequences=num_return_sequences,
        early_stopping={"true": True, "false": False, "never": "never"}.get(early_stopping or ""),
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
    )
    records = [Record(seq=i, text=p, source="--prompt", line=i + 1) for i, p in enumerate(prompts)] or None
    streaming = (len(prompts) == 1 and stream.format == "text" and stream.output in ("-", "")
                 and _isatty(sys.stdout))
    tasks: list[GenerateTask] = []

    def make_task(m):
        tasks.append(GenerateTask(m, overrides, chat=chat, system=system, stop=stop))
        return tasks[0]

    summary = run_stream_command(model, stream, make_task, tasks=GenerateTask.task_names,
                                 engine_options={"streaming": streaming}, records=records)
    if tasks:
        task = tasks[0]
        rate = task.generated_tokens / summary.seconds if summary.seconds > 0 else 0.0
        console.info(f"{task.generated_tokens:,} tokens generated ({rate:,.1f} tokens/s)")
        console.debug(f"decoding: {task.stats.as_dict()}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

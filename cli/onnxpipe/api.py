"""The Python API: load an export once, then run lists or streams of texts through it.

    import onnxpipe
    clf = onnxpipe.load("sentiment", device="auto", threads=2)   # a name in the export home, or a path
    clf(["great film", "dull"])          # -> [Result, Result], one per input, in input order
    clf("great film", top_k=2)           # one text in, one Result out; the task's options as keywords
    for r in clf.stream(lines): ...      # any iterable in, results out in input order, batched inside
    gen = onnxpipe.load("smollm2"); gen("Hello", max_new_tokens=20, chat=True).generated_text

It runs the same engine as the CLI (length-sorted batches, order restored, empty inputs kept), and a
result's `to_dict()` is exactly the record that the command's `--format jsonl` writes for that line.
Nothing here prints: where the model runs is in `Pipeline.provider` and `Pipeline.device_note`; a
`threads` above the usable CPUs is capped to them with a `RuntimeWarning` (the warnings module, so
the caller decides whether it shows), and `Pipeline.threads` is the value in use.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from onnxpipe.errors import UsageError
from onnxpipe.registry import TaskFamily, family_for_export
from onnxpipe.stream.records import Result

__all__ = ["Pipeline", "Result", "load"]

_STREAM_WINDOW = 256  # records per engine window in stream(): results flow out after each window


class _Collector:
    """The engine's writer for the API: keeps the Results in the order the engine writes them."""

    def __init__(self) -> None:
        self.results: list[Result] = []

    def write(self, result: Result) -> None:
        self.results.append(result)

    def write_partial(self, text: str) -> None:  # pragma: no cover - the API never streams pieces
        raise UsageError("the Python API does not stream partial results")

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> list[Result]:
        results, self.results = self.results, []
        return results


class Pipeline:
    """An opened export and its task family. Sessions are made once and reused by every call."""

    def __init__(
        self,
        model: Any,
        family: TaskFamily,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        on_error: str = "fail",
    ):
        self.model = model
        self.family = family
        self.batch_size = batch_size or family.batch_size
        self.max_batch_tokens = max_batch_tokens or family.max_batch_tokens
        self.on_error = on_error
        self._tasks: dict[tuple[tuple[str, Any], ...], Any] = {}

    @property
    def task(self) -> str:
        """The task family's name: classify, rerank, embed, tag, fill-mask, answer, generate, translate or summarize."""
        return self.family.name

    @property
    def name(self) -> str:
        return str(self.model.name)

    @property
    def provider(self) -> str | None:
        """The execution provider the sessions really got (known after the first call)."""
        provider: str | None = self.model.provider
        return provider

    @property
    def threads(self) -> int | None:
        """The intra-op threads in use: load()'s `threads`, capped at the usable CPUs (None: ONNX Runtime's default)."""
        threads: int | None = self.model.threads
        return threads

    @property
    def device_note(self) -> str | None:
        """What the CLI says on stderr about the device: where it runs, and why when it fell back to CPU."""
        note: str | None = self.model.device_note
        return note

    @property
    def notes(self) -> list[str]:
        """What the CLI says on stderr about how this export runs (e.g. a graph built for another device)."""
        out: list[str] = []
        for task in self._tasks.values():
            out += [note for note in getattr(task, "notes", []) if note not in out]
        return out

    def __repr__(self) -> str:
        return f"<onnxpipe.Pipeline {self.family.name} {self.name!r} on {self.provider or self.model.device}>"

    @overload
    def __call__(self, inputs: str | tuple[str, str], **options: Any) -> Result: ...
    @overload
    def __call__(self, inputs: Sequence[str | tuple[str, str]], **options: Any) -> list[Result]: ...
    @overload
    def __call__(self, inputs: None = None, **options: Any) -> Result | list[Result]: ...

    def __call__(
        self, inputs: str | tuple[str, str] | Sequence[str | tuple[str, str]] | None = None, **options: Any
    ) -> Result | list[Result]:
        """Run INPUTS (a text, or a list of texts) with the task's OPTIONS; one Result per text, in order.

        A (text, text_pair) tuple is a text pair (classify's --pair-field): a premise and its hypothesis,
        a query and a passage. Question answering takes its inputs as transformers' pipeline does:
        question= and context= (each a str or a list), {"question", "context"} dicts, (question, context)
        tuples, or contexts with one question= for all."""
        if self.family.name == "answer":
            inputs, options = _qa_inputs(inputs, options)
        if inputs is None:
            raise UsageError("give the inputs: a text or a list of texts")
        if isinstance(inputs, str) or _is_pair(inputs):
            return self._run([inputs], options)[0]  # type: ignore[list-item]
        return self._run(list(inputs), options)

    def stream(self, inputs: Iterable[str | tuple[str, str]], **options: Any) -> Iterator[Result]:
        """Results for any iterable of texts, lazily and in input order; memory stays bounded."""
        window: list[str | tuple[str, str]] = []
        for text in inputs:
            window.append(text)
            if len(window) >= _STREAM_WINDOW:
                yield from self._run(window, options)
                window = []
        if window:
            yield from self._run(window, options)

    # --- inside -------------------------------------------------------------------------------
    def task_for(self, options: Mapping[str, Any]) -> Any:
        """The task object for OPTIONS, made once per distinct set of options."""
        key = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
        if key not in self._tasks:
            self._tasks[key] = self.family.make_task(self.model, options)
        return self._tasks[key]

    def _run(self, texts: list[str | tuple[str, str]], options: Mapping[str, Any]) -> list[Result]:
        from onnxpipe.stream.engine import Engine, EngineOptions

        for i, text in enumerate(texts):
            if not isinstance(text, str) and not _is_pair(text):
                raise UsageError(f"input {i} is a {type(text).__name__}, not a str or a (text, text_pair) tuple")
        task = self.task_for(options)
        collector = _Collector()
        engine_options = EngineOptions(
            batch_size=self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
            on_error=self.on_error,
            window=max(len(texts), 1),
        )
        records = [_record(i, t) for i, t in enumerate(texts)]
        Engine(task, collector, engine_options).run_records(records)
        return collector.take()


def _is_pair(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _qa_inputs(inputs: Any, options: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Question answering's inputs as the engine takes them: (context, question) pairs, or contexts for the
    task's own question= (the record's text is the context, as a line is for `onnxpipe answer --question`)."""
    options = dict(options)
    if inputs is None:
        question, context = options.pop("question", None), options.pop("context", None)
        if isinstance(question, str) and isinstance(context, str):
            return (context, question), options
        if isinstance(question, list) and isinstance(context, str):
            return [(context, q) for q in question], options
        if isinstance(question, list) and isinstance(context, list):
            if len(question) != len(context):
                raise UsageError(f"{len(question)} questions and {len(context)} contexts: give one context each")
            return [(c, q) for q, c in zip(question, context)], options
        raise UsageError("give question= and context= (each a str or a list of str)")

    def one(item: Any) -> Any:
        if isinstance(item, dict):
            if not (isinstance(item.get("question"), str) and isinstance(item.get("context"), str)):
                raise UsageError("a question-answering input dict needs str 'question' and 'context'")
            return (item["context"], item["question"])
        return (item[1], item[0]) if _is_pair(item) else item

    if isinstance(inputs, (str, dict, tuple)):
        return one(inputs), options
    return [one(item) for item in inputs], options


def _record(seq: int, text: str | tuple[str, str]) -> Any:
    from onnxpipe.stream.records import Record

    if isinstance(text, tuple):  # a text pair; an empty first text is an empty record, as on the CLI
        first, pair = text
        return Record(seq=seq, text=first, source="<api>", line=seq + 1, nbytes=len(first) + len(pair) + 2, pair=pair)
    return Record(seq=seq, text=text, source="<api>", line=seq + 1, nbytes=len(text) + 1)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def load(
    name_or_path: str | Path,
    device: str = "auto",
    threads: int | None = None,
    *,
    task: str | None = None,
    batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    on_error: str = "fail",
) -> Pipeline:
    """Open an export (a name in the export home, or a path) for its task.

    DEVICE is auto, cpu, cuda or cuda:N, as the CLI's --device (cuda never falls back to the CPU);
    THREADS the intra-op threads (more than the usable CPUs: capped, with a RuntimeWarning). TASK picks the family where an export serves more than one
    (text2text-generation: "translate", the default, or "summarize"). ON_ERROR "fail" raises at the
    first input that cannot run; "null" gives it a Result with `error` set instead.
    """
    from onnxpipe.runtime import load_model

    if on_error not in ("fail", "null"):
        raise UsageError(f"on_error must be 'fail' or 'null', not {on_error!r}")
    if threads is not None:
        threads = _capped_threads(threads)
    model = load_model(name_or_path, device=device, threads=threads)
    family = family_for_export(model.task, task)
    pipeline = Pipeline(model, family, batch_size=batch_size, max_batch_tokens=max_batch_tokens, on_error=on_error)
    for graph in model.manifest.get("files") or {}:  # a device error belongs to load(), not to the first call
        model.session(graph)
    if family.kind == "decoder":
        pipeline.task_for({})  # generation's notes (a graph built for another device) are known from the start
    return pipeline


def _capped_threads(threads: Any) -> int:
    """THREADS checked (a positive int) and capped at the usable CPUs, with a RuntimeWarning when capped."""
    import warnings

    from onnxpipe.runtime.machine import usable_cpus

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive int or None, not {threads!r}")
    usable = usable_cpus()
    if threads > usable:
        warnings.warn(
            f"threads={threads}: only {usable} CPU(s) usable here; using {usable}", RuntimeWarning, stacklevel=3
        )
        return usable
    return threads

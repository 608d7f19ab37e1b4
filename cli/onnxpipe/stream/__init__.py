"""Readers, the length-sorting batcher and writers: the line contract lives here.

Data flows one way: reader -> window -> batcher -> task -> writer (see DESIGN.md).

    readers.LineSource    files and stdin ('-'), read ahead in a thread; chunks of whole lines, or IDLE
    readers.RecordParser  raw lines -> Records: text, JSONL (--field), TSV (--column); counts invalid UTF-8
    engine.Engine         windows, length-sorted batches, order restoration, --on-error, truncation counts
    writers               text (escaped: \\n, \\\\), jsonl (exact), tsv, npy; flushed after every batch
    run.run_stream_command  what a command calls: model + task + input + output + progress + summary

A task plugs in by implementing this protocol (`engine.Task`); it never reads stdin or prints:

    encode(records: Sequence[Record]) -> list[Item]
        Tokenize. One Item per record, in order; `item.cost` is the token count the batcher sorts
        and budgets by (rows x longest row <= --max-batch-tokens). Set `item.truncated` when the
        input was cut to the model's limit, `item.error` when the record cannot run (it then gets an
        error result and never reaches run()). Empty records ("") never reach encode().
    run(batch: Sequence[Item]) -> list[result]
        One result per item, same order. May take long (generation): output is flushed after each
        batch. An exception fails just this batch: with --on-error null its records are retried
        one by one and the failing ones get error results.
    to_text(result) -> str             the main result, one line (the writer escapes newlines)
    to_fields(result | None) -> dict   JSONL fields merged into the record (None: empty/failed record)
    to_columns(result | None) -> list  TSV cells after the input row
    to_vector(result) -> array         only for --format npy
    run_streaming(item, emit) -> result   optional: with EngineOptions(streaming=True) the engine
        runs records one at a time and `emit(text)` writes each piece as soon as it is made
        (generate with one prompt on a terminal); the writer ends the line.

Commands get the shared options from `onnxpipe.commands._options`:
`@model_option` (-m/--model), `@stream_options(formats=..., batch_size=..., max_batch_tokens=...)`
(FILE..., -o, --format, --field, --column, --batch-size, --max-batch-tokens, --on-error,
--device, --threads, --progress), delivered as one `stream: StreamOptions` argument, and
`@device_options` alone for commands that do not stream. Then:

    run_stream_command(model, stream, lambda m: MyTask(m, ...), tasks=("text-generation",),
                       engine_options={"streaming": True})   # optional EngineOptions overrides
"""

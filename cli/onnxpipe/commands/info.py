"""`onnxpipe info`: one export's manifest, readable."""

from __future__ import annotations

import json
from typing import Any

import click

from onnxpipe.commands._format import folder_size, human_size, validation_rows, weights_text
from onnxpipe.commands._options import complete_export_names


@click.command("info")
@click.argument("model", shell_complete=complete_export_names)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (onnxpipe.json) as it is.")
def info(model: str, as_json: bool) -> None:
    """Show how an export was made and how it validated.

    MODEL is an export folder or a name in the export home.
    """
    from onnxpipe import console
    from onnxpipe.home import resolve_model
    from onnxpipe.manifest import file_problems, read_manifest

    folder = resolve_model(model)
    manifest = read_manifest(folder)
    problems = file_problems(folder, manifest)
    recorded = manifest.get("checksums")
    if recorded is not None and problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        console.warn(
            f"{folder.name}: {len(problems)} file{'s no longer match' if len(problems) > 1 else ' no longer matches'} the "
            f"manifest ({shown}): run onnxpipe verify {model}, or re-export it"
        )
    if as_json:
        click.echo(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    from rich.errors import ConsoleError

    try:
        text = _render(folder, manifest, problems, recorded)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ConsoleError) as exc:  # a tampered field
        from onnxpipe.errors import ExportFolderError
        from onnxpipe.home import MANIFEST_NAME

        raise ExportFolderError(
            f"{folder / MANIFEST_NAME}: a field that info shows is malformed ({type(exc).__name__}: {exc})",
            hint="re-run onnxpipe export",
        ) from None
    click.echo(text, nl=False)


def _render(folder, manifest: dict[str, Any], problems: list[str], recorded: dict | None) -> str:
    """The readable report, whole: nothing is printed when a field of it cannot be shown."""
    import io

    from rich.console import Console
    from rich.table import Table

    buffer = io.StringIO()
    out = Console(highlight=False, soft_wrap=True, file=buffer, width=Console().width)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    size = folder_size(folder)
    source = manifest.get("source") or {}
    if recorded is None:
        integrity = problems[0]
    elif problems:
        integrity = f"{len(problems)} of {len(recorded)} files changed since the export (run onnxpipe verify)"
    else:
        integrity = f"{len(recorded)} files, sizes as recorded (onnxpipe verify checks the sha256)"
    rows = [
        ("name", manifest.get("name")),
        ("path", str(folder)),
        ("task", manifest.get("task")),
        ("architecture", f"{manifest.get('architecture')} ({manifest.get('model_type')})"),
        ("family", _family(manifest.get("model_type"))),
        (
            "source",
            f"{source.get('kind')}: {source.get('path') or source.get('id')}"
            + (f" @ {source['revision']}" if source.get("revision") else ""),
        ),
        ("sha256", source.get("sha256")),
        ("files", ", ".join(f"{k}={v}" for k, v in (manifest.get("files") or {}).items())),
        ("size", human_size(size)),
        ("checksums", integrity),
        ("precision", manifest.get("precision")),
        ("device", _device(manifest)),
        ("optimization", manifest.get("optimization") or "none"),
        ("opset", manifest.get("opset")),
        ("tokenizer", _tokenizer(manifest.get("tokenizer") or {})),
        ("labels", ", ".join(manifest["labels"]) if manifest.get("labels") else None),
        ("problem type", manifest.get("problem_type")),
        ("pooling", _pooling(manifest) if manifest.get("pooling") else None),
        (
            "special tokens",
            ", ".join(
                f"{k.removesuffix('_token_id')}={v}"
                for k, v in (manifest.get("special_tokens") or {}).items()
                if v is not None
            ),
        ),
        ("graph", _graph(manifest.get("graph") or {}, manifest.get("model_type"))),
        ("weights", weights_text(manifest.get("graph") or {})),
    ]
    for key, value in rows:
        if value not in (None, ""):
            table.add_row(key, str(value))
    out.print(table)
    out.print()
    validation = manifest.get("validation") or {}
    table = Table(
        show_header=False, box=None, pad_edge=False, title="validation", title_justify="left", title_style="bold"
    )
    table.add_column(style="bold")
    table.add_column()
    for key, value in validation_rows(validation):
        table.add_row(key, value)
    out.print(table)
    versions = manifest.get("versions") or {}
    out.print()
    out.print("made with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f" on {manifest.get('created')}")
    return buffer.getvalue()


def _device(manifest: dict[str, Any]) -> str:
    """Which device the graph is for, as the runtime reads it (older exports do not say: inferred)."""
    from onnxpipe.manifest import graph_device

    made_for = graph_device(manifest)
    text = {"cpu": "CPU", "cuda": "CUDA", "any": "CPU or CUDA"}[made_for]
    return text if "device" in manifest else f"{text} (not recorded: an older export)"


def _pooling(m: dict[str, Any]) -> str:
    """ "mean, 2 dense layers (32 -> 24 tanh, 24 -> 16 identity), normalized, max 128 tokens"."""
    parts = [str(m["pooling"])]
    dense = [d for d in m.get("dense") or [] if isinstance(d, dict)]
    if dense:
        shapes = ", ".join(
            f"{d['shape'][1]} -> {d['shape'][0]} {d.get('activation')}"
            if len(d.get("shape") or []) == 2
            else str(d.get("activation"))
            for d in dense
        )
        parts.append(f"{len(dense)} dense layer{'s' if len(dense) > 1 else ''} ({shapes})")
    if m.get("normalize"):
        parts.append("normalized")
    if m.get("max_seq_length"):
        parts.append(f"max {m['max_seq_length']} tokens")
    return ", ".join(parts)


def _family(model_type: str | None) -> str | None:
    from onnxpipe.export.families import describe  # plain data: no export stack needed

    return describe(model_type)


def _tokenizer(t: dict[str, Any]) -> str:
    parts = [t.get("file") or "?"]
    if t.get("target_file"):
        parts.append(f"target {t['target_file']}")
    if t.get("chat_template"):
        parts.append(f"chat template {t['chat_template']}")
    if t.get("max_length"):
        parts.append(f"max length {t['max_length']}")
    return ", ".join(parts)


def _graph(g: dict[str, Any], model_type: str | None = None) -> str:
    caches = ("past_key_values.", "past_key.", "past_value.", "cross_key.", "cross_value.")
    text = f"inputs {', '.join(i for i in g.get('inputs', []) if not i.startswith(caches))}"
    if g.get("num_layers"):
        text += f"; KV cache {g['num_layers']} layers x {g.get('num_kv_heads')} heads x {g.get('head_dim')}"
    if g.get("builder") == "onnxpipe-fused":
        text += f"; onnxpipe-fused ({model_type or '?'}): onnxpipe's fused graph (last position's logits"
        text += (
            ", one key/value buffer per layer shared by past and present)"
            if g.get("kv_cache") == "shared-buffer"
            else ")"
        )
    elif g.get("builder") == "onnxpipe-fused-cuda":
        text += "; onnxpipe's fused CUDA graph (fp16, one key/value buffer shared by past and present)"
    elif g.get("builder") == "onnxpipe-fused-seq2seq":
        text += (
            f"; onnxpipe-fused-seq2seq ({model_type or '?'}): onnxpipe's encoder-decoder graphs (cross-attention "
            "keys once per input, one self-attention buffer per layer shared by past and present)"
        )
    elif g.get("builder") == "optimum":
        text += "; optimum's graph"
    return text

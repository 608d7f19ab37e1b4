"""`onnxpipe info`: one export's manifest, readable."""

from __future__ import annotations

import json
from typing import Any

import click

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
        console.warn(f"{folder.name}: {len(problems)} file{'s no longer match' if len(problems) > 1 else ' no longer matches'} the "
                     f"manifest ({shown}): run onnxpipe verify {model}, or re-export it")
    if as_json:
        click.echo(json.dumps(manifest, indent=2, ensure_ascii=False))
        return
    from rich.errors import ConsoleError

    try:
        text = _render(folder, manifest, problems, recorded)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ConsoleError) as exc:  # a tampered field
        from onnxpipe.errors import ExportFolderError
        from onnxpipe.home import MANIFEST_NAME

        raise ExportFolderError(f"{folder / MANIFEST_NAME}: a field that info shows is malformed "
                                f"({type(exc).__name__}: {exc})", hint="re-run onnxpipe export") from None
    click.echo(text, nl=False)


def _render(folder, manifest: dict[str, Any], problems: list[str], recorded: dict | None) -> str:
    """The readable report, whole: nothing is printed when a field of it cannot be shown."""
    import io

    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True, file=io.StringIO(), width=Console().width)
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
        ("source", f"{source.get('kind')}: {source.get('path') or source.get('id')}"
                   + (f" @ {source['revision']}" if source.get("revision") else "")),
        ("sha256", source.get("sha256")),
        ("files", ", ".join(f"{k}={v}" for k, v in (manifest.get("files") or {}).items())),
        ("size", human_size(size)),
        ("checksums", integrity),
        ("precision", manifest.get("precision")),
        ("optimization", manifest.get("optimization") or "none"),
        ("opset", manifest.get("opset")),
        ("tokenizer", _tokenizer(manifest.get("tokenizer") or {})),
        ("labels", ", ".join(manifest["labels"]) if manifest.get("labels") else None),
        ("problem type", manifest.get("problem_type")),
        ("pooling", _pooling(manifest) if manifest.get("pooling") else None),
        ("special tokens", ", ".join(f"{k.removesuffix('_token_id')}={v}" for k, v in (manifest.get("special_tokens") or {}).items() if v is not None)),
        ("graph", _graph(manifest.get("graph") or {})),
        ("weights", weights_text(manifest.get("graph") or {})),
    ]
    for key, value in rows:
        if value not in (None, ""):
            table.add_row(key, str(value))
    out.print(table)
    out.print()
    validation = manifest.get("validation") or {}
    table = Table(show_header=False, box=None, pad_edge=False, title="validation", title_justify="left", title_style="bold")
    table.add_column(style="bold")
    table.add_column()
    for key, value in validation_rows(validation):
        table.add_row(key, value)
    out.print(table)
    versions = manifest.get("versions") or {}
    out.print()
    out.print("made with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f" on {manifest.get('created')}")
    return out.file.getvalue()


def folder_size(folder) -> int:
    """Bytes of the regular files under FOLDER; links are not followed, unreadable parts are skipped."""
    import os

    total = 0
    for root, dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def validation_rows(v: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation report as (label, text) rows: shared by `info` and the export summary."""
    if not v:
        return [("validated", "no report")]
    rows = [("validated", ("passed" if v.get("passed") else "FAILED") + f" against {v.get('reference', 'PyTorch')}"
             + (f" on {v['provider']}" if v.get("provider") else ""))]
    rows.append(("inputs", str(v.get("inputs"))))
    outputs = v.get("outputs") or {}
    if outputs:
        worst = sorted(outputs.items(), key=lambda kv: -(kv[1].get("max_abs_diff") or 0))
        shown = ", ".join(f"{name} {o['max_abs_diff']:.2g}" for name, o in worst[:4])
        more = f" (+{len(worst) - 4} more)" if len(worst) > 4 else ""
        tolerance = v.get("tolerance")
        limit = f"tolerance {tolerance:g}" if tolerance is not None else "no tolerance: judged on agreement"
        rows.append(("max abs diff", f"{shown}{more}; {limit}"))
    if "label_agreement" in v:
        rows.append(("label agreement", f"{v['label_agreement']:.2%}"))
    if "greedy" in v:
        g = v["greedy"]
        rows.append(("greedy ids", f"{g['identical']}/{g['sequences']} sequences identical over {g['steps']} steps"
                     f" ({g['agreement']:.0%} of steps before a divergence)"))
    if "cosine_similarity" in v:
        c = v["cosine_similarity"]
        rows.append(("cosine similarity", f"min {c['min']:.4f}, mean {c['mean']:.4f}"))
    topk = next((k for k in v if k.startswith("top") and k.endswith("_overlap")), None)
    if topk:
        rows.append((topk.replace("_", " "), f"{v[topk]:.2%}"))
    if v.get("fp32"):
        f = v["fp32"]
        worst = max((o["max_abs_diff"] for o in (f.get("outputs") or {}).values()), default=0.0)
        rows.append(("fp32 baseline", ("passed" if f.get("passed") else "failed") + f", max abs diff {worst:.2g}"))
    for failure in v.get("failures") or []:
        rows.append(("failure", failure))
    return rows


def _pooling(m: dict[str, Any]) -> str:
    """"mean, 2 dense layers (32 -> 24 tanh, 24 -> 16 identity), normalized, max 128 tokens"."""
    parts = [str(m["pooling"])]
    dense = [d for d in m.get("dense") or [] if isinstance(d, dict)]
    if dense:
        shapes = ", ".join(f"{d['shape'][1]} -> {d['shape'][0]} {d.get('activation')}" if len(d.get("shape") or []) == 2
                           else str(d.get("activation")) for d in dense)
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


def _graph(g: dict[str, Any]) -> str:
    text = f"inputs {', '.join(i for i in g.get('inputs', []) if not i.startswith('past_key_values.'))}"
    if g.get("num_layers"):
        text += f"; KV cache {g['num_layers']} layers x {g.get('num_kv_heads')} heads x {g.get('head_dim')}"
    if g.get("builder") == "onnxpipe-fused":
        text += "; onnxpipe's fused graph (last position's logits)"
    elif g.get("builder") == "optimum":
        text += "; optimum's graph"
    return text


def weights_text(g: dict[str, Any]) -> str | None:
    """The fused graph's weight matrices by kind: "120 as Q4_1 blocks, 1 as Q8_0 blocks (exact), ..."."""
    kinds = {k: n for k, n in (g.get("weights") or {}).items() if n}
    if not kinds:
        return None
    blocks = [f"{n} as {k.upper()} blocks" for k, n in kinds.items() if k != "float32"]
    text = ", ".join(blocks) + (" (kept as blocks: the exact values)" if blocks else "")
    if kinds.get("float32"):
        text += (", " if blocks else "") + f"{kinds['float32']} float32"
    return text

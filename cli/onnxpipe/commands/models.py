"""`onnxpipe models`: the exports in the export home."""

from __future__ import annotations

import json

import click


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per export, one per line.")
def models(as_json: bool) -> None:
    """List the exports in the export home ($ONNXPIPE_HOME).

    Shows each export's name, task, architecture, precision, size and whether it
    passed validation.
    """
    from onnxpipe import console
    from onnxpipe.commands.info import human_size
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.home import export_home, list_exports
    from onnxpipe.manifest import read_manifest

    home = export_home()
    rows = []
    # Hidden folders are unfinished exports (temporaries of a running or killed export).
    for folder in (p for p in list_exports(home) if not p.name.startswith(".")):
        try:
            m = read_manifest(folder)
        except OnnxpipeError as exc:
            m = {"task": None, "architecture": None, "precision": None, "validation": {}, "error": str(exc)}
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        variant = m.get("precision")
        if m.get("optimization"):
            variant = f"{variant} {m['optimization']}"
        rows.append({
            "name": folder.name,
            "task": m.get("task"),
            "architecture": m.get("architecture"),
            "precision": variant,
            "size": size,
            "validated": bool((m.get("validation") or {}).get("passed")),
            "path": str(folder),
        })
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    if not rows:
        console.info(f"no exports in {home} yet: create one with onnxpipe export SOURCE --name NAME")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("name", "task", "architecture", "precision", "size", "validated"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for row in rows:
        table.add_row(row["name"], row["task"] or "?", row["architecture"] or "?", row["precision"] or "?",
                      human_size(row["size"]), "yes" if row["validated"] else "no")
    Console(highlight=False, soft_wrap=True).print(table)

"""`onnxpipe models`: the exports in the export home."""

from __future__ import annotations

import json
from typing import Any

import click


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per export, one per line.")
def models(as_json: bool) -> None:
    """List the exports in the export home ($ONNXPIPE_HOME).

    Shows each export's name, task, architecture, precision, size and whether it
    passed validation. An export whose manifest is broken is listed as "broken: WHY", one
    whose files no longer have the sizes the manifest records as "changed: WHY" (`onnxpipe
    verify NAME` checks every checksum).
    """
    from onnxpipe import console
    from onnxpipe.commands._format import folder_size, human_size
    from onnxpipe.errors import OnnxpipeError
    from onnxpipe.home import export_home, list_exports
    from onnxpipe.manifest import file_problems, read_manifest

    home = export_home()
    rows: list[dict[str, Any]] = []
    for folder in list_exports(home):
        problem = None
        try:
            m = read_manifest(folder)
            changed = [p for p in file_problems(folder, m) if m.get("checksums") is not None]
            if changed:
                problem = "changed: " + changed[0] + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else "")
        except OnnxpipeError as exc:
            m = {}
            problem = "broken: " + str(exc).replace(f"{folder}/", "").replace(str(folder), folder.name)
        variant = m.get("precision")
        if m.get("optimization"):
            variant = f"{variant} {m['optimization']}"
        rows.append(
            {
                "name": folder.name,
                "task": m.get("task"),
                "architecture": m.get("architecture"),
                "precision": variant,
                "size": folder_size(folder),
                "validated": problem is None and bool((m.get("validation") or {}).get("passed")),
                "problem": problem,
                "path": str(folder),
            }
        )
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, ensure_ascii=False))
        return
    if not rows:
        console.info(f"no exports in {home} yet: create one with onnxpipe export SOURCE --name NAME")
        return
    header = ("name", "task", "architecture", "precision", "size", "validated")
    table = [header] + [
        (
            r["name"],
            r["task"] or "?",
            r["architecture"] or "?",
            r["precision"] or "?",
            human_size(r["size"]),
            r["problem"] or ("yes" if r["validated"] else "no"),
        )
        for r in rows
    ]
    # Plain aligned columns: never truncated, whatever the terminal width, and easy to `awk`.
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for line in table:
        cells = [cell.rjust(w) if i == 4 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        click.echo("  ".join(cells).rstrip())

"""`onnxpipe verify`: does an export folder still hold exactly the files its manifest records?"""

from __future__ import annotations

import click

from onnxpipe.commands._options import complete_export_names


@click.command("verify")
@click.argument("model", shell_complete=complete_export_names)
def verify(model: str) -> None:
    """Check an export's files against the sizes and sha256 sums in its manifest.

    MODEL is an export folder or a name in the export home. The manifest is
    checked first (schema, and paths that stay inside the folder); then every
    file recorded at export must be there with its size and sha256, and no
    other file may have appeared. Prints one line per problem, or
    "NAME: ok (N files)"; exits 1 when anything differs.
    """
    from onnxpipe.errors import ExportFolderError
    from onnxpipe.home import resolve_model
    from onnxpipe.manifest import file_problems, read_manifest

    folder = resolve_model(model)
    manifest = read_manifest(folder)
    name = folder.name
    recorded = manifest.get("checksums")
    if recorded is None:
        raise ExportFolderError(
            f"{name}: {file_problems(folder, manifest)[0]}",
            hint="re-export it with this onnxpipe to be able to verify it",
        )
    problems = file_problems(folder, manifest, full=True)
    for problem in problems:
        click.echo(f"{name}: {problem}")
    if problems:
        raise ExportFolderError(
            f"{name}: {len(problems)} problem{'s' if len(problems) > 1 else ''} against the manifest "
            f"({len(recorded)} files recorded)",
            hint="re-export it, or get a fresh copy from where it came from",
        )
    click.echo(f"{name}: ok ({len(recorded)} files)")

"""`onnxpipe export`: a checkpoint in, a validated ONNX export folder out."""

from __future__ import annotations

import time
import unicodedata
from pathlib import Path

import click

from onnxpipe import console
from onnxpipe.errors import UsageError
from onnxpipe.registry import export_tasks

TASK_CHOICES = export_tasks()  # the registry's, in its order


@click.command("export")
@click.argument("source")
@click.option(
    "--task", type=click.Choice(TASK_CHOICES), help="What the export does. Default: inferred from config.json."
)
@click.option("--name", help="Save as NAME in the export home ($ONNXPIPE_HOME). Default: the source's name.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), help="Save into this folder instead.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing export of the same name. Only an onnxpipe export is ever replaced: "
    "any other folder, or a symbolic link, is refused.",
)
@click.option("--optimize", type=click.Choice(["O1", "O2", "O3"]), help="ONNX Runtime graph optimisation level.")
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    help="Quantise for the CPU. int8 on encoders and encoder-decoders: int8 weights per channel and activations "
    "per row, so a record's result never depends on its batch, validated on agreement with fp32 (labels; "
    "teacher-forced next tokens); on optimum's decoder-only graphs, dynamic int8; on the fused text-generation graph, 8-bit "
    "MatMulNBits weights with int8 compute. int4 (fused graph only): 4-bit weights (a GGUF's blocks kept, "
    "others rounded to nearest), an 8-bit output layer, int8 compute.",
)
@click.option(
    "--fp16",
    is_flag=True,
    help="Half precision (float16) for CUDA, float32 at the inputs and outputs; validated on a CUDA session "
    "(needs a working CUDA provider) by label and token agreement with fp32.",
)
@click.option(
    "--bf16",
    is_flag=True,
    help="bfloat16 for CUDA, as --fp16 (float32 at the inputs and outputs, validated on CUDA); ops without a "
    "CUDA bfloat16 kernel stay float32. ONNX Runtime's CPU provider has no bfloat16 kernels.",
)
@click.option(
    "--validate-with",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also validate on the lines of this text file.",
)
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --quantize int8, for encoders: text lines (up to 256, like the inputs the model will see) "
    "whose activation ranges become fixed int8 scales. Faster than the default, which scales each "
    "row at run time; both keep a record's result independent of its batch.",
)
@click.option("--trust-remote-code", is_flag=True, help="Run model code shipped with the checkpoint (off by default).")
@click.option("--revision", help="Hub revision (branch, tag or commit) for a hub id.")
@click.option("--opset", type=int, help="ONNX opset. Default: optimum's choice for the architecture.")
@click.option(
    "--graph",
    type=click.Choice(["auto", "fused", "optimum"]),
    default="auto",
    show_default=True,
    help="Who writes the graph. auto: onnxpipe's fused decoder (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma, "
    "Gemma 3; fp32; CPU) or fused encoder-decoder (Marian, BART, mBART, M2M100/NLLB, Pegasus, T5; CPU) "
    "where it applies, else optimum's.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda",
    help="The device the export is for. cuda: the decoders the fused graph covers get its CUDA "
    "form (fp16, a preallocated key/value buffer shared by past and present), validated through its float32 CPU twin, "
    "so no GPU is needed to export; other models get optimum's graph. cpu: the fused CPU graph where it "
    "applies. auto: cpu where CUDA does not run, else optimum's graph (it runs on both).",
)
def export(
    source: str,
    task: str | None,
    name: str | None,
    output: Path | None,
    force: bool,
    optimize: str | None,
    quantize: str | None,
    fp16: bool,
    bf16: bool,
    validate_with: Path | None,
    calibration: Path | None,
    trust_remote_code: bool,
    revision: str | None,
    opset: int | None,
    graph: str,
    device: str,
) -> None:
    """Export a checkpoint to a validated ONNX folder.

    SOURCE is a local Hugging Face folder, a .gguf file or a hub id. The export is checked
    against the PyTorch model (outputs, labels, greedy ids) and kept only if it passes;
    progress and a summary go to stderr.

    --force replaces an onnxpipe export and nothing else: a folder of other files, a
    symbolic link, the source checkpoint (or a folder around or inside it) and the current
    folder are refused before anything is written. A pickled pytorch_model.bin is refused:
    convert it to safetensors.

    \b
      onnxpipe export ./my-finetuned-bert --name sentiment
      onnxpipe export ./opus-mt-en-de --validate-with en.txt
      onnxpipe export ./my-finetuned-bert --name sentiment-int8 --quantize int8 --calibration train.txt
      onnxpipe export ./smollm2.gguf --name smollm2
      onnxpipe export ./smollm2.gguf --name smollm2-optimum --graph optimum
      onnxpipe export ./smollm2.gguf --name smollm2-cuda --device cuda
    """
    from onnxpipe.export import export_model
    from onnxpipe.home import export_home

    if name is not None and output:
        raise UsageError(
            "--name and --output exclude each other", hint="--name saves in the export home, --output anywhere"
        )
    if output is None:
        if name is None:
            name = default_name(source)
            check_name(name, f"the default name (from {source})", "pass --name NAME")
        else:
            check_name(name, "--name", "choose another --name")
        output = export_home() / name
    started = time.monotonic()
    manifest = export_model(
        source,
        output,
        task=task,
        force=force,
        optimize=optimize,
        quantize=quantize,
        fp16=fp16,
        bf16=bf16,
        validate_with=validate_with,
        calibration=calibration,
        trust_remote_code=trust_remote_code,
        revision=revision,
        opset=opset,
        graph=graph,
        device=device,
        progress=_progress,
    )
    _summary(manifest, output, time.monotonic() - started)


MAX_NAME = 100


def check_name(name: str, what: str, hint: str) -> None:
    """An export name is one plain path component: typed after -m, listed by `models`, safe in a shell line."""
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_NAME:
        problem = f"is {len(name)} characters long; the limit is {MAX_NAME}"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        problem = "holds a control character (a newline, tab, or similar)"
    elif name.startswith(".") or "/" in name or "\\" in name:
        problem = "starts with '.' or holds a slash"
    if problem:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise UsageError(
            f"{what} {shown!r} {problem}: not a valid export name",
            hint=f"{hint}: up to {MAX_NAME} characters, no slashes or control characters",
        )


def default_name(source: str) -> str:
    """The folder's name, the .gguf file's stem, or the last part of a hub id."""
    path = Path(source.rstrip("/\\"))
    if path.suffix.lower() == ".gguf":
        return path.stem
    return path.resolve().name if path.exists() else path.name


def _progress(stage: str, message: str) -> None:
    console.info(f"{stage:<9} {message}")


def _summary(manifest: dict, output: Path, seconds: float) -> None:
    from onnxpipe.commands._format import human_size, validation_rows, weights_text

    if console.VERBOSITY["level"] < 0:
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    variant = manifest["precision"] + (f" {manifest['optimization']}" if manifest.get("optimization") else "")
    table.add_row("export", str(output))
    table.add_row("task", f"{manifest['task']} ({manifest['architecture']})")
    table.add_row("variant", variant)
    weights = weights_text(manifest.get("graph") or {})
    if weights:
        table.add_row("weights", weights)
    table.add_row("size", human_size(sum(f.stat().st_size for f in output.rglob("*") if f.is_file())))
    for key, value in validation_rows(manifest["validation"]):
        table.add_row(key, value)
    table.add_row("time", f"{seconds:.1f}s")
    console.stderr().print(table)

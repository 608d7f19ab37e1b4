"""Coverage-guided fuzzing of the targets' checks with atheris (libFuzzer): `make fuzz`.

    python tests/fuzz/atheris_run.py record_parser -max_total_time=60 [-runs=N] [CORPUS_DIR]

The onnxpipe modules are imported instrumented, so libFuzzer mutates bytes toward new branches of
the parser, the writers and the manifest loader. A check that fails (an exception other than the
documented one) stops the run with the input that caused it and exit status 1 (libFuzzer's crash
report names the file it saved the input to).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))

with atheris.instrument_imports(include=["onnxpipe"]):
    import onnxpipe.manifest  # noqa: F401
    import onnxpipe.stream.readers  # noqa: F401
    import onnxpipe.stream.writers  # noqa: F401

from targets import _manifest, check_manifest, check_record  # noqa: E402

_PARSERS = ({}, {"field": "text"}, {"column": 2})
_FORMATS = ("text", "jsonl", "tsv")


def record_parser(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    parser_kw = _PARSERS[fdp.ConsumeIntInRange(0, 2)]
    fmt = _FORMATS[fdp.ConsumeIntInRange(0, 2)]
    line = fdp.ConsumeIntInRange(1, 3)
    raw = fdp.ConsumeBytes(fdp.remaining_bytes()).replace(b"\n", b"")
    check_record(raw, parser_kw, fmt, line)


def manifest_loader(data: bytes) -> None:
    check_manifest(data)


TARGETS = {"record_parser": record_parser, "manifest_loader": manifest_loader}


def seeds(name: str) -> list[bytes]:
    """Valid inputs to start from: mutations of real records and manifests reach far more branches."""
    import json

    if name == "manifest_loader":
        full = {
            **_manifest(),
            "family": "encoder",
            "graph": {"inputs": ["input_ids"], "outputs": ["logits"]},
            "special_tokens": {"pad_token_id": 0},
            "checksums": {"model.onnx": {"size": 0, "sha256": "0" * 64}},
        }
        return [json.dumps(_manifest()).encode(), json.dumps(full).encode()]
    lines = [
        '{"text": "a good film", "id": 1}',
        '{"text": null}',
        "[1, 2]",
        "col1\tcol2\tcol3",
        "plain text é 🙂",
        '{"text": "x", "n": 1e400, "d": {"a": [1, {"b": "c"}]}}',
    ]
    return [bytes([0, 1, 2, 0]) + line.encode() for line in lines]  # three choice bytes, then the line


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(TARGETS)}}} [libFuzzer options] [CORPUS_DIR]")
    name = sys.argv.pop(1)
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not dirs:  # no corpus given: one in /tmp (libFuzzer adds what it finds there)
        import tempfile

        dirs = [tempfile.mkdtemp(prefix=f"onnxpipe-fuzz-{name}-")]
        sys.argv.append(dirs[0])
    corpus = Path(dirs[0])
    if corpus.is_dir() and not any(corpus.iterdir()):  # an empty corpus starts from the seeds
        for i, seed in enumerate(seeds(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""`onnxpipe finetune`: labels and label maps, the seeded split, bad data, and `--export`."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from onnxpipe.errors import InputError, MissingExtraError
from onnxpipe.main import cli
from onnxpipe.training.finetune import prepare_data, split_indices

POSITIVE = [
    "a good movie with a great cast",
    "i loved every minute of it",
    "a moving story, great and good",
    "the cast was great",
    "good fun, loved it",
]
NEGATIVE = [
    "this film was boring",
    "the worst thing i have seen",
    "too long and badly acted",
    "boring, long and bad",
    "the worst film this year",
]


def _rows(n: int = 20) -> list[tuple[str, str]]:
    rows = []
    for i in range(n):
        rows.append((POSITIVE[i % len(POSITIVE)], "1"))
        rows.append((NEGATIVE[i % len(NEGATIVE)], "-1"))
    return rows


def _write_tsv(path, rows, header=("text", "label")):
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    return path


def _finetune(*args):
    return CliRunner().invoke(cli, ["finetune", *map(str, args)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, checkpoint):
    """One real (tiny) training run with --label-map and --export, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("finetune")
    data = _write_tsv(tmp / "reviews.tsv", _rows())
    home = tmp / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("ONNXPIPE_HOME", str(home))
    try:
        result = _finetune(
            checkpoint("bert", "feature-extraction"),
            "--data",
            data,
            "--output",
            tmp / "hf",
            "--label-map",
            "1=positive,-1=negative",
            "--epochs",
            1,
            "--batch-size",
            8,
            "--validation-split",
            0.2,
            "--logging-steps",
            1,
            "--export",
            "sentiment",
        )
    finally:
        mp.undo()
    return result, tmp / "hf", home / "sentiment"


def test_finetune_writes_readable_labels(trained):
    result, hf, _ = trained
    assert result.exit_code == 0, result.output
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    # ids follow the raw labels' numeric order (-1 < 1), names come from --label-map
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert (hf / "model.safetensors").is_file() and (hf / "tokenizer.json").is_file()
    summary = json.loads((hf / "onnxpipe_finetune.json").read_text())
    assert summary["examples"] == {"train": 32, "validation": 8, "truncated": 0}
    assert set(summary["metrics"]) >= {"accuracy", "macro", "per_class", "confusion_matrix"}


def test_finetune_reports_on_stderr_only(trained):
    result, _, _ = trained
    assert result.stdout == ""
    assert "step 1/4" in result.stderr and "loss " in result.stderr
    assert "validation (8 examples): accuracy" in result.stderr and "macro precision" in result.stderr


def test_finetune_export_produces_an_export(trained):
    _, _, export = trained
    manifest = json.loads((export / "onnxpipe.json").read_text())
    assert manifest["task"] == "text-classification"
    assert manifest["labels"] == ["negative", "positive"]
    assert (export / "model.onnx").is_file()


def test_string_labels_are_sorted_by_name(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(
            json.dumps({"body": t, "stars": s}) + "\n"
            for t, s in [("a", "pos"), ("b", "neg"), ("c", "neutral"), ("d", "pos")]
        )
    )
    train, val, raw, names = prepare_data(path, "body", "stars", None, 0.0, None, seed=0)
    assert names == raw == ["neg", "neutral", "pos"]
    assert val is None and train.labels == ["pos", "neg", "neutral", "pos"]


def test_numeric_labels_keep_numeric_order(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in [10, 2, -1, 2.0]))
    _, _, raw, _ = prepare_data(path, "text", "label", None, 0.0, None, seed=0)
    assert raw == ["-1", "2", "10"]  # 2 and 2.0 are one label


def test_split_is_seeded_and_stratified():
    labels = ["a"] * 30 + ["b"] * 10
    train, val = split_indices(labels, 0.2, seed=7)
    assert (train, val) == split_indices(labels, 0.2, seed=7)
    assert split_indices(labels, 0.2, seed=8)[1] != val
    assert sorted(train + val) == list(range(40))
    assert sum(labels[i] == "a" for i in val) == 6 and sum(labels[i] == "b" for i in val) == 2


def test_validation_file_is_mapped_and_checked(tmp_path):
    data = _write_tsv(tmp_path / "train.tsv", _rows(4))
    val = _write_tsv(tmp_path / "val.tsv", [("fine", "1"), ("meh", "0")])
    with pytest.raises(InputError, match=r"val.tsv:3: label '0' is not in --label-map"):
        prepare_data(data, "text", "label", "1=positive,-1=negative", None, val, seed=0)


def _error(result) -> str:
    assert result.exit_code != 0, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("text\tlabel\n", "has a header but no examples"),
        ("review\tlabel\ngood\t1\n", ":1: no column 'text' in the header (columns: review, label); pass --text-column"),
        ("text\tlabel\ngood\t1\nbad\t1\nfine\t1\n", "every example in"),
        ("text\tlabel\ngood\t1\nbad\t\n", ":3: empty value in column 'label'"),
        ("text\tlabel\ngood\t1\nbad\n", ":3: 1 field(s), the header has 2"),
    ],
)
def test_bad_data_fails_with_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    line = _error(_finetune(tmp_path, "--data", path, "--output", tmp_path / "out"))
    assert line.startswith("onnxpipe: error: ") and message in line
    assert not (tmp_path / "out").exists()


def test_bad_encoding_names_the_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ngood,1\ncaf\u00e9 au lait,-1\n".encode("latin-1"))
    line = _error(_finetune(tmp_path, "--data", path, "--output", tmp_path / "out"))
    assert "latin1.csv:3: not valid UTF-8" in line


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": -1\n', encoding="utf-8")
    assert "d.jsonl:2: malformed JSON" in _error(_finetune(tmp_path, "--data", path, "--output", tmp_path / "o"))
    path.write_text('{"text": "good", "label": 1}\n{"text": "bad"}\n', encoding="utf-8")
    assert "d.jsonl:2: no field 'label'" in _error(_finetune(tmp_path, "--data", path, "--output", tmp_path / "o"))


def test_label_map_must_cover_every_label(tmp_path):
    data = _write_tsv(tmp_path / "d.tsv", [("good", "1"), ("bad", "-1"), ("meh", "0")])
    line = _error(_finetune(tmp_path, "--data", data, "--output", tmp_path / "o", "--label-map", "1=pos,-1=neg"))
    assert "d.tsv:4: label '0' is not in --label-map" in line
    line = _error(_finetune(tmp_path, "--data", data, "--output", tmp_path / "o", "--label-map", "1:pos"))
    assert "bad --label-map entry '1:pos'" in line


def test_existing_output_needs_force(tmp_path):
    data = _write_tsv(tmp_path / "d.tsv", _rows(2))
    (tmp_path / "out").mkdir()
    assert "pass --force" in _error(_finetune(tmp_path, "--data", data, "--output", tmp_path / "out"))


def test_missing_extra_says_what_to_install(tmp_path, monkeypatch):
    data = _write_tsv(tmp_path / "d.tsv", _rows(2))
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(MissingExtraError, match=r"install onnxpipe\[export\]"):
        from onnxpipe.training.finetune import finetune

        finetune(tmp_path, data, tmp_path / "out")


@pytest.mark.parametrize("what", ["foreign", "base", "data-folder", "link"])
def test_force_never_replaces_what_finetune_did_not_write(tmp_path, checkpoint, what):
    """--force replaces a folder finetune wrote, nothing else; refused before any training, files intact."""
    base = checkpoint("bert", "feature-extraction")
    data = _write_tsv(tmp_path / "data" / "d.tsv", _rows(2)) if (tmp_path / "data").mkdir() is None else None
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_bytes(b"precious\n")
    output = {"foreign": victim, "base": base, "data-folder": tmp_path / "data", "link": tmp_path / "link"}[what]
    if what == "link":
        output.symlink_to(victim)
    before = {p: p.read_bytes() for p in [*base.iterdir(), data, victim / "notes.txt"] if p.is_file()}
    result = _finetune(base, "--data", data, "--output", output, "--force")
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "refusing" in result.stderr
    assert "Traceback" not in result.output and "step " not in result.stderr  # no training happened
    assert {p: p.read_bytes() for p in before} == before


def test_force_replaces_a_folder_finetune_wrote(trained, tmp_path):
    from onnxpipe.training.finetune import check_output

    _, hf, _ = trained
    check_output(hf, True)  # its own earlier output: may be replaced
    with pytest.raises(Exception, match="pass --force"):
        check_output(hf, False)

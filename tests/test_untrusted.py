"""An export folder is untrusted input: a tampered manifest, paths that leave the folder, broken graphs,
tokenizers and configs, files that changed since the export. Each ends in one line, never a traceback,
and nothing outside the folder is opened."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxpipe.errors import ExportFolderError, OnnxpipeError
from onnxpipe.main import cli
from onnxpipe.manifest import read_manifest, validate_manifest


def run(*args: str, **kw):
    return CliRunner().invoke(cli, list(args), **kw)


def assert_one_line(result, exit_code: int, *fragments: str) -> str:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxpipe: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _home() -> Path:
    return Path(os.environ["ONNXPIPE_HOME"])


def install(exported, name: str, arch: str = "bert") -> Path:
    dst = _home() / name
    shutil.copytree(exported(arch), dst)
    return dst


def edit_manifest(folder: Path, change) -> None:
    path = folder / "onnxpipe.json"
    data = json.loads(path.read_text())
    data = change(data)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def _set(**keys):
    def change(m):
        m.update(keys)
        return m

    return change


def _drop(key):
    def change(m):
        m.pop(key)
        return m

    return change


# --- the manifest's schema --------------------------------------------------------------

BAD_MANIFESTS = {
    "a list": (lambda m: [], "the manifest is a JSON array, not an object"),
    "no task": (_drop("task"), "the manifest has no 'task'"),
    "null task": (_set(task=None), "unknown task None"),
    "unknown task": (_set(task="summarization"), "unknown task 'summarization'"),
    "files a string": (_set(files="model.onnx"), "'files' is a JSON string, expected object"),
    "tokenizer a string": (_set(tokenizer="tokenizer.json"), "'tokenizer' is a JSON string, expected object"),
    "labels a mapping": (_set(labels={"0": "a"}), "'labels' is a JSON object, expected array or null"),
    "format 2": (_set(format=2), "manifest format 2"),
    "generator without a model": (
        _set(task="text-generation", family="decoder", files={}),
        "a text-generation export needs the graph model",
    ),
    "seq2seq without a decoder": (
        _set(task="text2text-generation", family="seq2seq", files={"encoder": "model.onnx"}),
        "a text2text-generation export needs the graph decoder",
    ),
    "family that does not fit": (_set(family="decoder"), "family 'decoder' does not fit task text-classification"),
    "not JSON": (lambda m: "{", "is not valid JSON"),
    "deep nesting": (lambda m: "[" * 100_000 + "]" * 100_000, "is not valid JSON"),
    "a file that is missing": (_set(files={"model": "gone.onnx"}), "files.model names gone.onnx, which is missing"),
    "graph inputs that are not names": (
        _set(graph={"inputs": [[1]], "outputs": ["logits"]}),
        "graph.inputs must be a list of names",
    ),
    "a negative token id": (
        _set(special_tokens={"pad_token_id": -1}),
        "special_tokens.pad_token_id must be a token id",
    ),
    "a token id that is text": (_set(special_tokens={"eos_token_id": ["</s>"]}), "special_tokens.eos_token_id must"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_a_bad_manifest_is_one_line_naming_the_file(exported, case):
    change, fragment = BAD_MANIFESTS[case]
    folder = install(exported, "bad")
    edit_manifest(folder, change)
    for args in (["info", "bad"], ["classify", "-m", "bad"], ["verify", "bad"]):
        result = run(*args, input="a good movie\n")
        assert_one_line(result, 1, str(folder / "onnxpipe.json"), fragment)


@pytest.mark.parametrize(
    "report", [{"outputs": {"logits": {"max_abs_diff": "big"}}}, {"cosine_similarity": 0.5}, {"failures": [[1]]}]
)
def test_info_of_a_malformed_report_is_one_line_and_prints_nothing_else(exported, report):
    folder = install(exported, "odd")
    edit_manifest(folder, _set(validation={"passed": True, **report}))
    assert_one_line(run("info", "odd"), 1, "onnxpipe.json: a field that info shows is malformed")
    assert run("info", "--json", "odd").exit_code == 0  # the manifest as it is stays readable


def test_models_lists_good_exports_and_marks_broken_ones(exported):
    install(exported, "good")
    edit_manifest(install(exported, "no-task"), _drop("task"))
    edit_manifest(install(exported, "a-list"), lambda m: [])
    shrunk = install(exported, "shrunk")
    with open(shrunk / "model.onnx", "r+b") as f:
        f.truncate(100)
    result = run("models")
    assert result.exit_code == 0 and result.stderr == "", result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert rows["good"].endswith("yes")
    assert rows["no-task"].endswith("broken: onnxpipe.json: the manifest has no 'task' (re-run onnxpipe export)")
    assert "broken: onnxpipe.json: the manifest is a JSON array" in rows["a-list"]
    assert "changed: model.onnx: 100 bytes, the manifest records" in rows["shrunk"]
    records = {r["name"]: r for r in map(json.loads, run("models", "--json").stdout.splitlines())}
    assert records["good"]["problem"] is None and records["good"]["validated"] is True
    assert records["no-task"]["validated"] is False and records["no-task"]["problem"].startswith("broken: ")


# --- paths stay inside the folder --------------------------------------------------------


@pytest.fixture
def no_session(monkeypatch):
    """Fail the test if ONNX Runtime is asked to open anything."""
    import onnxruntime

    opened = []

    def refuse(path, *a, **kw):
        opened.append(path)
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
    return opened


@pytest.mark.parametrize(
    "key, value",
    [
        ("files.model", "../outside/model.onnx"),
        ("files.model", "/etc/passwd"),
        ("files.model", "sub/../../outside/model.onnx"),
        ("tokenizer.file", "../outside/tokenizer.json"),
        ("tokenizer.chat_template", "/etc/passwd"),
        ("tokenizer.target_file", "~/tokenizer.json"),
    ],
)
def test_manifest_paths_that_leave_the_folder_are_refused_unopened(exported, tmp_path, no_session, key, value):
    outside = _home() / "outside"
    shutil.copytree(exported("bert"), outside)  # a real export there: it must not be used
    folder = install(exported, "evil")
    section, field = key.split(".")

    def change(m):
        m[section][field] = value
        return m

    edit_manifest(folder, change)
    result = run("classify", "-m", "evil", input="a good movie\n")
    assert_one_line(result, 1, f"{key} = {value!r} leads out of the export folder", "refusing")
    assert no_session == []


@pytest.mark.parametrize("layer", [{"weight": "../w.npy"}, {"weight": "dense/w.npy", "bias": "/etc/passwd"}])
def test_dense_layer_files_stay_inside_the_folder(exported, layer):
    folder = install(exported, "dense")
    edit_manifest(folder, _set(dense=[layer]))
    with pytest.raises(ExportFolderError, match=r"dense\[0\]\.(weight|bias) = .* leads out of the export folder"):
        read_manifest(folder)


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json", "config.json"])
def test_symlinks_that_leave_the_folder_are_refused(exported, tmp_path, no_session, name):
    folder = install(exported, "linked")
    target = tmp_path / f"elsewhere-{name}"
    shutil.copy(folder / name, target)
    (folder / name).unlink()
    (folder / name).symlink_to(target)
    result = run("classify", "-m", "linked", input="a good movie\n")
    assert_one_line(result, 1, f"is a link to {target}, outside the export folder")
    assert no_session == []


def test_a_symlink_inside_the_folder_is_fine(exported):
    folder = install(exported, "inner")
    (folder / "model.onnx").rename(folder / "graph.onnx")
    (folder / "model.onnx").symlink_to("graph.onnx")
    result = run("classify", "-m", "inner", input="a good movie\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() in ("negative", "positive", "neutral")


# --- broken files -----------------------------------------------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


BROKEN_FILES = {
    "empty model.onnx": ("model.onnx", lambda p: p.write_bytes(b""), "model.onnx is empty"),
    "truncated model.onnx": ("model.onnx", _truncate, "ONNX Runtime cannot load"),
    "model.onnx of text": ("model.onnx", lambda p: p.write_text("hello"), "ONNX Runtime cannot load"),
    "broken tokenizer.json": ("tokenizer.json", _truncate, "tokenizer.json is not a usable tokenizer"),
    "tokenizer.json of another kind": (
        "tokenizer.json",
        lambda p: p.write_text('{"version": 1}'),
        "tokenizer.json is not a usable tokenizer",
    ),
    "broken config.json": ("config.json", lambda p: p.write_text('{"a": '), "config.json is not valid JSON"),
    "config.json a list": ("config.json", lambda p: p.write_text("[1]"), "config.json does not hold a JSON object"),
    "broken generation_config.json": (
        "generation_config.json",
        lambda p: p.write_bytes(b"\xff\xfe"),
        "generation_config.json is not valid JSON",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
@pytest.mark.parametrize("arch, command", [("bert", "classify"), ("gpt2", "generate")])
def test_a_broken_file_is_one_line(exported, case, arch, command):
    name, damage, fragment = BROKEN_FILES[case]
    folder = install(exported, "broken", arch)
    damage(folder / name)
    result = run(command, "-m", "broken", "--device", "cpu", input="a good movie\n")
    assert_one_line(result, 1, fragment)


def test_onnx_external_data_outside_the_folder_is_one_line(exported, tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = install(exported, "external")
    secret = _home() / "secret.bin"
    secret.write_bytes(np.ones(4, dtype=np.float32).tobytes())
    weight = numpy_helper.from_array(np.zeros(4, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weight],
    )
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    result = run("classify", "-m", "external", input="a good movie\n")
    assert_one_line(result, 1, "ONNX Runtime cannot load", "model.onnx")


# --- checksums and verify ---------------------------------------------------------------


def test_export_records_a_checksum_for_every_file(exported):
    import hashlib

    folder = exported("bert")
    recorded = json.loads((folder / "onnxpipe.json").read_text())["checksums"]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "onnxpipe.json")
    assert sorted(recorded) == files and "model.onnx" in files and "tokenizer.json" in files
    for rel, entry in recorded.items():
        data = (folder / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_says_ok_then_names_each_change(exported):
    folder = install(exported, "checked")
    n = len(json.loads((folder / "onnxpipe.json").read_text())["checksums"])
    result = run("verify", "checked")
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout == f"checked: ok ({n} files)\n"
    data = bytearray((folder / "model.onnx").read_bytes())
    data[-1] ^= 1  # same size, other bytes: only the checksum sees it
    (folder / "model.onnx").write_bytes(bytes(data))
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer_config.json").unlink()
    (folder / "notes.txt").write_text("added")
    result = run("verify", "checked")
    assert result.stdout.splitlines() == [
        "checked: config.json: 2 bytes, the manifest records " + str(_recorded(folder, "config.json")["size"]),
        "checked: model.onnx: sha256 differs from the manifest's",
        "checked: tokenizer_config.json: missing",
        "checked: notes.txt: not in the manifest",
    ]
    assert result.exit_code == 1
    assert result.stderr.startswith("onnxpipe: error: checked: 4 problems against the manifest")
    assert len(result.stderr.strip().splitlines()) == 1
    # info sees the size changes (cheap) but not the same-size edit: that is verify's job.
    info = run("info", "checked")
    assert info.exit_code == 0
    assert "2 files no longer match the manifest (config.json: 2 bytes" in info.stderr
    assert "2 of" in info.stdout and "files changed since the export" in info.stdout


def _recorded(folder: Path, rel: str) -> dict:
    return json.loads((folder / "onnxpipe.json").read_text())["checksums"][rel]


def test_an_export_without_checksums_says_so(exported):
    folder = install(exported, "old")
    edit_manifest(folder, _drop("checksums"))
    result = run("verify", "old")
    assert_one_line(result, 1, "old: no checksums recorded (exported by an older onnxpipe)")
    info = run("info", "old")
    assert info.exit_code == 0 and info.stderr == ""
    assert "no checksums recorded (exported by an older onnxpipe)" in info.stdout
    models = run("models")
    assert models.stdout.splitlines()[1].endswith("yes")


# --- messages ---------------------------------------------------------------------------


def test_wrong_task_says_which_command_fits(exported):
    install(exported, "gen", "gpt2")
    result = run("classify", "-m", "gen", input="hi\n")
    assert_one_line(
        result,
        2,
        "gen is a text-generation export; this command needs a text-classification export",
        "run onnxpipe generate -m gen",
    )


def test_a_trailing_slash_finds_the_export(exported):
    install(exported, "sentiment")
    result = run("classify", "-m", "sentiment/", input="a good movie\n")
    assert result.exit_code == 0, result.output


# --- properties: the loader returns a manifest or raises its own error --------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
KEYS = [
    "format",
    "task",
    "family",
    "files",
    "tokenizer",
    "labels",
    "special_tokens",
    "checksums",
    "name",
    "graph",
    "dense",
    "file",
    "weight",
]


@pytest.fixture(scope="module")
def good_manifest(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("prop")
    (folder / "model.onnx").write_bytes(b"x")
    (folder / "tokenizer.json").write_text("{}")
    manifest = {
        "format": 1,
        "task": "text-classification",
        "family": "encoder",
        "files": {"model": "model.onnx"},
        "tokenizer": {"file": "tokenizer.json"},
        "labels": ["a", "b"],
        "special_tokens": {"pad_token_id": 0},
        "checksums": {"model.onnx": {"size": 1, "sha256": "00"}},
    }
    return folder, manifest


def _loads_or_refuses(call) -> None:
    try:
        data = call()
    except ExportFolderError:
        return
    except OnnxpipeError as exc:  # only "has no onnxpipe.json" may be another domain error
        assert "has no onnxpipe.json" in str(exc)
        return
    assert isinstance(data, dict) and data["format"] == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=JSON)
def test_any_json_is_a_manifest_or_one_domain_error(good_manifest, data):
    folder, _ = good_manifest
    _loads_or_refuses(lambda: validate_manifest(data, folder))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=JSON, nested=st.sampled_from([None, "files", "tokenizer", "checksums"]))
def test_any_change_to_a_good_manifest_is_a_manifest_or_one_domain_error(good_manifest, key, value, nested):
    folder, manifest = good_manifest
    data = json.loads(json.dumps(manifest))
    if nested:
        data[nested][key] = value
    else:
        data[key] = value
    _loads_or_refuses(lambda: validate_manifest(data, folder))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_bytes_are_a_manifest_or_one_domain_error(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("bytes", numbered=True)
    (folder / "onnxpipe.json").write_bytes(raw)
    _loads_or_refuses(lambda: read_manifest(folder))

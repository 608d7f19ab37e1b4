"""The README's tour and the man pages' EXAMPLES run as shown.

Every ```sh block of README.md runs, in order, in one bash (`set -euo pipefail`), except a block
right after an `<!-- not run: WHY -->` comment (make itself, or the Hugging Face hub, which tests
never reach); those are checked against the click definitions instead. The `$ ` lines of each
man/text page run the same way, one page per test.

They run in a scratch folder laid out like a checkout after `make demo`: examples/, scripts/ and
.venv/ are links to the real ones, and exports/ holds tiny random models exported by the session
fixtures under the names the docs use. The outputs of random models are noise, so the docs show
none; what is checked is that every command runs and exits as shown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shell_examples import REPO, check_invocation, commands_of, invocations, man_examples, readme_blocks

from onnxpipe.main import COMMANDS

pytestmark = pytest.mark.slow

# name in the docs -> (architecture, task, export options) of its tiny stand-in
STAND_INS = {
    "sentiment": ("bert", "text-classification", {}),
    "sentiment-int8": ("bert", None, {"quantize": "int8"}),
    "nli": ("bert", "text-classification", {}),
    "ms-marco": ("bert", "text-classification", {"checkpoint_kw": {"num_labels": 1}}),
    "minilm": ("bert", "feature-extraction", {}),
    "ner": ("bert", "token-classification", {}),
    "squad": ("bert", "question-answering", {}),
    "distilroberta": ("roberta", "fill-mask", {}),
    "smollm2": ("llama", None, {}),
    "opus-mt-en-de": ("marian", None, {}),
    "distilbart-cnn": ("bart", None, {}),
}
# checkpoint folders the docs name -> (architecture, task) of the tiny checkpoint put there
CHECKPOINTS = {"my-encoder": ("bert", "feature-extraction"), "my-sentiment-hf": ("bert", "text-classification")}

POSITIVE = [
    "A warm, funny and moving film.",
    "I loved every minute of it!",
    "A great cast and a good story.",
    "Beautifully acted, it stays with you.",
]
NEGATIVE = [
    "The plot is a mess and the jokes fall flat.",
    "Boring, too long and badly acted.",
    "The worst thing I have seen this year.",
    "I checked my watch three times.",
]
ROWS = "".join(f"{p}\t1\n{n}\t-1\n" for p, n in zip(POSITIVE, NEGATIVE))
LABELLED = "text\tlabel\n" + ROWS
# The generic input files the man pages name.
MAN_FILES = {
    "news.txt": "Angela Merkel met Emmanuel Macron in Paris on Monday.\n\nThe Rhine flows through Basel and Cologne.\n",
    "en.txt": "The house is small.\nThe weather is nice today.\n\nMachine translation turns English into German.\n",
    "posts.jsonl": "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(POSITIVE[:2] + NEGATIVE[:2])),
    "articles.jsonl": "".join(
        json.dumps({"id": i, "article": " ".join([t] * 3)}) + "\n" for i, t in enumerate(POSITIVE[:2] + NEGATIVE[:1])
    ),
    "prompts.txt": "The shell is\nPipelines of small tools\n",
    "questions.txt": "What is a pipe?\nWhy is the sky blue?\n",
    "cloze.txt": "Paris is the <mask> of France.\nThis line has no mask.\nA <mask> day.\n",
    "train.tsv": "text\tlabel\n" + ROWS * 3,
    "heldout.tsv": LABELLED,
    "newstest.en": "The house is small.\nThe weather is nice today.\n",
    "newstest.de": "Das Haus ist klein.\nDas Wetter ist heute schön.\n",
    "squad.jsonl": "".join(
        json.dumps(
            {"id": i, "question": q, "context": c, "answers": {"text": a, "answer_start": [c.find(t) for t in a]}}
        )
        + "\n"
        for i, (q, c, a) in enumerate(
            [
                ("Where is Paris?", "Paris is the capital of France.", ["France", "capital of France"]),
                ("Who left?", 'She said: "hello, world" and left the room.', ["She"]),
                ("What is the capital of Mars?", "The quick brown fox jumps over the lazy dog.", []),
            ]
        )
    ),
    "passages.txt": "Pipes connect the output of one program to the input of another.\nThe weather is nice today.\n\n",
    "nli.jsonl": "".join(
        json.dumps({"id": i, "premise": p, "hypothesis": h}) + "\n"
        for i, (p, h) in enumerate([(POSITIVE[0], "The film is good."), (NEGATIVE[0], "The film is good.")])
    ),
    "pairs.tsv": "en\tde\nThe house is small.\tDas Haus ist klein.\nThe weather is nice today.\tDas Wetter ist heute schön.\n",
}


@pytest.fixture(scope="module")
def stand_ins(exported, checkpoint) -> dict[str, Path]:
    folders = {name: exported(arch, task, **options) for name, (arch, task, options) in STAND_INS.items()}
    folders.update({name: checkpoint(arch, task) for name, (arch, task) in CHECKPOINTS.items()})
    return folders


def _layout(root: Path, stand_ins: dict[str, Path], checkpoints_at: str = ".") -> Path:
    """A scratch checkout: links to the real examples/, scripts/ and .venv/, and exports/ of stand-ins."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("examples", "scripts", ".venv"):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    (root / "exports").mkdir()
    for name in STAND_INS:
        # A link: the docs never --force onto these names, and nothing writes into an export folder.
        (root / "exports" / name).symlink_to(stand_ins[name])
    for name in CHECKPOINTS:
        (root / checkpoints_at / name).symlink_to(stand_ins[name])
    (root / "home").mkdir()  # $HOME, for the ~/... of the completion examples
    return root


def _run(script: str, cwd: Path, what: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ONNXPIPE_HOME", "ONNXPIPE_DEVICE", "VIRTUAL_ENV")}
    env.update(
        HOME=str(cwd / "home"),
        ONNXPIPE_HOME=str(cwd / "exports"),
        HF_HUB_OFFLINE="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    proc = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + script], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, (
        f"{what} failed with exit status {proc.returncode}\n--- stderr (end):\n"
        f"{proc.stderr[-4000:]}\n--- stdout (end):\n{proc.stdout[-1500:]}"
    )
    return proc


def _script(commands: list[tuple[str, str]]) -> str:
    return "".join(f"echo '>>> {where}: {cmd[:100].replace(chr(39), '')}' >&2\n{cmd}\n" for where, cmd in commands)


# --- README ----------------------------------------------------------------------------------


def test_readme_tour_runs(tmp_path, stand_ins):
    root = _layout(tmp_path / "checkout", stand_ins)
    build = root / "build" / "sentiment"  # as make models leaves it
    build.mkdir(parents=True)
    (build / "train.tsv").write_text(MAN_FILES["train.tsv"], encoding="utf-8")
    texts = [line.split("\t")[0] for line in MAN_FILES["train.tsv"].splitlines()[1:]]
    (build / "train.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")  # the int8 calibration
    (build / "heldout.tsv").write_text(LABELLED, encoding="utf-8")
    steps = [(f"README.md:{b.line}", cmd) for b in readme_blocks() if b.run for cmd in commands_of(b.code)]
    proc = _run(_script(steps), root, "the README tour")
    assert proc.stdout.strip()


def test_readme_tour_covers_every_command():
    ran = {
        args[i]
        for b in readme_blocks()
        if b.run
        for cmd in commands_of(b.code)
        for args in invocations(cmd)
        for i in range(len(args))
        if args[i] in COMMANDS and all(a.startswith("-") for a in args[:i])
    }
    assert ran == set(COMMANDS), set(COMMANDS) - ran


def test_readme_examples_use_real_options():
    """The blocks that cannot run here (the hub) are at least real command lines."""
    problems = [
        f"README.md:{b.line}: {cmd}: {p}"
        for b in readme_blocks()
        for cmd in commands_of(b.code)
        for args in invocations(cmd)
        for p in check_invocation(args)
    ]
    assert not problems, problems
    assert all(b.why_not for b in readme_blocks() if not b.run)


def _python_blocks(text: str) -> list[tuple[int, str]]:
    """(line, code) of the README's ```python blocks."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            j = lines.index("```", i + 1)
            blocks.append((i + 1, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


def test_readme_python_blocks_run(tmp_path, stand_ins):
    """The Python API section runs as shown, against the same stand-ins as the tour."""
    blocks = _python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert blocks, "the README shows the Python API"
    root = _layout(tmp_path / "checkout", stand_ins)
    for line, code in blocks:
        (root / "block.py").write_text(code, encoding="utf-8")
        proc = _run("python block.py", root, f"the python block at README.md:{line}")
        assert proc.stdout.strip()


# --- man pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["onnxpipe", *(f"onnxpipe-{c}" for c in COMMANDS)])
def test_man_examples_run(tmp_path, stand_ins, page):
    run, _ = man_examples(page)
    if not run:
        pytest.fail(f"man/text/{page}.txt has no `$ ` example")
    root = _layout(tmp_path / "work", stand_ins)
    for name, text in MAN_FILES.items():
        (root / name).write_text(text, encoding="utf-8")
    for name in ("reviews.txt", "sentences.txt"):
        (root / name).write_text((REPO / "examples" / name).read_text(encoding="utf-8"), encoding="utf-8")
    _run(_script([(f"man/text/{page}.txt", cmd) for cmd in run]), root, f"the EXAMPLES of {page}(1)")

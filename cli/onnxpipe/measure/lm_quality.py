"""Teacher-forced quality of a text-generation export: perplexity, and next-token agreement with a reference.

Greedy ids identical to the float32 model's is the right test for an exact export and the wrong one for
a lossy one (int4, int8): one flipped token early changes everything after it. Teacher forcing scores
every position of a held-out text instead, each model seeing the same true prefix:

    lm_agreement(export_dir, reference_dir, texts, max_tokens, context) -> dict
        {"tokens", "context", "agreement", "perplexity", "reference_perplexity", "perplexity_ratio",
         "kl_divergence", "top1_accuracy", "reference_top1_accuracy", "text"}
        (what export validation records; export.validate.lm_quality adds the thresholds)
    evaluate_lm(model, data_path, against=..., max_tokens=..., context=...) -> dict   (onnxpipe eval's report)

The text: every non-empty line is a document, tokenized on its own without special tokens and followed
by a newline's tokens (a newline, not EOS: what a model's EOS means differs between base and chat models).
The documents form one stream of tokens, cut into windows of CONTEXT tokens, each run from an empty cache.
Where the tokenizer puts a BOS before a text (as generate's prompts get it), each window starts with it,
and every token of the stream is scored; otherwise consecutive windows share one token, the first of each
window is only context, and every token but the stream's first is scored. Each token is scored once.

Logits at every position: optimum's graphs return them. onnxpipe's fused graph (export.fused) returns
the last position's only, so its graph is loaded (without its external data), the Slice nodes that keep
the last position are bypassed in memory, and the session is made from that graph (reading the
weights from the export folder). That edit needs the onnx package (the [export] extra); a base install
scores the fused graph as it is, one token a run over its growing cache, several times slower, and says
so in a note. Its float32-compute graphs give the same logits up to summation order. A graph whose cache
is one buffer bound as past and present (export.cuda_graph's form: the CUDA graph, and the CPU's
--quantize int4|int8 exports) is always scored one token a run into that buffer, as generation runs it.
For int8 compute that differs a little from one run a window: attention sums its keys in another order,
and the next layer's int8 rounding can turn that last bit into another value (SmolLM2 int4, 2,797
tokens: 96.60% agreement one token a run, 96.39% in one run a window).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import ExportFolderError, InputError, MissingExtraError, UsageError, import_extra
from onnxpipe.registry import FAMILIES

TEXT_GENERATION = FAMILIES["generate"].export_tasks[0]

DEFAULT_MAX_TOKENS = 20_000
DEFAULT_CONTEXT = 512
HELDOUT_TEXT = "heldout_en.txt"  # in onnxpipe/data: English written for onnxpipe, so no model was tuned on it
TEXT_NOTE = (
    "non-empty lines as documents, each followed by a newline; windows of {context} tokens{bos}, each token scored once"
)


def heldout_texts() -> list[str]:
    """The held-out English text shipped with onnxpipe (a few thousand tokens), one document a line."""
    text = resources.files("onnxpipe").joinpath("data", HELDOUT_TEXT).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


# --- an export opened for teacher forcing ------------------------------------------------------


@dataclass
class Scorer:
    """One export's tokenizer and a session that returns the logits of every position."""

    folder: Path
    name: str
    precision: str | None
    session: Any
    tokenizer: Any
    max_positions: int | None
    unk_remap: dict | None
    provider: str
    device_note: str | None = None
    stepwise: bool = False  # the fused graph as it is (last position's logits): one token a run
    device_index: int = 0  # the CUDA device the session runs on, when it does

    def __post_init__(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past = {n: i for n, i in inputs.items() if n.startswith("past_key_values.")}
        known = {"input_ids", "attention_mask", "position_ids", "use_cache_branch", *self.past}
        if self.stepwise:  # driven by runtime.decoder, which feeds a shared-buffer graph's inputs too
            known |= {"seqlens_k", "total_sequence_length"}
        if set(inputs) - known:
            raise UsageError(
                f"{self.name}'s graph takes inputs that a teacher-forced run cannot feed: "
                + ", ".join(sorted(set(inputs) - known)),
                hint="score the export it was made from",
            )
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        if logits is None:
            raise ExportFolderError(f"{self.name}'s graph has no logits output", hint="re-run onnxpipe export")
        self.logits_name, self.vocab_size = logits.name, logits.shape[-1]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        from onnxpipe.runtime.model import unk_remapped

        return unk_remapped(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, self.unk_remap)

    def bos_prefix(self) -> list[int]:
        """The ids the tokenizer puts before a text (its BOS), [] when none."""
        plain, full = self.encode("a"), self.encode("a", add_special_tokens=True)
        if plain and full[len(full) - len(plain) :] == plain:
            return full[: len(full) - len(plain)]
        return []

    @property
    def method_note(self) -> str | None:
        """What a report should say about how this export was scored, when it is not in one run a window."""
        if not self.stepwise:
            return None
        if "seqlens_k" in self.input_names:
            return f"{self.name}: scored one token a run into its key/value buffer, as generation runs it"
        return (
            f"{self.name}: scored one token a run (reading its graph for every position's logits needs the "
            "onnx package: install onnxpipe[export] for a faster run)"
        )

    def logits(self, window: Sequence[int]) -> np.ndarray:
        """(len(window), vocab) float32: the logits after each token of WINDOW, from an empty cache."""
        if self.stepwise:
            return self._stepwise_logits(window)
        n = len(window)
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([window], dtype=np.int64)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((1, n), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.arange(n, dtype=np.int64)[None]
        if "use_cache_branch" in self.input_names:
            feeds["use_cache_branch"] = np.array([False])
        for name, info in self.past.items():
            dtype = np.float16 if "float16" in info.type else np.float32
            feeds[name] = np.zeros((1, info.shape[1], 0, info.shape[3]), dtype=dtype)
        (out,) = self.session.run([self.logits_name], feeds)
        if out.shape[:2] != (1, n):
            raise ExportFolderError(f"{self.name}'s graph returned logits of shape {out.shape} for {n} tokens")
        return np.asarray(out[0], dtype=np.float32)

    @cached_property
    def decoder(self) -> Any:
        """Generation's driver of this session (runtime.decoder), made once for every window."""
        from onnxpipe.runtime.decoder import CausalDecoder
        from onnxpipe.runtime.device import CUDA, Device

        device = Device("cuda", self.device_index) if self.provider == CUDA else Device("cpu")
        return CausalDecoder.for_session(self.session, device)

    def _stepwise_logits(self, window: Sequence[int]) -> np.ndarray:
        """logits() for a graph that returns the last position's logits only: generation's decoder
        (runtime.decoder) run one token at a time, each step's logits kept."""
        batch = self.decoder.running()
        rows = np.empty((len(window), self.vocab_size), dtype=np.float32)
        rows[0] = batch.admit([list(window[:1])], 0, [len(window)])[0]
        for i, token in enumerate(window[1:], 1):
            rows[i] = batch.step(np.array([token], dtype=np.int64))[0]
        return rows


def _describe(folder: Path) -> dict[str, Any]:
    """What scoring needs from FOLDER: its manifest when it has one (a finished export), else the files an
    export writes before its manifest (validation runs in the temporary folder)."""
    from onnxpipe.manifest import MANIFEST_NAME, read_manifest
    from onnxpipe.runtime.model import read_json_file

    if (folder / MANIFEST_NAME).exists():
        manifest = read_manifest(folder)
    else:
        manifest = {"files": {"model": "model.onnx"}, "family": "decoder", "task": TEXT_GENERATION}
    if manifest.get("family") != "decoder" or "model" not in (manifest.get("files") or {}):
        raise UsageError(
            f"{folder.name} is a {manifest.get('task')} export: perplexity and next-token agreement need a "
            "text-generation (decoder-only) export"
        )
    config = read_json_file(folder, "config.json")
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    tokenizer = manifest.get("tokenizer") or {}
    return {
        "manifest": manifest,
        "graph": manifest["files"]["model"],
        "tokenizer": tokenizer.get("file") or "tokenizer.json",
        "unk_remap": tokenizer.get("unk_remap"),
        "max_positions": positions if isinstance(positions, int) and positions > 0 else None,
    }


def open_scorer(ref: str | Path, device: str = "cpu", threads: int | None = None, unfinished: bool = False) -> Scorer:
    """REF (an export name or folder; with UNFINISHED, also an export's temporary folder without its
    manifest yet) opened for teacher forcing."""
    from onnxpipe.home import resolve_model
    from onnxpipe.manifest import MANIFEST_NAME, inside
    from onnxpipe.runtime.device import CUDA, cuda_failure_reason, parse_device
    from onnxpipe.runtime.machine import cap_threads
    from onnxpipe.runtime.model import load_tokenizer
    from onnxpipe.runtime.sessions import make_session

    path = Path(ref)
    folder = path if unfinished and path.is_dir() and not (path / MANIFEST_NAME).exists() else resolve_model(ref)
    info = _describe(folder)
    manifest = info["manifest"]
    graph_path = inside(folder, info["graph"])
    if not graph_path.is_file():
        raise ExportFolderError(f"{graph_path} is missing", hint="re-run onnxpipe export")
    tokenizer = load_tokenizer(folder, info["tokenizer"])
    dev = parse_device(device)
    threads = cap_threads(threads)
    fell_back: list[str] = []
    builder = (manifest.get("graph") or {}).get("builder")
    stepwise = False
    try:
        graph: bytes | None = None
        if builder != "optimum":  # optimum's graphs return logits at every position already
            try:
                graph = all_position_logits(graph_path)
                stepwise = graph is None  # a shared-buffer graph: one token a run into its buffer
            except MissingExtraError:  # a base install: the fused graph as it is, one token a run
                stepwise = True
        if graph is None:
            session = make_session(graph_path, dev, threads=threads, on_fallback=fell_back.append)
        else:
            session = make_session(
                graph, dev, threads=threads, on_fallback=fell_back.append, external_data_folder=graph_path.parent
            )
    except (OSError, ValueError) as exc:
        raise ExportFolderError(
            f"ONNX Runtime cannot load {graph_path}: {exc}", hint="re-run onnxpipe export"
        ) from None
    provider = session.get_providers()[0]
    name = manifest.get("name") or folder.name
    if fell_back:
        note = f"CUDA not usable ({cuda_failure_reason(fell_back[0])}); running {name} on CPU"
    else:
        note = f"running {name} on {'CUDA device ' + str(dev.index) if provider == CUDA else 'CPU'}"
    return Scorer(
        folder,
        folder.name,
        manifest.get("precision"),
        session,
        tokenizer,
        info["max_positions"],
        info["unk_remap"],
        provider,
        note,
        stepwise,
        dev.index,
    )


def _int_constant(initializers: dict[str, Any], name: str, to_array: Any) -> list[int] | None:
    """The integer constant NAME among INITIALIZERS (onnx TensorProtos; TO_ARRAY is onnx.numpy_helper's)."""
    tensor = initializers.get(name)
    if tensor is None:
        return None
    value = to_array(tensor)
    return [int(v) for v in value.reshape(-1)] if value.dtype.kind == "i" else None


def all_position_logits(graph_path: Path) -> bytes | None:
    """GRAPH_PATH's graph (its external data left where it is) serialized with logits at every position;
    None for a graph whose cache is one buffer bound as past and present (export.cuda_graph's form),
    which is scored one token a run instead.

    A graph whose logits already cover the sequence comes back as it is. onnxpipe's fused graph keeps the
    last position with Slice(x, starts=[-1], ends=[int64 max], axes=[1]) on the last layer's two outputs
    before the final norm: those are bypassed, and the logits reshaped to (batch, sequence, vocab) (its
    float32 Gemm output layer flattens the rows).
    """
    onnx = import_extra("export", f"scoring {graph_path.parent.name}'s fused graph at every position", "onnx")
    TensorProto, helper, to_array = onnx.TensorProto, onnx.helper, onnx.numpy_helper.to_array
    proto = onnx.load(str(graph_path), load_external_data=False)
    graph = proto.graph
    if any(i.name == "seqlens_k" for i in graph.input):
        return None
    logits = next((o for o in graph.output if o.name == "logits"), None)
    if logits is None:
        raise ExportFolderError(f"{graph_path} has no logits output", hint="re-run onnxpipe export")
    dims = logits.type.tensor_type.shape.dim
    if len(dims) != 3 or not (dims[1].HasField("dim_value") and dims[1].dim_value == 1):
        return proto.SerializeToString()
    initializers = {t.name: t for t in graph.initializer}
    last = np.iinfo(np.int64).max
    bypass = {}
    for node in list(graph.node):
        if node.op_type != "Slice" or len(node.input) < 3:
            continue
        axes = _int_constant(initializers, node.input[3], to_array) if len(node.input) > 3 and node.input[3] else [1]
        if (
            _int_constant(initializers, node.input[1], to_array) == [-1]
            and _int_constant(initializers, node.input[2], to_array) == [last]
            and axes == [1]
        ):
            bypass[node.output[0]] = node.input[0]
            graph.node.remove(node)
    if not bypass:
        raise ExportFolderError(
            f"{graph_path} returns the last position's logits only, and its last-position Slice was not found",
            hint="re-export the model with this onnxpipe",
        )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
        for i, name in enumerate(node.output):
            if name == "logits":
                node.output[i] = "logits.rows"
    graph.initializer.append(helper.make_tensor("all_positions.vocab", TensorProto.INT64, [1], [-1]))
    graph.node.extend(
        [
            helper.make_node("Shape", ["input_ids"], ["all_positions.ids_shape"], name="all_positions.ids_shape"),
            helper.make_node(
                "Concat",
                ["all_positions.ids_shape", "all_positions.vocab"],
                ["all_positions.shape"],
                axis=0,
                name="all_positions.shape",
            ),
            helper.make_node("Reshape", ["logits.rows", "all_positions.shape"], ["logits"], name="all_positions"),
        ]
    )
    dims[1].ClearField("dim_value")
    dims[1].dim_param = "sequence_length"
    return proto.SerializeToString()


# --- the text, the windows and the figures ---------------------------------------------------------


def token_stream(scorer: Scorer, documents: Iterable[str], enough: int) -> list[int]:
    """The documents' ids one after another, each followed by a newline's; stops once ENOUGH ids are there."""
    stream: list[int] = []
    for doc in documents:
        if doc.strip():
            stream += scorer.encode(doc.strip("\r\n") + "\n")
            if len(stream) >= enough:
                break
    return stream


def enough_documents(scorer: Scorer, documents: Iterable[str], max_tokens: int | None) -> list[str]:
    """The first DOCUMENTS whose ids reach what score() reads of them (MAX_TOKENS + 1 ids, as token_stream
    counts them; None: all of them), read no further."""
    kept: list[str] = []
    count = 0
    for doc in documents:
        kept.append(doc)
        if max_tokens is not None and doc.strip():
            count += len(scorer.encode(doc.strip("\r\n") + "\n"))
            if count >= max_tokens + 1:
                break
    return kept


def windows(stream: Sequence[int], prefix: Sequence[int], context: int, max_tokens: int) -> list[tuple[list[int], int]]:
    """(window ids, index of its first scored token) covering STREAM; at most MAX_TOKENS tokens scored."""
    if context <= len(prefix) + (0 if prefix else 1):
        raise UsageError(f"--context {context} leaves no token to score")
    out: list[tuple[list[int], int]] = []
    scored = 0
    pos = 0 if prefix else 1  # the next stream token to score
    while pos < len(stream) and scored < max_tokens:
        start = pos if prefix else pos - 1
        take = min(len(stream) - pos, max_tokens - scored, context - len(prefix) - (pos - start))
        window = list(prefix) + list(stream[start : pos + take])
        out.append((window, len(window) - take))
        scored += take
        pos += take
    return out


@dataclass
class _Tally:
    """Per-token figures summed over the windows."""

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0  # top-1 equals the text's next token

    def add(self, logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add LOGITS' rows (one per target); return their log-softmax and top-1 ids."""
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        self.nll -= float(logp[np.arange(len(targets)), targets].astype(np.float64).sum())
        ids = logits.argmax(-1)
        self.correct += int((ids == targets).sum())
        self.tokens += len(targets)
        return logp, ids

    def scores(self) -> dict[str, float]:
        mean = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "perplexity": math.exp(mean) if self.tokens else float("nan"),
            "mean_nll": mean,
            "top1_accuracy": self.correct / self.tokens if self.tokens else float("nan"),
        }


def check_same_tokenizer(a: Scorer, b: Scorer) -> None:
    """Agreement compares ids: both exports must give a text the same ids and mean the same by them."""
    if a.tokenizer.get_vocab(with_added_tokens=True) != b.tokenizer.get_vocab(with_added_tokens=True):
        raise UsageError(
            f"{a.name} and {b.name} have different tokenizers: their next-token predictions cannot be compared",
            hint="--against needs an export of the same model (e.g. its float32 export)",
        )
    if a.vocab_size != b.vocab_size and isinstance(a.vocab_size, int) and isinstance(b.vocab_size, int):
        raise UsageError(f"{a.name} predicts over {a.vocab_size} ids and {b.name} over {b.vocab_size}")


def score(
    model: Scorer,
    documents: Sequence[str],
    max_tokens: int | None,
    context: int | None,
    reference: Scorer | None = None,
) -> dict[str, Any]:
    """Teacher-forced figures of MODEL over DOCUMENTS, and with REFERENCE the agreement between the two.
    CONTEXT None: DEFAULT_CONTEXT, or the models' positions where fewer (a larger CONTEXT is cut to them,
    with a warning). MAX_TOKENS None: the whole text."""
    asked = max_tokens
    if max_tokens is None:
        max_tokens = 1 << 62
    elif max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    warnings = []
    limits = [p for p in (model.max_positions, reference and reference.max_positions) if p]
    if context is None:  # the default: DEFAULT_CONTEXT, or the model's positions where fewer
        context = min([DEFAULT_CONTEXT, *limits])
    elif limits and context > min(limits):
        warnings.append(
            f"--context {context} is more than the model's {min(limits)} positions: windows of {min(limits)}"
        )
        context = min(limits)
    prefix = model.bos_prefix()
    stream = token_stream(model, documents, max_tokens + 1)
    if reference is not None:
        check_same_tokenizer(model, reference)
        if reference.bos_prefix() != prefix or token_stream(reference, documents, max_tokens + 1) != stream:
            raise UsageError(f"{model.name} and {reference.name} tokenize the text differently")
    cut = windows(stream, prefix, context, max_tokens)
    if not cut:  # no figure to give: NaN would pass for one (and is no JSON)
        raise InputError(
            f"the text has no token to score ({len(stream)} token(s)"
            + (")" if prefix else "; with no BOS from this tokenizer, the first one is only context)")
        )
    mine, theirs = _Tally(), _Tally()
    same, kl = 0, 0.0
    for window, first in cut:
        targets = np.asarray(window[first:], dtype=np.int64)
        logp, ids = mine.add(model.logits(window)[first - 1 : -1], targets)
        if reference is not None:
            ref_logp, ref_ids = theirs.add(reference.logits(window)[first - 1 : -1], targets)
            same += int((ids == ref_ids).sum())
            kl += float((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).astype(np.float64).sum())
    if asked is not None and mine.tokens < asked:
        warnings.append(f"the text has {mine.tokens} token(s) to score, fewer than the {asked} asked for")
    figures: dict[str, Any] = {
        "tokens": mine.tokens,
        "context": context,
        "windows": len(cut),
        "text": TEXT_NOTE.format(context=context, bos=" starting with BOS" if prefix else ", sharing one token"),
        "scores": mine.scores(),
        "warnings": warnings,
    }
    if reference is not None:
        ref_scores = theirs.scores()
        figures["reference_scores"] = ref_scores
        figures["agreement"] = {
            "tokens": mine.tokens,
            "same": same,
            "differ": mine.tokens - same,
            "agreement": same / mine.tokens if mine.tokens else float("nan"),
        }
        figures["perplexity_ratio"] = figures["scores"]["perplexity"] / ref_scores["perplexity"]
        figures["kl_divergence"] = kl / mine.tokens if mine.tokens else float("nan")
    return figures


def lm_agreement(
    export_dir: str | Path,
    reference_dir: str | Path,
    texts: Sequence[str] | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    context: int = DEFAULT_CONTEXT,
    *,
    threads: int | None = None,
) -> dict[str, Any]:
    """Teacher-forced top-1 agreement of EXPORT_DIR with REFERENCE_DIR (its float32 export) and both
    perplexities, on the CPU, over the first MAX_TOKENS tokens (None: all) of TEXTS (None: onnxpipe's
    held-out English text, heldout_texts(), about 2,800 tokens).

    Either folder may be an export's temporary folder without its manifest yet (model.onnx, tokenizer.json,
    config.json). Returns {"tokens", "context", "agreement", "perplexity", "reference_perplexity",
    "perplexity_ratio" (export / reference), "kl_divergence" (mean KL(reference || export), nats),
    "top1_accuracy", "reference_top1_accuracy", "text", "warnings"}.
    """
    model = open_scorer(export_dir, "cpu", threads, unfinished=True)
    reference = open_scorer(reference_dir, "cpu", threads, unfinished=True)
    figures = score(model, heldout_texts() if texts is None else list(texts), max_tokens, context, reference)
    return {
        "tokens": figures["tokens"],
        "context": figures["context"],
        "agreement": figures["agreement"]["agreement"],
        "perplexity": figures["scores"]["perplexity"],
        "reference_perplexity": figures["reference_scores"]["perplexity"],
        "perplexity_ratio": figures["perplexity_ratio"],
        "kl_divergence": figures["kl_divergence"],
        "top1_accuracy": figures["scores"]["top1_accuracy"],
        "reference_top1_accuracy": figures["reference_scores"]["top1_accuracy"],
        "text": figures["text"],
        "warnings": figures["warnings"],
    }


def evaluate_lm(
    model: str | Path,
    data_path: str | Path,
    *,
    against: str | Path | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    context: int | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> dict[str, Any]:
    """onnxpipe eval's report for a text-generation export: perplexity over the plain text DATA_PATH (one
    document a line), and with AGAINST (the float32 export) next-token agreement and the perplexity ratio."""
    import contextlib
    import itertools

    from onnxpipe.stream.readers import iter_text_lines

    # Read lazily: a corpus (or a stdin that does not end) is read only as far as --max-tokens needs.
    with contextlib.closing(iter_text_lines(data_path, strict=True, skip_empty=True)) as lines:
        documents = (line for line in lines if line.strip())
        first = next(documents, None)
        if first is None:
            raise InputError(
                f"{'<stdin>' if str(data_path) == '-' else data_path} has no text to score: no non-empty line"
            )
        scorer = open_scorer(model, device, threads)
        other = open_scorer(against, device, threads) if against is not None else None
        needed = enough_documents(scorer, itertools.chain([first], documents), max_tokens)
    figures = score(scorer, needed, max_tokens, context, other)
    report: dict[str, Any] = {
        "model": scorer.name,
        "path": str(scorer.folder),
        "precision": scorer.precision,
        "provider": scorer.provider,
        "data": str(data_path),
        "task": TEXT_GENERATION,
        "tokens": figures["tokens"],
        "context": figures["context"],
        "windows": figures["windows"],
        "text": figures["text"],
        "scores": figures["scores"],
        "skipped_empty": 0,
        "truncated": 0,
        "warnings": figures["warnings"],
        "notes": [n for n in (scorer.device_note, scorer.method_note) if n],
    }
    if other is not None:
        report["against"] = {
            "model": other.name,
            "path": str(other.folder),
            "precision": other.precision,
            "provider": other.provider,
            "scores": figures["reference_scores"],
            "agreement": figures["agreement"],
            "perplexity_ratio": figures["perplexity_ratio"],
            "kl_divergence": figures["kl_divergence"],
        }
        report["notes"].extend(n for n in (other.device_note, other.method_note) if n)
    return report

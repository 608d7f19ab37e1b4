"""Check an export against its PyTorch model before it is kept.

The oracle is the fp32 PyTorch model. Every ONNX output is compared (max abs diff), classifiers
must pick the same labels, and generators must produce the same greedy ids for a number of steps,
run through the past-key-values graph exactly as the runtime runs it. Lossy variants (int8, fp16)
are judged on a quality budget (label agreement, top-k overlap, cosine similarity) as well.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import ValidationError

# Generated inputs: short and long, punctuation, digits, accents; something for every tokenizer.
GENERATED_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "I loved every minute of it!",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Numbers like 42 and 3.14 appear in text too; so do accents: Zürich, São Paulo.",
    "Short.",
    "A longer sentence that keeps going, with commas, clauses and a few more words than the others have.",
]
GREEDY_STEPS = 8
MAX_FILE_LINES = {"encoder": 256, "decoder": 16, "seq2seq": 16}
TOP_K = 5


@dataclass(frozen=True)
class Budget:
    """What a variant must reproduce. atol is on every output; the rest are quality figures."""

    atol: float | None  # None: lossy, judged on the figures below only
    rtol: float = 0.0  # times the reference output's max |value|, added to atol
    min_label_agreement: float = 1.0
    min_greedy_agreement: float = 1.0
    min_cosine: float = 0.0


# fp32: ORT and PyTorch run the same maths in a different order, so an output may differ by
# |x| * (a few float32 epsilons, 1.2e-7) per accumulated product, and errors grow through the
# layers. The allowance is therefore on the output's own scale: atol + rtol * max |reference|.
# Real models reach ~1e-5 of their scale (1e-4 on logits of 10-30); a T5 v1.1/flan/mT5 with logits
# in the hundreds reaches 2e-4 of its scale through its unscaled attention and gated FFN. rtol 1e-3
# leaves a margin above that while a wrong op or weight (>= 1e-2 of the scale) still fails; and
# what the user sees is checked exactly: the same labels and the same greedy ids. atol 1e-3 keeps
# outputs near zero (small hidden states, cache entries) from failing on noise. Optimised graphs
# fuse kernels (O3 also approximates GeLU). int8 and fp16 are lossy: no tolerance, the budget on
# agreement decides (min_cosine is on the mean cosine similarity of output rows).
FP32_ATOL, FP32_RTOL = 1e-3, 1e-3
BUDGETS = {
    "fp32": Budget(atol=FP32_ATOL, rtol=FP32_RTOL),
    "O1": Budget(atol=FP32_ATOL, rtol=FP32_RTOL),
    "O2": Budget(atol=FP32_ATOL, rtol=FP32_RTOL),
    "O3": Budget(atol=1e-2, rtol=FP32_RTOL, min_label_agreement=0.9, min_greedy_agreement=0.75, min_cosine=0.99),
    "int8": Budget(atol=None, min_label_agreement=0.75, min_greedy_agreement=0.0, min_cosine=0.9),
    "fp16": Budget(atol=None, min_label_agreement=0.9, min_greedy_agreement=0.5, min_cosine=0.99),
}


def budget_for(precision: str, optimization: str | None) -> Budget:
    if precision != "fp32":
        return BUDGETS[precision]
    return BUDGETS[optimization] if optimization else BUDGETS["fp32"]


def session(path: Path, provider: str = "CPUExecutionProvider"):
    from onnxpipe.runtime.sessions import make_session

    return make_session(path, providers=[provider])


def validate(
    model,
    folder: Path,
    task: str,
    family: str,
    files: dict[str, str],
    tokenizer,
    texts: list[str],
    budget: Budget,
    inputs_note: str,
    provider: str = "CPUExecutionProvider",
    special_tokens: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the export and MODEL on TEXTS; return the report (raise nothing: `passed` says)."""
    import torch

    texts = [t for t in texts if t.strip()] or GENERATED_TEXTS
    with torch.inference_mode():
        if family == "encoder":
            figures = _encoder(
                model,
                session(folder / files["model"], provider),
                task,
                tokenizer,
                texts,
                (special_tokens or {}).get("pad_token_id"),
            )
        elif family == "decoder":
            figures = _decoder(
                model, session(folder / files["model"], provider), tokenizer, texts, special_tokens or {}
            )
        else:
            figures = _seq2seq(
                model,
                session(folder / files["encoder"], provider),
                session(folder / files["decoder"], provider),
                tokenizer,
                texts,
                special_tokens or {},
            )
    outputs = figures.pop("outputs")
    drift_cases = figures.pop("mismatches", [])
    failures = []  # "<check>: what differs", check one of tolerance, labels, ids, quality
    for name, o in outputs.items():
        diff = o["max_abs_diff"]
        if budget.atol is not None:
            o["allowed"] = float(f"{budget.atol + budget.rtol * o['max_abs_reference']:.4g}")
        if diff != diff:  # NaN: a broken graph, whatever the budget
            failures.append(f"tolerance: {name} is not finite")
        elif budget.atol is not None and diff > o["allowed"]:
            failures.append(
                f"tolerance: {name} differs by {diff:.3g} > {o['allowed']:g} "
                f"({budget.atol:g} + {budget.rtol:g} x max |{name}| {o['max_abs_reference']:.3g})"
            )
    if "label_agreement" in figures and figures["label_agreement"] < budget.min_label_agreement:
        failures.append(f"labels: label agreement {figures['label_agreement']:.3f} < {budget.min_label_agreement}")
    greedy = figures.get("greedy")
    real = _judge_greedy(greedy, drift_cases, budget) if greedy else []
    if greedy and greedy["agreement"] < budget.min_greedy_agreement:
        first = greedy.get("first_difference") or {}
        where = (
            f" (first in text {first['text']} at step {first['step']}: {first['got']} vs PyTorch's {first['expected']}, "
            f"{first['margin']:.3g} below it in PyTorch's logits)"
            if first
            else ""
        )
        failures.append(
            f"ids: greedy ids agree on {greedy['agreement']:.3f} of steps < {budget.min_greedy_agreement}{where}"
        )
        replay = next((m for m in real if "feeds" in m), None)
        if replay is not None and budget.atol is not None:  # fp32 only: a lossy variant drifts by design
            from onnxpipe.export.drift import locate_drift

            drift = locate_drift(folder, files, replay, FP32_RTOL)  # float32 noise, whatever the budget
            if drift is not None:
                figures["drift"] = drift
                failures[-1] += "; " + drift["summary"]
    if "cosine_similarity" in figures and not figures["cosine_similarity"]["mean"] >= budget.min_cosine:
        failures.append(
            f"quality: mean cosine similarity {figures['cosine_similarity']['mean']:.4f} < {budget.min_cosine}"
        )
    return {
        "passed": not failures,
        "failures": failures,
        "failed_checks": sorted({f.split(":", 1)[0] for f in failures}),
        "reference": "PyTorch fp32",
        "provider": provider,
        "tolerance": budget.atol,
        "rtol": budget.rtol,
        "budget": {k: v for k, v in budget.__dict__.items() if k not in ("atol", "rtol")},
        "inputs": inputs_note,
        "outputs": outputs,
        **figures,
    }


def raise_if_failed(report: dict[str, Any], what: str) -> None:
    if not report["passed"]:
        raise ValidationError(f"{what} failed validation against PyTorch: " + "; ".join(report["failures"]))


# --- helpers ----------------------------------------------------------------------------


def _diff(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max abs diff, max abs of the reference): the difference and the scale it is judged on."""
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    scale = float(np.max(np.abs(ref[np.isfinite(ref)]), initial=0.0))
    if ref.shape != got.shape:
        return float("inf"), scale
    return (float(np.max(np.abs(ref - got))) if ref.size else 0.0), scale


def _merge(outputs: dict[str, dict], name: str, compared: tuple[float, float]) -> None:
    value, scale = compared
    old = outputs.get(name, {"max_abs_diff": 0.0, "max_abs_reference": 0.0})
    diff = old["max_abs_diff"]
    outputs[name] = {
        "max_abs_diff": max(diff, value) if value == value and diff == diff else float("nan"),
        "max_abs_reference": float(f"{max(old['max_abs_reference'], scale):.6g}"),
    }


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-12)


def _topk_overlap(ref: np.ndarray, got: np.ndarray, k: int = TOP_K) -> float:
    ref = ref.reshape(-1, ref.shape[-1])
    got = got.reshape(-1, got.shape[-1])
    k = min(k, ref.shape[-1])
    r = np.argsort(-ref, axis=-1)[:, :k]
    g = np.argsort(-got, axis=-1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(r, g)]))


def _quality(figures: dict, ref: list[np.ndarray], got: list[np.ndarray], topk: bool = True) -> None:
    """Cosine similarity of output rows and (for logits) top-k overlap, over all inputs."""
    cos = np.concatenate([_cosine_rows(r, g) for r, g in zip(ref, got)])
    figures["cosine_similarity"] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}
    if topk and ref[0].shape[-1] > 1:
        figures[f"top{TOP_K}_overlap"] = round(float(np.mean([_topk_overlap(r, g) for r, g in zip(ref, got)])), 4)


def _encode(tokenizer, texts: list[str], max_length: int | None = None) -> list[Any]:
    encodings = tokenizer.encode_batch(texts)
    if max_length:
        for e in encodings:
            e.truncate(max_length)
    return encodings


def _pad(encodings, pad_id: int) -> dict[str, np.ndarray]:
    width = max(1, max(len(e.ids) for e in encodings))
    ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n] = e.ids
        mask[row, :n] = 1
        types[row, :n] = e.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# --- encoders ---------------------------------------------------------------------------


def _encoder(model, sess, task: str, tokenizer, texts: list[str], pad_id: int | None) -> dict[str, Any]:
    import torch

    input_names = [i.name for i in sess.get_inputs()]
    output_names = [o.name for o in sess.get_outputs()]
    pad_id = pad_id if pad_id is not None else 0
    max_length = getattr(model.config, "max_position_embeddings", None)
    if max_length and getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        max_length -= 2
    outputs: dict[str, dict] = {}
    agree, total = 0, 0
    ref_rows: list[np.ndarray] = []
    got_rows: list[np.ndarray] = []
    multi_label = getattr(model.config, "problem_type", None) == "multi_label_classification"
    for start in range(0, len(texts), 16):
        batch = _pad(_encode(tokenizer, texts[start : start + 16], max_length), pad_id)
        feeds = {name: batch[name] for name in input_names}
        got = dict(zip(output_names, sess.run(None, feeds)))
        ref_out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        mask = batch["attention_mask"].astype(bool)
        for name in output_names:
            ref = getattr(ref_out, name).float().numpy()
            out = got[name]
            if ref.ndim == 3 and ref.shape[:2] == mask.shape:  # per token: ignore padding positions
                ref, out = ref[mask], out[mask]
            _merge(outputs, name, _diff(ref, out))
            ref_rows.append(ref)
            got_rows.append(out)
            if task in ("text-classification", "token-classification", "fill-mask") and name == "logits":
                if multi_label:
                    same = ((ref > 0) == (out > 0)).all(-1)
                else:
                    same = ref.argmax(-1) == out.argmax(-1)
                agree += int(same.sum())
                total += int(same.size)
    figures: dict[str, Any] = {"outputs": outputs, "texts": len(texts)}
    if total:
        figures["label_agreement"] = round(agree / total, 6)
    _quality(figures, ref_rows, got_rows, topk=task != "feature-extraction")
    return figures


# --- decoder-only -----------------------------------------------------------------------


def _legacy(cache) -> list[tuple]:
    """transformers' cache object as [(key, value), ...] per layer."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "to_legacy_cache"):
        return list(cache.to_legacy_cache())
    return list(cache)


def _max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 1 << 20


def _prompts(tokenizer, texts: list[str], special_tokens: dict[str, Any], max_positions: int) -> list[list[int]]:
    fallback = special_tokens.get("bos_token_id")
    eos = special_tokens.get("eos_token_id")
    if fallback is None:
        fallback = (eos[0] if isinstance(eos, list) else eos) or 0
    prompts = []
    # Leave room for the greedy steps inside the model's positions.
    for e in _encode(tokenizer, texts[: MAX_FILE_LINES["decoder"]], max(1, min(64, max_positions - GREEDY_STEPS))):
        prompts.append(list(e.ids) or [fallback])
    return prompts


def _empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            heads, head_dim = i.shape[1], i.shape[3]
            dtype = np.float16 if "float16" in i.type else np.float32
            past[i.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return past


def _decoder(model, sess, tokenizer, texts, special_tokens) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    if "seqlens_k" in {i.name for i in sess.get_inputs()}:  # export.cuda_graph's shared cache buffer
        from onnxpipe.export.cuda_graph import GrowingCacheView

        sess = GrowingCacheView(sess)
    input_names = {i.name for i in sess.get_inputs()}
    output_names = [o.name for o in sess.get_outputs()]
    outputs: dict[str, dict] = {}
    identical = 0
    agreement: list[float] = []
    mismatches: list[dict] = []
    ref_first: list[np.ndarray] = []
    got_first: list[np.ndarray] = []
    for prompt in _prompts(tokenizer, texts, special_tokens, _max_positions(model.config)):
        # PyTorch, step by step with its cache.
        ref_ids, ref_logits = [], []
        ids = torch.tensor([prompt])
        # A cache of every position, as the ONNX graph keeps: transformers' default one keeps only a sliding
        # window's last positions (Mistral), whose presents could not be compared; the mask still applies the window.
        cache, length = DynamicCache(), 0
        first_presents: list[np.ndarray] = []
        for step in range(GREEDY_STEPS):
            length += ids.shape[1]
            out = model(
                input_ids=ids,
                attention_mask=torch.ones((1, length), dtype=torch.long),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float().numpy()
            if step == 0:
                first_presents = [t.float().numpy() for kv in _legacy(cache) for t in kv]
                first_all = out.logits.float().numpy()
            ref_logits.append(logits)
            ref_ids.append(int(logits.argmax()))
            ids = torch.tensor([[ref_ids[-1]]])
        # ONNX Runtime, the way the runtime decodes.
        got_ids, got_logits = [], []
        feeds_past = _empty_past(sess, 1)
        feed_ids = np.array([prompt], dtype=np.int64)
        past_len = 0
        for step in range(GREEDY_STEPS):
            n = feed_ids.shape[1]
            feeds = {"input_ids": feed_ids, **feeds_past}
            if "attention_mask" in input_names:
                feeds["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
            if "position_ids" in input_names:
                feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
            result = dict(zip(output_names, sess.run(None, feeds)))
            logits = result["logits"][:, -1].astype(np.float32)
            if step == 0:
                # A fused graph returns the last position's logits only.
                _merge(outputs, "logits", _diff(first_all[:, -result["logits"].shape[1] :], result["logits"]))
                presents = [result[n_] for n_ in output_names if n_.startswith("present.")]
                for name, ref, got in zip(
                    [n_ for n_ in output_names if n_.startswith("present.")], first_presents, presents
                ):
                    _merge(outputs, name, _diff(ref, got))
            got_logits.append(logits)
            got_ids.append(int(logits.argmax()))
            if got_ids[-1] != ref_ids[step]:
                mismatches.append(
                    _mismatch(
                        "model",
                        {"model": feeds},
                        len(agreement),
                        step,
                        ref_logits[step],
                        got_ids[-1],
                        keep_feeds=len(mismatches) < _KEEP_FEEDS,
                    )
                )
            feeds_past = {
                n_.replace("present.", "past_key_values.", 1): result[n_]
                for n_ in output_names
                if n_.startswith("present.")
            }
            past_len += n
            # Feed PyTorch's token, so later steps compare like with like even after a divergence.
            feed_ids = np.array([[ref_ids[step]]], dtype=np.int64)
        _merge(outputs, "logits", _diff(np.concatenate(ref_logits), np.concatenate(got_logits)))
        identical += int(ref_ids == got_ids)
        agreement.append(_prefix_agreement(ref_ids, got_ids))
        ref_first.append(np.concatenate(ref_logits))
        got_first.append(np.concatenate(got_logits))
    return _generation_figures(outputs, agreement, identical, mismatches, ref_first, got_first)


_KEEP_FEEDS = 4  # the feeds of the first few differing steps are kept for export.drift


def _mismatch(
    graph: str, feeds: dict[str, dict], text: int, step: int, ref_logits: np.ndarray, got: int, keep_feeds: bool
) -> dict[str, Any]:
    """A greedy step where ONNX Runtime picked another id than PyTorch. `margin` is how far PyTorch's own
    logit of that id is below its pick: within float32 noise, the two ids tie. The feeds that ran the
    step are kept so that export.drift can replay it and name the op that drifts."""
    row = np.asarray(ref_logits, dtype=np.float64).reshape(-1)
    expected = int(row.argmax())
    record = {
        "graph": graph,
        "text": text,
        "step": step,
        "expected": expected,
        "got": int(got),
        "margin": float(f"{row[expected] - row[got]:.4g}"),
        "scale": float(np.max(np.abs(row[np.isfinite(row)]), initial=0.0)),
    }
    if keep_feeds:
        record["feeds"] = {g: {k: np.array(v) for k, v in f.items()} for g, f in feeds.items()}
    return record


def _add_mismatches(figures: dict[str, Any], mismatches: list[dict]) -> None:
    if mismatches:
        figures["mismatches"] = mismatches


def _judge_greedy(greedy: dict[str, Any], mismatches: list[dict], budget: Budget) -> list[dict]:
    """Split the differing steps into ties and real differences; return the real ones.

    A tie: PyTorch's logits of the two ids are closer than float32 noise on that row (the fp32
    allowance, FP32_ATOL + FP32_RTOL * max |logits|, whatever the budget). Float32 in any other op order may pick either, so a tie is counted
    and reported, not failed; the agreement figure counts steps before the first real difference.
    Lossy variants are judged on the plain agreement (no ties).
    """
    if budget.atol is None:
        real = mismatches
    else:
        real = [m for m in mismatches if m["margin"] > FP32_ATOL + FP32_RTOL * m["scale"]]
        greedy["ties"] = len(mismatches) - len(real)
        first_real: dict[int, int] = {}
        for m in real:
            first_real.setdefault(m["text"], m["step"])
        steps = greedy["steps"]
        greedy["agreement"] = (
            round(float(np.mean([first_real.get(t, steps) / steps for t in range(greedy["sequences"])])), 4)
            if greedy["sequences"]
            else 1.0
        )
    shown = real[0] if real else (mismatches[0] if mismatches else None)
    if shown is not None:
        greedy["first_difference"] = {k: shown[k] for k in ("text", "step", "expected", "got", "margin")}
    return real


def _prefix_agreement(ref: list[int], got: list[int]) -> float:
    """Share of steps before the first divergence: the figure that matters for greedy output."""
    same = 0
    for a, b in zip(ref, got):
        if a != b:
            break
        same += 1
    return same / max(1, len(ref))


# --- encoder-decoder --------------------------------------------------------------------


def _seq2seq(model, enc_sess, dec_sess, tokenizer, texts, special_tokens) -> dict[str, Any]:
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    enc_inputs = [i.name for i in enc_sess.get_inputs()]
    dec_inputs = {i.name: i for i in dec_sess.get_inputs()}
    dec_outputs = [o.name for o in dec_sess.get_outputs()]
    start = special_tokens.get("decoder_start_token_id")
    if start is None:
        start = model.config.decoder_start_token_id
    outputs: dict[str, dict] = {}
    identical = 0
    agreement: list[float] = []
    mismatches: list[dict] = []
    ref_all: list[np.ndarray] = []
    got_all: list[np.ndarray] = []
    max_length = getattr(model.config, "max_position_embeddings", None) or 512
    encoder = model.get_encoder()
    # T5's encoder stack refuses use_cache=True, which the export leaves on the shared config.
    enc_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(encoder.forward).parameters else {}
    for e in _encode(tokenizer, texts[: MAX_FILE_LINES["seq2seq"]], min(64, max_length)):
        ids = np.array([e.ids or [special_tokens.get("eos_token_id", [0])[0]]], dtype=np.int64)
        mask = np.ones_like(ids)
        enc_feeds = {"input_ids": ids, "attention_mask": mask}
        got_enc = enc_sess.run(None, {k: enc_feeds[k] for k in enc_inputs})[0]
        ref_enc = encoder(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **enc_kwargs
        ).last_hidden_state
        _merge(outputs, "last_hidden_state", _diff(ref_enc.numpy(), got_enc))

        ref_ids, ref_logits = [], []
        dec = torch.tensor([[start]])
        cache, ref_presents = None, None
        for _ in range(GREEDY_STEPS):
            out = model(
                encoder_outputs=BaseModelOutput(last_hidden_state=ref_enc),
                attention_mask=torch.from_numpy(mask),
                decoder_input_ids=dec,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            if ref_presents is None:
                ref_presents = _seq2seq_presents(cache)
            logits = out.logits[:, -1].float().numpy()
            ref_logits.append(logits)
            ref_ids.append(int(logits.argmax()))
            dec = torch.tensor([[ref_ids[-1]]])

        if "seqlens_k" in dec_inputs:  # onnxpipe's own graphs (export.seq2seq_graph): teacher-forced by their helper
            from onnxpipe.export.seq2seq_graph import teacher_forced_logits

            got_logits = teacher_forced_logits(enc_sess, dec_sess, ids, mask, [start, *ref_ids[:-1]])
            got_ids = [int(g.argmax()) for g in got_logits]
            for step, got in enumerate(got_ids):
                if got != ref_ids[step]:
                    mismatches.append(_mismatch("decoder", {}, len(agreement), step, ref_logits[step], got, False))
            _merge(outputs, "logits", _diff(np.concatenate(ref_logits), np.concatenate(got_logits)))
            identical += int(ref_ids == got_ids)
            agreement.append(_prefix_agreement(ref_ids, got_ids))
            ref_all.append(np.concatenate(ref_logits))
            got_all.append(np.concatenate(got_logits))
            continue
        got_ids, got_logits = [], []
        past = {}
        for name, info in dec_inputs.items():
            if name.startswith("past_key_values."):
                past[name] = np.zeros(
                    (1, info.shape[1], 0, info.shape[3]), dtype=np.float16 if "float16" in info.type else np.float32
                )
        dec_ids = np.array([[start]], dtype=np.int64)
        cross = None
        for step in range(GREEDY_STEPS):
            feeds = {"input_ids": dec_ids, "encoder_hidden_states": got_enc, "encoder_attention_mask": mask, **past}
            if "use_cache_branch" in dec_inputs:
                feeds["use_cache_branch"] = np.array([step > 0])
            result = dict(zip(dec_outputs, dec_sess.run(None, {k: v for k, v in feeds.items() if k in dec_inputs})))
            logits = result["logits"][:, -1].astype(np.float32)
            got_logits.append(logits)
            got_ids.append(int(logits.argmax()))
            if got_ids[-1] != ref_ids[step]:
                mismatches.append(
                    _mismatch(
                        "decoder",
                        {"encoder": {k: enc_feeds[k] for k in enc_inputs}, "decoder": feeds},
                        len(agreement),
                        step,
                        ref_logits[step],
                        got_ids[-1],
                        keep_feeds=len(mismatches) < _KEEP_FEEDS,
                    )
                )
            if step == 0 and ref_presents is not None:
                for name, value in ref_presents.items():
                    if name in result:
                        _merge(outputs, name, _diff(value, result[name]))
            if cross is None:  # the cross-attention cache is computed once, on the first step
                cross = {
                    n.replace("present.", "past_key_values.", 1): result[n] for n in dec_outputs if ".encoder." in n
                }
            past = {n.replace("present.", "past_key_values.", 1): result[n] for n in dec_outputs if ".decoder." in n}
            past.update(cross)
            dec_ids = np.array([[ref_ids[step]]], dtype=np.int64)
        _merge(outputs, "logits", _diff(np.concatenate(ref_logits), np.concatenate(got_logits)))
        identical += int(ref_ids == got_ids)
        agreement.append(_prefix_agreement(ref_ids, got_ids))
        ref_all.append(np.concatenate(ref_logits))
        got_all.append(np.concatenate(got_logits))
    return _generation_figures(outputs, agreement, identical, mismatches, ref_all, got_all)


def _generation_figures(
    outputs: dict[str, Any],
    agreement: list[float],
    identical: int,
    mismatches: list[Any],
    ref: list[np.ndarray],
    got: list[np.ndarray],
) -> dict[str, Any]:
    """The report of a generator's validation (decoder or seq2seq): outputs, greedy agreement, quality."""
    n = len(agreement)
    figures = {
        "outputs": outputs,
        "texts": n,
        "greedy": {
            "steps": GREEDY_STEPS,
            "sequences": n,
            "identical": identical,
            "agreement": round(float(np.mean(agreement)), 4),
        },
    }
    _add_mismatches(figures, mismatches)
    _quality(figures, ref, got)
    return figures


def _seq2seq_presents(cache) -> dict[str, np.ndarray]:
    """transformers' encoder-decoder cache under the ONNX output names (present.N.decoder.key, ...)."""
    presents = {}
    for side, part in (("decoder", "self_attention_cache"), ("encoder", "cross_attention_cache")):
        sub = getattr(cache, part, None)
        if sub is None:
            continue
        for i, (key, value) in enumerate(_legacy(sub)):
            presents[f"present.{i}.{side}.key"] = key.float().numpy()
            presents[f"present.{i}.{side}.value"] = value.float().numpy()
    return presents


# --- lossy text-generation variants: teacher-forced quality against float32 -----------------

# A lossy variant (int4, int8) of a text-generation export is judged against the float32 export on
# onnxpipe's held-out English text (measure.lm_quality), teacher-forced: the share of positions whose
# top-1 next token is float32's, and its perplexity relative to float32's (only a rise fails).
LM_QUALITY = {"min_agreement": 0.98, "max_perplexity_ratio": 1.02}
LM_QUALITY_TOKENS = None  # all of the held-out text (2,797 tokens for SmolLM2)
LM_QUALITY_CONTEXT = 512


def lm_quality_report(
    export_dir: Path,
    reference_dir: Path,
    *,
    max_tokens: int | None = LM_QUALITY_TOKENS,
    context: int = LM_QUALITY_CONTEXT,
    texts: list[str] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The validation report's quality figures of the variant in EXPORT_DIR against the float32 export in
    REFERENCE_DIR (either may be an export's temporary folder): measure.lm_quality.lm_agreement's figures,
    the thresholds (LM_QUALITY), `passed` and `failures` ("quality: ..."). Raises nothing on a failure."""
    from onnxpipe.measure.lm_quality import lm_agreement

    figures = lm_agreement(export_dir, reference_dir, texts, max_tokens, context, threads=threads)
    failures = []
    if not figures["agreement"] >= LM_QUALITY["min_agreement"]:
        failures.append(
            f"quality: next-token agreement with float32 {figures['agreement']:.4f} < {LM_QUALITY['min_agreement']} "
            f"({figures['tokens']} tokens, teacher-forced)"
        )
    if not figures["perplexity_ratio"] <= LM_QUALITY["max_perplexity_ratio"]:
        failures.append(
            f"quality: perplexity {figures['perplexity']:.4g} is {figures['perplexity_ratio']:.4f} x float32's "
            f"{figures['reference_perplexity']:.4g} > {LM_QUALITY['max_perplexity_ratio']}"
        )
    return {
        "passed": not failures,
        "failures": failures,
        "thresholds": dict(LM_QUALITY),
        "reference": "float32 export, teacher-forced",
        "data": "texts given"
        if texts is not None
        else "onnxpipe's held-out English text (onnxpipe/data/heldout_en.txt)",
        **figures,
    }

"""Text the commands show about exports: sizes, the validation report, the fused graph's weights.

Shared by `info`, `export` and `models`; plain Python, so every command can import it cheaply.
"""

from __future__ import annotations

from typing import Any


def folder_size(folder) -> int:
    """Bytes of the regular files under FOLDER; links are not followed, unreadable parts are skipped."""
    import os

    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += st.st_size
    return total


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def validation_rows(v: dict[str, Any]) -> list[tuple[str, str]]:
    """The validation report as (label, text) rows: shared by `info` and the export summary."""
    if not v:
        return [("validated", "no report")]
    rows = [
        (
            "validated",
            ("passed" if v.get("passed") else "FAILED")
            + f" against {v.get('reference', 'PyTorch')}"
            + (f" on {v['provider']}" if v.get("provider") else ""),
        )
    ]
    rows.append(("inputs", str(v.get("inputs"))))
    outputs = v.get("outputs") or {}
    if outputs:
        worst = sorted(outputs.items(), key=lambda kv: -(kv[1].get("max_abs_diff") or 0))
        shown = ", ".join(f"{name} {o['max_abs_diff']:.2g}" for name, o in worst[:4])
        more = f" (+{len(worst) - 4} more)" if len(worst) > 4 else ""
        tolerance = v.get("tolerance")
        limit = f"tolerance {tolerance:g}" if tolerance is not None else "no tolerance: judged on agreement"
        rows.append(("max abs diff", f"{shown}{more}; {limit}"))
    if "label_agreement" in v:
        rows.append(("label agreement", f"{v['label_agreement']:.2%}"))
    if "greedy" in v:
        g = v["greedy"]
        rows.append(
            (
                "greedy ids",
                f"{g['identical']}/{g['sequences']} sequences identical over {g['steps']} steps"
                f" ({g['agreement']:.0%} of steps before a divergence)",
            )
        )
    if "cosine_similarity" in v:
        c = v["cosine_similarity"]
        rows.append(("cosine similarity", f"min {c['min']:.4f}, mean {c['mean']:.4f}"))
    topk = next((k for k in v if k.startswith("top") and k.endswith("_overlap")), None)
    if topk:
        rows.append((topk.replace("_", " "), f"{v[topk]:.2%}"))
    if v.get("fp32"):
        f = v["fp32"]
        fp32_worst = max((o["max_abs_diff"] for o in (f.get("outputs") or {}).values()), default=0.0)
        rows.append(("fp32 baseline", ("passed" if f.get("passed") else "failed") + f", max abs diff {fp32_worst:.2g}"))
    if v.get("quality") and "perplexity_ratio" not in v["quality"]:  # int8 encoder or seq2seq (export.agreement)
        q = v["quality"]
        floor = (q.get("thresholds") or {}).get("min_agreement")
        rows.append(
            (
                "int8 agreement",
                f"{q['agreement']:.2%} with float32 ({q.get('compared')} compared: {q.get('measure')})"
                + ("" if q.get("passed") else f"; below the threshold {floor}"),
            )
        )
        if "batch_independent" in q:
            rows.append(("batch-independent", "yes, bit for bit" if q["batch_independent"] else "no"))
    elif v.get("quality"):
        # a lossy text-generation variant, teacher-forced against float32 (validate.lm_quality_report)
        q = v["quality"]
        limits = q.get("thresholds") or {}
        rows.append(
            (
                "next tokens",
                f"{q['agreement']:.2%} agree with float32, perplexity x {q['perplexity_ratio']:.4f}"
                f" ({q['tokens']} tokens, teacher-forced)"
                + (
                    ""
                    if q.get("passed")
                    else f"; short of the target (agreement >= {limits.get('min_agreement')}, perplexity ratio "
                    f"<= {limits.get('max_perplexity_ratio')})"
                ),
            )
        )
    for failure in v.get("failures") or []:
        rows.append(("failure", failure))
    return rows


def weights_text(g: dict[str, Any]) -> str | None:
    """The fused graph's weight matrices by kind: "120 as Q4_1 blocks, 1 as Q8_0 blocks (exact), ..."."""
    kinds = {k: n for k, n in (g.get("weights") or {}).items() if n}
    if not kinds:
        return None
    plain = ("float32", "float16")  # unquantised: the CPU graph's, or the CUDA graph's (export.cuda_graph)
    exact = ("q4_0", "q4_1", "q8_0")  # a GGUF checkpoint's blocks, kept (fused.exact_blocks)
    blocks = [f"{n} as {k.upper()} blocks" for k, n in kinds.items() if k in exact]
    text = ", ".join(blocks) + (" (kept as blocks: the exact values)" if blocks else "")
    # --quantize int4|int8 (export.nbits): rounded to nearest, not the checkpoint's values
    rounded = [f"{n} as {k.upper()} blocks" for k, n in kinds.items() if k not in exact and k not in plain]
    if rounded:
        text += (", " if text else "") + ", ".join(rounded) + " (rounded to nearest: --quantize)"
    for kind in plain:
        if kinds.get(kind):
            text += (", " if text else "") + f"{kinds[kind]} {kind}"
    return text

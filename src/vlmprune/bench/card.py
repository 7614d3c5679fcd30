"""The efficiency card of ``vlmprune bench``: its fields, each variant's summaries and ratios
against the unpruned model, the acceptance targets, and the card assembled from the measured
(model, dtype, batch) blocks. Field definitions: ``docs/efficiency.md``.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Sequence

import torch

from .models import FAMILY_MODELS, SYNTHETIC_MODELS
from .spec import Variant
from .timing import PART_PHASES, loadavg, machine_info, summarise

__all__ = ["CARD_FIELDS", "FAMILY_OVERHEAD", "FAMILY_SPEEDUP_TOL", "OVERHEAD_PARTS", "RAW_KEYS", "SCHEMA",
           "TARGET_OVERHEAD", "TARGET_SPEEDUP_METHODS", "TARGET_SPEEDUP_TOL", "build_card", "card_targets",
           "evaluate_targets", "ratio", "run_block", "summarise_variants"]

SCHEMA = "vlmprune.efficiency-card/1"

#: Acceptance targets on the scaled LLaVA-1.5 model at batch 1: the prefill speed-up of these
#: methods within ``TARGET_SPEEDUP_TOL`` of the FLOP-ideal, every method's overhead at most
#: ``TARGET_OVERHEAD`` of the unpruned prefill.
TARGET_SPEEDUP_TOL = 0.15
TARGET_SPEEDUP_METHODS = ("prumerge+", "fastv")
TARGET_OVERHEAD = 0.05
#: The same targets on the scaled model of each other family, at every batch measured.
FAMILY_SPEEDUP_TOL = 0.10
FAMILY_OVERHEAD = 0.03

#: Per-run timings recorded in ``variants[*].raw`` (seconds, tokens/s).
RAW_KEYS = ("ttft_s", "vision_s", "projector_s", "llm_prefill_s", "overhead_s", "decode_s",
            "decode_overhead_s", "decode_tokens_per_s", "overhead_score_s", "overhead_select_s",
            "overhead_gather_s", "overhead_masks_s", "overhead_other_s")
#: The parts of ``overhead_s``: the handle's phases nested in its prefill, and ``other``, the rest.
OVERHEAD_PARTS = (*PART_PHASES, "other")

#: Every field of the card, as dotted paths ("[]" = every element of a list).
CARD_FIELDS: dict[str, tuple[str, ...]] = {
    "": ("schema", "command", "created", "machine", "settings", "models", "results", "targets", "plot", "notes",
         "run"),
    "machine": ("cpu_model", "cores_logical", "cpu_flags", "platform", "python", "torch", "transformers",
                "vlmprune", "torch_threads", "torch_interop_threads", "omp_num_threads_env", "loadavg_before",
                "loadavg_after", "bf16_matmul"),
    "machine.bf16_matmul": ("shape", "fp32_s", "bf16_s", "slowdown", "accelerated", "hardware", "note"),
    "settings": ("dtype", "dtype_requested", "device", "batches", "methods", "repeats", "warmup", "new_tokens",
                 "decode_steps", "threads", "memory", "seed", "timing", "ratios", "flop_ideal", "memory_method",
                 "kv_method"),
    "models[]": ("name", "dtype", "kind", "config", "prompt"),
    "results[]": ("model", "dtype", "batch", "prompt_tokens", "visual_tokens_unpruned", "variants"),
    "results[].variants[]": ("label", "method", "options", "stage", "visual_tokens", "visual_tokens_per_sample",
                             "layer_tokens", "kv_cache_bytes", "raw", "median", "stats", "flops", "ratios",
                             "memory"),
    "results[].variants[].ratios": ("prefill_speedup", "prefill_speedup_of_min", "llm_prefill_speedup",
                                    "flop_ideal_speedup", "llm_flop_ideal_speedup", "flop_ideal_padded_speedup",
                                    "prefill_vs_ideal", "llm_prefill_vs_ideal", "vision_time_ratio",
                                    "overhead_fraction", "decode_speedup", "kv_cache_ratio", "peak_memory_ratio"),
    "results[].variants[].memory": ("peak_rss_delta_bytes", "baseline_rss_bytes", "peak_rss_bytes", "method"),
    "results[].variants[].flops": ("vision_tower", "projector", "decoder", "total"),
    "targets[]": ("name", "model", "batch", "method", "measured", "threshold", "met", "margin", "detail"),
}


# ================================================================================ summaries and ratios


def ratio(a: float, b: float) -> float:
    """``a / b``; NaN when ``b`` is 0 or NaN."""
    return a / b if b and not math.isnan(b) else math.nan


def summarise_variants(rows: dict[str, dict[str, Any]], base_label: str = "unpruned") -> None:
    """Add ``stats``, ``median`` and ``ratios`` to every row (label -> the variant's entry with its
    ``raw`` timings, ``flops``, ``flops_padded``, ``kv_cache_bytes`` and ``memory``); each ratio is
    a ratio of medians against the row ``base_label``."""
    for row in rows.values():
        row["stats"] = {k: summarise(vals) for k, vals in row["raw"].items()}
        row["median"] = {k: s["median"] for k, s in row["stats"].items()}
    base = rows[base_label]
    for row in rows.values():
        m, b = row["median"], base["median"]
        ideal = ratio(base["flops"]["total"], row["flops"]["total"])
        ideal_llm = ratio(base["flops"]["decoder"], row["flops"]["decoder"])
        speed = ratio(b["ttft_s"], m["ttft_s"])
        speed_llm = ratio(b["llm_prefill_s"], m["llm_prefill_s"])
        mb, mr = base["memory"]["peak_rss_delta_bytes"], row["memory"]["peak_rss_delta_bytes"]
        row["ratios"] = {
            "prefill_speedup": speed,
            "prefill_speedup_of_min": ratio(base["stats"]["ttft_s"]["min"], row["stats"]["ttft_s"]["min"]),
            "llm_prefill_speedup": speed_llm,
            "flop_ideal_speedup": ideal,
            "llm_flop_ideal_speedup": ideal_llm,
            "flop_ideal_padded_speedup": ratio(base["flops"]["total"], row["flops_padded"]["total"]),
            "prefill_vs_ideal": speed / ideal - 1,
            "llm_prefill_vs_ideal": speed_llm / ideal_llm - 1,
            "vision_time_ratio": ratio(m["vision_s"], b["vision_s"]),
            "overhead_fraction": ratio(m["overhead_s"], b["ttft_s"]),
            "decode_speedup": ratio(m["decode_tokens_per_s"], b["decode_tokens_per_s"]),
            "kv_cache_ratio": ratio(row["kv_cache_bytes"], base["kv_cache_bytes"]),
            "peak_memory_ratio": ratio(mr, mb) if mr is not None and mb else None,
        }


# ================================================================================ targets


def evaluate_targets(card: dict[str, Any], model: str = "scaled", batch: int = 1, *,
                     speedup_tol: float = TARGET_SPEEDUP_TOL, overhead: float = TARGET_OVERHEAD
                     ) -> list[dict[str, Any]]:
    """Acceptance targets on ``model`` at ``batch``: prefill speed-up of PruMerge+ and FastV within
    ``speedup_tol`` of the FLOP-ideal, and every method's overhead <= ``overhead`` of the unpruned
    prefill (defaults: the scaled LLaVA-1.5 model's 15 % / 5 %)."""
    found = [r for r in card["results"] if r["model"] == model and r["batch"] == batch]
    if not found:
        return [{"name": "all targets", "model": model, "batch": batch, "method": None, "measured": None,
                 "threshold": None, "met": None, "margin": None,
                 "detail": f"not evaluated: the run has no {model} model at batch {batch}"}]
    return [t for res in found for t in _targets_of(res, model, batch, speedup_tol, overhead)]


def card_targets(card: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target that applies to the card: the scaled LLaVA-1.5 model's at batch 1 (reported as
    not evaluated when absent, unless the run is of the other families only), and
    ``FAMILY_SPEEDUP_TOL`` / ``FAMILY_OVERHEAD`` on each scaled family model at every batch measured."""
    names = {r["model"] for r in card["results"]} | {m["name"] for m in card.get("models", [])}
    out = []
    if "scaled" in names or not names & set(FAMILY_MODELS):
        out += evaluate_targets(card)
    for model in FAMILY_MODELS:
        if model in names:
            for batch in sorted({r["batch"] for r in card["results"] if r["model"] == model}):
                out += evaluate_targets(card, model, batch, speedup_tol=FAMILY_SPEEDUP_TOL, overhead=FAMILY_OVERHEAD)
    return out


def _targets_of(res: dict[str, Any], model: str, batch: int, tol: float = TARGET_SPEEDUP_TOL,
                limit: float = TARGET_OVERHEAD) -> list[dict[str, Any]]:
    targets = []
    dtype = res.get("dtype")
    for v in res["variants"]:
        if v["method"] is None:
            continue
        r = v["ratios"]
        if v["method"] in TARGET_SPEEDUP_METHODS:
            dev = r["prefill_vs_ideal"]
            targets.append({
                "name": f"prefill speed-up within {100 * tol:.0f}% of FLOP-ideal", "model": model, "batch": batch,
                "dtype": dtype, "method": v["label"], "measured": dev, "threshold": tol,
                "met": abs(dev) <= tol, "margin": tol - abs(dev),
                "detail": (f"measured {r['prefill_speedup']:.3f}x vs FLOP-ideal {r['flop_ideal_speedup']:.3f}x "
                           f"({100 * dev:+.1f}%) at {v['visual_tokens']:.1f} visual tokens (ideal with the batch's "
                           f"padding: {r.get('flop_ideal_padded_speedup', math.nan):.3f}x); LLM only "
                           f"{r['llm_prefill_speedup']:.3f}x vs {r['llm_flop_ideal_speedup']:.3f}x "
                           f"({100 * r['llm_prefill_vs_ideal']:+.1f}%)"),
            })
        frac = r["overhead_fraction"]
        targets.append({
            "name": f"pruning overhead <= {100 * limit:.0f}% of unpruned prefill", "model": model, "batch": batch,
            "dtype": dtype, "method": v["label"], "measured": frac, "threshold": limit, "met": frac <= limit,
            "margin": limit - frac,
            "detail": (f"{v['median']['overhead_s'] * 1e3:.2f} ms of the method's own work vs "
                       f"{res['variants'][0]['median']['ttft_s'] * 1e3:.1f} ms unpruned prefill "
                       f"({100 * frac:.2f}%)"),
        })
    return targets


# ================================================================================ the card


def run_block(models: Sequence[str], variants: Sequence[Variant], dtype: str, batches: Sequence[int],
              new_tokens: int, seed: int) -> dict[str, Any]:
    """The ``run`` block every results file carries (``vlmprune.runinfo``); synthetic models have no weights."""
    from ..runinfo import method_entry, model_info, new_run
    from ..testbed.model import CHECKPOINT_DIR

    described = [{"path": None, "synthetic": m, "weights_sha256": None, "weights_files": {}, "dtype": dtype}
                 if m in SYNTHETIC_MODELS else {**model_info(CHECKPOINT_DIR if m == "testbed" else m), "dtype": dtype}
                 for m in models]
    run = new_run("bench", model=described[0] if len(described) == 1 else {"models": described},
                  data={"source": "synthetic", "prompt": "LLaVA prompt: system text, the image placeholders, a "
                                                         "question; random pixels", "seed": seed},
                  generation={"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                              "batch_sizes": list(batches)})
    run["methods"] = [method_entry(v.label, v.method, v.options) for v in variants]
    return run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build_card(*, command: str, bf16: dict[str, Any], load_before: Any, dtypes: list[str], dtype_choice: list[str],
               device: str, batches: list[int], variants: Sequence[Variant], repeats: int, warmup: int,
               new_tokens: int, memory: bool, seed: int, models: list[dict[str, Any]],
               results: list[dict[str, Any]], run: dict[str, Any], status: str) -> dict[str, Any]:
    """The efficiency card of the finished blocks: ``models`` (one entry per model and dtype),
    ``results`` (one per model, dtype and batch); ``status`` "complete" or "interrupted"."""
    card = {
        "schema": SCHEMA,
        "command": command,
        "created": _now(),
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg(), "bf16_matmul": bf16},
        "settings": {
            "dtype": dtypes, "dtype_requested": dtype_choice, "device": device, "batches": batches,
            "methods": [v.label for v in variants[1:]],
            "repeats": repeats, "warmup": warmup, "new_tokens": new_tokens, "decode_steps": new_tokens - 1,
            "threads": torch.get_num_threads(), "memory": memory, "seed": seed,
            "timing": ("one greedy generate(max_new_tokens=min_new_tokens=new_tokens) per run; variants "
                       "interleaved, order rotated per round; warm-up rounds discarded; median of repeats"),
            "ratios": ("ratios of medians vs the unpruned model in the same process: speed-ups = unpruned "
                       "time / pruned time; decode_speedup = pruned tokens/s / unpruned tokens/s; "
                       "kv/peak-memory ratios = pruned / unpruned; overhead_fraction = pruned overhead_s / "
                       "unpruned ttft_s"),
            "flop_ideal": ("vlmprune.cost.analytic of the same config: matmul FLOPs (2/MAC) of vision tower + "
                           "projector (on the tokens it receives) + decoder (each sample's own per-layer "
                           "tokens, no padding; lm_head on the last token); ideal speed-up = unpruned / "
                           "pruned; 'llm' = decoder only; flop_ideal_padded_speedup: the same with every "
                           "sample at the batch's longest count per layer (what a padded batch computes)"),
            "memory_method": ("fresh subprocess per (model, batch, variant): warm-up generate, reset the peak "
                              "RSS mark (/proc/self/clear_refs=5), peak = VmHWM - VmRSS over one generate; "
                              "MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS"),
            "kv_method": "sum of key/value tensor bytes of the cache after one prefill forward (padding included)",
        },
        "models": models,
        "results": results,
        "targets": [],
        "plot": None,
        "run": {**run, "status": status, "finished": _now()},
        "notes": [
            f"dtype {' and '.join(dtypes)} (asked: {', '.join(dtype_choice)}); {bf16['note']}",
            "the acceptance targets apply to the scaled model at batch 1 (speed-up within 15% of the FLOP-ideal, "
            "overhead <= 5%) and to the scaled family models at every batch (10% / 3%)",
            "prefill_vs_ideal = measured prefill speed-up / FLOP-ideal speed-up - 1 (0 = ideal)",
        ],
    }
    card["targets"] = card_targets(card)
    return card

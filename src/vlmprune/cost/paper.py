"""Published efficiency figures and their reproduction with :mod:`vlmprune.cost.analytic`.

PruMerge (Shang et al., arXiv 2403.15388) Table 2: a roofline model of the LLaVA-1.5
LLM decoder on a V100, computed with LLM-Viewer. Reconstruction (see
the PruMerge paper's Table 2 and ``docs/cost.md``): decoder only, batch 1,
prefill, no FlashAttention, 2 ops per MAC, lm_head on the last token, prompt of
700 tokens (original) vs 70 (PruMerge); "total memory" = bytes moved during prefill,
"activation" = bytes of all activations written; INT4 = 4-bit weights, activations
and KV at the INT8 peak; the INT4 FLOPs column is the FP16 figure x 4/16.

ATP-LLaVA (arXiv 2412.00447) reports "FLOPs -78.1%, KV-cache memory -75%" vs
LLaVA-1.5-7B for an adaptive model keeping 144 visual tokens on average over all
decoder layers; :func:`atp_reduction` computes what the cost model gives for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .analytic import PrefillCost, layer_ops, prefill_cost
from .specs import LLM_VIEWER, PHYSICAL, Conventions, ModelConfig, get_precision, load_model

TABLE2_METRICS: dict[str, str] = {
    "tflops": "FLOPs (T)",
    "prefill_ms": "Prefill time (ms)",
    "total_memory_gb": "Total memory (GB)",
    "activation_gb": "Activation (GB)",
}


@dataclass(frozen=True)
class Table2Row:
    """One row of PruMerge Table 2 (paper figures kept as printed strings)."""

    label: str
    model: str
    precision: str
    method: str
    prompt_tokens: int
    paper: dict[str, str]
    flops_scale: float = 1.0  # the paper's INT4 FLOPs = FP16 FLOPs x 4/16, by hand


def _table2(*rows: tuple) -> tuple[Table2Row, ...]:
    """Rows ``(label, model, precision, method, prompt_tokens, (the four figures as printed),
    flops_scale)`` -> ``Table2Row``s (figures keyed by ``TABLE2_METRICS``)."""
    return tuple(Table2Row(label, model, precision, method, tokens, dict(zip(TABLE2_METRICS, figures)), scale)
                 for label, model, precision, method, tokens, figures, scale in rows)


TABLE2: tuple[Table2Row, ...] = _table2(
    ("7B FP16 LLaVA-1.5", "llava-1.5-7b", "fp16", "LLaVA-1.5", 700, ("9.3", "88.6", "23.3", "4.60"), 1.0),
    ("7B FP16 +PruMerge", "llava-1.5-7b", "fp16", "PruMerge", 70, ("0.91", "15.3", "13.7", "0.28"), 1.0),
    ("13B FP16 LLaVA-1.5", "llava-1.5-13b", "fp16", "LLaVA-1.5", 700, ("18.2", "170.5", "41.6", "7.30"), 1.0),
    ("13B FP16 +PruMerge", "llava-1.5-13b", "fp16", "PruMerge", 70, ("1.80", "29.5", "26.6", "0.44"), 1.0),
    ("7B INT4 LLaVA-1.5", "llava-1.5-7b", "int4", "LLaVA-1.5", 700, ("2.3", "151.6", "5.9", "1.20"), 4 / 16),
    ("7B INT4 +PruMerge", "llava-1.5-7b", "int4", "PruMerge", 70, ("0.28", "14.9", "3.5", "0.07"), 4 / 16),
)

# Known reasons for figures that do not match at the table's rounding.
TABLE2_NOTES: dict[tuple[str, str], str] = {
    ("7B INT4 +PruMerge", "tflops"): (
        "paper slip: the paper's own rule (FP16 FLOPs x 4/16) gives 0.910 x 0.25 = 0.23; "
        "'0.28' equals the activation figure of the FP16 PruMerge row"),
    ("13B FP16 +PruMerge", "tflops"): (
        "1.781 T rounds to 1.78, the paper prints 1.80 (perhaps 1.8 to 2 significant "
        "digits, printed with a trailing 0); no integer prompt length gives 1.795-1.805 "
        "(70 -> 1.781, 71 -> 1.806), and 70 is the length that gives the row's 29.5 ms"),
    ("7B FP16 LLaVA-1.5", "activation_gb"): (
        "activation column: ours is 'every activation written' (4.645 GB); a search over "
        "per-layer sums n1*h*s + n2*I*s + n3*H*s^2 (half-integer n up to 30/6/6, with or "
        "without lm_head terms) and over +-combinations of the loaded/stored weight, "
        "activation and KV totals found no formula matching even 4 of the 6 printed "
        "activation values, so the column cannot be reproduced at rounding by any single "
        "byte count of this model; all six are within 3.3%"),
    ("13B FP16 LLaVA-1.5", "activation_gb"): "see 7B FP16 LLaVA-1.5 activation",
    ("7B INT4 LLaVA-1.5", "activation_gb"): (
        "4-bit activations make every activation exactly 1/4 of FP16 (4.645/4 = "
        "1.161); the paper's 1.20 is not 1/4 of its own 4.60"),
}


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _matches(ours: float, printed: str) -> bool:
    return f"{ours:.{_decimals(printed)}f}" == printed


def table2_figures(cost: PrefillCost, flops_scale: float = 1.0) -> dict[str, float]:
    """The four Table-2 figures from a prefill cost (ops x ``flops_scale``)."""
    s = cost.summary()
    return {
        "tflops": s["tflops"] * flops_scale,
        "prefill_ms": s["prefill_ms"],
        "total_memory_gb": s["total_memory_gb"],
        "activation_gb": s["activation_gb"],
    }


def reproduce_table2(
    conventions: Conventions = LLM_VIEWER, gpu: str = "v100", tolerance_pct: float = 5.0
) -> dict[str, Any]:
    """Recompute every figure of PruMerge Table 2 and compare with the paper.

    Returns ``{"rows": [...], "summary": {...}, "assumptions": [...]}``; each row has,
    per metric, the paper's printed value, ours, the % deviation, whether ours rounds
    to the printed value, and whether it is within ``tolerance_pct``.
    """
    rows: list[dict[str, Any]] = []
    n_exact = n_within = n_total = 0
    for r in TABLE2:
        cost = prefill_cost(r.model, r.prompt_tokens, gpu, r.precision, conventions=conventions)
        ours = table2_figures(cost, r.flops_scale)
        metrics: dict[str, Any] = {}
        for key, printed in r.paper.items():
            paper = float(printed)
            dev = (ours[key] - paper) / paper * 100.0
            exact = _matches(ours[key], printed)
            within = abs(dev) <= tolerance_pct
            n_total += 1
            n_exact += exact
            n_within += within
            metrics[key] = {
                "paper": paper, "paper_printed": printed, "ours": ours[key],
                "deviation_pct": dev, "exact_at_rounding": exact,
                "within_tolerance": within, "note": TABLE2_NOTES.get((r.label, key), ""),
            }
        rows.append({
            "label": r.label, "model": r.model, "precision": r.precision,
            "method": r.method, "prompt_tokens": r.prompt_tokens,
            "flops_scale": r.flops_scale, "metrics": metrics,
            "extra": {"kv_cache_gb": cost.summary()["kv_cache_gb"],
                      "matmul_tflops": cost.summary()["matmul_tflops"]},
        })
    return {
        "source": "PruMerge (arXiv 2403.15388) Table 2, LLaVA-1.5 on V100",
        "gpu": gpu,
        "conventions": conventions.name,
        "tolerance_pct": tolerance_pct,
        "rows": rows,
        "summary": {"figures": n_total, "exact_at_rounding": n_exact,
                    "within_tolerance": n_within},
        "assumptions": TABLE2_ASSUMPTIONS,
    }


TABLE2_ASSUMPTIONS: list[str] = [
    "LLM decoder only (no vision encoder, no pruning overhead), batch 1, prefill",
    "no FlashAttention: the s x s scores are written and read back; dense s x s attention",
    "per operator max(ops/peak, bytes/bandwidth), operator times summed",
    "V100: 112 TFLOPS FP16, 62 TOPS INT8, 900 GB/s (LLM-Viewer's V100 entry)",
    "2 ops per multiply-accumulate; norms 7 ops/element, softmax 5, add 1, SwiGLU gate 2",
    "lm_head on the last token only",
    "prompt = 700 tokens (LLaVA-1.5, 576 visual) and 70 tokens (PruMerge)",
    "FP16 = 16-bit W/A/KV; INT4 = 4-bit W/A/KV at the INT8 peak",
    "total memory = all bytes read+written in prefill; activation = all activation bytes written",
    "INT4 FLOPs column = FP16 FLOPs x 4/16 (the paper's hand scaling)",
    "LLM-Viewer 2024 quirks: lm_head weights charged at 1 byte/param at every precision; "
    "SwiGLU gating op sized by hidden_size (not intermediate_size)",
    "GB = 1e9 bytes, T = 1e12",
]


# --------------------------------------------------------------------------- ATP-LLaVA

ATP_PAPER = {"flops_reduction_pct": 78.1, "kv_reduction_pct": 75.0, "cuda_time_reduction_pct": 38.4,
             "avg_visual_tokens": 144, "full_visual_tokens": 576}

# A front-loaded per-layer schedule with ATP's default module positions (after layers
# 2, 8, 14, 20, 26 of 32, as in the ATP-LLaVA paper) whose all-layer average is
# exactly 144 visual tokens: 3x576, 6x248, 6x124, 6x62, 6x31, 5x18.
ATP_SCHEDULE_144: tuple[int, ...] = (
    (576,) * 3 + (248,) * 6 + (124,) * 6 + (62,) * 6 + (31,) * 6 + (18,) * 5)


def _ops(model: str, visual: list[int], text: int, conventions: Conventions) -> tuple[float, float]:
    cfg = load_model(model)
    toks = [v + text for v in visual]
    c = prefill_cost(cfg, toks, "v100", "fp16", conventions=conventions)
    return c.total_ops, c.kv_cache_bytes


def _reduction(model: str, visual: list[int], text: int, full: int,
               conventions: Conventions) -> dict[str, float]:
    n = load_model(model).num_layers
    base_ops, base_kv = _ops(model, [full] * n, text, conventions)
    ops, kv = _ops(model, visual, text, conventions)
    return {"flops_reduction_pct": (1 - ops / base_ops) * 100,
            "kv_reduction_pct": (1 - kv / base_kv) * 100,
            "avg_visual_tokens": sum(visual) / len(visual)}


def _solve(f, lo: float, hi: float, target: float, iters: int = 60) -> float:
    """Bisection for f(x) = target with f monotone on [lo, hi]."""
    flo = f(lo) - target
    for _ in range(iters):
        mid = (lo + hi) / 2
        fm = f(mid) - target
        if (fm < 0) == (flo < 0):
            lo, flo = mid, fm
        else:
            hi = mid
    return (lo + hi) / 2


def atp_reduction(model: str = "llava-1.5-7b", text_tokens: int = 124,
                  conventions: Conventions = PHYSICAL) -> dict[str, Any]:
    """FLOPs / KV reductions for ATP-LLaVA's all-layer average of 144 visual tokens.

    Scenarios (vs LLaVA-1.5 with 576 visual tokens at every layer):

    * ``linear_visual_only``: FLOPs taken proportional to the visual-token count and
      text ignored: ``1 - 144/576``.
    * ``uniform_144_no_text``: the full decoder model, 144 visual tokens at every
      layer, no text tokens.
    * ``schedule_144_no_text``: the front-loaded schedule :data:`ATP_SCHEDULE_144`
      (average 144), no text.
    * ``uniform_144_with_text`` / ``schedule_144_with_text``: the same with
      ``text_tokens`` text tokens in every layer of both models.

    Plus what it takes to reach the paper's -78.1 %: the all-layer average visual
    count needed (no text), and the text length with which the paper's 88-token model
    lands on -78.1 %.
    """
    cfg = load_model(model)
    n, full = cfg.num_layers, ATP_PAPER["full_visual_tokens"]
    avg = ATP_PAPER["avg_visual_tokens"]
    sched = list(ATP_SCHEDULE_144)
    if len(sched) != n:  # scale the 32-layer schedule to other depths
        sched = [ATP_SCHEDULE_144[min(int(i * 32 / n), 31)] for i in range(n)]
    scen: dict[str, dict[str, Any]] = {
        "linear_visual_only": {"flops_reduction_pct": (1 - avg / full) * 100,
                               "kv_reduction_pct": (1 - avg / full) * 100,
                               "avg_visual_tokens": float(avg)},
        "uniform_144_no_text": _reduction(model, [avg] * n, 0, full, conventions),
        "schedule_144_no_text": _reduction(model, sched, 0, full, conventions),
        "uniform_144_with_text": _reduction(model, [avg] * n, text_tokens, full, conventions),
        "schedule_144_with_text": _reduction(model, sched, text_tokens, full, conventions),
    }
    target = ATP_PAPER["flops_reduction_pct"]

    def red_avg(v: float) -> float:  # FLOPs reduction for a uniform (fractional) count
        return _reduction_frac(model, v, 0, full, conventions)

    needed_avg = _solve(red_avg, 1.0, float(full), target)

    def red_text_88(t: float) -> float:
        return _reduction_frac(model, 88.0, t, full, conventions)

    needed_text_88 = _solve(red_text_88, 0.0, 2000.0, target)
    return {
        "model": model,
        "paper": ATP_PAPER,
        "text_tokens": text_tokens,
        "conventions": conventions.name,
        "schedule_144": sched,
        "scenarios": scen,
        "to_reach_paper_flops": {
            "avg_visual_tokens_needed_no_text": needed_avg,
            "text_tokens_needed_with_88_token_model": needed_text_88,
        },
    }


def _layer_poly(cfg: ModelConfig, conv: Conventions) -> tuple[float, float]:
    """Per-layer ops are exactly ``a*s + b*s^2`` (no constant term): fit a, b from s=1, 2."""
    p = get_precision("fp16")
    f1 = sum(o.ops for o in layer_ops(cfg, 1, p, 1, conv))
    f2 = sum(o.ops for o in layer_ops(cfg, 2, p, 1, conv))
    b = (f2 - 2 * f1) / 2
    return f1 - b, b


def prefill_ops_continuous(cfg: ModelConfig, conv: Conventions, s: float) -> float:
    """Total prefill ops for a (possibly fractional) uniform sequence length ``s``;
    equals ``prefill_cost(...).total_ops`` at integer ``s``. Used to solve for token counts."""
    a, b = _layer_poly(cfg, conv)
    rows = 1.0 if conv.lm_head_tokens == "last" else s
    return cfg.num_layers * (a * s + b * s * s) + conv.ops_per_mac * rows * cfg.hidden_size * cfg.vocab_size


def _reduction_frac(model: str, visual: float, text: float, full: int,
                    conventions: Conventions) -> float:
    """FLOPs reduction (%) with uniform, possibly fractional token counts."""
    cfg = load_model(model)
    return (1 - prefill_ops_continuous(cfg, conventions, visual + text)
            / prefill_ops_continuous(cfg, conventions, full + text)) * 100

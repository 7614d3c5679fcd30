"""The README's accuracy tables as commands (``vlmprune tables vision`` / ``vlmprune tables budgets``).

* ``vision`` -- the analogue of PruMerge's Tables 1, 4 and 5: PruMerge and PruMerge+ with their
  adaptive counts, then, at each one's measured mean count (rounded; on families whose images
  have several units or sizes of their own, the same fraction of each unit), selection only
  (``cls-topk``: the same [CLS]-attention ranking without the merge) and the sampling baselines
  (spatial, sequential, random).
* ``budgets`` -- the analogue of the SparseVLM / ATP comparisons at 192 / 128 / 64 visual tokens:
  FastV (K=2, keeping that many tokens after layer K, as SparseVLM's tables count it), SparseVLM (its
  v1.5 schedule for that budget) and the vision-stage methods keeping that many tokens. The
  ``tokens`` column always reports what was measured: the all-layer average for decoder-stage
  methods, the count fed to the LLM for vision-stage ones.
* ``order`` -- where reading and counting are lost: the vision-stage methods with the official output order
  (attention-ranked, which scrambles the raster order of the kept tokens) against
  ``order="spatial"`` (kept tokens in raster order), and FastV pruning from layer K=2 against K=3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

BUDGETS = (192, 128, 64)
ADAPTIVE = ("prumerge", "prumerge+")
MATCHED_BASELINES = ("cls-topk", "spatial", "sequential", "random")


def matched_specs(adaptive_counts: dict[str, float], unpruned: float | None = None) -> list[tuple[str, dict]]:
    """Baselines at each adaptive method's mean token count: ``keep=`` that count (rounded, at least
    1) when every image is one unit of the same N tokens (``unpruned`` None, LLaVA-1.5); else, as
    the baselines' ``keep`` counts per unit (crop, frame, image of its own size), the fraction of
    the ``unpruned`` mean visual tokens it kept (``keep=`` a ratio: floor(ratio x each unit's
    tokens), at least 1)."""
    specs = []
    for name in ADAPTIVE:
        if name in adaptive_counts:
            if unpruned is None:
                keep: int | float = max(1, round(adaptive_counts[name]))
            else:
                keep = min(1.0, max(round(adaptive_counts[name] / unpruned, 4), 1e-4))
            specs += [(b, {"keep": keep}) for b in MATCHED_BASELINES]
    return specs


def budget_specs(budgets: Sequence[int] = BUDGETS) -> list[tuple[str, dict]]:
    specs = []
    for b in budgets:
        specs += [("fastv", {"k": 2, "count": b}), ("sparsevlm", {"budget": b}), ("prumerge", {"keep": b}),
                  ("prumerge+", {"keep": b}), ("spatial", {"keep": b}), ("random", {"keep": b})]
    return specs


def order_specs() -> list[tuple[str, dict]]:
    """Each vision-stage [CLS] method in both output orders, then FastV at K=2 and K=3 (same kept count)."""
    specs = []
    for name, opts in (("prumerge", {}), ("prumerge+", {}), ("cls-topk", {"keep": 172})):
        specs += [(name, {**opts, "order": order}) for order in ("attention", "spatial")]
    return specs + [("fastv", {"k": k, "count": 192}) for k in (2, 3)]


#: tables that run a fixed list of (method, options) after the unpruned run; "vision" derives its list
#: from the adaptive methods' measured counts
FIXED_SPECS = {"budgets": budget_specs, "order": order_specs}
TABLES = ("vision", *FIXED_SPECS)


def table_checks(which: str) -> list[tuple[str, dict]]:
    """Every (method, options) the table can run, for a dry run before the first question ("vision"'s
    matched baselines at keep=1: their counts come from the measured runs)."""
    if which == "vision":
        return [(name, {}) for name in ADAPTIVE] + [(b, {"keep": 1}) for b in MATCHED_BASELINES]
    return FIXED_SPECS[which]()


def run_tables(which: str, model, processor, items, *, out: Path | None, batch_size: int = 16,
               progress: bool = True, evaluate: Callable | None = None) -> list:
    """Evaluate the unpruned model and the table's methods on ``items``; write ``{which}.md/json`` to
    ``out`` (None: the caller writes, e.g. through the ``evaluate`` it passes)."""
    from . import report
    from .distributed import is_main_process
    from .harness import evaluate as _evaluate

    if which not in TABLES:
        raise ValueError(f"unknown table {which!r}: choose one of {', '.join(TABLES)}")
    evaluate = evaluate or _evaluate

    def run(name, opts, base):
        return evaluate(model, processor, items, method=name, method_options=opts, baseline=base,
                        batch_size=batch_size, progress=progress)

    base = run(None, {}, None)
    base.retention = 1.0
    results = [base]
    if which == "vision":
        adaptive = [run(name, {}, base) for name in ADAPTIVE]
        results += adaptive
        from ..integrations.base import get_adapter

        counts = {r.method: r.mean_visual_tokens for r in adaptive}
        # every image one unit of N tokens (LLaVA-1.5; or a stand-in model): the counts are the keep=
        one_grid = model is None or get_adapter(model).fixed_image_tokens(model) is not None
        results += [run(name, opts, base) for name, opts in
                    matched_specs(counts, None if one_grid else base.mean_visual_tokens)]
    else:
        results += [run(name, opts, base) for name, opts in FIXED_SPECS[which]()]
    if is_main_process():
        report.print_table(results, title=f"ShapesVQA — {which} table")
        if out is not None:
            report.write(results, out, which)
    return results

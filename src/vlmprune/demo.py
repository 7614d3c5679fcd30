"""The main job (``make demo`` / ``vlmprune demo``): the testbed, unpruned and with each method."""

from __future__ import annotations

from pathlib import Path

# Method specs compared by the demo, at the budgets the papers report (testbed: 576 patch tokens).
DEMO_SPECS: list[tuple[str, dict]] = [
    ("prumerge", {}),
    ("prumerge+", {}),
    ("cls-topk", {"keep": 144}),
    ("spatial", {"keep": 144}),
    ("sequential", {"keep": 144}),
    ("random", {"keep": 144}),
    ("random", {"keep": 32}),
    ("fastv", {}),
    ("sparsevlm", {"budget": 192}),
    ("sparsevlm", {"budget": 64}),
]  # ATP joins once trained ATP weights ship with the testbed (`vlmprune train atp`).


def run_demo(n: int = 50, out: Path = Path("out/demo"), batch_size: int = 16) -> list:
    from . import registry
    from .eval import report
    from .eval.data import shapesvqa_items
    from .eval.harness import evaluate
    from .testbed.model import load

    model, processor = load()
    items = shapesvqa_items("test", None, n)
    base = evaluate(model, processor, items, batch_size=batch_size)
    base.retention = 1.0
    results = [base]
    known = set(registry.method_names())
    for name, opts in DEMO_SPECS:
        if name not in known:
            continue
        results.append(evaluate(model, processor, items, method=name, method_options=opts, baseline=base,
                                batch_size=batch_size))
    report.print_table(results, title=f"ShapesVQA test, {n} questions per family")
    md, js = report.write(results, out, "demo")
    print(f"wrote {md} and {js}")
    return results

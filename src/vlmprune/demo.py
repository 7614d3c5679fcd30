"""The main job (``make demo`` / ``vlmprune demo``, run by ``vlmprune.cli``): the testbed, unpruned and with
each method."""

from __future__ import annotations

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
    ("atp", {"checkpoint": "testbed-144"}),  # the shipped ATP weights (paper targets 144 and 88)
    ("atp", {"checkpoint": "testbed-88"}),
]


def demo_specs() -> list[tuple[str, str, dict]]:
    """(label, method, options) of each registered method of ``DEMO_SPECS``."""
    from . import registry
    from .eval.harness import label_for

    from .integrations.atp import shipped_checkpoints

    known = set(registry.method_names())
    shipped = shipped_checkpoints()
    return [(label_for(name, opts), name, opts) for name, opts in DEMO_SPECS
            if name in known and (name != "atp" or opts["checkpoint"] in shipped)]

"""Host synchronisations in the prefill: at most one per pruning step (see docs/efficiency.md).

Counted with ``sync_counter.SyncCounter`` (the calls that would synchronise on an accelerator:
``.item()`` / ``int()`` / ``bool()`` of a tensor, ``.tolist()``, ``.cpu()``, data-dependent shapes),
as the excess over the stock model's own count for the same forward or ``generate()``.
"""

from __future__ import annotations

import pytest
import torch

import vlmprune
from atp_helpers import set_constant_thresholds
from conftest import make_inputs, make_tiny_llava
from sync_counter import SyncCounter
from vlmprune.integrations.atp import attach_atp
from vlmprune.methods.atp import ATPConfig, ATPPruner
from vlmprune.methods.neighbours import CPU_KERNELS_ENV

VISION = [("prumerge", {}), ("prumerge+", {}), ("prumerge+", {"keep": 6}), ("prumerge", {"keep": 0.25}),
          ("cls-topk", {}), ("cls-topk", {"keep": 5}), ("random", {"keep": 5}), ("sequential", {"keep": 5}),
          ("spatial", {"keep": 4})]


@pytest.fixture(autouse=True)
def accelerator_path(monkeypatch):
    """The path an accelerator runs: PruMerge's CPU kernel (``methods.neighbours``; CPU tensors
    only, read through zero-copy ``.numpy()`` views that wait for nothing) is turned off."""
    monkeypatch.setenv(CPU_KERNELS_ENV, "0")


@pytest.fixture(scope="module")
def model():
    return make_tiny_llava()


@pytest.fixture(scope="module")
def inputs(model):
    return make_inputs(model, prefix_lens=(3, 5, 2), suffix_lens=(5, 2, 4))  # ragged, left-padded, batch 3


def _syncs(fn) -> SyncCounter:
    with torch.no_grad():
        fn()  # warm-up: lazy initialisations are not the steady state
        with SyncCounter() as counter:
            fn()
    return counter


def _excess(model, inputs, method, options, call) -> tuple[int, dict]:
    stock = _syncs(lambda: call(model, inputs))
    with vlmprune.pruned(model, method, **options):
        pruned = _syncs(lambda: call(model, inputs))
    return pruned.count - stock.count, dict(pruned.where - stock.where)


def _forward(model, inputs):
    return model(**inputs)


def _generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=4, do_sample=False)


def test_counter_sees_the_synchronising_calls():
    """Positive control: each kind of call the bound is about is counted, plain ops are not."""
    x = torch.arange(6.0)
    with SyncCounter() as c:
        y = (x * 2 + 1).softmax(0)
        assert c.count == 0
        x.sum().item()
        int(x.max())
        bool((x > 2).any())
        x.tolist()
        x[x > 2]
        torch.nonzero(x)
        x.cpu()
    assert c.count == 7, dict(c.where)
    assert y.shape == (6,)


@pytest.mark.parametrize("call", [_forward, _generate], ids=["forward", "generate"])
@pytest.mark.parametrize("method,options", VISION, ids=[f"{m}-{o}" for m, o in VISION])
def test_vision_stage_synchronises_once_per_prefill(model, inputs, method, options, call):
    """A forward: one host read (the kept counts, with the placeholders per row and the finiteness
    check in the same transfer). generate() encodes the images before the forward sees the prompt,
    so the placeholders per row come in a second read; decode steps add none."""
    excess, where = _excess(model, inputs, method, options, call)
    assert excess <= (1 if call is _forward else 2), where


@pytest.mark.parametrize("call", [_forward, _generate], ids=["forward", "generate"])
@pytest.mark.parametrize("options", [{"k": 1, "drop_ratio": 0.5}, {"k": 2, "count": 5}], ids=["ratio", "count"])
def test_fastv_synchronises_once_per_prune_point(model, inputs, options, call):
    """FastV prunes once: one host read (new width and every count the stats need), none at the
    prefill's start or end, none per decode step."""
    excess, where = _excess(model, inputs, "fastv", options, call)
    assert excess <= 1, where


@pytest.mark.parametrize("call", [_forward, _generate], ids=["forward", "generate"])
@pytest.mark.parametrize("options", [{"schedule": (8, 6, 4)}, {"schedule": (8, 6, 4), "recycle": False},
                                     {"schedule": (10, 5, 2), "positions": "original"}],
                         ids=["recycle", "no-recycle", "original-positions"])
def test_sparsevlm_synchronises_at_most_once_per_prune_point(model, inputs, options, call):
    """SparseVLM (3 prune points): two host reads, both before the first layer (the rows' visual / text
    counts with the machinery's counts of the input layout; then the raters per row); every later
    count follows on the host, so the prune points and the decode steps read nothing."""
    excess, where = _excess(model, inputs, "sparsevlm", options, call)
    assert excess <= 2, where


def test_sparsevlm_prompt_ending_with_its_image_reads_at_each_prune_point(model):
    """A prompt that ends with its image: the recycled tokens become its last prompt token, so the raters per
    row change from layer to layer: one read before the first layer, then two per prune point (the raters'
    width, the point's counts)."""
    ends = make_inputs(model, prefix_lens=(3, 1), suffix_lens=(0, 4), seed=4)
    excess, where = _excess(model, ends, "sparsevlm", {"schedule": (8, 6, 4)}, _forward)
    assert excess <= 1 + 2 * 3, where


ATP = {"learned": dict(theta_r=(0.8, 0.85, 0.9), theta_s=0.9),
       "fixed-ratio": dict(fixed_ratio=0.6),
       "compact": dict(theta_r=(0.8, 0.85, 0.9), theta_s=0.9, positions="compact"),
       "soft": dict(theta_r=(0.8, 0.85, 0.9), theta_s=0.9, mode="soft")}


@pytest.mark.parametrize("call", [_forward, _generate], ids=["forward", "generate"])
@pytest.mark.parametrize("kind", list(ATP))
def test_atp_synchronises_once_per_module_and_once_before(model, inputs, kind, call):
    """ATP (3 modules): one host read before the first module (each sample's image, judged and instruction
    tokens, the units' samples, with the machinery's counts of the input layout), then one per module (its
    counts and thresholds; the last one also brings the all-layer average); none at the end, none per
    decode step."""
    opts = dict(ATP[kind])
    theta_r, theta_s = opts.pop("theta_r", None), opts.pop("theta_s", None)
    attach = {k: opts.pop(k) for k in ("positions", "mode") if k in opts}
    torch.manual_seed(0)
    cfg = ATPConfig(num_layers=model.config.text_config.num_hidden_layers, layers=(0, 1, 2), num_patches=16,
                    hidden=16, **opts)
    pruner = set_constant_thresholds(ATPPruner(cfg), theta_r, theta_s)
    stock = _syncs(lambda: call(model, inputs))
    handle = attach_atp(model, pruner, **attach)
    try:
        pruned = _syncs(lambda: call(model, inputs))
    finally:
        handle.remove()
    assert pruned.count - stock.count <= 3 + 1, dict(pruned.where - stock.where)


def test_units_of_several_grids_are_reduced_with_one_host_read():
    """``_reduce_by_grid`` on units of three grids: one ``fetch`` in all, and the same reduction and
    the same global random state after it as one method call per grid (the old way), for a method
    drawing from the global generator and for a PruMerge+ reduction."""
    from vlmprune.integrations.vision.method import VisionMethod, VisionSignals, _reduce_by_grid
    from vlmprune.methods.baselines import random_keep
    from vlmprune.methods.prumerge import prumerge

    grids = [(2, 3), (4, 4), (2, 3), (3, 3)]
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4, 16, 5, generator=g)
    attn = torch.softmax(torch.randn(4, 16, generator=g), -1)
    signals = VisionSignals(cls_attn=attn, keys=torch.randn(4, 16, 5, generator=g))
    methods = [VisionMethod("random", lambda f, s, grid, fetch: random_keep(f, 0.5, fetch=fetch)),
               VisionMethod("prumerge+", lambda f, s, grid, fetch: prumerge(s.cls_attn, s.keys, f, plus=True,
                                                                           fetch=fetch), needs_signals=True)]
    for method in methods:
        calls = []

        def counting(values):
            calls.append(values.numel())
            return values.tolist()

        torch.manual_seed(7)
        got = _reduce_by_grid(method, features, signals, grids, counting)
        state_after = torch.get_rng_state()
        assert len(calls) == 1  # one read for the three groups
        torch.manual_seed(7)  # the reference: one call per grid, in order of first appearance
        for grid in dict.fromkeys(grids):
            units = [u for u, gr in enumerate(grids) if gr == grid]
            n = grid[0] * grid[1]
            sig = VisionSignals(cls_attn=attn[units, :n], keys=signals.keys[units, :n])
            ref = method.reduce(features[units, :n], sig, grid)
            m = ref.tokens.shape[1]
            assert torch.equal(got.tokens[units, :m], ref.tokens) and not got.tokens[units, m:].any()
            assert torch.equal(got.counts[units], ref.counts)
            assert [got.host_counts[u] for u in units] == ref.host_counts
        assert torch.equal(torch.get_rng_state(), state_after)

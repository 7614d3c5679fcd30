"""``methods.neighbours.neighbour_sums``: the tensor path and the CPU kernel against hand-worked
cases and the top-k invariant (every chosen column scores at least as high as every column left
out, the row's own column never chosen, exactly k per row), ties and non-finite rows included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlmprune.methods.neighbours import CPU_KERNELS_ENV, cpu_kernel_available, neighbour_sums

PATHS = ["tensor", pytest.param("kernel", marks=pytest.mark.skipif(
    not cpu_kernel_available(), reason="numba is not importable here: the CPU kernel is off"))]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(CPU_KERNELS_ENV, "1" if request.param == "kernel" else "0")
    return request.param


def chosen_sets(sims: torch.Tensor, exclude: torch.Tensor, k: int) -> list[list[set[int]]]:
    """Run with one-hot values and unit weights: pooled[b, r] is the indicator of the chosen set."""
    batch, rows, n = sims.shape
    values = torch.eye(n).expand(batch, n, n).contiguous()
    weights = torch.ones(batch, n)
    pooled, total = neighbour_sums(sims.clone(), exclude, weights, values, k)
    assert torch.equal(total, torch.full((batch, rows), float(k)))
    assert set(pooled.unique().tolist()) <= {0.0, 1.0}
    return [[set(torch.nonzero(pooled[b, r]).flatten().tolist()) for r in range(rows)] for b in range(batch)]


def test_hand_worked_case(path):
    sims = torch.tensor([[[9.0, 1.0, 5.0, 3.0, 4.0],     # own column 0: top-2 of the others = {2, 4}
                          [0.0, 7.0, 2.0, 6.0, 8.0]]])   # own column 4: top-2 = {1, 3}
    exclude = torch.tensor([[0, 4]])
    weights = torch.tensor([[0.5, 0.25, 0.125, 1.0, 2.0]])
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [3.0, -1.0], [-4.0, 1.0]]])
    pooled, total = neighbour_sums(sims.clone(), exclude, weights, values, 2)
    # row 0: 0.125 * [2, 2] + 2 * [-4, 1] = [-7.75, 2.25]; row 1: 0.25 * [0, 1] + 1 * [3, -1] = [3, -0.75]
    assert torch.equal(pooled, torch.tensor([[[-7.75, 2.25], [3.0, -0.75]]]))
    assert torch.equal(total, torch.tensor([[2.125, 1.25]]))


def test_paths_agree_on_random_inputs(monkeypatch):
    if not cpu_kernel_available():
        pytest.skip("numba is not importable here")
    g = torch.Generator().manual_seed(0)
    for batch, rows, n, dim, k in [(1, 239, 576, 192, 32), (3, 17, 64, 8, 5), (2, 5, 9, 3, 8), (2, 40, 300, 16, 1)]:
        sims = torch.randn(batch, rows, n, generator=g)
        exclude = torch.randint(0, n, (batch, rows), generator=g)
        weights = torch.rand(batch, n, generator=g)
        values = torch.randn(batch, n, dim, generator=g)
        out = {}
        for flag in ("0", "1"):
            monkeypatch.setenv(CPU_KERNELS_ENV, flag)
            out[flag] = neighbour_sums(sims.clone(), exclude, weights, values, k)
        torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["1"][1], out["0"][1], rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 40), rows=st.integers(1, 6), batch=st.integers(1, 3), levels=st.integers(1, 6),
       data=st.data())
def test_top_k_invariant_with_ties(n, rows, batch, levels, data):
    """Few distinct values (many ties): each row gets exactly k columns, never its own, and no
    column left out scores higher than a chosen one -- on both paths."""
    k = data.draw(st.integers(1, n - 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    sims = torch.randint(0, levels, (batch, rows, n), generator=g).float()
    exclude = torch.randint(0, n, (batch, rows), generator=g)
    for flag in ("0", "1") if cpu_kernel_available() else ("0",):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(CPU_KERNELS_ENV, flag)
            sets = chosen_sets(sims, exclude, k)
        for b in range(batch):
            for r in range(rows):
                own, chosen = int(exclude[b, r]), sets[b][r]
                assert len(chosen) == k and own not in chosen
                left = [j for j in range(n) if j not in chosen and j != own]
                if left:
                    assert min(sims[b, r, j] for j in chosen) >= max(sims[b, r, j] for j in left)


def test_every_other_column_when_k_is_n_minus_one(path):
    sims = torch.randn(2, 3, 6)
    exclude = torch.tensor([[0, 3, 5], [1, 1, 2]])
    sets = chosen_sets(sims, exclude, 5)
    for b in range(2):
        for r in range(3):
            assert sets[b][r] == set(range(6)) - {int(exclude[b, r])}


def test_non_finite_rows_still_give_k_distinct_columns(path):
    n, k = 12, 4
    sims = torch.randn(1, 4, n)
    sims[0, 0, 3] = float("nan")
    sims[0, 1] = float("nan")  # a whole row of NaN
    sims[0, 2, [1, 7]] = float("inf")
    sims[0, 3, :] = float("-inf")  # a row of -inf: any k columns (its own one is no lower than the rest)
    exclude = torch.tensor([[0, 5, 1, 11]])
    sets = chosen_sets(sims, exclude, k)
    for r in range(4):
        assert len(sets[0][r]) == k
    for r in range(3):
        assert int(exclude[0, r]) not in sets[0][r]
    assert 7 in sets[0][2]  # the one +inf that is not the row's own column is among the largest


def test_gradients_take_the_tensor_path():
    sims = torch.randn(1, 3, 8)
    values = torch.randn(1, 8, 2, requires_grad=True)
    weights = torch.rand(1, 8)
    pooled, _ = neighbour_sums(sims, torch.tensor([[0, 1, 2]]), weights, values, 3)
    pooled.sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match=r"k must be in \[1, N - 1\] = \[1, 4\], got 5"):
        neighbour_sums(torch.randn(1, 2, 5), torch.zeros(1, 2, dtype=torch.long), torch.rand(1, 5),
                       torch.randn(1, 5, 2), 5)


def test_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(CPU_KERNELS_ENV, "0")
    assert not cpu_kernel_available()


def test_a_kernel_that_cannot_compile_leaves_the_tensor_path(monkeypatch):
    import vlmprune.methods.neighbours as nb

    def broken(cache):
        raise RuntimeError("cannot cache / compile here")

    monkeypatch.setattr(nb, "_kernel_source", lambda: broken)
    nb._kernel.cache_clear()
    try:
        assert not cpu_kernel_available()
        pooled, total = neighbour_sums(torch.tensor([[[3.0, 1.0, 2.0]]]), torch.tensor([[0]]), torch.ones(1, 3),
                                       torch.eye(3)[None], 1)
        assert torch.equal(pooled, torch.tensor([[[0.0, 0.0, 1.0]]])) and torch.equal(total, torch.tensor([[1.0]]))
    finally:
        nb._kernel.cache_clear()

"""The vision-stage method: ``VisionSignals`` ([CLS] attention and keys), ``VisionMethod`` (a configured
reduction) and ``_reduce_by_grid``, which runs one over units of different grids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ...methods.common import Fetch, Reduction, to_host


@dataclass
class VisionSignals:
    """[CLS] signals of the last vision layer for I images.

    Attributes:
        cls_attn: [I, N] float32, softmax(q_cls K^T / sqrt(C)) over all 1+N keys, [CLS] column
            dropped (spec §1; rows sum to < 1).
        keys: [I, N, C] raw ``k_proj`` outputs of the patches ([CLS] row dropped), tower dtype.
    """

    cls_attn: Tensor
    keys: Tensor


@dataclass(frozen=True)
class VisionMethod:
    """A configured vision-stage method, as built by ``integrations.builders``.

    ``fn(features [I, N, D], signals | None, grid (H, W), fetch) -> Reduction`` does the work
    (``fetch``: how it brings its counts to the host, once; see ``methods.common.Fetch``);
    ``needs_signals`` asks the plumbing for [CLS] attention and keys (hooks are only installed
    then); ``needs_grid`` says that the N tokens must form the H x W patch grid; ``lora`` is the
    folder of LoRA adapters injected into the language model while the method is attached.
    """

    name: str
    fn: Callable[..., Reduction]
    needs_signals: bool = False
    needs_grid: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    lora: str | None = None

    def reduce(self, features: Tensor, signals: VisionSignals | None, grid: tuple[int, int],
               fetch: Fetch | None = None) -> Reduction:
        """features [I, N, D] -> Reduction (tokens [I, M, D], counts [I], host_counts)."""
        if self.needs_signals and signals is None:
            raise RuntimeError(f"method {self.name!r} needs [CLS] signals but none were captured")
        return self.fn(features, signals, grid, fetch)

    def validate(self, num_tokens: int, grid: tuple[int, int]) -> None:
        """Dry-run on tiny dummy inputs of the model's N, so bad budgets fail at ``apply()``."""
        g = torch.Generator().manual_seed(0)
        features = torch.randn(1, num_tokens, 4, generator=g)
        signals = None
        if self.needs_signals:
            signals = VisionSignals(cls_attn=torch.softmax(torch.randn(1, num_tokens + 1, generator=g), -1)[:, 1:],
                                    keys=torch.randn(1, num_tokens, 4, generator=g))
        self.reduce(features, signals, grid)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in {**self.options, **({"lora": self.lora} if self.lora else {})}.items())
        return f"VisionMethod({self.name}: {opts})"



class _Deferred(Exception):
    """Raised by ``_reduce_by_grid``'s recording fetch: the group's method stops at its host read."""


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _reduce_by_grid(method: VisionMethod, features: Tensor, signals: VisionSignals | None,
                    grids: list[tuple[int, int]], fetch: Fetch | None = None) -> Reduction:
    """features [U, N, D] (unit u's first h_u * w_u rows real) -> one padded ``Reduction`` [U, M, D].

    One ``method.reduce`` call when every unit has the same grid (features passed as they are);
    otherwise one call per distinct grid on its units' real rows, and the groups' outputs padded
    to the widest (tokens 0, indices -1) in unit order. The groups still read the host once in
    all: each group's method first runs up to its one ``fetch``, which records the values and
    stops it (the random generators forked, so nothing is drawn), the recorded values of every
    group come to the host in one ``fetch``, and then each group runs in full with its share of
    them (the work before a method's read is done twice; what follows it, e.g. PruMerge's
    neighbour search, once). A method that returns without reading is simply run again in pass 2.
    """
    if len(set(grids)) == 1:
        return method.reduce(features, signals, grids[0], fetch)
    groups: dict[tuple[int, int], list[int]] = {}
    for u, g in enumerate(grids):
        groups.setdefault(g, []).append(u)
    dev = features.device
    inputs = []
    for grid, units in groups.items():
        n = grid[0] * grid[1]
        idx = torch.tensor(units, device=dev)
        sig = None if signals is None else VisionSignals(cls_attn=signals.cls_attn[idx, :n], keys=signals.keys[idx, :n])
        inputs.append((idx, features[idx, :n], sig, grid))
    recorded: list[Tensor | None] = []

    def record(values: Tensor) -> list:
        recorded.append(values.reshape(-1))
        raise _Deferred

    for _idx, f, sig, grid in inputs:  # pass 1: up to each group's read
        with torch.random.fork_rng(devices=_rng_devices(dev)):
            try:
                method.reduce(f, sig, grid, record)
                recorded.append(None)  # returned without reading
            except _Deferred:
                pass
    read = [v for v in recorded if v is not None]
    host_all = (fetch or to_host)(torch.cat(read)) if read else []
    shares, at = [], 0
    for v in recorded:
        shares.append(None if v is None else host_all[at:at + v.numel()])
        at += 0 if v is None else v.numel()

    def replay(share: list) -> Fetch:
        def give(values: Tensor) -> list:
            if values.numel() != len(share):
                raise RuntimeError("vlmprune: a vision method read different values on its second pass")
            return share
        return give

    parts = []
    for (idx, f, sig, grid), share in zip(inputs, shares):  # pass 2: in full, the reads answered from the host
        parts.append((idx, method.reduce(f, sig, grid, None if share is None else replay(share))))
    width = max(r.tokens.shape[1] for _, r in parts)
    iwidth = max(r.indices.shape[1] for _, r in parts)
    n_units = len(grids)
    first = parts[0][1]
    tokens = first.tokens.new_zeros((n_units, width, first.tokens.shape[-1]))
    counts = first.counts.new_zeros(n_units)
    indices = first.indices.new_full((n_units, iwidth), -1)
    extra = None if first.extra is None else first.extra.new_zeros(n_units)
    num_att = None if first.num_attention is None else first.num_attention.new_zeros(n_units)
    host: list[int] | None = [0] * n_units
    for (grid, units), (idx, r) in zip(groups.items(), parts):
        if host is not None and r.host_counts is not None:
            for u, c in zip(units, r.host_counts):
                host[u] = c
        else:
            host = None
        tokens[idx, :r.tokens.shape[1]] = r.tokens
        counts[idx] = r.counts
        indices[idx, :r.indices.shape[1]] = r.indices
        if extra is not None:
            extra[idx] = r.extra
        if num_att is not None:
            num_att[idx] = r.num_attention
    return Reduction(tokens=tokens, counts=counts, indices=indices, extra=extra, num_attention=num_att,
                     host_counts=host)

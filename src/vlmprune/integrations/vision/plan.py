"""The prefill rewrite: which slots of each sample survive (``Plan`` / ``make_plan``, the left-re-padded
compaction) and which placeholders each NaN-padded image keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Plan:
    """How the last prefill rewrote its batch (used to translate later calls).

    Attributes:
        keep: [B, L] bool, which original slots survive (L = original prompt length).
        dest: [B, L] long, each surviving slot's index in the rewritten sequence [0, L').
        src: [B, L'] long, the original slot of each rewritten slot (-1 on the new left pads).
        new_len: L', the rewritten width.
        dropped: [B] long, slots deleted per sample.
        new_mask: [B, L'] long, the rewritten attention mask of the prompt (0 on pads).
        orig_mask: [B, L] long or None, the caller's prompt mask (None: it passed none).
        offset: cached tokens before the prompt (a prefill continuing a cache); mask columns
            before ``offset`` are left as they are.
    """

    keep: Tensor
    dest: Tensor
    src: Tensor
    new_len: int
    dropped: Tensor
    new_mask: Tensor
    orig_mask: Tensor | None
    offset: int = 0

    @property
    def orig_len(self) -> int:
        return self.keep.shape[1]

    @property
    def shrink(self) -> int:
        """L - L': how much shorter the rewritten sequences are."""
        return self.orig_len - self.new_len

    def compact(self, x: Tensor, fill: Any) -> Tensor:
        """x [B, L, ...] in original coordinates -> [B, L', ...]; new left pads get ``fill``.

        One gather along dim 1 (no data-dependent shapes, no host synchronisation).
        """
        idx = self.src.clamp(min=0).to(x.device)  # [B, L']
        pads = (self.src < 0).to(x.device)  # [B, L']
        if x.ndim > 2:
            tail = (1,) * (x.ndim - 2)
            idx = idx.view(*idx.shape, *tail).expand(-1, -1, *x.shape[2:])
            pads = pads.view(*pads.shape, *tail)
        return x.gather(1, idx).masked_fill(pads, fill)

    def compact_positions(self, positions: Tensor) -> Tensor:
        """positions [*P, B, L] in original coordinates -> [*P, B, L'] (the survivors' own values;
        0 on the new left pads). One gather along the last dim."""
        idx = self.src.clamp(min=0).to(positions.device)  # [B, L']
        pads = (self.src < 0).to(positions.device)
        lead = positions.shape[:-2]
        return positions.gather(-1, idx.expand(*lead, *idx.shape)).masked_fill(pads.expand(*lead, *pads.shape), 0)


def make_plan(keep: Tensor, attention_mask: Tensor | None, offset: int = 0, new_len: int | None = None) -> Plan:
    """keep [B, L] bool -> the left-re-padded compaction (see ``Plan``); ``new_len`` = max kept per
    row when the caller knows it on the host, else read from the device (one host sync)."""
    bsz, length = keep.shape
    kept_len = keep.sum(dim=1)  # [B]
    if new_len is None:
        new_len = int(kept_len.max())
    dest = (new_len - kept_len)[:, None] + keep.long().cumsum(dim=1) - 1  # [B, L]; valid where keep
    cols = torch.arange(length, device=keep.device).expand(bsz, length)
    # dropped slots write to a dump column L' that is cut off
    src = torch.full((bsz, new_len + 1), -1, dtype=torch.long, device=keep.device)
    src = src.scatter_(1, torch.where(keep, dest, new_len), cols)[:, :new_len]  # [B, L']
    plan = Plan(keep=keep, dest=dest, src=src, new_len=new_len, dropped=length - kept_len,
                new_mask=torch.empty(0), orig_mask=attention_mask, offset=offset)
    ones = torch.ones(keep.shape, dtype=torch.long, device=keep.device)
    plan.new_mask = plan.compact(ones if attention_mask is None else attention_mask, 0)
    return plan



def image_token_counts(per_image: list[Tensor]) -> list[int]:
    """Kept tokens of each NaN-padded image tensor [n, D] (its rows that are not all NaN)."""
    return image_token_slots(per_image)[0]


def image_token_slots(per_image: list[Tensor]) -> tuple[list[int], list[Tensor | None]]:
    """Kept tokens of each NaN-padded image tensor [n, D]: (counts, slots). ``slots[i]`` is None
    when image i's kept rows are its first ``counts[i]`` (the rest all NaN), else the [counts[i]]
    long row indices of its rows that are not all NaN (the placeholder slots its tokens keep).

    Images of one shape are scanned together (one host synchronisation for the whole batch).
    """
    counts: list[int] = [0] * len(per_image)
    slots: list[Tensor | None] = [None] * len(per_image)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(per_image):
        groups.setdefault((tuple(t.shape), t.device, t.dtype), []).append(i)
    for (shape, _, _), idx in groups.items():
        if shape[0] == 0:
            continue
        stacked = torch.stack([per_image[i] for i in idx])  # [G, n, D]
        pad = torch.isnan(stacked).all(dim=-1).cpu()  # [G, n], the group's one transfer
        trailing = pad.flip(1).long().cumprod(1).sum(1)  # [G] trailing all-NaN rows
        kept = (~pad).sum(1)  # [G]
        for g, i in enumerate(idx):
            counts[i] = int(kept[g])
            if counts[i] != shape[0] - int(trailing[g]):  # NaN rows between kept rows: own slots
                slots[i] = torch.nonzero(~pad[g]).flatten().to(per_image[i].device)
    return counts, slots



def _removed_per_row(rows: list[int], runs: list[int], counts: list[int]) -> list[int] | None:
    """Placeholders each row loses: ``rows[b]`` placeholders in row b, filled by the images' runs in
    order (image i: ``runs[i]`` placeholders, ``counts[i]`` kept). None when an image's run does not
    end inside its row (the caller then reads the lengths from the device)."""
    removed, i = [0] * len(rows), 0
    for b, n in enumerate(rows):
        while n > 0:
            if i >= len(runs) or runs[i] > n:
                return None
            removed[b] += runs[i] - counts[i]
            n -= runs[i]
            i += 1
    return removed if i == len(runs) else None

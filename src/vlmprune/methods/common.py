"""Helpers shared by the pruning methods: argument validators, the vision-stage result type and its
tensor helpers.

Everything here is pure torch, vectorised over batch and tokens. Ragged per-sample results
(every image keeps its own number of tokens) are represented by padding to the batch maximum:
a method builds a boolean "chosen" mask and a sort key per patch, one ``argsort`` puts the chosen
patches of every sample first and in output order, and ``counts`` says where each sample stops.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Reduction",
    "is_int",
    "is_real",
    "check_tensor",
    "check_choice",
    "resolve_budget",
    "grid_shape",
    "lattice_mask",
    "spread_priority",
    "order_chosen",
    "gather_rows",
    "pack_selection",
    "select_chosen",
    "topk_indices",
    "pack_mask",
    "rank_of",
    "scale_layers",
    "Fetch",
    "to_host",
    "fetch_counts",
    "to_host_lists",
]

Fetch = Callable[[Tensor], list]
"""Brings a 1-D integer tensor's values to the host as a list: the one place a method synchronises.

A method calls its ``fetch`` at most once per call. The default is ``Tensor.tolist``; a caller that
needs device values of its own (e.g. the vision stage's placeholder counts) passes a ``fetch`` that
brings them in the same transfer."""


def to_host(values: Tensor) -> list:
    """The default ``Fetch``: ``values.tolist()`` (one host synchronisation on an accelerator)."""
    return values.tolist()

@dataclass
class Reduction:
    """The output of a vision-stage token reduction, padded to the batch maximum.

    Attributes:
        tokens: [B, M, D], dtype of the input features. Sample b's output is
            ``tokens[b, :counts[b]]``; everything after ``counts[b]`` is zero.
        counts: [B] long, number of valid output tokens per sample (extra token included).
        indices: [B, M'] long, the patch index (0..N-1, [CLS] excluded) each centre token comes
            from, in output order, padded with -1. The extra token, if any, is a summary of many
            patches and has **no** patch index, so it is not in ``indices``: ``M' <= M`` and the
            number of indexed tokens of sample b is ``counts[b] - extra[b]``.
        extra: [B] bool or None. None when the method never appends an extra token; otherwise
            whether the last valid token of each sample (``tokens[b, counts[b] - 1]``) is the
            appended extra token.
        num_attention: [B] long or None. For PruMerge(+): how many of the centres were chosen by
            [CLS] attention (they come first in the default order); the other centres come from
            the spatial grid.
        host_counts: ``counts`` as a list of B ints on the host (the methods fill it from their
            one synchronisation, so callers need not read ``counts`` again), or None.
    """

    tokens: Tensor
    counts: Tensor
    indices: Tensor
    extra: Tensor | None = None
    num_attention: Tensor | None = None
    host_counts: list[int] | None = None

    @property
    def mask(self) -> Tensor:
        """[B, M] bool: True where ``tokens`` holds a valid token."""
        positions = torch.arange(self.tokens.shape[1], device=self.counts.device)
        return positions[None, :] < self.counts[:, None]

    @property
    def num_indexed(self) -> Tensor:
        """[B] long: number of tokens with a patch index (``counts`` minus the extra token)."""
        if self.extra is None:
            return self.counts
        return self.counts - self.extra.long()

    def unpad(self) -> list[Tensor]:
        """Per-sample list of [counts[b], D] tensors (convenience for callers; loops over B)."""
        counts = self.host_counts if self.host_counts is not None else self.counts.tolist()
        return [self.tokens[b, : int(c)] for b, c in enumerate(counts)]


# --------------------------------------------------------------------------- validation


def is_int(x: object) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """A real number (int or float) that is not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_tensor(x: object, name: str, ndim: int, what: str, *, floating: bool = True) -> Tensor:
    """Raise ValueError unless ``x`` is a tensor with ``ndim`` dims (``what`` names them), floating
    point unless ``floating=False``; returns ``x``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; "
            f"convert it with {name}.float()"
        )
    return x


def to_host_lists(tensors: list[Tensor]) -> list:
    """Several tensors (any shapes, dtypes, one device) -> their ``tolist()`` values, in one host
    transfer. The values travel as float64, exact for every integer below 2**53 and every float32 /
    bfloat16 / float16 value; integer and bool tensors come back as ints / bools."""
    if not tensors:
        return []
    dev = tensors[0].device
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors]).tolist()
    out, start = [], 0
    for t in tensors:
        vals = flat[start:start + t.numel()]
        start += t.numel()
        if t.dtype == torch.bool:
            vals = [v != 0 for v in vals]
        elif not t.is_floating_point():
            vals = [int(v) for v in vals]
        out.append(_nest(vals, tuple(t.shape)))
    return out


def _nest(vals: list, shape: tuple[int, ...]):
    """Flat values -> the nested lists ``tolist()`` gives for ``shape``."""
    if not shape:
        return vals[0]
    if len(shape) == 1:
        return vals
    step = math.prod(shape[1:])
    return [_nest(vals[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def fetch_counts(counts: Tensor, fetch: Fetch | None = None, *, finite: Tensor | None = None,
                 name: str = "cls_attn") -> list[int]:
    """counts [B] integer -> their values on the host, in one ``fetch``.

    ``finite``: a tensor that must hold no NaN / infinity (checked in the same transfer; raises
    ValueError naming it ``name``), so that a method checks its input and reads its counts with a
    single host synchronisation.
    """
    parts = [counts.reshape(-1).long()]
    if finite is not None:
        parts.append((~torch.isfinite(finite).all()).long().reshape(1))
    values = (fetch or to_host)(torch.cat(parts) if len(parts) > 1 else parts[0])
    if finite is not None and values[-1]:
        raise ValueError(
            f"{name} contains NaN or infinite values; pass finite scores "
            f"(check the upstream computation, e.g. an fp16 overflow)"
        )
    return [int(v) for v in values[: counts.numel()]]


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices`` (the message lists them)."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def resolve_budget(
    n: object, num_tokens: int, batch: int, device: torch.device, name: str = "n"
) -> Tensor:
    """Turn a budget into a [B] long tensor of counts in [1, N].

    ``n`` may be an int count in [1, N], a float ratio in (0, 1] (count = floor(ratio * N) as the
    official ``int(N * reduction_ratio)``, but tolerant to round-off so that a ratio of k / N
    gives k; it must give at least 1 token), or a [B] integer tensor of per-sample counts in
    [1, N].
    """
    hint = (
        f"pass an int count in [1, {num_tokens}], a float ratio in (0, 1], "
        f"or a [{batch}] integer tensor of per-sample counts"
    )
    if isinstance(n, Tensor):
        if n.is_floating_point() or n.dtype == torch.bool or n.is_complex():
            raise ValueError(f"{name} as a tensor must hold integer counts, got dtype {n.dtype}; {hint}")
        if n.ndim == 0:
            n = int(n)
        else:
            if tuple(n.shape) != (batch,):
                raise ValueError(f"{name} as a tensor must have shape [{batch}], got {tuple(n.shape)}; {hint}")
            lo, hi = torch.stack([n.min(), n.max()]).tolist()  # one host synchronisation
            if lo < 1 or hi > num_tokens:
                raise ValueError(
                    f"{name} holds counts in [{lo}, {hi}], outside [1, {num_tokens}] "
                    f"(N = {num_tokens} patches); {hint}"
                )
            return n.to(device=device, dtype=torch.long)
    if is_int(n):
        count = int(n)
        if count < 1:
            raise ValueError(f"{name} = {count} keeps no token; {hint}")
        if count > num_tokens:
            raise ValueError(f"{name} = {count} is more than the N = {num_tokens} patches; {hint}")
    elif is_real(n):
        ratio = float(n)
        if math.isnan(ratio):
            raise ValueError(f"{name} is NaN; {hint}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"{name} = {ratio} is not a ratio in (0, 1]; {hint}")
        count = int(math.floor(ratio * num_tokens + 1e-9))  # tolerant: (k / N) * N gives k
        if count < 1:
            raise ValueError(
                f"{name} = {ratio} keeps floor({ratio} * {num_tokens}) = 0 tokens; "
                f"pass a ratio of at least 1/{num_tokens} or an int count"
            )
    else:
        raise ValueError(f"{name} must be an int, a float or a tensor, got {type(n).__name__}; {hint}")
    return torch.full((batch,), count, dtype=torch.long, device=device)


def grid_shape(num_tokens: int, grid_size: object = None, name: str = "grid_size") -> tuple[int, int]:
    """(H, W) of the patch grid: ``grid_size`` (int side or (H, W)) or sqrt(N) when square.

    ``name`` is the argument's name in the error messages.
    """
    if grid_size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(
                f"N = {num_tokens} patches is not a square grid; pass {name}=(H, W) with "
                f"H * W == {num_tokens}"
            )
        return side, side
    if is_int(grid_size):
        h = w = int(grid_size)
    elif (
        isinstance(grid_size, (tuple, list))
        and len(grid_size) == 2
        and all(is_int(s) for s in grid_size)
    ):
        h, w = int(grid_size[0]), int(grid_size[1])
    else:
        raise ValueError(f"{name} must be an int or a pair of ints (H, W), got {grid_size!r}")
    if h < 1 or w < 1 or h * w != num_tokens:
        raise ValueError(
            f"{name} {(h, w)} does not match N = {num_tokens} patches; "
            f"pass (H, W) with H * W == {num_tokens}"
        )
    return h, w


# --------------------------------------------------------------------------- spatial layouts


def lattice_mask(target: Tensor, height: int, width: int) -> Tensor:
    """[B] target counts -> [B, H*W] bool mask of a centred r x c lattice with r*c ~ target.

    Per sample, r (rows) and c (columns) are chosen to make |r*c - target| smallest, then the
    aspect r/c closest to H/W, then the fewest rows. Row i of r sits at floor((i + 1/2) H / r),
    column j of c at floor((j + 1/2) W / c): evenly spaced, centred, all distinct. A target of 0
    gives an empty mask. Flattened in raster order (index = row * W + col).
    """
    device = target.device
    batch = target.shape[0]
    # float32 is exact here: every value is an integer below (H W)^2 or a ratio of two of them
    t = target.clamp(0, height * width).to(torch.float32)[:, None]  # [B, 1]
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)[None, :]  # [1, H]
    cols = torch.clamp(torch.floor(t / rows + 0.5), 1, width)  # [B, H]: best c for each r
    miss = (rows * cols - t).abs()  # [B, H], integer-valued
    # aspect mismatch >= 1, symmetric in (r/c) vs (H/W) and exact on ties: max/min of r W, c H
    rw, ch = rows * width, cols * height
    aspect = torch.maximum(rw, ch) / torch.minimum(rw, ch)  # in [1, max(H, W)^2]
    best = miss == miss.min(dim=1, keepdim=True).values  # [B, H] the closest counts
    pick = torch.where(best, aspect, torch.inf).argmin(dim=1)  # [B], first minimum = fewest rows
    r = pick + 1  # [B]
    c = cols.gather(1, pick[:, None])[:, 0].long()  # [B]

    def axis_mask(n_sel: Tensor, size: int) -> Tensor:
        i = torch.arange(size, device=device)[None, :]  # [1, size]
        pos = ((2 * i + 1) * size) // (2 * n_sel[:, None])  # [B, size]
        pos = torch.where(i < n_sel[:, None], pos, size)  # invalid slots -> dump column
        out = torch.zeros(batch, size + 1, dtype=torch.bool, device=device)
        out.scatter_(1, pos, True)
        return out[:, :size]  # [B, size]

    mask = axis_mask(r, height)[:, :, None] & axis_mask(c, width)[:, None, :]  # [B, H, W]
    mask = mask.reshape(batch, height * width)
    return mask & (target > 0)[:, None]


def spread_priority(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """[H*W] long rank of every patch in a coarse-to-fine 2-D order (bit-reversed Morton code).

    Taking patches in increasing rank gives a well spread 2-D set at every prefix (the first 4^j
    ranks of a 2^b x 2^b grid form a regular lattice); used to fill a fixed budget exactly.
    """
    bits = max(1, math.ceil(math.log2(max(height, width))))
    hh = torch.arange(height, device=device)[:, None].expand(height, width).reshape(-1)
    ww = torch.arange(width, device=device)[None, :].expand(height, width).reshape(-1)
    code = torch.zeros_like(hh)
    for b in range(bits):  # interleave bits, h above w: Morton code of 2*bits bits
        code |= ((hh >> b) & 1) << (2 * b + 1)
        code |= ((ww >> b) & 1) << (2 * b)
    rev = torch.zeros_like(code)
    for b in range(2 * bits):  # reverse the 2*bits bits
        rev |= ((code >> b) & 1) << (2 * bits - 1 - b)
    return rank_of(torch.argsort(rev))  # rev values are distinct


def rank_of(order: Tensor) -> Tensor:
    """A permutation along the last dim (``order[..., i]`` = the item at position i, e.g. a sort's
    indices) -> [..., N] long, the position of each item (the inverse permutation)."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def scale_layers(layers: tuple[int, ...] | list[int], num_layers: int, reference: int, *, ties: str = "even",
                 collide: str = "shift") -> list[int]:
    """Decoder-layer indices of a ``reference``-layer model mapped to a ``num_layers``-layer one.

    The number of layers that run up to and including layer l scales proportionally:
    ``l' = round((l + 1) * num_layers / reference) - 1``, rounded half to even (``ties="even"``,
    Python's ``round``) or half up (``"up"``), then kept in [0, num_layers - 2] (a layer with
    none after it is never a pruning layer) and strictly increasing: ``collide="shift"`` moves a
    colliding layer later and leaves room for the layers still to come (every layer is kept; the
    caller checks that ``len(layers) <= num_layers - 1``), ``"drop"`` drops it. ``layers`` are
    taken in increasing order.
    """
    check_choice(ties, "ties", ("even", "up"))
    check_choice(collide, "collide", ("shift", "drop"))
    out: list[int] = []
    layers = sorted(layers)
    for i, l in enumerate(layers):
        x = (l + 1) * num_layers / reference
        before = int(round(x)) if ties == "even" else int(math.floor(x + 0.5))
        layer = min(max(before - 1, 0), num_layers - 2)
        if collide == "shift":
            layer = max(layer, out[-1] + 1 if out else 0)
            layer = min(layer, num_layers - 1 - (len(layers) - i))  # leave room for the remaining layers
        elif out and layer <= out[-1]:
            continue
        out.append(layer)
    return out


# --------------------------------------------------------------------------- packing


def order_chosen(key: Tensor, chosen: Tensor, span: int | None = None, *,
                 width: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Chosen patches of every sample, sorted by ``key``, padded to the batch maximum.

    ``key`` [B, N] integer (lower comes first), ``chosen`` [B, N] bool; ``span``: an upper bound
    of ``key.max() - key.min() + 1`` when the caller knows one, ``width``: max(counts) when the
    caller has it on the host (each saves a host synchronisation).
    Returns ``(idx, valid, counts)``: idx [B, M] long patch indices in output order (padding slots
    hold arbitrary but in-range indices), valid [B, M] bool, counts [B] long, M = max(counts).
    """
    counts = chosen.sum(dim=1)  # [B]
    m = int(counts.max()) if width is None else width
    if span is None:
        span = int(key.max() - key.min()) + 1
    shifted = torch.where(chosen, key, key + span)  # every unchosen key sorts after every chosen
    idx = torch.argsort(shifted, dim=1, stable=True)[:, :m]  # [B, M]
    valid = torch.arange(m, device=key.device)[None, :] < counts[:, None]  # [B, M]
    return idx, valid, counts


def topk_indices(x: Tensor, k: int, *, block: int = 4) -> Tensor:
    """Indices of the k largest entries along the last dim of x [..., N] -> [..., k], unordered.

    The same set as ``x.topk(k, dim=-1).indices`` except where values tie at the k-th place (which
    of the tied entries is taken is arbitrary in both). Two stages, cheaper than one ``topk`` over
    N on CPU: the N entries are cut into N / block blocks, the k blocks with the largest maxima
    are kept (every top-k entry lies in one of them: if m is the k-th largest block maximum, at
    least k entries are >= m, so the k-th largest entry is >= m and any entry above it sits in a
    block whose maximum is >= m), and the top k of their k * block entries are taken. Falls back
    to one ``topk`` when N is not a multiple of ``block`` or the blocks would not shrink the search.
    """
    n = x.shape[-1]
    if k <= 0:
        return x.new_zeros((*x.shape[:-1], 0), dtype=torch.long)
    if block < 2 or n % block or 2 * k * block > n:
        return x.topk(k, dim=-1, sorted=False).indices
    lead = x.shape[:-1]
    block_max = F.max_pool1d(x.reshape(-1, 1, n), block).view(*lead, n // block)  # [..., N/b]
    top_blocks = block_max.topk(k, dim=-1, sorted=False).indices  # [..., k]
    cand = (top_blocks[..., None] * block + torch.arange(block, device=x.device)).reshape(*lead, k * block)
    pick = x.gather(-1, cand).topk(k, dim=-1, sorted=False).indices  # [..., k] into cand
    return cand.gather(-1, pick)


def pack_mask(mask: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """[B, L] bool -> (columns [B, R] long, valid [B, R] bool): each row's True columns in order,
    then padding (column 0, not valid). R = the largest row count (at least 1): ``width``, when the
    caller has that count on the host (no host synchronisation), else read from ``mask``."""
    n = mask.sum(1)
    if width is None:
        width = int(n.max()) if mask.numel() else 0
    width = max(width, 1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < n[:, None]
    return torch.where(valid, order, 0), valid


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, N, D], idx [B, M] (values in [0, N)) -> [B, M, D], rows of x picked per sample."""
    batch, num_tokens, dim = x.shape
    flat = idx + torch.arange(batch, device=idx.device)[:, None] * num_tokens  # [B, M] rows of x.view(B*N, D)
    return x.reshape(batch * num_tokens, dim).index_select(0, flat.reshape(-1)).view(batch, -1, dim)


def select_chosen(features: Tensor, key: Tensor, chosen: Tensor, span: int, fetch: Fetch | None = None, *,
                  finite: Tensor | None = None) -> Reduction:
    """Reduction holding the ``chosen`` [B, N] rows of ``features`` [B, N, D] unchanged, in ``key``
    order (no merge, no extra token); one ``fetch`` for the counts (and ``finite``'s check)."""
    counts = chosen.sum(dim=1)  # [B]
    host = fetch_counts(counts, fetch, finite=finite)
    idx, valid, counts = order_chosen(key, chosen, span, width=max(host))
    red = pack_selection(features, idx, valid, counts)
    red.host_counts = host
    return red


def pack_selection(features: Tensor, idx: Tensor, valid: Tensor, counts: Tensor) -> Reduction:
    """Reduction holding the selected rows of ``features`` unchanged (no merge, no extra token)."""
    tokens = gather_rows(features, idx).masked_fill(~valid[:, :, None], 0)  # [B, M, D]
    indices = torch.where(valid, idx, torch.full_like(idx, -1))
    return Reduction(tokens=tokens, counts=counts, indices=indices, extra=None)

"""Vision-stage plumbing: reduce each image's visual tokens before the LLM, keep the model's API.

Two things are installed on the model (both undone by ``handle.remove()``): the base model's
``get_image_features`` is shadowed by an instance attribute, and the user's model gets a forward
pre-hook. Nothing else is patched; the attention implementation (sdpa) is never touched.

**Modalities.** The adapter lists one view per visual modality (``adapter.modality_views``: images,
and videos for families that take them), each naming its features method (``get_image_features``
/ ``get_video_features``), its ``mm_encoder_outputs`` key, its pixels keyword and placeholder
token. Every view's features method is shadowed the same way and the pre-hook encodes whichever
pixels a forward carries; a prefill with images and videos is rewritten by one plan (the columns
each modality keeps, intersected). A video counts as one "image" of its view's layout, its frames
or temporal slices being the units. Stats record one entry per encoding (a batch with images
and videos records its images, then its videos).

**Encoding images** (``get_image_features``, which ``generate()`` calls before the prefill and a
plain forward reaches through the pre-hook; videos alike through their view):

0. The family's adapter says what the images are (``adapter.image_layout``: a
   ``layout.VisualLayout`` of U tower passes — one per image for LLaVA-1.5, base image + crops for
   LLaVA-NeXT — each with its grid, [CLS] flag and index, and each image's placeholder count).
1. The vision tower runs once over the U units (its own attention implementation). If the method
   needs [CLS] signals, the adapter computes them (``adapter.encode_with_signals``; a family
   without [CLS] supplies a documented substitute, ``adapter.importance_score``). By default
   forward hooks on the *last* encoder layer's ``q_proj`` / ``k_proj`` are
   registered for the duration of this call only: they keep the [CLS] query row (at the
   adapter's ``cls_index``) and ``k`` (all keys), raw linear outputs [U, 1+N, C]. Spec §1: that
   layer's input is the penultimate hidden state, i.e. the very features LLaVA feeds the
   projector, and its keys are what the official PruMerge code uses. Only the [CLS] row of the attention is computed (``cls_attention``).
2. The method reduces the features [U, N, D] to a padded ``Reduction`` (tokens [U, M, D], counts
   [U]); units of different grids (dynamic-resolution families) are reduced group by group, one
   call per grid, and the groups' results padded into one ``Reduction``. The projector runs on
   the reduced tokens only.
3. The adapter packs the units into the stock layout (``adapter.pack``), one [n_i, D_text]
   tensor per image (n_i its unpruned placeholder count) whose finite rows are the kept tokens
   and whose all-NaN rows are dropped slots: the kept rows are either the first ``counts[i]``
   (the kept tokens take the first placeholders, LLaVA's rule) or, for a family whose tokens
   keep their own positions, the rows of their own placeholder slots. The padding is
   self-describing: it survives what
   ``generate()`` does to pre-encoded features (beam expansion by placeholder counting, device
   moves, re-use at every step without cache), and NaN can never be consumed silently.

**Prefill** (a forward whose ``mm_encoder_outputs`` carry such features; ``pixel_values`` are
first encoded as above): image i's placeholder run (n_i copies of ``image_token_id`` in
``input_ids``, found with ``adapter.sequence_layout``) keeps the slots of its finite rows; the
other slots are deleted. Every sample is compacted and re-padded **on the left** to the new batch
width L' = max_b(kept length), so every image keeps its own count. ``attention_mask`` (0 on the new pads), ``position_ids`` (original
position minus the number of slots deleted before it, so the survivors are consecutive, as
LLaVA-PruMerge feeds them; a family with ``compact_positions`` False instead keeps every
survivor's original positions, in its own form, e.g. M-RoPE [3, B, L], computed on the unpruned
prompt by ``adapter.prompt_positions`` when the caller passed none), the adapter's other per-token
inputs (``adapter.sequence_inputs``, e.g. Qwen2-VL's ``mm_token_type_ids``) and ``labels`` (-100 on
new pads) are rewritten the same way, the NaN
rows are sliced off, and the stock forward scatters the kept tokens into the kept placeholders.
Logits therefore have the rewritten length L'. The rewrite is remembered as a ``Plan`` on the
handle until the next prefill.

**Later calls** (no image features, a non-empty KV cache): the caller keeps speaking in its
*original* coordinates, as ``generate()`` does — it extends the original ``attention_mask`` by one
column per token and derives ``position_ids`` from it. The hook translates: the mask's prompt
columns are compacted with the plan (the appended columns are kept), and ``position_ids`` are
shifted down by the sample's deleted count (families with ``compact_positions`` False keep them:
decoding continues after the unpruned prompt's positions). A mask that already has the cache's length (the
caller used the rewritten mask) passes unchanged. If ``generate`` dropped an all-ones mask, the
hook rebuilds the rewritten one so the new left pads stay masked. So ``generate()`` works
unchanged — greedy, sampling, beams, with or without cache (without cache every step is a
prefill with the same pre-encoded features) — and returns sequences in the original
coordinates (the original prompt followed by the new tokens).

A call without images on an empty cache is a text-only prefill: the plan is dropped. Static /
compiled caches (4-D masks built by ``generate``) are not supported with an active plan and raise.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..methods.common import Fetch, Reduction, to_host_lists
from ..methods.prumerge import cls_attention
from .base import ModelAdapter, PruneHandle, in_phase
from .compat import K, get_cache
from .layout import VisualLayout

__all__ = ["VisionSignals", "VisionMethod", "VisionHandle", "Plan", "attach", "capture_signals", "signals_from_qk",
           "image_token_counts", "image_token_slots"]


# ------------------------------------------------------------------------------ method protocol


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


# ------------------------------------------------------------------------------ signal capture


@contextmanager
def capture_signals(adapter: ModelAdapter, model: Any) -> Iterator[dict[str, Tensor]]:
    """Forward hooks on the last vision layer's q_proj / k_proj, active inside the ``with``.

    Yields a dict that receives ``"q_cls"`` [U, 1, C] (the [CLS] query row only, at the adapter's
    ``cls_index``) and ``"k"`` [U, 1+N, C] (all keys): raw linear outputs, bias included, before
    the 1/sqrt(d) scaling.
    """
    q_proj, k_proj = adapter.get_last_qk(model)
    store: dict[str, Tensor] = {}
    ci = adapter.cls_index

    def on_q(_module: Any, _inp: Any, out: Tensor) -> None:
        store["q_cls"] = out[:, ci:ci + 1].detach()  # [U, 1, C]

    def on_k(_module: Any, _inp: Any, out: Tensor) -> None:
        store["k"] = out.detach()  # [U, 1+N, C]

    hooks = [q_proj.register_forward_hook(on_q), k_proj.register_forward_hook(on_k)]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def signals_from_qk(q_cls: Tensor, k: Tensor, cls_index: int = 0) -> VisionSignals:
    """q_cls [U, 1, C], k [U, 1+N, C] with the [CLS] key at ``cls_index`` -> VisionSignals
    (cls_attn [U, N] float32, keys [U, N, C], both without the [CLS] column)."""
    if cls_index:  # move [CLS] to the front: cls_attention expects it at index 0
        order = [cls_index] + [j for j in range(k.shape[1]) if j != cls_index]
        k = k[:, order]
    q = q_cls.expand_as(k)  # a view: cls_attention reads row 0 only
    return VisionSignals(cls_attn=cls_attention(q, k), keys=k[:, 1:])


# ------------------------------------------------------------------------------ the rewrite


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


# ------------------------------------------------------------------------------ the handle


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


class _BatchedFetch:
    """A ``Fetch`` that brings ``pending`` device values (name -> 1-D integer tensor) to the host in
    the same transfer as the first values it is asked for; later calls transfer on their own.
    ``values[name]`` holds the pending values once fetched."""

    def __init__(self, pending: dict[str, Tensor] | None = None) -> None:
        self.pending = dict(pending or {})
        self.values: dict[str, list[int]] = {}

    def __call__(self, values: Tensor) -> list:
        if not self.pending:
            return values.tolist()
        names = list(self.pending)
        parts = [values.reshape(-1).long()] + [self.pending[k].reshape(-1).long().to(values.device) for k in names]
        flat = torch.cat(parts).tolist()
        start = values.numel()
        for k in names:
            n = self.pending[k].numel()
            self.values[k] = flat[start:start + n]
            start += n
        self.pending = {}
        return flat[:values.numel()]


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


class VisionHandle(PruneHandle):
    """Handle of a vision-stage pruning. Besides the base API it exposes, for inspection:

    ``last_reduction`` (the method's ``Reduction`` of the last encoding: per-unit counts, kept
    patch ``indices``; ``last_reductions[modality]`` the last one of each modality), ``plan`` (the
    last rewrite of a batch, see ``Plan``).
    """

    def __init__(self, model: Any, adapter: ModelAdapter, method: str, method_obj: VisionMethod) -> None:
        super().__init__(model, adapter, method, method_obj, stage="vision")
        self.plan: Plan | None = None
        self.last_reduction: Reduction | None = None
        #: The method's ``Reduction`` of the last encoding of each modality (``"image"``, ``"video"``).
        self.last_reductions: dict[str, Reduction] = {}
        # per modality: (tensor, kept count, kept slots or None) of its last encoding (see image_token_slots)
        self._issued: dict[str, list[tuple[weakref.ref, int, Tensor | None]]] = {}
        self.grid = adapter.patch_grid(model)
        self.stats.tokens_per_image = adapter.fixed_image_tokens(model)
        self._signature = inspect.signature(model.forward)
        self._base = adapter.base_model(model)
        #: One adapter view per visual modality (images first; ``adapter.modality_views``).
        self._views = adapter.modality_views(model)
        self._stock_encode = getattr(self._base, adapter.image_features_method)
        #: this forward's fetch: carries each modality's placeholders per row into the encoding's transfer
        self._fetch: _BatchedFetch | None = None

    def _install(self) -> None:
        for view in self._views:
            self._shadow(view)
        self.add_hook(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))

    def _shadow(self, view: ModelAdapter) -> None:
        """Shadow the base model's ``view.image_features_method`` with the reducing encoder."""
        base, name = self._base, view.image_features_method
        missing = object()
        previous = vars(base).get(name, missing)
        stock = getattr(base, name)
        stock_signature = inspect.signature(stock)

        def encode(*args: Any, **kwargs: Any) -> Any:
            kw = _as_kwargs(stock_signature, args, kwargs)
            if view.pixel_values_field != K.PIXEL_VALUES:
                kw[K.PIXEL_VALUES] = kw.pop(view.pixel_values_field)
            return self._encode_images(view=view, **kw)

        functools.update_wrapper(encode, stock)  # same name, doc and signature as the stock method
        setattr(base, name, encode)  # instance attribute shadows the class method; generate() finds it too

        def restore() -> None:
            if previous is missing:
                if vars(base).get(name) is encode:
                    delattr(base, name)
            else:
                setattr(base, name, previous)

        self.add_undo(restore)

    # ---------------------------------------------------------------- image encoding
    @in_phase("prefill")
    def _encode_images(self, pixel_values: Tensor, vision_feature_layer: int | list[int] | None = None,
                       vision_feature_select_strategy: str | None = None, image_sizes: Tensor | None = None,
                       view: ModelAdapter | None = None, **kwargs: Any) -> Any:
        """Replaces ``get_image_features``: pixel_values (the family's form; [I, 3, H, W] for
        LLaVA-1.5) -> reduced, projected tokens.

        Returns the family's output type whose ``pooler_output`` is a list of I tensors
        [n_i, D_text], n_i = placeholders of image i; image i's kept tokens are the first
        ``counts[i]`` rows and the rest are NaN (never consumed: the forward hook slices them
        off; were they ever fed to the LLM, the output would be NaN, not silently wrong).
        NaN padding survives whatever ``generate()`` does to the features (beam expansion,
        device moves) and tells the forward hook each image's count.

        ``view`` is the modality's adapter view (``adapter.modality_views``; default the images'):
        a video is one "image" whose units are its frames.
        """
        model, method = self.model, self.method_obj
        adapter = self.adapter if view is None else view
        layer = adapter.vision_feature_layer(model) if vision_feature_layer is None else vision_feature_layer
        strategy = (adapter.select_strategy(model) if vision_feature_select_strategy is None
                    else vision_feature_select_strategy)
        if method.needs_signals and (problem := adapter.signal_problem(model, strategy)):
            raise ValueError(f"method {self.method!r} cannot run on this model: {problem}")

        # 0. what the images are: U tower passes, each image's placeholder count (the family's
        #    geometry keywords, e.g. Qwen2-VL's image_grid_thw, go to the adapter)
        geometry = {name: kwargs[name] for name in adapter.image_geometry if kwargs.get(name) is not None}
        layout = adapter.image_layout(model, pixel_values, image_sizes, strategy, **geometry)
        grids = layout.grids()

        # 1. vision tower (+ signal hooks only if the method needs them) -> features [U, N, D]
        #    (N the largest unit's tokens when the grids differ; unit u's first h_u * w_u are real)
        if method.needs_signals:
            with self.phase("score"):
                features, signals = adapter.encode_with_signals(model, pixel_values, layer, strategy, layout)
        else:
            features = adapter.encode(model, pixel_values, layer, strategy, layout)
            signals = None
        per_unit = features.shape[1]
        if method.needs_grid and len(set(grids)) == 1 and per_unit != grids[0][0] * grids[0][1]:
            raise ValueError(f"method {self.method!r} needs the {grids[0][0]}x{grids[0][1]} patch grid, but the "
                             f"tower gives {per_unit} tokens per pass (select strategy {strategy!r})")

        # 2. reduce (one call per grid), then project the kept tokens only; 3. the adapter packs them
        fetch = self._fetch or _BatchedFetch()
        with self.phase("select"):
            red = _reduce_by_grid(method, features, signals, grids, fetch)  # tokens [U, M, D], counts [U]
        projected = adapter.project_kept(model, red.tokens, layout)  # [U, M, D_text]
        # the encoding's one host synchronisation (made by the method; it brings the rows' placeholder counts too)
        counts = red.host_counts if red.host_counts is not None else [int(c) for c in fetch(red.counts)]
        per_image_out, counts, slots = adapter.pack_slots(model, projected, red, counts, layout)

        self.last_reduction = self.last_reductions[adapter.image_modality] = red
        self.stats.record(counts, list(layout.tokens_per_image))
        self._issued[adapter.image_modality] = [(weakref.ref(t), c, sl)
                                                for t, c, sl in zip(per_image_out, counts, slots)]
        out = adapter.image_output(per_image_out)
        return out if kwargs.get(K.RETURN_DICT, True) is not False else out.to_tuple()

    # ---------------------------------------------------------------- forward hook
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = _as_kwargs(self._signature, args, kwargs)
        mm = dict(kw.get(K.MM_ENCODER_OUTPUTS) or {})
        encoded = False
        input_ids = kw.get(K.INPUT_IDS)
        with_pixels = [view for view in self._views if any(kw.get(f) is not None for f in
                                                           (view.pixel_values_field, *view.pixel_values_aliases))]
        self._fetch = _BatchedFetch({  # each modality's placeholders per row, to bring with the counts
            view.image_modality: view.sequence_layout(self.model, input_ids, VisualLayout()).visual.sum(dim=1)
            for view in with_pixels if input_ids is not None})
        for view in self._views:  # encode each modality's pixels with the reducing encoder
            fields = (view.pixel_values_field, *view.pixel_values_aliases)
            pixels = next((kw[f] for f in fields if kw.get(f) is not None), None)
            if pixels is None:
                continue
            for f in fields[1:]:
                kw.pop(f, None)
            if mm.get(view.image_modality) is not None:
                raise ValueError(f"pass either {view.pixel_values_field} or mm_encoder_outputs, not both")
            mm[view.image_modality] = getattr(self._base, view.image_features_method)(**{
                view.pixel_values_field: pixels, K.FEATURE_LAYER: kw.get(K.FEATURE_LAYER),
                K.SELECT_STRATEGY: kw.get(K.SELECT_STRATEGY), K.IMAGE_SIZES: kw.get(K.IMAGE_SIZES),
                **{name: kw.get(name) for name in view.image_geometry}, K.RETURN_DICT: True})
            kw[view.pixel_values_field] = None
            encoded = True
        if encoded:
            kw[K.MM_ENCODER_OUTPUTS] = mm
        features = {view.image_modality: view.image_tokens(mm[view.image_modality])
                    for view in self._views if mm.get(view.image_modality) is not None}
        features = {key: t for key, t in features.items() if t is not None}
        rows = self._fetch.values if encoded else {}  # placeholders per row, fetched with the counts
        self._fetch = None
        if features:
            return (), self._prefill(kw, features, rows)
        return (), self._continue(kw)

    # ---------------------------------------------------------------- prefill
    @in_phase("prefill")
    @in_phase("gather")
    def _prefill(self, kw: dict[str, Any], features: dict[str, list[Tensor]],
                 rows: dict[str, list[int]] | None = None) -> dict[str, Any]:
        """Rewrite a batch whose visual features are in ``features`` (modality key -> I tensors
        [n_i, D]); every modality's placeholders are compacted by one plan. ``rows``: each
        modality's placeholders per row on the host, when known (then no host synchronisation)."""
        adapter, model = self.adapter, self.model
        input_ids = kw.get(K.INPUT_IDS)
        rows = rows or {}
        keep, kept_rows = None, {}
        todo = []  # (view, per-image features, kept counts, kept slots, runs) of each pruned modality
        for view in self._views:
            key = view.image_modality
            if key not in features:
                continue
            per_image = features[key]
            known = self._known_counts(key, per_image)
            if known is None:  # features this handle did not produce as they are (e.g. beam-expanded copies)
                counts, slots = image_token_slots(per_image)
            else:
                counts, slots = known
            runs = [t.shape[0] for t in per_image]
            if counts == runs:  # nothing pruned (e.g. pre-encoded stock features): the stock path
                continue
            if input_ids is None:
                raise ValueError(f"vlmprune ({self.method}): a pruned model needs input_ids with the image "
                                 "placeholder tokens (inputs_embeds alone are not supported)")
            todo.append((view, per_image, counts, slots, runs))
        missing = [view for view, *_ in todo if view.image_modality not in rows]
        if missing:  # e.g. generate() encoded the images before the prompt was seen: one transfer for all
            host = to_host_lists([view.sequence_layout(model, input_ids, VisualLayout()).visual.sum(dim=1)
                                  for view in missing])
            rows = {**rows, **{view.image_modality: r for view, r in zip(missing, host)}}
        removed: list[int] | None = [0] * input_ids.shape[0] if todo else None
        for view, per_image, counts, slots, runs in todo:
            key = view.image_modality
            keep_view = self._keep_columns(view, input_ids, runs, counts, slots, rows[key])
            keep = keep_view if keep is None else keep & keep_view
            lost = _removed_per_row(rows[key], runs, counts)
            removed = None if lost is None or removed is None else [a + b for a, b in zip(removed, lost)]
            kept_rows[key] = (per_image, counts, slots)
        if keep is None:
            self.plan = None
            return kw
        original, kw = kw, dict(kw)
        past = _cache_len(get_cache(kw))
        mask = kw.get(K.ATTENTION_MASK)
        if mask is not None and mask.ndim != 2:
            raise ValueError("vision-stage pruning needs a 2-D attention_mask [B, L] (or none); static/compiled "
                             "caches, which make generate() build 4-D masks, are not supported")
        prefix = None
        if mask is not None and mask.shape[1] != past + input_ids.shape[1]:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns for {past} cached + {input_ids.shape[1]} new "
                             "tokens; continuing a cache that already holds a pruned prompt (multi-turn) is not "
                             "supported: pass the mask in the cache's coordinates or start a new cache")
        if mask is not None and past:
            prefix, mask = mask[:, :past], mask[:, past:]  # continuing a cache: rewrite only the new part
        kept_len = None if removed is None else [input_ids.shape[1] - r for r in removed]
        plan = make_plan(keep, mask, offset=past if prefix is not None else 0,
                         new_len=None if kept_len is None else max(kept_len))
        kw[K.INPUT_IDS] = plan.compact(input_ids, _pad_id(model, adapter))
        if mask is not None or (len(set(kept_len)) > 1 if kept_len is not None else bool(plan.new_mask.eq(0).any())):
            kw[K.ATTENTION_MASK] = plan.new_mask if prefix is None else torch.cat([prefix, plan.new_mask], dim=1)
        pos = kw.get(K.POSITION_IDS)
        if adapter.compact_positions:  # survivors get consecutive positions
            if pos is not None:
                if pos.ndim != 2:
                    raise ValueError("vision-stage pruning supports 2-D position_ids [B, L] only")
                dropped_before = (~keep).long().cumsum(dim=1)  # [B, L] slots deleted up to each slot
                kw[K.POSITION_IDS] = plan.compact((pos - dropped_before).clamp(min=0), 0)
        else:  # survivors keep their own positions, in the family's form
            if pos is None:
                pos = adapter.prompt_positions(model, original)
            if pos is not None:
                kw[K.POSITION_IDS] = plan.compact_positions(pos)
        for name in adapter.sequence_inputs:  # the family's other per-token inputs
            if kw.get(name) is not None:
                kw[name] = plan.compact(kw[name], 0)
        if kw.get(K.LABELS) is not None:
            kw[K.LABELS] = plan.compact(kw[K.LABELS], -100)
        mm = dict(kw[K.MM_ENCODER_OUTPUTS])  # new objects: generate() may pass the same features again
        for view in self._views:
            if view.image_modality in kept_rows:
                per_image, counts, slots = kept_rows[view.image_modality]
                mm[view.image_modality] = view.image_output(
                    [t[:c] if sl is None else t.index_select(0, sl.to(t.device))
                     for t, c, sl in zip(per_image, counts, slots)])
        kw[K.MM_ENCODER_OUTPUTS] = mm
        adapter.after_rewrite(model, plan, pos)
        self.plan = plan
        return kw

    def _keep_columns(self, view: ModelAdapter, input_ids: Tensor, runs: list[int], counts: list[int],
                      slots: list[Tensor | None], rows: list[int] | None = None) -> Tensor:
        """[B, L] bool: the columns that survive ``view``'s reduction (every column that is not one
        of its placeholders, and the kept slots of each of its images' runs). ``rows``: the
        placeholders per row on the host, when known (else counted on the device)."""
        seq = view.sequence_layout(self.model, input_ids, VisualLayout(tokens_per_image=tuple(runs)))
        ph, img, rank = seq.visual, seq.image, seq.rank  # [B, L] each
        n_ph = sum(rows) if rows is not None else int(ph.sum())
        if n_ph != sum(runs):
            raise ValueError(f"{view.image_modality.capitalize()} features and {view.image_modality} tokens do not "
                             f"match: {n_ph} placeholder tokens in input_ids for {len(runs)} {view.image_modality}(s) "
                             f"of {runs[0] if len(set(runs)) == 1 else runs} tokens")
        dev = input_ids.device
        if all(sl is None for sl in slots):  # each image keeps its first counts[i] slots
            return ~ph | (rank < torch.tensor(counts, device=dev)[img])  # [B, L]
        # some images keep their tokens' own slots: kept [I, n_max], looked up per placeholder
        kept = torch.zeros(len(runs), max(runs), dtype=torch.bool, device=dev)
        for i, (c, sl) in enumerate(zip(counts, slots)):
            if sl is None:
                kept[i, :c] = True
            else:
                kept[i, sl.to(dev)] = True
        return ~ph | kept[img, rank.clamp(0, max(runs) - 1)]  # [B, L]

    def _known_counts(self, key: str, per_image: list[Tensor]) -> tuple[list[int], list[Tensor | None]] | None:
        """Each image's (kept count, kept slots) when ``per_image`` are exactly the tensors the
        last encoding of modality ``key`` returned (what ``generate`` passes on), without reading
        them; else None."""
        issued = self._issued.get(key, [])
        if len(issued) != len(per_image):
            return None
        for (ref, _, _), t in zip(issued, per_image):
            if ref() is not t:
                return None
        return [c for _, c, _ in issued], [sl for _, _, sl in issued]

    # ---------------------------------------------------------------- decode steps
    @in_phase("decode")
    def _continue(self, kw: dict[str, Any]) -> dict[str, Any]:
        past = _cache_len(get_cache(kw))
        plan = self.plan
        if past == 0:
            self.plan = None  # a new, text-only prefill
            return kw
        if plan is None:
            return kw
        ids = kw.get(K.INPUT_IDS)
        ref = ids if ids is not None else kw.get(K.INPUTS_EMBEDS)
        if ref is None or ref.shape[0] != plan.keep.shape[0]:
            return kw  # not a continuation of the planned batch
        q = ref.shape[1]
        mask = kw.get(K.ATTENTION_MASK)
        kw = dict(kw)
        off, L = plan.offset, plan.orig_len
        if mask is None:
            if bool(plan.new_mask.eq(0).any()):  # e.g. generate() dropped an all-ones mask
                ones = plan.new_mask.new_ones
                kw[K.ATTENTION_MASK] = torch.cat([ones(plan.new_mask.shape[0], off), plan.new_mask,
                                                  ones(plan.new_mask.shape[0], past + q - off - plan.new_len)], dim=1)
        elif mask.ndim != 2:
            raise ValueError("vision-stage pruning keeps a rewritten prompt; static/compiled caches (4-D masks) are "
                             "not supported: use the default dynamic cache")
        elif mask.shape[1] == past + q + plan.shrink and not self._already_rewritten(mask):
            kw[K.ATTENTION_MASK] = torch.cat([mask[:, :off], plan.compact(mask[:, off:off + L], 0), mask[:, off + L:]],
                                             dim=1)
        elif mask.shape[1] == past + q:
            return kw  # the caller already speaks rewritten coordinates
        else:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns; with {past} cached and {q} new tokens it "
                             f"should have {past + q + plan.shrink} (original coordinates) or {past + q} "
                             "(rewritten coordinates)")
        pos = kw.get(K.POSITION_IDS)
        if pos is not None and pos.ndim == 2 and self.adapter.compact_positions:
            kw[K.POSITION_IDS] = (pos - plan.dropped.to(pos.device)[:, None]).clamp(min=0)
        return kw

    def _already_rewritten(self, mask: Tensor) -> bool:
        """With L == L' lengths cannot tell the coordinates apart: compare with the stored masks."""
        plan = self.plan
        if plan.shrink or plan.orig_mask is None:
            return False
        head = mask[:, plan.offset:plan.offset + plan.orig_len]
        return not torch.equal(head, plan.orig_mask.to(head)) and torch.equal(head, plan.new_mask.to(head))


def _reduce_by_grid(method: VisionMethod, features: Tensor, signals: VisionSignals | None,
                    grids: list[tuple[int, int]], fetch: Fetch | None = None) -> Reduction:
    """features [U, N, D] (unit u's first h_u * w_u rows real) -> one padded ``Reduction`` [U, M, D].

    One ``method.reduce`` call when every unit has the same grid (features passed as they are);
    otherwise one call per distinct grid on its units' real rows, and the groups' outputs padded
    to the widest (tokens 0, indices -1) in unit order.
    """
    if len(set(grids)) == 1:
        return method.reduce(features, signals, grids[0], fetch)
    groups: dict[tuple[int, int], list[int]] = {}
    for u, g in enumerate(grids):
        groups.setdefault(g, []).append(u)
    dev = features.device
    parts = []
    for grid, units in groups.items():
        n = grid[0] * grid[1]
        idx = torch.tensor(units, device=dev)
        sig = None if signals is None else VisionSignals(cls_attn=signals.cls_attn[idx, :n], keys=signals.keys[idx, :n])
        parts.append((idx, method.reduce(features[idx, :n], sig, grid, fetch)))
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


def _as_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's positional arguments, bound with ``signature``, -> keyword arguments."""
    if not args:
        return dict(kwargs)
    bound = signature.bind_partial(*args, **kwargs)
    kw: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            kw.update(value)
        else:
            kw[name] = value
    return kw


def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple cache


def _pad_id(model: Any, adapter: ModelAdapter) -> int:
    for cfg in (getattr(model, "generation_config", None), adapter.config(model), adapter.text_config(model)):
        pad = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(pad, int):
            return pad
    return 0


# ------------------------------------------------------------------------------ attach


def attach(model: Any, adapter: ModelAdapter, info: Any, method_obj: VisionMethod) -> VisionHandle:
    """Install ``method_obj`` on ``model`` (validated first); returns the handle."""
    if not isinstance(method_obj, VisionMethod):
        raise TypeError(f"the vision stage drives VisionMethod objects, got {type(method_obj).__name__}")
    if method_obj.needs_signals and (problem := adapter.signal_problem(model)):
        raise ValueError(f"method {info.name!r} cannot run on this model: {problem}")
    grid = adapter.patch_grid(model)  # dynamic-resolution families: the grid budgets are validated on
    per_image = adapter.tokens_per_image(model)
    if method_obj.needs_grid and per_image != grid[0] * grid[1]:
        raise ValueError(f"method {info.name!r} needs the {grid[0]}x{grid[1]} patch grid, but the LLM gets {per_image} "
                         f"tokens per image (vision_feature_select_strategy={adapter.select_strategy(model)!r} keeps "
                         "[CLS]); use 'default'")
    method_obj.validate(per_image, grid)  # bad budgets (e.g. keep > N) fail here, not at the first forward
    handle = VisionHandle(model, adapter, info.name, method_obj)
    handle._install()
    if method_obj.lora is not None:
        from .lora import load as load_lora

        try:
            injection = load_lora(model, method_obj.lora)
        except Exception:
            handle.remove()
            raise
        handle.add_undo(injection.remove)
        handle.lora = injection
    return handle

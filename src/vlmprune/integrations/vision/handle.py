"""The vision-stage handle: the shadowed features methods, the forward pre-hook that rewrites prefills and
translates later calls, and ``attach`` (see the package docstring for how it works)."""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch
from torch import Tensor

from ...methods.common import Reduction, to_host_lists
from ..base import ModelAdapter, PruneHandle, in_phase
from ..compat import K, get_cache
from ..layout import VisualLayout
from .method import VisionMethod, _reduce_by_grid
from .plan import Plan, _removed_per_row, image_token_slots, make_plan


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
        host = to_host_lists([values, *(self.pending[k].to(values.device) for k in names)])
        self.values.update(zip(names, host[1:]))
        self.pending = {}
        return host[0]


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
        #: modalities encoded since the last prompt was rewritten: one prefill's record in ``stats``
        self._recorded: set[str] = set()

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
            for alias in view.pixel_values_aliases:  # e.g. generate() passes the processor's name along
                pixels = kw.pop(alias, None)
                if kw.get(view.pixel_values_field) is None and pixels is not None:
                    kw[view.pixel_values_field] = pixels
            if view.pixel_values_field != K.PIXEL_VALUES:
                kw[K.PIXEL_VALUES] = kw.pop(view.pixel_values_field)
            try:
                return self._encode_images(view=view, **kw)
            except BaseException:
                self._recorded = set()  # a failed prompt's record is closed: the next encoding starts its own
                raise

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
        key = adapter.image_modality
        if key in self._recorded:  # this modality again: the next prefill's record
            self._recorded = set()
        self.stats.record(counts, list(layout.tokens_per_image), same_prefill=bool(self._recorded))
        self._recorded.add(key)
        self._issued[adapter.image_modality] = [(weakref.ref(t), c, sl)
                                                for t, c, sl in zip(per_image_out, counts, slots)]
        out = adapter.image_output(per_image_out)
        return out if kwargs.get(K.RETURN_DICT, True) is not False else out.to_tuple()

    # ---------------------------------------------------------------- forward hook
    def _pre_forward(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kw = _as_kwargs(self._signature, args, kwargs)
        mm = dict(kw.get(K.MM_ENCODER_OUTPUTS) or {})
        input_ids = kw.get(K.INPUT_IDS)
        given = []  # (view, its pixel fields, its pixels) of each modality passed as pixels
        for view in self._views:
            fields = (view.pixel_values_field, *view.pixel_values_aliases)
            pixels = next((kw[f] for f in fields if kw.get(f) is not None), None)
            if pixels is not None:
                given.append((view, fields, pixels))
        # each modality's placeholders per row, brought to the host with the first method's counts
        self._fetch = _BatchedFetch({view.image_modality: self._placeholders_per_row(view, input_ids)
                                     for view, _, _ in given if input_ids is not None})
        try:
            for view, fields, pixels in given:  # encode each modality's pixels with the reducing encoder
                for f in fields[1:]:
                    kw.pop(f, None)
                if mm.get(view.image_modality) is not None:
                    raise ValueError(f"pass either {view.pixel_values_field} or mm_encoder_outputs, not both")
                mm[view.image_modality] = getattr(self._base, view.image_features_method)(**{
                    view.pixel_values_field: pixels, K.FEATURE_LAYER: kw.get(K.FEATURE_LAYER),
                    K.SELECT_STRATEGY: kw.get(K.SELECT_STRATEGY), K.IMAGE_SIZES: kw.get(K.IMAGE_SIZES),
                    **{name: kw.get(name) for name in view.image_geometry}, K.RETURN_DICT: True})
                kw[view.pixel_values_field] = None
            rows = self._fetch.values  # placeholders per row, fetched with the counts
        finally:
            self._fetch = None  # a later standalone encoding must not bring this prompt's values
            self._recorded = set()  # this prompt's encodings are recorded (or failed): the next are another's
        if given:
            kw[K.MM_ENCODER_OUTPUTS] = mm
        features = {view.image_modality: view.image_tokens(mm[view.image_modality])
                    for view in self._views if mm.get(view.image_modality) is not None}
        features = {key: t for key, t in features.items() if t is not None}
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
            host = to_host_lists([self._placeholders_per_row(view, input_ids) for view in missing])
            rows = {**rows, **{view.image_modality: r for view, r in zip(missing, host)}}
        removed: list[int] | None = [0] * input_ids.shape[0] if todo else None
        placeholders: dict[str, Tensor] = {}  # [B, L] each modality's placeholder columns
        for view, per_image, counts, slots, runs in todo:
            key = view.image_modality
            keep_view, placeholders[key] = self._keep_columns(view, input_ids, runs, counts, slots, rows[key])
            keep = keep_view if keep is None else keep & keep_view
            lost = _removed_per_row(rows[key], runs, counts)
            removed = None if lost is None or removed is None else [a + b for a, b in zip(removed, lost)]
            kept_rows[key] = (per_image, counts, slots)
        visual = None  # [B, L]: every visual placeholder of the prompt (each modality's)
        for view in self._views:
            key = view.image_modality
            if key in features and input_ids is not None:
                ph = placeholders.get(key)
                if ph is None:  # a modality passed as it was (nothing pruned)
                    ph = view.sequence_layout(self.model, input_ids, VisualLayout()).visual
                visual = ph if visual is None else visual | ph
        if visual is not None:  # each sample's visual tokens fed to the LLM (read to the host only when asked)
            self.stats.last_per_sample = (visual if keep is None else visual & keep).sum(dim=1)
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

    def _placeholders_per_row(self, view: ModelAdapter, input_ids: Tensor) -> Tensor:
        """[B] long: how many of ``view``'s placeholder tokens each row of ``input_ids`` holds."""
        return view.sequence_layout(self.model, input_ids, VisualLayout()).visual.sum(dim=1)

    def _keep_columns(self, view: ModelAdapter, input_ids: Tensor, runs: list[int], counts: list[int],
                      slots: list[Tensor | None], rows: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """([B, L] bool the columns that survive ``view``'s reduction (every column that is not one
        of its placeholders, and the kept slots of each of its images' runs), [B, L] bool its
        placeholder columns). ``rows``: the placeholders per row on the host, when known (else
        counted on the device)."""
        seq = view.sequence_layout(self.model, input_ids, VisualLayout(tokens_per_image=tuple(runs)))
        ph, img, rank = seq.visual, seq.image, seq.rank  # [B, L] each
        n_ph = sum(rows) if rows is not None else int(ph.sum())
        if n_ph != sum(runs):
            raise ValueError(f"{view.image_modality.capitalize()} features and {view.image_modality} tokens do not "
                             f"match: {n_ph} placeholder tokens in input_ids for {len(runs)} {view.image_modality}(s) "
                             f"of {runs[0] if len(set(runs)) == 1 else runs} tokens")
        dev = input_ids.device
        if all(sl is None for sl in slots):  # each image keeps its first counts[i] slots
            return ~ph | (rank < torch.tensor(counts, device=dev)[img]), ph  # [B, L]
        # some images keep their tokens' own slots: kept [I, n_max], looked up per placeholder
        kept = torch.zeros(len(runs), max(runs), dtype=torch.bool, device=dev)
        for i, (c, sl) in enumerate(zip(counts, slots)):
            if sl is None:
                kept[i, :c] = True
            else:
                kept[i, sl.to(dev)] = True
        return ~ph | kept[img, rank.clamp(0, max(runs) - 1)], ph  # [B, L]

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
        from ..lora import load as load_lora

        try:
            injection = load_lora(model, method_obj.lora)
        except Exception:
            handle.remove()
            raise
        handle.add_undo(injection.remove)
        handle.lora = injection
    return handle

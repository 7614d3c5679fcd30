"""The decoder-stage handle: its torch hooks, prefill pruning at the prune points, decode-step masks and
positions, and ``attach`` (see the package docstring for how it works)."""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from ...methods.common import gather_rows, to_host_lists
from ..base import ModelAdapter, PruneHandle, in_phase
from ..compat import K, get_cache, layer_keys, output_cache
from .attention import _soft_mask, attention_row_sums, attention_rows
from .protocol import Decision, DecoderMethodBase, LayerView, RowSums
from .state import DecoderState, DecoderStats, Segment, _first_position, _last_true, _take_positions


class DecoderHandle(PruneHandle):
    """Handle of a decoder-stage pruning: ``.stats`` (``DecoderStats``), ``.state``, ``.remove()``."""

    stats_class = DecoderStats

    def __init__(self, model: Any, adapter: ModelAdapter, method: str, method_obj: Any) -> None:
        base = adapter.base_model(model)
        lm = adapter.get_language_model(model)
        layers = adapter.get_decoder_layers(model)
        num_layers = len(layers)
        points = sorted(set(int(p) for p in method_obj.prune_layers(num_layers)))
        if not points:
            raise ValueError(f"{method!r} has no prune points for a {num_layers}-layer decoder")
        if points[0] < 0 or points[-1] >= num_layers:
            raise ValueError(f"{method!r}: prune points {points} must lie in [0, {num_layers - 1}] "
                             f"(point p drops tokens from the input of decoder layer p)")
        if method_obj.positions not in ("original", "compact"):
            raise ValueError(f"positions must be 'original' or 'compact', got {method_obj.positions!r}")
        rotary = adapter.rotary(model)
        if rotary is None:
            raise ValueError(f"{type(lm).__name__} has no rotary_emb; decoder-stage pruning needs RoPE")
        super().__init__(model, adapter, method, method_obj, "decoder")  # marks the model as pruned
        self.state = DecoderState()
        self.base, self.lm, self.layers, self.num_layers = base, lm, layers, num_layers
        self.rotary = rotary
        #: the position rule in force: the method's, unless the family keeps original positions only
        #: (``adapter.compact_positions`` False, e.g. M-RoPE: survivors keep their own 3-D positions)
        self.positions = method_obj.positions if adapter.compact_positions else "original"
        self.image_token_id = adapter.image_token_id(model)
        self.embed = adapter.get_input_embeddings(model)
        self.points = points
        self.stats.tokens_per_image = adapter.fixed_image_tokens(model)
        attn0 = self.layers[0].self_attn
        self.num_heads = int(getattr(attn0.config, "num_attention_heads"))
        self.head_dim = int(attn0.head_dim)
        self.num_kv_heads = self.num_heads // int(getattr(attn0, "num_key_value_groups", 1))
        self.scaling = float(attn0.scaling)
        self._install()

    # ---------------------------------------------------------------- hooks
    def _install(self) -> None:
        self.add_hook(self.base.register_forward_pre_hook(self._base_pre_hook, with_kwargs=True))
        self.add_hook(self.lm.register_forward_pre_hook(self._lm_pre_hook, with_kwargs=True))
        self.add_hook(self.lm.register_forward_hook(self._lm_post_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self.add_hook(layer.register_forward_pre_hook(self._make_layer_pre_hook(i), with_kwargs=True))
        for p in self.points:
            if p >= 1:
                attn = self.layers[p - 1].self_attn
                self.add_hook(attn.q_proj.register_forward_hook(self._make_capture(p - 1, "q")))
                self.add_hook(attn.k_proj.register_forward_hook(self._make_capture(p - 1, "k")))

    def _make_capture(self, layer: int, which: str):
        state = self.state

        def hook(module, args, output):
            if state.phase == "prefill":
                state.captured.setdefault(layer, {})[which] = output
        return hook

    def _base_pre_hook(self, module, args, kwargs):
        """Base multimodal model: find each sample's image tokens (and whether the prompt continues)."""
        st = self.state
        ids = kwargs.get(K.INPUT_IDS, args[0] if args else None)
        embeds = kwargs.get(K.INPUTS_EMBEDS)
        pixels = kwargs.get(K.PIXEL_VALUES)
        mask = kwargs.get(K.ATTENTION_MASK)
        cache = get_cache(kwargs)
        st.pending_visual, st.pending_prompt_len = None, None
        ref = ids if ids is not None else embeds
        if (kwargs.get(K.POSITION_IDS) is None and ref is not None and cache is not None and st.cache_ref is not None
                and st.cache_ref() is cache and ref.shape[0] == st.segments[0].source.shape[0]):
            # a decode step on the pruned cache without positions: the base model would derive them
            # from layer 0's (possibly pruned) cache length; give it the original continuation
            positions = self._decode_positions(self._appended(cache), ref.shape[1], ref.device)
            return args, {**kwargs, K.POSITION_IDS: positions}
        if ids is not None:
            visual = self.adapter.visual_columns(self.model, ids)
        elif embeds is not None:
            tok = self.embed(torch.tensor(self.image_token_id, device=embeds.device))
            visual = (embeds == tok.to(embeds.dtype)).all(-1)
        else:
            return None
        if visual.shape[1] <= 1:
            return None
        if _image_key(pixels, kwargs.get(K.MM_ENCODER_OUTPUTS)) is None and not bool(visual.any()):
            return None  # no image passed and no placeholder (with images, the model checks the placeholders)
        if cache is not None and cache.get_seq_length() > 0:
            return None  # a continuation on a filled cache: not a prefill we prune
        st.pending_visual = visual
        if getattr(self.method_obj, "needs_grids", False):
            # every modality's keywords (images, videos), and the ids that tell their placeholders apart
            names = {K.INPUT_IDS, K.IMAGE_SIZES, K.MM_ENCODER_OUTPUTS}
            for view in self.adapter.modality_views(self.model):
                names |= {view.pixel_values_field, *view.image_geometry}
            st.pending_images = {name: kwargs.get(name) for name in names}
        # continuation of the previous prompt without a cache (generate(use_cache=False))?
        image = _image_key(pixels, kwargs.get(K.MM_ENCODER_OUTPUTS))
        plen = None
        if ids is not None and st.prompt_ids is not None and image is not None and st.prompt_image is not None:
            old_ids = st.prompt_ids
            n = old_ids.shape[1]
            if (ids.shape[0] == old_ids.shape[0] and ids.shape[1] > n and torch.equal(ids[:, :n], old_ids)
                    and _same_image(image, st.prompt_image)
                    and (mask is None) == (st.prompt_mask is None)
                    and (mask is None or torch.equal(mask[:, :n], st.prompt_mask))):
                plen = n
        if plen is None:
            st.prompt_ids = ids.clone() if ids is not None else None
            st.prompt_mask = mask.clone() if mask is not None else None
            st.prompt_image = image
        st.pending_prompt_len = plen
        return None

    def _lm_pre_hook(self, module, args, kwargs):
        st = self.state
        embeds = kwargs.get(K.INPUTS_EMBEDS)
        cache = get_cache(kwargs)
        visual, plen, images = st.pending_visual, st.pending_prompt_len, st.pending_images
        st.pending_visual, st.pending_prompt_len, st.pending_images = None, None, None
        if embeds is None:
            st.phase = "idle"
            return None
        if visual is not None and visual.shape == embeds.shape[:2] and (cache is None or cache.get_seq_length() == 0):
            self._begin_prefill(embeds, kwargs.get(K.ATTENTION_MASK), kwargs.get(K.POSITION_IDS), visual, plen,
                                images)
            return None
        if (st.cache_ref is not None and cache is not None and st.cache_ref() is cache
                and embeds.shape[0] == st.segments[0].source.shape[0]):
            st.phase = "decode"
            return self._begin_decode_step(args, kwargs, embeds, cache)
        st.phase = "idle"
        st.cache_ref = None
        return None

    def _lm_post_hook(self, module, args, kwargs, output):
        st = self.state
        if st.phase == "prefill":
            self._finish_prefill(output)
        elif st.phase == "decode":
            st.step = {}
        return None

    def _make_layer_pre_hook(self, idx: int):
        def hook(module, args, kwargs):
            st = self.state
            if st.phase == "prefill":
                return self._prefill_layer(idx, args, kwargs)
            if st.phase == "decode":
                return self._decode_layer(idx, args, kwargs)
            return None
        return hook

    # ---------------------------------------------------------------- prefill
    @in_phase("prefill")
    def _begin_prefill(self, embeds: Tensor, mask2d: Tensor | None, position_ids: Tensor | None,
                       visual: Tensor, prompt_len: int | None, images: dict[str, Any] | None = None) -> None:
        st = self.state
        st.begin_prefill()
        bsz, length = embeds.shape[:2]
        dev = embeds.device
        cols = torch.arange(length, device=dev)
        valid = mask2d.bool() if mask2d is not None else torch.ones(bsz, length, dtype=torch.bool, device=dev)
        if valid.shape != (bsz, length):
            valid = valid[:, -length:]
        source = torch.where(valid, cols[None, :], torch.full_like(cols[None, :], -1)).expand(bsz, length)
        visual = visual.to(dev) & valid
        # the family's positions ([B, L] or M-RoPE [3, B, L]) and rotary function, from the adapter
        st.layout = self.adapter.lm_layout(self.model, visual, position_ids, self.rotary)
        if getattr(self.method_obj, "needs_grids", False):
            st.layout = self.adapter.grid_layout(self.model, st.layout, embeds, images or {})
        positions = st.layout.positions
        last_vis = _last_true(visual)  # [B]
        after = valid & ~visual & (cols[None, :] > last_vis[:, None]) & (last_vis[:, None] >= 0)
        prompt = valid if prompt_len is None else valid & (cols[None, :] < prompt_len)
        root = Segment(first_layer=0, source=source, valid=valid, visual=visual,
                       recycled=torch.zeros_like(visual), prompt=prompt, after_image=after, positions=positions,
                       soft=None, shift=torch.zeros_like(positions[..., -1]), identity=True, shifted=False)
        st.segments = [root]
        st.layer_segment = [0] * self.num_layers
        st.orig_len = length
        st.last_pos = positions[..., -1].clone()
        st.num_visual0 = visual.sum(1)
        if getattr(type(self.method_obj), "prepare", None) is not DecoderMethodBase.prepare:  # skip the no-op
            view = self._view(0, embeds, root)
            view.fetch = self._start_fetch(root, view)
            st.context = self.method_obj.prepare(embeds, view)

    def _start_fetch(self, root: Segment, view: LayerView) -> Callable[[list[Tensor]], list]:
        """``LayerView.fetch`` for ``prepare``: the method's tensors, the input layout's counts and (with
        compacted positions) each row's last position minus its first, in one host transfer."""
        def fetch(tensors: list[Tensor]) -> list:
            own = [root.visual.sum(1), root.valid.sum(1)]
            span = self.positions == "compact" and root.positions.dim() == 2
            if span:
                own.append(self.state.last_pos - _first_position(root))
            host = to_host_lists([*own, *tensors])
            root.counts = view.counts = (host[0], host[1])
            if span:
                self.state.span = host[2]
            return host[len(own):]
        return fetch

    def _view(self, layer: int, hidden: Tensor, seg: Segment) -> LayerView:
        last = _last_true(seg.prompt).clamp(min=0)
        n0 = self.state.num_visual0
        return LayerView(layer=layer, num_layers=self.num_layers, hidden=hidden, valid=seg.valid, visual=seg.visual,
                         recycled=seg.recycled, after_image=seg.after_image, prompt=seg.prompt, source=seg.source,
                         positions=seg.positions, last=last, num_visual0=n0, context=self.state.context,
                         layout=self.state.layout, counts=seg.counts)

    @in_phase("prefill")
    def _prefill_layer(self, idx: int, args: tuple, kwargs: dict):
        st = self.state
        hidden = args[0] if args else kwargs[K.HIDDEN_STATES]
        if idx == 0 or st.current.identity:
            # the model's own mask / rotary are right for the untouched layout
            root = st.segments[0]
            if root.pos_emb is None:
                root.pos_emb = kwargs.get(K.POSITION_EMBEDDINGS)
                root.mask = kwargs.get(K.ATTENTION_MASK)
        if idx in self.points:
            hidden = self._prune(idx, hidden, get_cache(kwargs))
        seg = st.current
        st.layer_segment[idx] = len(st.segments) - 1
        st.pos_emb_used[idx] = seg.pos_emb
        if seg.identity:
            return None
        kwargs = dict(kwargs)
        kwargs[K.ATTENTION_MASK] = seg.mask
        kwargs[K.POSITION_EMBEDDINGS] = seg.pos_emb
        kwargs[K.POSITION_IDS] = self.adapter.layer_position_ids(seg.positions)
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs[K.HIDDEN_STATES] = hidden
        return args, kwargs

    @in_phase("score")
    def _scores(self, p: int, hidden: Tensor, seg: Segment, rows: Tensor, rows_valid: Tensor,
                cache: Any = None, weights: Tensor | None = None,
                row_bounds: list[int] | None = None) -> Tensor | RowSums:
        """[B, R, L] head-mean attention of layer p-1 (or layer 0 on its input when p == 0); with
        ``weights`` [B, R, G], only their weighted sums of those rows (``RowSums``; ``row_bounds``:
        the method's host bounds of the rows' columns, see ``attention_row_sums``).

        Layer p-1's rotated keys are read from its KV-cache entry when there is one (no key is
        recomputed); without a cache they are re-rotated from the captured ``k_proj`` output.
        """
        st = self.state
        roped = None
        if p == 0:
            layer = self.layers[0]
            normed = layer.input_layernorm(hidden)
            q = layer.self_attn.q_proj(normed)
            k = layer.self_attn.k_proj(normed)
            cos, sin = seg.pos_emb
        else:
            cap = st.captured.get(p - 1, {})
            if "q" not in cap or "k" not in cap:
                raise RuntimeError(f"q/k of decoder layer {p - 1} were not captured; is the model's attention "
                                   "module laid out as expected (self_attn.q_proj / k_proj)?")
            q, k = cap["q"], cap["k"]
            cos, sin = st.pos_emb_used[p - 1]
            roped = layer_keys(cache, p - 1, (k.shape[0], self.num_kv_heads, seg.length, self.head_dim))
        kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                  scaling=self.scaling, key_bias=seg.key_bias(), roped_keys=roped)
        if weights is not None:
            return RowSums(*attention_row_sums(q, k, rows, rows_valid, weights, cos, sin, seg.valid,
                                               row_bounds=row_bounds, **kw))
        return attention_rows(q, k, rows, rows_valid, cos, sin, seg.valid, **kw)

    def _prune(self, p: int, hidden: Tensor, cache: Any = None) -> Tensor:
        st = self.state
        seg = st.current
        view = self._view(p, hidden, seg)
        req = self.method_obj.score_rows(view)
        attn = None
        if req is not None:
            rows, rows_valid, *rest = req
            weights = rest[0].to(hidden.device) if rest else None
            bounds = rest[1] if len(rest) > 1 else None
            attn = self._scores(p, hidden, seg, rows.to(hidden.device), rows_valid.to(hidden.device), cache, weights,
                                bounds)
        st.captured.pop(p - 1, None)  # free the projections
        with self.phase("select"):
            dec = self.method_obj.select(view, attn)
        new_hidden, new_seg, info = self._apply_decision(p, hidden, seg, dec)
        st.decisions[p] = {**dec.info, **info, "kept": new_seg.counts[0]}
        if new_seg is not seg:
            st.segments.append(new_seg)
        return new_hidden

    @in_phase("gather")
    def _apply_decision(self, p: int, hidden: Tensor, seg: Segment,
                        dec: Decision) -> tuple[Tensor, Segment, dict[str, Any]]:
        """Apply ``dec`` at prune point ``p``: (new hidden, new segment, ``dec.info``'s tensors as host lists)."""
        bsz, length = seg.source.shape
        dev = hidden.device
        keep = seg.valid.clone() if dec.keep is None else (seg.valid & (dec.keep.to(dev).bool() | ~seg.visual))
        # each sample's last prompt token stays (it produces the next-token logits)
        cols = torch.arange(length, device=dev)
        keep |= (cols[None, :] == _last_true(seg.prompt)[:, None]) & seg.valid
        soft = seg.soft
        if dec.soft is not None:
            s = torch.where(seg.visual, dec.soft.to(dev, torch.float32), torch.ones_like(dec.soft, dtype=torch.float32))
            soft = s if soft is None else soft * s
        n_extra = 0 if dec.extra is None else dec.extra.shape[1]
        ev = None
        if n_extra:
            ev = dec.extra_valid.to(dev).bool() if dec.extra_valid is not None else \
                torch.ones(bsz, n_extra, dtype=torch.bool, device=dev)
        compact = self.positions == "compact"
        base = _first_position(seg) if compact else None  # [*P, B]
        names = [k for k, v in dec.info.items() if isinstance(v, Tensor)]
        if (dec.counts is not None and seg.counts is not None and not names
                and (not compact or self.state.span is not None)):
            # the method's host counts: no host read at this point
            kept, inserted = dec.counts
            counts = ([k + e for k, e in zip(kept, inserted)],
                      [t - v + k + e for t, v, k, e in zip(seg.counts[1], seg.counts[0], kept, inserted)])
            new_len = max(counts[1])
            dropped = any(k < v for k, v in zip(kept, seg.counts[0]))
            shifted = compact and any(s != max(n - 1, 0) for s, n in zip(self.state.span, counts[1]))
            info = {}
        else:
            n_new = keep.sum(1) + (ev.sum(1) if n_extra else 0)  # [B] tokens of the new layout
            vis_new = (keep & seg.visual).sum(1) + (ev.sum(1) if n_extra else 0)  # [B] visual tokens of the new layout
            # the prune point's one host synchronisation: anything dropped, whether compacted positions end
            # before the original last one (decode rotary), the new layout's counts (its width is their maximum;
            # and the first layout's), and the method's recorded tensors
            flags = [(seg.valid & ~keep).any().long()]
            if compact:  # the new layout's last position is base + n_new - 1 (its last column is valid)
                flags.append((self.state.last_pos - base - (n_new - 1).clamp(min=0) != 0).any().long())
            first = [seg.visual.sum(1), seg.valid.sum(1)] if seg.counts is None else []
            host = to_host_lists([torch.stack(flags), vis_new, n_new, *first, *(dec.info[k] for k in names)])
            dropped, counts = host[0][0], (host[1], host[2])
            new_len = max(counts[1])
            shifted = compact and bool(host[0][1])
            if first:
                seg.counts = (host[3], host[4])
            info = dict(zip(names, host[3 + len(first):]))
        if not dropped and n_extra == 0:
            if soft is seg.soft:
                return hidden, seg, info
            new = Segment(first_layer=p, source=seg.source, valid=seg.valid, visual=seg.visual,
                          recycled=seg.recycled, prompt=seg.prompt, after_image=seg.after_image,
                          positions=seg.positions, soft=soft, shift=seg.shift, identity=False, counts=counts,
                          shifted=seg.shifted)
            self._finish_segment(new, hidden)
            return hidden, new, info

        cols = torch.arange(length, device=dev)
        key = torch.where(keep, cols[None, :] * 2, torch.full_like(cols[None, :], -1)).expand(bsz, length)
        cand = [hidden]
        source, valid, visual, recycled = [seg.source], [keep], [seg.visual], [seg.recycled]
        prompt, after, positions = [seg.prompt], [seg.after_image], [seg.positions]  # positions: [*P, B, *]
        softs = [soft] if soft is not None else None
        if n_extra:
            # insert after each sample's last visual token (of the layout before dropping)
            last_vis = _last_true(seg.visual)
            ekey = torch.where(ev, (last_vis * 2 + 1)[:, None].expand(bsz, n_extra), torch.full_like(ev, -1, dtype=torch.long))
            key = torch.cat([key, ekey], dim=1)
            cand.append(dec.extra.to(hidden.dtype))
            source.append(torch.full((bsz, n_extra), -1, dtype=torch.long, device=dev))
            valid.append(ev)
            visual.append(ev)
            recycled.append(ev)
            prompt.append(ev)
            after.append(torch.zeros_like(ev))
            if dec.extra_positions is not None:
                positions.append(dec.extra_positions.to(dev).long())
            else:
                positions.append(_take_positions(seg.positions, last_vis.clamp(min=0)[:, None].expand(bsz, n_extra)))
            if softs is not None:
                softs.append(torch.ones(bsz, n_extra, dtype=torch.float32, device=dev))
        order = torch.sort(key, dim=1, stable=True).indices[:, -new_len:]  # pads (-1) first, then in order

        def take(parts: list[Tensor]) -> Tensor:
            t = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            return t.gather(1, order)

        h = torch.cat(cand, dim=1) if n_extra else hidden
        new_hidden = gather_rows(h, order)  # [B, L', D]
        new_valid = take(valid)
        new_source = torch.where(new_valid, take(source), -1)
        new_visual = take(visual) & new_valid
        new_positions = _take_positions(torch.cat(positions, dim=-1) if n_extra else seg.positions, order)
        if compact:
            new_positions = torch.where(new_valid, base[..., None] + new_valid.long().cumsum(1) - 1, base[..., None])
        new = Segment(first_layer=p, source=new_source, valid=new_valid, visual=new_visual,
                      recycled=take(recycled) & new_valid, prompt=take(prompt) & new_valid,
                      after_image=take(after) & new_valid, positions=new_positions,
                      soft=take(softs) if softs is not None else None,
                      shift=(self.state.last_pos - new_positions[..., -1]) if compact
                      else torch.zeros_like(seg.shift), identity=False, counts=counts, shifted=shifted)
        pos_emb = None
        if n_extra == 0 and self.positions == "original" and seg.pos_emb is not None:
            # survivors keep their positions, so their rotary rows are the old layout's rows
            pos_emb = tuple(gather_rows(t.expand(bsz, -1, -1), order) for t in seg.pos_emb)
        self._finish_segment(new, new_hidden, pos_emb=pos_emb)
        return new_hidden, new, info

    @in_phase("masks")
    def _finish_segment(self, seg: Segment, hidden: Tensor, pos_emb: tuple[Tensor, Tensor] | None = None) -> None:
        """Prefill attention mask and rotary tables of a new layout (``pos_emb``: its rotary tables, if
        known, else computed from its positions)."""
        length = seg.length
        bias = seg.key_bias()
        if bias is None:
            if seg.padding_free():
                seg.mask = None  # sdpa's is_causal path
            else:
                causal = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
                seg.mask = causal[None, None] & seg.valid[:, None, None, :]
        else:
            seg.mask = _soft_mask(seg.valid, bias, hidden.dtype, q_len=length, past=0)
        seg.pos_emb = pos_emb if pos_emb is not None else self.state.layout.rotary(hidden, position_ids=seg.positions)

    @in_phase("prefill")
    def _finish_prefill(self, output: Any) -> None:
        st = self.state
        cache = output_cache(output)
        st.cache_ref = weakref.ref(cache) if cache is not None else None
        st.phase = "idle"
        st.captured = {}
        st.pos_emb_used = {}
        st.final_source = st.current.source
        # per-segment counts, read at the prune points' synchronisations (one transfer if no point ran)
        missing = [seg for seg in st.segments if seg.counts is None]
        if missing:
            host = to_host_lists([t for seg in missing for t in (seg.visual.sum(1), seg.valid.sum(1))])
            for i, seg in enumerate(missing):
                seg.counts = (host[2 * i], host[2 * i + 1])
        per_layer = [st.segments[s].counts for s in st.layer_segment]
        vis = [[c[0][b] for c in per_layer] for b in range(len(per_layer[0][0]))]  # [B][layers]
        tok = [[c[1][b] for c in per_layer] for b in range(len(per_layer[0][0]))]
        kept_at = {p: d["kept"] for p, d in st.decisions.items()}
        self.stats.record_layers(vis, tok, kept_at, unpruned=list(st.segments[0].counts[0]))

    # ---------------------------------------------------------------- decode
    def _appended(self, cache: Any) -> int:
        """Tokens appended since the prefill, read from the last layer's cache (its own length)."""
        st = self.state
        return cache.get_seq_length(self.num_layers - 1) - st.segments[st.layer_segment[-1]].length

    def _decode_positions(self, past_new: int, q_len: int, device: Any) -> Tensor:
        """[*P, B, q_len] positions of the next decode tokens in the family's form: after the
        original (unpruned) last position, counting the ``past_new`` tokens appended since the prefill."""
        return (self.state.last_pos.to(device) + 1 + past_new)[..., None] + torch.arange(q_len, device=device)

    @in_phase("decode")
    def _begin_decode_step(self, args: tuple, kwargs: dict, embeds: Tensor, cache: Any):
        st = self.state
        q_len = embeds.shape[1]
        mask2d = kwargs.get(K.ATTENTION_MASK)
        past_new = self._appended(cache)
        bsz = embeds.shape[0]
        dev = embeds.device
        if mask2d is not None and mask2d.dim() == 2 and mask2d.shape[1] == st.orig_len + past_new + q_len:
            tail = mask2d[:, st.orig_len:].to(dev).bool()
            tail_full = None  # read once, at the step's first pruned layer that can use it
        else:
            tail = torch.ones(bsz, past_new + q_len, dtype=torch.bool, device=dev)
            tail_full = True
        pos = kwargs.get(K.POSITION_IDS)
        new_kwargs = None
        if pos is None:
            pos = self._decode_positions(past_new, q_len, dev)  # after the original last position, [*P, B, q]
            new_kwargs = dict(kwargs)
            new_kwargs[K.POSITION_IDS] = pos
        else:
            pos = self.adapter.lm_positions(pos, bsz, q_len, dev)  # the family's form, [*P, B, q]
        st.step = {"q_len": q_len, "past_new": past_new, "tail": tail, "tail_full": tail_full, "pos": pos,
                   "mask": {}, "rot": {}}
        if new_kwargs is not None:
            return args, new_kwargs
        return None

    @in_phase("decode")
    def _decode_layer(self, idx: int, args: tuple, kwargs: dict):
        st = self.state
        s = st.layer_segment[idx]
        seg = st.segments[s]
        if seg.identity:
            return None
        step = st.step
        if s not in step["mask"]:
            key_valid = torch.cat([seg.valid, step["tail"]], dim=1)
            bias = seg.key_bias()
            if bias is None and step["q_len"] == 1 and self._no_padding(seg, step):
                step["mask"][s] = None
            elif bias is None:
                q_len, kv = step["q_len"], key_valid.shape[1]
                limit = seg.length + step["past_new"] + torch.arange(q_len, device=key_valid.device)
                causal = torch.arange(kv, device=key_valid.device)[None, :] <= limit[:, None]
                step["mask"][s] = causal[None, None] & key_valid[:, None, None, :]
            else:
                full_bias = torch.cat([bias, torch.zeros_like(step["tail"], dtype=bias.dtype)], dim=1)
                step["mask"][s] = _soft_mask(key_valid, full_bias, args[0].dtype if args else
                                             kwargs[K.HIDDEN_STATES].dtype, q_len=step["q_len"],
                                             past=seg.length + step["past_new"])
            if seg.shifted is None:
                seg.shifted = bool((seg.shift != 0).any())  # once per layout, not per step
            if seg.shifted:
                hidden = args[0] if args else kwargs[K.HIDDEN_STATES]
                step["rot"][s] = st.layout.rotary(hidden, position_ids=step["pos"] - seg.shift[..., None])
            else:
                step["rot"][s] = None
        kwargs = dict(kwargs)
        kwargs[K.ATTENTION_MASK] = step["mask"][s]
        if step["rot"][s] is not None:
            kwargs[K.POSITION_EMBEDDINGS] = step["rot"][s]
            kwargs[K.POSITION_IDS] = self.adapter.layer_position_ids(step["pos"] - seg.shift[..., None])
        return args, kwargs

    @staticmethod
    def _no_padding(seg: Segment, step: dict[str, Any]) -> bool:
        """No padding among a decode step's keys of ``seg``: the layout's (host counts) and the new tokens'
        (the step's mask tail, read at most once per step)."""
        if not seg.padding_free():
            return False
        if step["tail_full"] is None:
            step["tail_full"] = bool(step["tail"].all())
        return step["tail_full"]

    def remove(self) -> None:
        super().remove()
        self.state = DecoderState()



def _image_key(pixels: Any, mm_outputs: Any) -> tuple | None:
    """What identifies a forward's images: the pixel tensor (and its in-place version counter), or the
    precomputed encoder outputs ``generate`` passes on every step (transformers >= 5 encodes once)."""
    if pixels is not None:
        return ("pixels", pixels, pixels._version)
    image = mm_outputs.get("image") if isinstance(mm_outputs, dict) else None
    if image is not None:
        return ("encoded", image)
    return None


def _same_image(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "encoded":
        return a[1] is b[1]
    if a[1] is b[1]:
        return a[2] == b[2]
    return a[1].shape == b[1].shape and bool(torch.equal(a[1], b[1]))



def attach(model: Any, adapter: ModelAdapter, info: Any, method_obj: Any) -> DecoderHandle:
    """Install ``method_obj`` (a ``DecoderMethod``) on ``model``; returns the handle."""
    for attr in ("prune_layers", "select", "score_rows", "prepare", "positions"):
        if not hasattr(method_obj, attr):
            raise TypeError(f"{type(method_obj).__name__} is not a decoder-stage method (missing {attr!r}); "
                            "subclass vlmprune.integrations.decoder.DecoderMethodBase")
    name = getattr(info, "name", None) or getattr(method_obj, "name", "decoder-method")
    # a method may bring its own handle subclass (e.g. ATP: richer stats, extra checks at attach)
    handle_class = getattr(method_obj, "handle_class", None) or DecoderHandle
    if not (isinstance(handle_class, type) and issubclass(handle_class, DecoderHandle)):
        raise TypeError(f"{type(method_obj).__name__}.handle_class must be a DecoderHandle subclass, "
                        f"got {handle_class!r}")
    return handle_class(model, adapter, name, method_obj)

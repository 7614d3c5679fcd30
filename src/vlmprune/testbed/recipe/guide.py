"""Stage 2's attention guidance: a loss on the attention of a few decoder heads, recomputed from q/k."""

from __future__ import annotations

import math

import torch


class AttentionGuide:
    """Stage-2 auxiliary loss on where a few decoder heads attend.

    Forward hooks on the self-attention of ``layers`` (negative indices count from the end) capture
    each layer's input and rotary embeddings; ``probabilities`` recomputes the attention of the
    first ``heads`` heads from the layer's own q/k projections (the model keeps running sdpa), and
    ``loss`` pulls chosen query rows towards chosen keys with the hinge
    ``max(0, log(target) - log(attention mass on the keys))``, which stops pulling once that share
    reaches ``target``. The other heads are unconstrained; ``remove()`` detaches the hooks.
    """

    def __init__(self, model, layers: tuple[int, ...], heads: int, target: float = 1.0):
        from ...integrations.compat import apply_rotary

        self._rotary = apply_rotary
        self.heads = heads
        self.floor = math.log(target)
        self.captured: list[tuple] = []
        decoder = model.model.language_model.layers
        bad = [i for i in layers if not -len(decoder) <= i < len(decoder)]
        if bad:
            raise ValueError(f"guide_layers {bad} out of range for a {len(decoder)}-layer decoder")
        self.num_layers = len(decoder)
        layers = dict.fromkeys(i % self.num_layers for i in layers)  # -1 and 5 are one layer: hooked once
        self.handles = [decoder[i].self_attn.register_forward_hook(self._hook, with_kwargs=True) for i in layers]

    def _hook(self, module, args, kwargs, output):
        from ...integrations.compat import K

        h = kwargs[K.HIDDEN_STATES] if K.HIDDEN_STATES in kwargs else args[0]
        self.captured.append((module, h, kwargs[K.POSITION_EMBEDDINGS]))

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def probabilities(self, allowed: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities [B, heads, L, L] of the guided heads, per hooked layer (consumes the capture).

        ``allowed`` [B, L, L] bool is the attention mask the forward pass used. The decoder layer
        index of each entry is left in ``self.layers_seen``.
        """
        captured, self.captured = self.captured, []
        self.layers_seen = [module.layer_idx for module, _, _ in captured]
        out = []
        for module, h, (cos, sin) in captured:
            B, L, _ = h.shape
            d = module.head_dim
            q = module.q_proj(h).view(B, L, -1, d)[:, :, : self.heads].transpose(1, 2)
            kv_heads = [i // module.num_key_value_groups for i in range(self.heads)]
            k = module.k_proj(h).view(B, L, -1, d)[:, :, kv_heads].transpose(1, 2)
            q, k = self._rotary(q, k, cos, sin)
            scores = (q @ k.transpose(-1, -2)) * module.scaling
            out.append(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
        return out

    def _share_loss(self, p: torch.Tensor, t: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        """Hinge ``max(0, log target - log mass)`` over the ``share`` rows [B, L]; ``t`` broadcasts to ``p``."""
        mass = (p * t).sum(-1)  # [B, heads, L]
        log_mass = (mass[share[:, None, :].expand_as(mass)] + 1e-6).log()
        return (self.floor - log_mass).clamp_min(0).mean()

    def loss(self, rows: torch.Tensor, targets: torch.Tensor, allowed: torch.Tensor,
             layer_rows: dict[int, torch.Tensor] | None = None, uniform: torch.Tensor | None = None,
             extra: list[dict] | None = None) -> torch.Tensor:
        """rows: [B, L] bool query rows; targets: [B, L] bool target keys (the same for every row) or
        [B, L, L] (row-specific keys); allowed: [B, L, L] bool attention mask; ``layer_rows``:
        decoder layer index -> the rows guided on that layer (default: ``rows`` on every layer);
        ``uniform`` [B, L]: rows trained towards the uniform distribution over their targets instead
        (``KL(uniform || attention)``, see ``count_guide_targets``), not just a share on them;
        ``extra``: further groups ``{"rows": [B, L], "targets": [B, heads, L, L] (one target per guided
        head), "layer": int}``, each guided on its one layer (see ``position_guide_targets``)."""
        t = (targets[:, None, None, :] if targets.dim() == 2 else targets[:, None]).float()
        probs = self.probabilities(allowed)
        if layer_rows is not None:  # config layers may be negative (-1 = last)
            layer_rows = {k % self.num_layers: v for k, v in layer_rows.items()}
        total = []
        for group in extra or ():
            if group["rows"].any() and group["layer"] % self.num_layers in self.layers_seen:
                p = probs[self.layers_seen.index(group["layer"] % self.num_layers)]
                total.append(self._share_loss(p, group["targets"].float(), group["rows"]))
        for layer, p in zip(self.layers_seen, probs):
            r = rows if layer_rows is None else layer_rows.get(layer)
            if r is None or not r.any():
                continue
            share = r if uniform is None else r & ~uniform
            if share.any():
                total.append(self._share_loss(p, t, share))
            if uniform is not None and (r & uniform).any():
                n = t.sum(-1).clamp_min(1)  # [B, 1, L] keys per row
                kl = -(t * (p + 1e-6).log()).sum(-1) / n - n.log()  # KL(u || p)
                total.append(kl[(r & uniform)[:, None, :].expand_as(kl)].mean())
        if not total:  # no guided row in this batch
            return allowed.new_zeros((), dtype=torch.float32)
        return torch.stack(total).mean()

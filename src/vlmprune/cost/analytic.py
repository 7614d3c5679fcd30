"""Analytic prefill cost of the LLM decoder of a vision-language model.

Everything here is arithmetic on a model config: no ``torch``, no ``transformers``,
no weights. Given the number of tokens each decoder layer processes (visual tokens
that survive pruning + text tokens), it returns prefill operation counts, bytes
moved, KV-cache bytes, weight / activation memory and a roofline estimate of the
prefill time on a named GPU.

The accounting
--------------
Notation for one decoder layer: ``s`` tokens in the layer (batch ``b``), hidden
size ``h``, ``H`` query heads and ``K`` key/value heads of size ``d`` (so
``q_dim = H*d``, ``kv_dim = K*d``), SwiGLU width ``I``, vocabulary ``V``.
``w``, ``a``, ``c`` are bytes per weight, per activation and per KV-cache element.

A matmul counts **2 ops per multiply-accumulate** (one mul + one add). Per layer::

    q_proj      2*b*s*h*q_dim        weights h*q_dim*w   reads b*s*h*a   writes b*s*q_dim*a
    k_proj      2*b*s*h*kv_dim       weights h*kv_dim*w  reads b*s*h*a   writes KV b*s*kv_dim*c
    v_proj      2*b*s*h*kv_dim       (same as k_proj)
    qk_matmul   2*b*s*s*d*H          reads q and K        writes scores b*H*s*s*a
    softmax     5*b*H*s*s            reads and writes the b*H*s*s scores
    sv_matmul   2*b*s*s*d*H          reads probs and V    writes b*s*q_dim*a
    o_proj      2*b*s*q_dim*h        weights q_dim*h*w
    gate_proj   2*b*s*h*I            weights h*I*w
    up_proj     2*b*s*h*I            weights h*I*w
    mlp_act     2 ops/element        silu(gate) * up
    down_proj   2*b*s*I*h            weights I*h*w
    2 x RMSNorm 7 ops/element        (sum, sub, pow, sum, div, mul, add: LLM-Viewer's count)
    2 x residual add  1 op/element

and once per model::

    lm_head     2*b*h*V              on the LAST token only (prefill only needs the
                                     next-token logits), weights h*V

Assumptions: no FlashAttention (the s x s score matrix is written to memory, as in
eager / math attention) and the attention matmuls are charged densely over the full
``s x s`` square (a causal kernel that skips the masked half would do half of them);
the embedding lookup, the final norm and rotary embeddings are not charged (each is
< 0.1 % of the total); biases (Qwen2's q/k/v) are counted as weights but their adds
are not. Pruned tokens are physically removed: layer ``i`` runs every operator above
with its own ``s_i`` and stores ``s_i`` entries in its KV cache.

Roofline time: each operator takes ``max(ops / peak, bytes / bandwidth)`` and the
times add up (no overlap between operators); the peak follows the precision
(``specs.Precision.compute_kind``).

Quantities reported (see :class:`PrefillCost`):
``total_ops`` (every operator; this is what PruMerge's Table 2 calls "FLOPs"),
``matmul_flops`` (matmuls only; what ``torch.utils.flop_counter`` counts),
``bytes_moved`` (all weight/activation/KV reads and writes = Table 2's
"total memory"), ``activation_bytes_written`` (all activation writes = Table 2's
"activation"), ``kv_cache_bytes``, ``weight_bytes`` (footprint of all LLM weights
incl. embeddings), ``peak_activation_bytes`` (largest single layer's written
intermediates, a footprint proxy since intermediates are freed layer by layer) and
``prefill_time_s``.

The inputs (model shapes, GPUs, precisions, the :data:`PHYSICAL` / :data:`LLM_VIEWER`
bookkeeping conventions) are in :mod:`vlmprune.cost.specs`; per-layer token schedules in
:mod:`vlmprune.cost.tokens`; the vision side's FLOPs in :mod:`vlmprune.cost.vision`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .specs import (GB, PHYSICAL, Conventions, CostModelError, GPUSpec, ModelConfig, Precision, get_conventions,
                    get_precision, load_gpu, load_model)
# imported from here by bench/ (ModelConfig, GPUSpec above too)
from .vision import vision_encoder_flops, vision_tower_flops  # noqa: F401

__all__ = [
    "LayerCost",
    "OpCost",
    "PrefillCost",
    "kv_cache_bytes",
    "layer_ops",
    "lm_head_op",
    "prefill_cost",
    "weight_footprint_bytes",
]


@dataclass(frozen=True)
class OpCost:
    """One operator's ops and bytes (already multiplied by the batch)."""

    name: str
    ops: float
    load_weight: float = 0.0
    load_act: float = 0.0
    store_act: float = 0.0
    load_kv: float = 0.0
    store_kv: float = 0.0
    matmul: bool = False

    @property
    def bytes(self) -> float:
        return self.load_weight + self.load_act + self.store_act + self.load_kv + self.store_kv

    def time(self, peak: float, bandwidth: float) -> float:
        """Roofline: the operator is bound by compute or by memory traffic."""
        return max(self.ops / peak, self.bytes / bandwidth)


def layer_ops(cfg: ModelConfig, seq: int, precision: Precision, batch: int = 1,
              conventions: Conventions = PHYSICAL) -> list[OpCost]:
    """The operators of one decoder layer processing ``seq`` tokens (see module doc)."""
    h, i_sz, d = cfg.hidden_size, cfg.intermediate_size, cfg.d_head
    nh = cfg.num_heads
    qd, kvd = cfg.q_dim, cfg.kv_dim
    w, a, c = precision.w_bytes, precision.a_bytes, precision.kv_bytes
    t = batch * seq  # token rows
    mac = conventions.ops_per_mac
    ops: list[OpCost] = []

    def linear(name: str, ic: int, oc: int, to_kv: bool = False) -> OpCost:
        return OpCost(
            name, ops=mac * t * ic * oc, load_weight=ic * oc * w, load_act=t * ic * a,
            store_act=0.0 if to_kv else t * oc * a, store_kv=t * oc * c if to_kv else 0.0,
            matmul=True)

    scores = batch * nh * seq * seq
    ops.append(OpCost("attn_norm", ops=conventions.norm_ops_per_element * t * h,
                      load_act=t * h * a, store_act=t * h * a))
    ops.append(linear("q_proj", h, qd))
    ops.append(linear("k_proj", h, kvd, to_kv=True))
    ops.append(linear("v_proj", h, kvd, to_kv=True))
    # q.k^T: every query head against its (shared, for GQA) key head; dense s x s.
    ops.append(OpCost("qk_matmul", ops=mac * scores * d, load_act=t * qd * a,
                      load_kv=t * kvd * c, store_act=scores * a, matmul=True))
    ops.append(OpCost("softmax", ops=conventions.softmax_ops_per_element * scores,
                      load_act=scores * a, store_act=scores * a))
    ops.append(OpCost("sv_matmul", ops=mac * scores * d, load_act=scores * a,
                      load_kv=t * kvd * c, store_act=t * qd * a, matmul=True))
    ops.append(linear("o_proj", qd, h))
    ops.append(OpCost("attn_add", ops=conventions.add_ops_per_element * t * h,
                      load_act=t * h * a, store_act=t * h * a))
    ops.append(OpCost("mlp_norm", ops=conventions.norm_ops_per_element * t * h,
                      load_act=t * h * a, store_act=t * h * a))
    ops.append(linear("gate_proj", h, i_sz))
    ops.append(linear("up_proj", h, i_sz))
    width = i_sz if conventions.gate_act_width == "intermediate" else h
    ops.append(OpCost("mlp_act", ops=conventions.act_ops_per_element * t * width,
                      load_act=2 * t * width * a, store_act=t * width * a))
    ops.append(linear("down_proj", i_sz, h))
    ops.append(OpCost("mlp_add", ops=conventions.add_ops_per_element * t * h,
                      load_act=t * h * a, store_act=t * h * a))
    return ops


def lm_head_op(cfg: ModelConfig, seq_last_layer: int, precision: Precision, batch: int = 1,
               conventions: Conventions = PHYSICAL) -> OpCost:
    """The lm_head: last token per sequence (or every token, per ``conventions``)."""
    rows = batch * (1 if conventions.lm_head_tokens == "last" else seq_last_layer)
    h, v, a = cfg.hidden_size, cfg.vocab_size, precision.a_bytes
    wb = precision.w_bytes if conventions.lm_head_weight_bytes is None else conventions.lm_head_weight_bytes
    return OpCost("lm_head", ops=conventions.ops_per_mac * rows * h * v, load_weight=h * v * wb,
                  load_act=rows * h * a, store_act=rows * v * a, matmul=True)


# --------------------------------------------------------------------------- totals


@dataclass
class LayerCost:
    """Totals for one decoder layer."""

    index: int
    tokens: int
    ops: float
    matmul_flops: float
    bytes_moved: float
    activation_bytes_written: float
    kv_cache_bytes: float
    time_s: float


@dataclass
class PrefillCost:
    """Prefill cost of the LLM decoder (batch included). Byte figures in bytes."""

    model: str
    gpu: str
    precision: str
    conventions: str
    batch: int
    layer_tokens: list[int]
    total_ops: float
    matmul_flops: float
    bytes_moved: float
    weight_bytes_loaded: float
    activation_bytes_written: float
    kv_cache_bytes: float
    weight_bytes: float
    peak_activation_bytes: float
    prefill_time_s: float
    compute_bound_time_s: float
    memory_bound_time_s: float
    peak_ops_per_s: float
    bandwidth_bytes_per_s: float
    layers: list[LayerCost] = field(default_factory=list)
    op_breakdown: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def memory_footprint_bytes(self) -> float:
        """Weights + KV cache + the largest layer's intermediates."""
        return self.weight_bytes + self.kv_cache_bytes + self.peak_activation_bytes

    def summary(self) -> dict[str, float]:
        """Headline figures in table units (T ops, GB, ms)."""
        return {
            "tflops": self.total_ops / 1e12,
            "matmul_tflops": self.matmul_flops / 1e12,
            "prefill_ms": self.prefill_time_s * 1e3,
            "total_memory_gb": self.bytes_moved / GB,
            "activation_gb": self.activation_bytes_written / GB,
            "kv_cache_gb": self.kv_cache_bytes / GB,
            "weight_gb": self.weight_bytes / GB,
            "peak_activation_gb": self.peak_activation_bytes / GB,
            "memory_footprint_gb": self.memory_footprint_bytes / GB,
        }

    def to_dict(self, per_layer: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not per_layer:
            d.pop("layers")
        d["memory_footprint_bytes"] = self.memory_footprint_bytes
        d["summary"] = self.summary()
        return d


def kv_cache_bytes(
    cfg: ModelConfig, layer_tokens: Sequence[int], precision: Precision | str, batch: int = 1
) -> float:
    """KV cache after prefill: ``sum_i 2 * b * s_i * num_kv_heads * head_dim * kv_bytes``."""
    p = get_precision(precision)
    return float(sum(2 * batch * s * cfg.kv_dim * p.kv_bytes for s in layer_tokens))


def weight_footprint_bytes(cfg: ModelConfig, precision: Precision | str) -> float:
    """All decoder parameters (embeddings, layers, norms, lm_head) at the weight precision."""
    return cfg.num_params() * get_precision(precision).w_bytes


def prefill_cost(
    cfg: ModelConfig | str,
    layer_tokens: int | Sequence[int],
    gpu: GPUSpec | str,
    precision: Precision | str = "fp16",
    batch: int = 1,
    conventions: Conventions | str = PHYSICAL,
) -> PrefillCost:
    """Cost of one prefill of the LLM decoder.

    Args:
        cfg: model config or shipped model name.
        layer_tokens: total tokens (text + visual) per sequence, either one number
            for all layers or one per decoder layer.
        gpu: GPU spec or shipped GPU name.
        precision: precision or its name.
        batch: sequences in the batch (weights are read once per operator).
        conventions: bookkeeping conventions (:data:`PHYSICAL` or :data:`LLM_VIEWER`).
    """
    model = load_model(cfg) if isinstance(cfg, str) else cfg
    g = load_gpu(gpu) if isinstance(gpu, str) else gpu
    p = get_precision(precision)
    conv = get_conventions(conventions)
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise CostModelError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(layer_tokens, int) and not isinstance(layer_tokens, bool):
        tokens = [layer_tokens] * model.num_layers
    else:
        tokens = list(layer_tokens)
    if len(tokens) != model.num_layers:
        raise CostModelError(
            f"expected {model.num_layers} per-layer token counts for {model.name}, "
            f"got {len(tokens)}")
    if any(isinstance(s, bool) or int(s) != s or s < 1 for s in tokens):
        raise CostModelError(f"every layer needs a positive integer token count, got {tokens}")
    tokens = [int(s) for s in tokens]

    peak, bw = g.peak(p.compute_kind), g.bandwidth
    totals = dict(ops=0.0, mm=0.0, bytes=0.0, lw=0.0, act=0.0, time=0.0, tc=0.0, tm=0.0)
    breakdown: dict[str, dict[str, float]] = {}
    layers: list[LayerCost] = []
    peak_act = 0.0

    def add(op: OpCost) -> tuple[float, float]:
        t = op.time(peak, bw)
        totals["ops"] += op.ops
        totals["mm"] += op.ops if op.matmul else 0.0
        totals["bytes"] += op.bytes
        totals["lw"] += op.load_weight
        totals["act"] += op.store_act
        totals["time"] += t
        if op.ops / peak >= op.bytes / bw:
            totals["tc"] += t
        else:
            totals["tm"] += t
        b = breakdown.setdefault(op.name, dict(ops=0.0, bytes=0.0, time_s=0.0, store_act=0.0))
        b["ops"] += op.ops
        b["bytes"] += op.bytes
        b["time_s"] += t
        b["store_act"] += op.store_act
        return t, op.store_act

    for idx, s in enumerate(tokens):
        lops = layer_ops(model, s, p, batch, conv)
        times = [add(op)[0] for op in lops]
        act = sum(op.store_act for op in lops)
        peak_act = max(peak_act, act)
        layers.append(LayerCost(
            index=idx, tokens=s, ops=sum(o.ops for o in lops),
            matmul_flops=sum(o.ops for o in lops if o.matmul),
            bytes_moved=sum(o.bytes for o in lops), activation_bytes_written=act,
            kv_cache_bytes=sum(o.store_kv for o in lops), time_s=sum(times)))
    add(lm_head_op(model, tokens[-1], p, batch, conv))

    return PrefillCost(
        model=model.name, gpu=g.name, precision=p.name, conventions=conv.name, batch=batch,
        layer_tokens=tokens, total_ops=totals["ops"], matmul_flops=totals["mm"],
        bytes_moved=totals["bytes"], weight_bytes_loaded=totals["lw"],
        activation_bytes_written=totals["act"],
        kv_cache_bytes=kv_cache_bytes(model, tokens, p, batch),
        weight_bytes=weight_footprint_bytes(model, p), peak_activation_bytes=peak_act,
        prefill_time_s=totals["time"], compute_bound_time_s=totals["tc"],
        memory_bound_time_s=totals["tm"], peak_ops_per_s=peak, bandwidth_bytes_per_s=bw,
        layers=layers, op_breakdown=breakdown)


"""Analytic prefill cost model for the LLM decoder of a vision-language model.

Everything here is arithmetic on a model config: no ``torch``, no ``transformers``,
no weights. Given the number of tokens each decoder layer processes (visual tokens
that survive pruning + text tokens), it returns prefill operation counts, bytes
moved, KV-cache bytes, weight / activation memory and a roofline estimate of the
prefill time on a named GPU.

The accounting (written out, nanoGPT style)
-------------------------------------------
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
times add up (no overlap between operators). The peak is the INT8 one when weights,
activations and KV are all <= 8 bits, the FP16 (or BF16) one otherwise, so "INT4"
(W4A4KV4) runs at the INT8 peak: a V100 or H100 has no INT4 tensor cores, and this
is also LLM-Viewer's rule.

Quantities reported (see :class:`PrefillCost`):
``total_ops`` (every operator; this is what PruMerge's Table 2 calls "FLOPs"),
``matmul_flops`` (matmuls only; what ``torch.utils.flop_counter`` counts),
``bytes_moved`` (all weight/activation/KV reads and writes = Table 2's
"total memory"), ``activation_bytes_written`` (all activation writes = Table 2's
"activation"), ``kv_cache_bytes``, ``weight_bytes`` (footprint of all LLM weights
incl. embeddings), ``peak_activation_bytes`` (largest single layer's written
intermediates, a footprint proxy since intermediates are freed layer by layer) and
``prefill_time_s``.

Two bookkeeping conventions are provided. :data:`PHYSICAL` (default) follows the
shapes of the real computation. :data:`LLM_VIEWER` mirrors two quirks of the 2024
LLM-Viewer (github hahnyuan/LLM-Viewer) that the PruMerge authors used for Table 2:
the lm_head weights are charged at 1 byte per parameter whatever the precision, and
the SwiGLU gating op is sized by the hidden size instead of the intermediate size.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, Sequence

__all__ = [
    "CONVENTIONS",
    "LLM_VIEWER",
    "PHYSICAL",
    "PRECISIONS",
    "Conventions",
    "CostModelError",
    "GPUSpec",
    "ModelConfig",
    "OpCost",
    "Precision",
    "PrefillCost",
    "get_conventions",
    "get_precision",
    "kv_cache_bytes",
    "layer_ops",
    "layer_token_schedule",
    "list_gpus",
    "list_models",
    "load_gpu",
    "load_model",
    "parse_layer_tokens",
    "prefill_cost",
    "vision_encoder_flops",
    "vision_tower_flops",
]

GB = 1e9  # decimal gigabyte: the unit of the papers' tables (and of LLM-Viewer)


class CostModelError(ValueError):
    """Bad input to the cost model; the message names the valid choices."""


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a VLM's LLM decoder (plus vision-side metadata).

    Only the decoder fields enter the prefill cost; ``vision`` and ``projector`` are
    kept for :func:`vision_encoder_flops` and for documentation.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    display_name: str = ""
    default_visual_tokens: int = 576
    max_visual_tokens: int = 576
    default_text_tokens: int = 124
    max_context: int | None = None  # the LLM's context length (max_position_embeddings); None = unknown
    vision: dict[str, Any] = field(default_factory=dict, compare=False)
    projector: dict[str, Any] = field(default_factory=dict, compare=False)
    note: str = field(default="", compare=False)
    #: The transformers config fields of the model's family (``model_type`` first), from which
    #: ``vlmprune.cost.geometry`` asks the family's adapter for image geometry; {} = unknown.
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "intermediate_size", "vocab_size"):
            if int(getattr(self, key)) <= 0:
                raise CostModelError(f"model config {self.name!r}: {key} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise CostModelError(
                f"model config {self.name!r}: num_heads ({self.num_heads}) must be a "
                f"multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise CostModelError(
                f"model config {self.name!r}: hidden_size not divisible by num_heads; "
                "give head_dim explicitly")

    @property
    def d_head(self) -> int:
        """Per-head size (``head_dim`` or ``hidden_size // num_heads``)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.d_head

    def layer_matmul_params(self) -> int:
        """Weights of the seven projections of one decoder layer (no biases/norms)."""
        h, i = self.hidden_size, self.intermediate_size
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * i

    def num_params(self) -> int:
        """All decoder parameters: layers (+ q/k/v biases, norms), embeddings, lm_head."""
        h = self.hidden_size
        per_layer = self.layer_matmul_params() + 2 * h
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * per_layer + embed + lm_head + h  # + final norm

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Build from the JSON layout of ``cost/configs/<model>.json``."""
        llm = data["llm"]
        vt = data.get("visual_tokens", {})
        return cls(
            name=data["name"],
            display_name=data.get("display_name", data["name"]),
            hidden_size=int(llm["hidden_size"]),
            num_layers=int(llm["num_layers"]),
            num_heads=int(llm["num_heads"]),
            num_kv_heads=int(llm.get("num_kv_heads", llm["num_heads"])),
            head_dim=llm.get("head_dim"),
            intermediate_size=int(llm["intermediate_size"]),
            vocab_size=int(llm["vocab_size"]),
            qkv_bias=bool(llm.get("qkv_bias", False)),
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            default_visual_tokens=int(vt.get("default", 576)),
            max_visual_tokens=int(vt.get("max", vt.get("default", 576))),
            default_text_tokens=int(data.get("default_text_tokens", 124)),
            max_context=None if llm.get("max_context") is None else int(llm["max_context"]),
            vision=dict(data.get("vision", {})),
            projector=dict(data.get("projector", {})),
            note=data.get("note", ""),
            hf_config=dict(data.get("hf_config", {})),
        )


@dataclass(frozen=True)
class GPUSpec:
    """Peak throughputs (dense, tensor cores) and memory bandwidth of one GPU."""

    name: str
    fp16_tflops: float
    int8_tops: float
    bandwidth_gbs: float
    bf16_tflops: float | None = None
    memory_gb: float | None = None
    display_name: str = ""
    note: str = field(default="", compare=False)

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_gbs * 1e9

    def peak(self, compute: str) -> float:
        """Ops per second for a compute kind: ``"fp16"``, ``"bf16"`` or ``"int8"``."""
        if compute == "fp16":
            return self.fp16_tflops * 1e12
        if compute == "int8":
            return self.int8_tops * 1e12
        if compute == "bf16":
            if self.bf16_tflops is None:
                raise CostModelError(
                    f"GPU {self.name!r} has no BF16 tensor-core peak; use --precision fp16")
            return self.bf16_tflops * 1e12
        raise CostModelError(f"unknown compute kind {compute!r}; valid: fp16, bf16, int8")


@dataclass(frozen=True)
class Precision:
    """Bit widths of weights, activations and KV cache, and which peak the math uses."""

    name: str
    weight_bits: float
    act_bits: float
    kv_bits: float
    compute: str = ""  # "fp16" | "bf16" | "int8"; "" = LLM-Viewer rule (see module doc)
    note: str = ""

    @property
    def w_bytes(self) -> float:
        return self.weight_bits / 8

    @property
    def a_bytes(self) -> float:
        return self.act_bits / 8

    @property
    def kv_bytes(self) -> float:
        return self.kv_bits / 8

    @property
    def compute_kind(self) -> str:
        if self.compute:
            return self.compute
        if max(self.weight_bits, self.act_bits, self.kv_bits) <= 8:
            return "int8"
        return "fp16"


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp16", 16, 16, 16, note="16-bit weights, activations and KV; FP16 peak"),
        Precision("bf16", 16, 16, 16, compute="bf16",
                  note="as fp16 but on the BF16 peak (not on V100)"),
        Precision("int8", 8, 8, 8, note="W8A8KV8; INT8 peak"),
        Precision("int4", 4, 4, 4,
                  note="W4A4KV4 (PruMerge Table 2's 'INT4'); runs at the INT8 peak"),
        Precision("w8a16", 8, 16, 16, note="8-bit weight-only quantisation; FP16 math"),
        Precision("w4a16", 4, 16, 16, note="4-bit weight-only (AWQ/GPTQ style); FP16 math"),
    )
}


@dataclass(frozen=True)
class Conventions:
    """Bookkeeping choices that the papers' tools make differently.

    Attributes:
        name: identifier.
        lm_head_tokens: ``"last"`` charges the lm_head for the last token of each
            sequence only (prefill needs one next-token distribution); ``"all"``
            charges every position (what a plain HF forward without
            ``logits_to_keep`` does).
        lm_head_weight_bytes: bytes per lm_head weight; ``None`` = the precision's
            weight bytes. LLM-Viewer (2024) charged 1 byte whatever the precision.
        gate_act_width: width of the SwiGLU ``silu(gate) * up`` op: ``"intermediate"``
            (real) or ``"hidden"`` (LLM-Viewer's sizing).
    """

    name: str
    lm_head_tokens: Literal["last", "all"] = "last"
    lm_head_weight_bytes: float | None = None
    gate_act_width: Literal["intermediate", "hidden"] = "intermediate"
    ops_per_mac: int = 2
    norm_ops_per_element: int = 7
    softmax_ops_per_element: int = 5
    act_ops_per_element: int = 2
    add_ops_per_element: int = 1
    description: str = ""


PHYSICAL = Conventions(
    name="physical",
    description="shapes of the real computation (default)",
)
LLM_VIEWER = Conventions(
    name="llm-viewer",
    lm_head_weight_bytes=1.0,
    gate_act_width="hidden",
    description=("LLM-Viewer 2024 quirks used by PruMerge Table 2: lm_head weights at "
                 "1 byte/param, SwiGLU gating op sized by hidden_size"),
)
CONVENTIONS: dict[str, Conventions] = {c.name: c for c in (PHYSICAL, LLM_VIEWER)}


# --------------------------------------------------------------------------- loading


def _configs_dir():
    return resources.files("vlmprune.cost") / "configs"


@lru_cache(maxsize=None)
def _model_files() -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in _configs_dir().iterdir():
        if entry.name.endswith(".json") and entry.name != "gpus.json":
            out[entry.name[: -len(".json")]] = entry.name
    return dict(sorted(out.items()))


def list_models() -> list[str]:
    """Names of the shipped model configs."""
    return list(_model_files())


@lru_cache(maxsize=None)
def _gpu_table() -> dict[str, dict[str, Any]]:
    return json.loads((_configs_dir() / "gpus.json").read_text())


def list_gpus() -> list[str]:
    """Names of the shipped GPU specs."""
    return list(_gpu_table())


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def load_model(name: str) -> ModelConfig:
    """Load a shipped model config by name (case-insensitive, ``_`` == ``-``)."""
    key = _norm(name)
    files = _model_files()
    if key not in files:
        raise CostModelError(
            f"unknown model {name!r}; valid models: {', '.join(files)}")
    data = json.loads((_configs_dir() / files[key]).read_text())
    return ModelConfig.from_dict(data)


def load_gpu(name: str) -> GPUSpec:
    """Load a shipped GPU spec by name (``v100``, ``a100``, ``h100``)."""
    key = _norm(name)
    table = _gpu_table()
    if key not in table:
        raise CostModelError(f"unknown GPU {name!r}; valid GPUs: {', '.join(table)}")
    d = table[key]
    return GPUSpec(
        name=key,
        display_name=d.get("display_name", key),
        fp16_tflops=float(d["fp16_tflops"]),
        bf16_tflops=None if d.get("bf16_tflops") is None else float(d["bf16_tflops"]),
        int8_tops=float(d["int8_tops"]),
        bandwidth_gbs=float(d["bandwidth_gbs"]),
        memory_gb=d.get("memory_gb"),
        note=d.get("note", ""),
    )


def get_precision(name: str | Precision) -> Precision:
    """Look up a precision by name (``fp16``, ``bf16``, ``int8``, ``int4``, ``w8a16``, ``w4a16``)."""
    if isinstance(name, Precision):
        return name
    key = _norm(name)
    if key not in PRECISIONS:
        raise CostModelError(
            f"unknown precision {name!r}; valid precisions: {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def get_conventions(name: str | Conventions) -> Conventions:
    """Look up a bookkeeping convention (``physical`` or ``llm-viewer``)."""
    if isinstance(name, Conventions):
        return name
    key = _norm(name)
    if key not in CONVENTIONS:
        raise CostModelError(
            f"unknown conventions {name!r}; valid: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[key]


# --------------------------------------------------------------------------- tokens


def layer_token_schedule(
    visual_tokens: int | Sequence[int], text_tokens: int, num_layers: int
) -> list[int]:
    """Per-layer sequence lengths = visual tokens in that layer + text tokens.

    ``visual_tokens`` is one count (same at every layer, i.e. pruning before the
    LLM) or one count per decoder layer (pruning inside the decoder).
    """
    if isinstance(text_tokens, bool) or int(text_tokens) != text_tokens or text_tokens < 0:
        raise CostModelError(f"text tokens must be a non-negative integer, got {text_tokens!r}")
    if isinstance(visual_tokens, (int,)) and not isinstance(visual_tokens, bool):
        per_layer = [visual_tokens] * num_layers
    else:
        per_layer = list(visual_tokens)
        if len(per_layer) != num_layers:
            raise CostModelError(
                f"expected {num_layers} per-layer visual-token counts (one per decoder "
                f"layer), got {len(per_layer)}")
    for i, v in enumerate(per_layer):
        if isinstance(v, bool) or int(v) != v or v < 0:
            raise CostModelError(
                f"visual tokens must be non-negative integers; layer {i} has {v!r}")
    out = [int(v) + int(text_tokens) for v in per_layer]
    if any(s == 0 for s in out):
        raise CostModelError("a layer would process 0 tokens; give at least one token")
    return out


_REPEAT = re.compile(r"^\s*(-?\d+)\s*(?:[x*]\s*(\d+))?\s*$")


def parse_layer_tokens(text: str, num_layers: int | None = None) -> list[int]:
    """Parse ``"576,576,144,..."``; ``"576x3,99x29"`` repeats a count.

    Raises :class:`CostModelError` on negative numbers, junk, or (when
    ``num_layers`` is given) the wrong number of entries.
    """
    counts: list[int] = []
    for part in text.split(","):
        if not part.strip():
            continue
        m = _REPEAT.match(part)
        if not m:
            raise CostModelError(
                f"cannot parse {part.strip()!r} in --layer-tokens; use a comma list of "
                "non-negative integers, optionally COUNTxREPEAT (e.g. 576x3,99x29)")
        value = int(m.group(1))
        if value < 0:
            raise CostModelError(f"visual tokens must be >= 0, got {value} in --layer-tokens")
        counts.extend([value] * (int(m.group(2)) if m.group(2) else 1))
    if not counts:
        raise CostModelError("--layer-tokens is empty")
    if num_layers is not None and len(counts) != num_layers:
        raise CostModelError(
            f"--layer-tokens has {len(counts)} entries but the model has {num_layers} "
            "decoder layers; give one count per layer")
    return counts


# --------------------------------------------------------------------------- operators


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


def layer_ops(
    cfg: ModelConfig,
    seq: int,
    precision: Precision,
    batch: int = 1,
    conventions: Conventions = PHYSICAL,
) -> list[OpCost]:
    """The operators of one decoder layer processing ``seq`` tokens (see module doc)."""
    h, i_sz, d = cfg.hidden_size, cfg.intermediate_size, cfg.d_head
    nh, nkv = cfg.num_heads, cfg.num_kv_heads
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


def lm_head_op(
    cfg: ModelConfig,
    seq_last_layer: int,
    precision: Precision,
    batch: int = 1,
    conventions: Conventions = PHYSICAL,
) -> OpCost:
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


# --------------------------------------------------------------------------- vision side


def vision_encoder_flops(cfg: ModelConfig, images: int | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per MAC) of the vision tower and projector; not pruned, not in the
    decoder totals. ViT layer: ``2*n*(4*D^2 + 2*D*M) + 4*n^2*D`` (QKV/out projections,
    2-layer MLP, dense attention) for ``n`` patch tokens of width ``D``, MLP width ``M``;
    patch embedding ``2*n*D*3*p^2``. ``images`` defaults to the config's maximum views
    per sample (5 for AnyRes LLaVA-NeXT)."""
    v = cfg.vision
    if not v:
        return {"vision_tower": 0.0, "projector": 0.0}
    n_img = int(images if images is not None else v.get("max_images_per_sample", 1))
    n = int(v["tokens_per_image"])
    dd, m, p = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["patch_size"])
    per_layer = 2 * n * (4 * dd * dd + 2 * dd * m) + 4 * n * n * dd
    tower = n_img * (int(v["num_layers"]) * per_layer + 2 * n * dd * 3 * p * p)
    dims = [int(x) for x in cfg.projector.get("dims", [])]
    # projector input rows: CLS dropped (LLaVA); for Qwen2-VL's merger 4 patches are
    # concatenated into one 4*D row, so rows = merged tokens.
    rows = n_img * int(v.get("projector_rows_per_image", n - (1 if v.get("cls_token") else 0)))
    proj = sum(2 * rows * a * b for a, b in zip(dims, dims[1:]))
    return {"vision_tower": float(tower), "projector": float(proj)}


def vision_tower_flops(shape: dict[str, Any], units: Sequence[tuple[int, int]],
                       projector_rows: int | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per MAC) of the vision tower and projector for the tower passes ``units``
    (each ``(n, rows)``: ``n`` tokens in the tower's sequence, ``rows`` projector rows unpruned).

    ``shape`` is an adapter's ``vision_shape``: width ``hidden`` = D, ``layers``, MLP width
    ``intermediate`` = M with ``mlp_matrices`` (2: fc1/fc2, 3: SwiGLU), ``patch_in`` inputs per
    patch, ``window_tokens`` / ``full_layers`` (windowed attention), ``projector_dims`` and
    ``projector_after_pruning``. Per pass: layers x ``2*n*(4*D^2 + mats*D*M)``, attention
    ``4*n*a*D`` per layer (``a = n``, or ``min(n, window_tokens)`` in a windowed layer), patch
    embedding ``2*n*D*patch_in``. Projector: ``2*rows*a*b`` per layer of ``projector_dims``, on
    ``projector_rows`` rows when the projector runs after pruning and the count is given, else on
    every unpruned row."""
    d, m, layers = int(shape["hidden"]), int(shape["intermediate"]), int(shape["layers"])
    mats, patch_in = int(shape.get("mlp_matrices", 2)), int(shape["patch_in"])
    window, full = shape.get("window_tokens"), shape.get("full_layers")
    tower = 0.0
    for n, _ in units:
        n = int(n)
        linear = 2 * n * (4 * d * d + mats * d * m)
        if window:
            n_full = len(set(full or []))
            attention = 4 * n * d * (n_full * n + (layers - n_full) * min(n, int(window)))
        else:
            attention = layers * 4 * n * n * d
        tower += layers * linear + attention + 2 * n * d * patch_in
    rows = sum(int(r) for _, r in units)
    if projector_rows is not None and shape.get("projector_after_pruning", True):
        rows = int(projector_rows)
    dims = [int(x) for x in shape.get("projector_dims", [])]
    proj = sum(2 * rows * a * b for a, b in zip(dims, dims[1:]))
    return {"vision_tower": float(tower), "projector": float(proj)}


def with_overrides(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    """A copy of ``cfg`` with fields replaced (validated again)."""
    return replace(cfg, **kw)


def gb(x: float) -> float:
    """Bytes to decimal GB."""
    return x / GB


def rel_dev(ours: float, paper: float) -> float:
    """Signed relative deviation of ours from the paper, in percent."""
    return math.inf if paper == 0 else (ours - paper) / paper * 100.0

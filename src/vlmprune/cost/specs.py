"""What the cost model computes on: model shapes, GPUs, precisions and bookkeeping conventions,
and the shipped ones (``cost/configs/*.json``) loaded by name.

No ``torch``, no ``transformers``, no weights: plain dataclasses.

Peaks: an operator runs at the INT8 peak when weights, activations and KV are all <= 8 bits,
at the FP16 (or BF16) peak otherwise (``Precision.compute_kind``), so "INT4" (W4A4KV4) runs at
the INT8 peak: a V100 or H100 has no INT4 tensor cores, and LLM-Viewer uses the same rule.

Two bookkeeping conventions are provided. :data:`PHYSICAL` (default) follows the shapes of the
real computation. :data:`LLM_VIEWER` mirrors two quirks of the 2024 LLM-Viewer (github
hahnyuan/LLM-Viewer) that the PruMerge authors used for their Table 2: the lm_head weights are
charged at 1 byte per parameter whatever the precision, and the SwiGLU gating op is sized by the
hidden size instead of the intermediate size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

__all__ = [
    "GB",
    "CONVENTIONS",
    "LLM_VIEWER",
    "PHYSICAL",
    "PRECISIONS",
    "Conventions",
    "CostModelError",
    "GPUSpec",
    "ModelConfig",
    "Precision",
    "get_conventions",
    "get_precision",
    "list_gpus",
    "list_models",
    "load_gpu",
    "load_model",
    "with_overrides",
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
    compute: str = ""  # "fp16" | "bf16" | "int8"; "" = by bit widths (see module doc)
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


def _key(name: str, table: dict[str, Any], what: str, valid: str) -> str:
    """``name`` normalised (case-insensitive, ``_`` == ``-``), checked to be a key of ``table``;
    the error says "unknown <what> ...; <valid>: <the keys>"."""
    key = _norm(name)
    if key not in table:
        raise CostModelError(f"unknown {what} {name!r}; {valid}: {', '.join(table)}")
    return key


def load_model(name: str) -> ModelConfig:
    """Load a shipped model config by name (case-insensitive, ``_`` == ``-``)."""
    files = _model_files()
    data = json.loads((_configs_dir() / files[_key(name, files, "model", "valid models")]).read_text())
    return ModelConfig.from_dict(data)


def load_gpu(name: str) -> GPUSpec:
    """Load a shipped GPU spec by name (``v100``, ``a100``, ``h100``)."""
    table = _gpu_table()
    key = _key(name, table, "GPU", "valid GPUs")
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
    return PRECISIONS[_key(name, PRECISIONS, "precision", "valid precisions")]


def get_conventions(name: str | Conventions) -> Conventions:
    """Look up a bookkeeping convention (``physical`` or ``llm-viewer``)."""
    if isinstance(name, Conventions):
        return name
    return CONVENTIONS[_key(name, CONVENTIONS, "conventions", "valid")]


def with_overrides(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    """A copy of ``cfg`` with fields replaced (validated again)."""
    return replace(cfg, **kw)


"""LoRA adapters on a model's language model (``peft``), injected in place and removable exactly.

``inject(model, LoraOptions)`` replaces each target linear (the family adapter's
``lora_target_modules``: the decoder layers' attention and MLP projections) by a ``peft`` LoRA
linear wrapping it, ``y = W x + (alpha / r) * B A dropout(x)`` with ``A`` [r, in] and ``B``
[out, r]; ``B`` starts at zero (peft's default), so a freshly injected model computes exactly what
it did before. It returns a ``LoraInjection`` whose ``remove()`` puts every original linear back
(the same module objects, so the same parameters), deletes what peft attached to the model and
restores every parameter's ``requires_grad``: the model is then exactly the stock model.

A saved adapter folder (``save`` / ``load``) is peft's own format, so ``peft.PeftModel`` can read
it too: ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` (float32
``base_model.model.<module>.lora_A.weight`` [r, in] / ``.lora_B.weight`` [out, r]), plus
``vlmprune_lora.json`` (how it was trained: method spec, model, steps; informative only).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LoraOptions", "LoraInjection", "inject", "save", "load", "read_folder", "CONFIG_NAME", "WEIGHTS_NAME",
           "INFO_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
INFO_NAME = "vlmprune_lora.json"
#: peft's prefix of saved keys (``PeftModel`` -> ``LoraModel`` -> the model).
_PREFIX = "base_model.model."
_ADAPTER = "default"


@dataclass(frozen=True)
class LoraOptions:
    """LoRA hyper-parameters. ``targets``: paths inside one decoder layer (None = the family
    adapter's ``lora_targets``)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an int >= 1, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise ValueError(f"LoRA targets must be non-empty module paths, got {self.targets!r}")


class LoraInjection:
    """LoRA layers injected into ``model`` (``inject``): ``names`` (the adapted linears),
    ``parameters()`` (name -> the trainable A / B tensors), ``state_dict()`` (peft's saved keys ->
    tensors), ``load_state_dict()``, ``remove()`` (idempotent; restores the model exactly)."""

    def __init__(self, model: nn.Module, names: list[str], options: LoraOptions, requires_grad: dict[str, bool],
                 had_peft_config: bool, previous_peft_config: Any) -> None:
        self.model = model
        self.names = names
        self.options = options
        self._requires_grad = requires_grad
        self._had_peft_config = had_peft_config
        self._previous_peft_config = previous_peft_config
        self.active = True

    def parameters(self) -> dict[str, nn.Parameter]:
        """Qualified name -> LoRA parameter (``...q_proj.lora_A.default.weight``), in module order."""
        return {n: p for n, p in self.model.named_parameters() if ".lora_A." in n or ".lora_B." in n}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """peft's saved keys (``base_model.model.<module>.lora_A.weight``) -> float32 CPU copies."""
        out = {}
        for n, p in self.parameters().items():
            out[_PREFIX + n.replace(f".{_ADAPTER}.", ".")] = p.detach().to("cpu", torch.float32).contiguous()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (``state_dict()``'s keys) into the LoRA parameters; the key sets and
        shapes must match exactly (``ValueError`` naming the first difference)."""
        params = {_PREFIX + n.replace(f".{_ADAPTER}.", "."): p for n, p in self.parameters().items()}
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or extra:
            which = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
            raise ValueError(f"the LoRA adapter does not fit this model ({which}; {len(missing)} missing, "
                             f"{len(extra)} unexpected tensors): was it trained on another model?")
        with torch.no_grad():
            for k, p in params.items():
                t = tensors[k]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"the LoRA adapter does not fit this model: {k} has shape {tuple(t.shape)}, "
                                     f"the model needs {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))

    def lora_dropout_train(self, on: bool) -> None:
        """Switch only the LoRA dropouts to training (``on``) or eval mode; the model stays as it is."""
        from peft.tuners.lora import LoraLayer

        for m in self.model.modules():
            if isinstance(m, LoraLayer):
                m.lora_dropout.train(on)

    def remove(self) -> None:
        """Put every original linear back and undo peft's changes; the model is the stock model."""
        if not self.active:
            return
        self.active = False
        for name in self.names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            wrapped = getattr(parent, child)
            base = getattr(wrapped, "base_layer", None)
            if base is not None:
                setattr(parent, child, base)
        if self._had_peft_config:
            self.model.peft_config = self._previous_peft_config
        elif "peft_config" in vars(self.model):
            del self.model.peft_config
        for n, p in self.model.named_parameters():
            if n in self._requires_grad:
                p.requires_grad_(self._requires_grad[n])


def inject(model: nn.Module, options: LoraOptions, *, seed: int | None = None) -> LoraInjection:
    """Inject LoRA layers (``options``) into the language model of ``model`` (any supported
    family); returns the ``LoraInjection``. ``A`` is drawn from torch's RNG (re-seeded with
    ``seed`` when given), ``B`` is zero. Every base parameter keeps its ``requires_grad``; the
    LoRA parameters are trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    from .base import get_adapter

    adapter = get_adapter(model)
    names = adapter.lora_target_modules(model, options.targets)
    if any(".lora_A." in n for n, _ in model.named_parameters()):
        raise ValueError("this model already carries LoRA layers; remove them before injecting new ones")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    had = "peft_config" in vars(model)
    previous = vars(model).get("peft_config")
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout, bias="none",
                        target_modules=names)
    if seed is not None:
        torch.manual_seed(seed)
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    injection = LoraInjection(model, names, options, requires_grad, had, previous)
    for n, p in model.named_parameters():  # peft froze the rest: restore, and make the LoRA tensors trainable
        p.requires_grad_(requires_grad.get(n, True))
    injection.lora_dropout_train(False)
    return injection


def save(injection: LoraInjection, folder: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write the adapter (peft format + ``vlmprune_lora.json``) to ``folder``; returns it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    o = injection.options
    config = {"peft_type": "LORA", "task_type": None, "r": o.r, "lora_alpha": o.alpha, "lora_dropout": o.dropout,
              "bias": "none", "target_modules": injection.names, "fan_in_fan_out": False,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(injection.state_dict(), str(tmp))
    tmp.replace(folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    (folder / INFO_NAME).write_text(json.dumps({"options": {**asdict(o), "targets": list(o.targets or [])},
                                                **(info or {})}, indent=2, default=str))
    return folder


def read_folder(folder: str | os.PathLike) -> tuple[LoraOptions, dict[str, torch.Tensor], list[str]]:
    """A saved adapter folder -> (options, tensors, adapted module names); every file problem is a
    ``ValueError`` naming the file and what to do."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"LoRA adapter folder {str(folder)!r} does not exist (train one with "
                                "`vlmprune train lora --method METHOD --out DIR`)")
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    missing = [str(p) for p in (cfg_path, w_path) if not p.is_file()]
    if missing:
        raise ValueError(f"{' and '.join(missing)} not found: {folder} is not a LoRA adapter folder (it needs "
                         f"{CONFIG_NAME} + {WEIGHTS_NAME}, written by `vlmprune train lora`)")
    try:
        cfg = json.loads(cfg_path.read_text())
        options = LoraOptions(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg["lora_dropout"]))
        names = list(cfg["target_modules"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} is not a readable LoRA config ({type(e).__name__}: {e}); re-run "
                         "`vlmprune train lora` or restore the file") from None
    try:
        tensors = load_file(str(w_path))
    except SafetensorError as e:
        raise ValueError(f"{w_path} is not a readable safetensors file ({e}); re-run `vlmprune train lora` or "
                         "restore the file") from None
    return options, tensors, names


def load(model: nn.Module, folder: str | os.PathLike) -> LoraInjection:
    """Inject the saved adapter in ``folder`` into ``model`` (same module names as when trained);
    returns the injection (``remove()`` restores the model exactly). A folder that does not fit the
    model raises ``ValueError`` before the model is changed for good."""
    options, tensors, names = read_folder(folder)
    from .base import get_adapter

    expected = get_adapter(model).lora_target_modules(model, _relative_targets(names))
    if sorted(expected) != sorted(names):
        raise ValueError(f"the LoRA adapter in {folder} adapts {len(names)} modules, but this model has "
                         f"{len(expected)} such modules: it was trained on another model")
    injection = inject(model, LoraOptions(options.r, options.alpha, options.dropout, _relative_targets(names)))
    try:
        injection.load_state_dict(tensors)
    except ValueError:
        injection.remove()
        raise
    return injection


def _relative_targets(names: list[str]) -> tuple[str, ...]:
    """``model.language_model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (order kept, unique)."""
    out: list[str] = []
    for n in names:
        parts = n.split(".")
        idx = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), None)
        rel = ".".join(parts[idx + 1:]) if idx is not None else n
        if rel not in out:
            out.append(rel)
    return tuple(out)

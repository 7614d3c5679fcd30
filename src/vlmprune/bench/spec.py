"""The benchmark's inputs, checked before anything is measured: method specs -> ``Variant``s,
dtypes, the device and batch sizes. A bad input raises ``BenchError`` saying what to pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["BenchError", "DTYPES", "Variant", "check_batches", "check_device", "parse_dtype", "parse_dtypes",
           "parse_methods", "resolve_dtypes"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class BenchError(ValueError):
    """Bad benchmark input; the message says what to pass."""


@dataclass(frozen=True)
class Variant:
    """One measured configuration: unpruned (``method=None``) or a method with options."""

    label: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    stage: str = "none"

    def apply(self, model: Any) -> Any:
        """Apply the method to ``model`` (``vlmprune.apply``): its handle, or None when unpruned.
        A budget the model cannot meet is a ``BenchError`` naming the variant."""
        if self.method is None:
            return None
        import vlmprune

        try:
            return vlmprune.apply(model, self.method, **self.options)
        except (ValueError, TypeError) as e:
            raise BenchError(f"{self.label}: {e}") from None


def parse_methods(specs: Sequence[str]) -> list[Variant]:
    """Method specs ``NAME[:key=value,...]`` -> validated variants (unpruned first, always).

    Options are checked by building the method (``BenchError`` names the problem); budgets that
    depend on the model (e.g. ``keep`` > N) are checked when the method is applied.
    """
    from ..registry import get_method, parse_method_spec

    variants = [Variant("unpruned", None)]
    seen = {"unpruned"}
    for spec in specs:
        try:
            name, opts = parse_method_spec(spec)
            if name is None:
                continue  # the unpruned baseline is always measured
            info = get_method(name)
            info.build(**opts)
        except ValueError as e:
            raise BenchError(str(e)) from None
        label = spec.strip()
        if label in seen:
            raise BenchError(f"method {label!r} given twice")
        seen.add(label)
        variants.append(Variant(label, name, dict(opts), info.stage))
    return variants


def parse_dtype(name: str) -> tuple[str, torch.dtype]:
    """``"fp32"`` / ``"bf16"`` (or ``float32`` / ``bfloat16``) -> (canonical name, dtype)."""
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise BenchError(f"unknown dtype {name!r}; use fp32 or bf16 (or auto, the default: both where bf16 is "
                         "accelerated)")
    dt = DTYPES[key]
    return ("fp32" if dt == torch.float32 else "bf16"), dt


def parse_dtypes(names: str | Sequence[str]) -> list[str]:
    """Dtype choices -> canonical names, ``"auto"`` kept (resolved by ``resolve_dtypes`` once the CPU
    is measured); duplicates dropped, order kept."""
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise BenchError("give at least one dtype (fp32, bf16 or auto)")
    out = []
    for name in names:
        key = "auto" if str(name).strip().lower() == "auto" else parse_dtype(name)[0]
        if key not in out:
            out.append(key)
    return out


def resolve_dtypes(names: Sequence[str], bf16_accelerated: bool) -> list[str]:
    """``auto`` -> bf16 and fp32 side by side where the CPU accelerates bf16, else fp32 alone."""
    out: list[str] = []
    for name in names:
        for d in ((["bf16", "fp32"] if bf16_accelerated else ["fp32"]) if name == "auto" else [name]):
            if d not in out:
                out.append(d)
    return out


def check_device(device: str) -> str:
    """``cpu`` or ``cuda`` / ``cuda:N`` (which must exist here); returns it normalised."""
    dev = str(device).strip().lower()
    if dev == "cpu":
        return dev
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BenchError(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu")
        index = int(dev[5:]) if ":" in dev else 0
        if index >= torch.cuda.device_count():
            raise BenchError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise BenchError(f"unknown device {device!r}; use cpu, cuda or cuda:N")


def check_batches(batches: Sequence[Any]) -> list[int]:
    """Batch sizes must be distinct ints >= 1."""
    out = []
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise BenchError(f"batch size must be an int >= 1, got {b!r}")
        if b in out:
            raise BenchError(f"batch size {b} given twice")
        out.append(b)
    if not out:
        raise BenchError("give at least one batch size")
    return out

"""What the training commands share: the schedule, model loading, resumable state, progress.

* ``lr_factor``: linear warm-up, then cosine from 1 to ``floor``.
* ``load_model``: the testbed (or a model folder) in a dtype, with a one-line error.
* ``read_state``: an existing ``train_state.pt`` of a run folder, checked against the new options
  (fields outside ``resumable`` must match), so a run resumes only with the options it began with.
* ``write_state``: the state written atomically (a killed run never leaves half a file).
* ``append_history``: per-step records appended to ``history.jsonl``.
* ``progress``: the rich progress bar of a run (resumes at the saved step).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

import torch

__all__ = ["STATE_NAME", "DTYPES", "lr_factor", "world_size_from_env", "load_model", "read_state", "write_state",
           "append_history", "progress"]

STATE_NAME = "train_state.pt"
#: Config spelling of the dtypes -> torch dtypes.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier of ``step`` (0-based) of ``total``: (step + 1) / warmup during the
    warm-up, then a cosine from 1 down to ``floor`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def world_size_from_env() -> int:
    """Processes of a distributed launch (torchrun / accelerate / mpirun env variables), else 1."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def load_model(model: str | None, dtype: str = "float32"):
    """(model, processor) of ``model`` (None = the committed testbed); ``ValueError`` naming the model."""
    from ..testbed.model import load

    try:
        return load(model, dtype=DTYPES[dtype])
    except Exception as e:  # noqa: BLE001 -- a missing / corrupt model folder: name it
        raise ValueError(f"could not load model {model or '(testbed)'}: {e}") from None


def read_state(out: str | os.PathLike, config_cls: type, cfg: Any, resumable: Iterable[str]) -> dict | None:
    """The saved state of the run folder ``out`` (None when it has none). ``ValueError`` when the
    file is unreadable or was written with options (other than ``resumable``) that differ from ``cfg``."""
    state_path = Path(out) / STATE_NAME
    if not state_path.exists():
        return None
    try:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        old = config_cls.from_dict(saved["config"])
    except Exception as e:  # noqa: BLE001 -- truncated / foreign files raise many kinds
        raise ValueError(f"{state_path} is not a readable training state ({type(e).__name__}: {e}); delete it "
                         "to start over, or choose a new --out") from None
    resumable = set(resumable)
    diff = [f.name for f in fields(config_cls) if f.name not in resumable and getattr(old, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ValueError(f"{state_path} was written with different options ({', '.join(diff)}: "
                         f"{', '.join(f'{getattr(old, d)!r} -> {getattr(cfg, d)!r}' for d in diff)}); "
                         "resume with the same options or choose a new --out")
    return saved


def write_state(out: str | os.PathLike, payload: dict) -> None:
    """``torch.save`` ``payload`` as ``out/train_state.pt`` via a temporary file (atomic replace)."""
    out = Path(out)
    tmp = out / (STATE_NAME + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out / STATE_NAME)


def append_history(out: str | os.PathLike, records: list[dict]) -> None:
    """Append per-step records (one JSON object a line) to ``out/history.jsonl``."""
    with open(Path(out) / "history.jsonl", "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def progress(enabled: bool = True):
    """A rich ``Progress`` with bar, step count, an ``info`` field and the time remaining."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn()]
    return Progress(*cols, disable=not enabled)

"""Data-parallel evaluation under ``accelerate launch``: shard the items, gather the results.

On a single process (no launcher) both functions are identities.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def _state():
    import os

    import torch
    from accelerate import PartialState

    # Several processes without CUDA (``accelerate launch --multi_gpu`` / torchrun on CPUs): accelerate
    # only picks its multi-CPU (gloo) mode when asked with cpu=True.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=multi_cpu)


def num_processes() -> int:
    return _state().num_processes


def shard(items: Sequence[T]) -> list[T]:
    """This process's contiguous slice of ``items`` (all of them on a single process)."""
    state = _state()
    if state.num_processes == 1:
        return list(items)
    with state.split_between_processes(list(items)) as part:
        return list(part)


def gather_results(local: list, seconds: float, order: list[str]) -> tuple[list, float]:
    """Gather every process's results (in the original item order) and the wall time (max over processes)."""
    state = _state()
    if state.num_processes == 1:
        return local, seconds
    from accelerate.utils import gather_object

    everything = gather_object(local)
    times = gather_object([seconds])
    by_id = {r.id: r for r in everything}
    missing = [i for i in order if i not in by_id]
    if missing:
        raise RuntimeError(f"distributed evaluation lost {len(missing)} item(s), e.g. {missing[:3]}")
    return [by_id[i] for i in order], max(times)


def is_main_process() -> bool:
    return _state().is_main_process


def finish() -> None:
    """End a multi-process run cleanly: wait for every process, then tear the process group down.

    Without this, gloo's threads can still be alive at interpreter exit and a process aborts
    ("terminate called without an active exception").
    """
    state = _state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()

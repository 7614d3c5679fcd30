"""Timing and machine facts shared by the benchmarks (``vlmprune bench``, ``bench.decoder``, ``bench.reduction``).

* clocks: ``device_sync`` (what a timer calls before reading the clock), ``time_call``,
  ``PhaseClock`` (nested spans: a handle's ``phase_timer`` and forward hooks on stock modules),
  ``own_time`` (a handle's own work from its phases), ``step_clock`` / ``timed_generate`` (one
  greedy ``generate`` with the time of every generated token);
* statistics: ``summarise`` (median, quartiles, min, max of repeated timings);
* the machine: ``machine_info``, ``loadavg``, ``cpu_flags``, and ``measure_bf16`` /
  ``bf16_verdict`` (whether this CPU accelerates bf16 matmuls).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..integrations.base import PHASES
from ..runinfo import cpu_model

__all__ = ["BF16_ACCELERATED_RATIO", "PART_PHASES", "PhaseClock", "bf16_verdict", "cpu_flags", "device_sync",
           "loadavg", "machine_info", "measure_bf16", "no_sync", "own_time", "step_clock", "summarise",
           "time_call", "timed_generate"]

#: The handle phases nested inside ``prefill`` (``integrations.base.PHASES``): the parts of its own work.
PART_PHASES = tuple(p for p in PHASES if p not in ("prefill", "decode"))


# ================================================================================ clocks


def no_sync() -> None:
    """The CPU's ``device_sync``: nothing to wait for."""
    return None


def device_sync(device: str) -> Callable[[], None]:
    """What the timers call before reading the clock: ``torch.cuda.synchronize`` on a GPU (kernels
    run asynchronously there), nothing on the CPU."""
    if str(device).startswith("cuda"):
        return functools.partial(torch.cuda.synchronize, torch.device(device))
    return no_sync


def time_call(fn: Callable[[], Any], sync: Callable[[], None] = no_sync) -> float:
    """Wall seconds of one call of ``fn``."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


class _Span:
    """The context manager ``PhaseClock(name)`` returns."""

    __slots__ = ("clock", "name")

    def __init__(self, clock: "PhaseClock", name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        self.clock.open(self.name)

    def __exit__(self, *exc: Any) -> None:
        self.clock.close(self.name)


class PhaseClock:
    """Wall time of named, nested spans.

    A span is opened and closed by ``open`` / ``close`` (e.g. a module's forward pre- and post-hook)
    or entered as ``with clock(name):`` — so the clock itself is a handle's ``phase_timer``. When a
    span closes, its wall time is added to ``inclusive[name]`` and appended to ``calls[name]``, and
    its self time (wall time minus the spans directly inside it) to ``exclusive[name]``; a span
    nested in one of the same name is therefore counted once in ``exclusive``.
    """

    def __init__(self, sync: Callable[[], None] = no_sync) -> None:
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        """Forget every span (open ones included)."""
        self.inclusive: dict[str, float] = defaultdict(float)
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, list[float]] = defaultdict(list)
        self._open: list[list[Any]] = []  # [name, start, time of the spans closed inside it]

    def open(self, name: str) -> None:
        self.sync()
        self._open.append([name, time.perf_counter(), 0.0])

    def close(self, name: str) -> None:
        """Close the innermost open span ``name`` (spans opened inside it and left open are dropped)."""
        self.sync()
        now = time.perf_counter()
        while self._open:
            top, start, inner = self._open.pop()
            if top == name:
                break
        else:
            return  # not open: opened before the last reset
        wall = now - start
        self.inclusive[name] += wall
        self.exclusive[name] += wall - inner
        self.calls[name].append(wall)
        if self._open:
            self._open[-1][2] += wall

    def __call__(self, name: str) -> _Span:
        return _Span(self, name)


def own_time(clock: PhaseClock, phase: str = "prefill") -> float:
    """A handle's own work in ``phase``: the self time of the phase and (for ``prefill``) of the
    parts nested in it, so the stock modules run inside them are left out."""
    parts = PART_PHASES if phase == "prefill" else ()
    return clock.exclusive.get(phase, 0.0) + sum(clock.exclusive.get(p, 0.0) for p in parts)


def step_clock(sync: Callable[[], None] = no_sync):
    """A logits processor that appends the time of each call (one per generated token) to its
    ``times`` and changes nothing."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            sync()
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def timed_generate(model, inputs: dict[str, Tensor], new_tokens: int,
                   sync: Callable[[], None] = no_sync) -> tuple[float, list[float], Any]:
    """One greedy ``generate`` of exactly ``new_tokens`` tokens: (start time, the time of each
    generated token, the output)."""
    from transformers import LogitsProcessorList

    clock = step_clock(sync)
    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]))
    return t0, clock.times, out


# ================================================================================ statistics


def summarise(values: Sequence[float], method: str = "inclusive") -> dict[str, float]:
    """median, q1, q3 (``statistics.quantiles`` with ``method``), min, max and n of ``values``."""
    vals = [float(v) for v in values]
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method=method)
    else:
        q1 = q3 = vals[0]
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": min(vals), "max": max(vals),
            "n": len(vals)}


# ================================================================================ the machine


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_flags() -> dict[str, bool]:
    """The CPU flags that decide matmul speed (``/proc/cpuinfo``; all False where unreadable)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
        flags = set(m.group(1).split()) if m else set()
    except OSError:
        flags = set()
    return {f: f in flags for f in wanted}


def machine_info() -> dict[str, Any]:
    """CPU, versions and thread settings of this process."""
    import transformers

    import vlmprune

    return {
        "cpu_model": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vlmprune": vlmprune.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
    }


#: bf16 / fp32 matmul time ratio up to which bf16 counts as accelerated (emulation is ~10-100x slower)
BF16_ACCELERATED_RATIO = 1.5


def measure_bf16(n: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Time an n x n x n matmul in fp32 and in bf16 (after one warm-up; the minimum of ``repeats``
    is robust to a shared machine's load). ``slowdown`` = bf16 time / fp32 time."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out: dict[str, Any] = {"shape": [n, n, n], "repeats": repeats}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dt), b.to(dt)
        x @ y
        ts = [time_call(lambda: x @ y) for _ in range(repeats)]
        out[f"{name}_s"] = min(ts)
        out[f"{name}_median_s"] = statistics.median(ts)
    out["slowdown"] = out["bf16_s"] / out["fp32_s"]
    out["accelerated"], out["hardware"], out["note"] = bf16_verdict(out["slowdown"], cpu_flags(),
                                                                    f"a {n}^3 bf16 matmul")
    return out


def bf16_verdict(ratio: float, flags: dict[str, bool], what: str = "a bf16 matmul") -> tuple[bool, str, str]:
    """(accelerated, hardware, a note for the card) from the measured bf16 / fp32 ``ratio`` and the
    CPU ``flags``: hardware is ``"amx_bf16"``, ``"avx512_bf16"`` or ``"none"``; accelerated means
    the measured ratio is at most ``BF16_ACCELERATED_RATIO`` (the flags alone do not decide: the
    torch build must use them)."""
    hardware = next((f for f in ("amx_bf16", "avx512_bf16") if flags.get(f)), "none")
    accelerated = ratio <= BF16_ACCELERATED_RATIO
    took = f"{what} took {ratio:.2f}x the fp32 time"
    if accelerated:
        where = f"{hardware} present" if hardware != "none" else "no amx_bf16 / avx512_bf16 flag"
        note = (f"this CPU accelerates bf16 ({where}): {took}; --dtype auto (the default) times bf16 and fp32 "
                "side by side")
    elif hardware != "none":
        note = f"this CPU reports {hardware}, but {took}: this torch build does not accelerate bf16 here"
    else:
        note = f"this CPU has no bf16 acceleration (neither amx_bf16 nor avx512_bf16): {took}, so bf16 times " \
               "would measure the emulation"
    return accelerated, hardware, note

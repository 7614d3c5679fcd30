"""Peak memory of one ``generate`` of a variant.

On the CPU (``probe_memory``) a fresh Python process per (model, batch, variant) builds the
model, applies the method, runs one warm-up ``generate``, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs`` = 5), reads ``VmRSS``, runs one ``generate`` and reads ``VmHWM``: the
peak is ``VmHWM - VmRSS``. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave the RSS. On a GPU (``cuda_peak_memory``) it is the CUDA allocator's peak over
one ``generate`` in this process.

    python -m vlmprune.bench.memory --probe SPEC.json   # the subprocess (internal)
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .models import ScaledConfig, bench_image_size, load_bench_model, make_bench_inputs
from .spec import Variant, parse_dtype
from .timing import device_sync, timed_generate

__all__ = ["cuda_peak_memory", "not_measured", "probe_memory"]


def not_measured() -> dict[str, Any]:
    """The ``memory`` entry of a run without memory measurement."""
    return {"peak_rss_delta_bytes": None, "baseline_rss_bytes": None, "peak_rss_bytes": None,
            "method": "not measured (--no-memory)"}


def _status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field_name}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _probe_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the fresh subprocess: build, warm up, reset the peak mark, one generate, read the peak."""
    import resource

    torch.set_num_threads(int(spec["threads"]))
    _, dtype = parse_dtype(spec["dtype"])
    model, processor, _ = load_bench_model(spec["model"], dtype, ScaledConfig(**spec["scaled"]))
    inputs, _ = make_bench_inputs(model, processor, int(spec["batch"]), int(spec["seed"]), bench_image_size(spec["model"]))
    variant = Variant(spec["label"], spec["method"], spec["options"], spec["stage"])
    handle = variant.apply(model)
    timed_generate(model, inputs, int(spec["new_tokens"]))  # warm-up: lazy initialisations, kernel caches
    gc.collect()
    reset = _reset_peak()
    base = _status_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    timed_generate(model, inputs, int(spec["new_tokens"]))
    hwm = _status_kib("VmHWM")
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if handle is not None:
        handle.remove()
    if reset and base is not None and hwm is not None:
        return {"peak_rss_delta_bytes": (hwm - base) * 1024, "baseline_rss_bytes": base * 1024,
                "peak_rss_bytes": hwm * 1024, "method": "VmHWM after clear_refs reset, minus VmRSS before the run"}
    # no resettable peak mark: the process peak so far (an upper bound if loading peaked higher)
    return {"peak_rss_delta_bytes": max(maxrss1 - (base or maxrss0), 0) * 1024,
            "baseline_rss_bytes": (base or maxrss0) * 1024, "peak_rss_bytes": maxrss1 * 1024,
            "method": "ru_maxrss minus VmRSS before the run (peak mark not resettable; may over-count)"}


def probe_memory(model: str, variant: Variant, batch: int, *, dtype: str = "fp32", threads: int = 1,
                 new_tokens: int = 8, seed: int = 0, scaled: ScaledConfig = ScaledConfig(),
                 timeout: float = 1800.0) -> dict[str, Any]:
    """Peak-RSS increase of one ``generate`` of ``variant`` in a fresh Python process (see module doc)."""
    spec = {"model": model, "label": variant.label, "method": variant.method, "options": variant.options,
            "stage": variant.stage, "batch": batch, "dtype": dtype, "threads": threads, "new_tokens": new_tokens,
            "seed": seed, "scaled": asdict(scaled)}
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", TOKENIZERS_PARALLELISM="false")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "vlmprune.bench.memory", "--probe", path],
                              capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        os.unlink(path)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory probe for {variant.label} (batch {batch}) failed (exit {proc.returncode}): "
                       + " | ".join(tail))


def cuda_peak_memory(model, inputs: dict[str, Tensor], variant: Variant, new_tokens: int,
                     device: str) -> dict[str, Any]:
    """Peak CUDA allocator memory over one generate above what was allocated before it (in process)."""
    handle = variant.apply(model)
    sync = device_sync(device)
    try:
        timed_generate(model, inputs, new_tokens, sync)  # warm-up
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        timed_generate(model, inputs, new_tokens, sync)
        peak = torch.cuda.max_memory_allocated(device)
    finally:
        if handle is not None:
            handle.remove()
    return {"peak_rss_delta_bytes": peak - base, "baseline_rss_bytes": base, "peak_rss_bytes": peak,
            "method": "torch.cuda.max_memory_allocated - memory_allocated over one generate (same process)"}


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "--probe":
        spec = json.loads(Path(argv[1]).read_text())
        result = _probe_child(spec)
        print("PROBE " + json.dumps(result), flush=True)
        return 0
    print("usage: python -m vlmprune.bench.memory --probe SPEC.json (internal; use `vlmprune bench`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

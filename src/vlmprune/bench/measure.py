"""``run_bench``: time pruning methods against the unpruned model and return the efficiency card.

For each model, dtype and batch size, every variant (the unpruned model first, then each method)
runs ``generate(max_new_tokens=T, min_new_tokens=T)`` greedily on the same prompts:

1. once untimed, for the counts: a prefill forward gives the KV-cache bytes, the handle's stats
   the tokens each decoder layer saw, and from them the FLOPs (``bench.flops``);
2. in ``warmup + repeats`` timed rounds, interleaved (every variant once per round, the order
   rotated), the first ``warmup`` discarded. A run's timers are forward hooks on the stock vision
   tower, projector and language model, a logits processor recording each token's time, and the
   handle's ``phase_timer`` (its own work by phase), all on one ``timing.PhaseClock``;
3. peak memory (``bench.memory``).

Then ``card.summarise_variants`` gives medians and ratios against the unpruned model. The
fields are defined in ``docs/efficiency.md``.
"""

from __future__ import annotations

import gc
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..integrations.compat import output_cache
from .card import RAW_KEYS, build_card, run_block, summarise_variants
from .flops import bench_layout, cache_bytes, flop_config, padded, prefill_flops, token_schedules
from .memory import cuda_peak_memory, not_measured, probe_memory
from .models import TINY, ScaledConfig, bench_image_size, check_model_name, load_bench_model, make_bench_inputs
from .report import write_card
from .spec import BenchError, Variant, check_batches, check_device, parse_dtype, parse_dtypes, parse_methods, \
    resolve_dtypes
from .timing import PART_PHASES, PhaseClock, device_sync, loadavg, measure_bf16, own_time, timed_generate

__all__ = ["BenchInterrupted", "run_bench"]


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_bench``: ``path`` is the card holding the finished (model, dtype, batch)
    blocks (status "interrupted"), or None when none had finished."""

    def __init__(self, path: Path | None, finished: int) -> None:
        super().__init__(str(path))
        self.path, self.finished = path, finished


# ================================================================================ one timed run


class _Probe:
    """The timers of one (model, batch): spans ``vision``, ``projector`` and ``llm`` on the stock
    modules (forward hooks, installed for the unpruned runs too) and the handle's phases, on one
    ``PhaseClock``."""

    def __init__(self, model, sync: Callable[[], None]) -> None:
        from ..integrations.base import get_adapter

        adapter = get_adapter(model)
        parts = {"vision": adapter.get_vision_tower(model), "projector": adapter.get_projector(model),
                 "llm": adapter.get_language_model(model)}
        self.clock = PhaseClock(sync)
        self._hooks = []
        for name, module in parts.items():
            self._hooks.append(module.register_forward_pre_hook(self._opener(name)))
            self._hooks.append(module.register_forward_hook(self._closer(name)))

    def _opener(self, name: str):
        def hook(module, args) -> None:
            self.clock.open(name)
        return hook

    def _closer(self, name: str):
        def hook(module, args, output) -> None:
            self.clock.close(name)
        return hook

    def run(self, model, inputs: dict[str, Tensor], new_tokens: int, handle: Any) -> dict[str, float]:
        """One timed ``generate`` with ``handle`` (None: unpruned) reporting its phases; the raw timings."""
        clock = self.clock
        clock.reset()
        if handle is not None:
            handle.phase_timer = clock
        try:
            t0, times, _ = timed_generate(model, inputs, new_tokens, clock.sync)
        finally:
            if handle is not None:
                handle.phase_timer = None
        llm = clock.calls.get("llm", [])
        if len(times) != new_tokens or not llm:
            raise RuntimeError(f"expected {new_tokens} generation steps, saw {len(times)}")
        batch = int(inputs["input_ids"].shape[0])
        decode = times[-1] - times[0]
        overhead = own_time(clock, "prefill")
        parts = {p: clock.exclusive.get(p, 0.0) for p in PART_PHASES}
        return {
            "ttft_s": times[0] - t0,
            "vision_s": clock.inclusive.get("vision", 0.0),
            "projector_s": clock.inclusive.get("projector", 0.0),
            "llm_prefill_s": llm[0],
            "overhead_s": overhead,
            **{f"overhead_{p}_s": t for p, t in parts.items()},
            "overhead_other_s": overhead - sum(parts.values()),
            "decode_s": decode,
            "decode_overhead_s": own_time(clock, "decode"),
            "decode_tokens_per_s": batch * (len(times) - 1) / decode if decode > 0 else float("nan"),
        }

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ================================================================================ the benchmark


def run_bench(
    models: Sequence[str] = ("testbed", "scaled"),
    methods: Sequence[str] = ("prumerge+", "fastv"),
    batches: Sequence[int] = (1, 8),
    *,
    dtype: str | Sequence[str] = "fp32",
    device: str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    new_tokens: int = 16,
    threads: int | None = 1,
    memory: bool = True,
    seed: int = 0,
    scaled: ScaledConfig = ScaledConfig(),
    out: str | Path | None = "out/bench",
    command: str = "",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmark and return the efficiency card (also written to ``out/card.json`` with the
    plot ``out/speedup.png`` when ``out`` is given). Validates every input before measuring.

    ``dtype``: one name or several (each model is measured in each, one results block per dtype);
    ``"auto"`` means bf16 and fp32 side by side when the measured CPU accelerates bf16, else fp32.
    ``device``: ``cpu`` or ``cuda[:N]`` (timers synchronise the GPU before reading the clock; peak
    memory is then the allocator's ``max_memory_allocated`` over one generate, in this process)."""
    log = log or (lambda msg: None)
    variants = parse_methods(methods)
    if len(variants) < 2:
        raise BenchError("give at least one pruning method (e.g. --method prumerge+)")
    dtype_choice = parse_dtypes(dtype)
    device = check_device(device)
    batches = check_batches(list(batches))
    models = [check_model_name(m) for m in models]
    if not models:
        raise BenchError("give at least one model")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("new_tokens", new_tokens, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BenchError(f"{name} must be an int >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise BenchError(f"threads must be an int >= 1, got {threads!r}")

    if not command:
        command = (f"vlmprune.bench.measure.run_bench(models={list(models)!r}, methods={list(methods)!r}, "
                   f"batches={batches!r}, dtype={dtype_choice!r}, device={device!r}, repeats={repeats}, "
                   f"warmup={warmup}, "
                   f"new_tokens={new_tokens}, threads={threads}, memory={memory}, seed={seed}, scaled={scaled!r})")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        load_before = loadavg()
        bf16 = measure_bf16()
        log(f"bf16 on this CPU: {bf16['note']}")
        dtypes = resolve_dtypes(dtype_choice, bool(bf16["accelerated"]))
        run = run_block(models, variants, "+".join(dtypes), batches, new_tokens, seed)
        if len(models) > 1:  # budgets depend on the model: check every method on every model first
            for name in models:
                model, _, _ = load_bench_model(name, torch.float32, scaled)
                for v in variants:
                    handle = v.apply(model)
                    if handle is not None:
                        handle.remove()
                del model
        model_cards, results = [], []

        def card(status: str) -> dict[str, Any]:
            return build_card(command=command, bf16=bf16, load_before=load_before, dtypes=dtypes,
                              dtype_choice=dtype_choice, device=device, batches=batches, variants=variants,
                              repeats=repeats, warmup=warmup, new_tokens=new_tokens, memory=memory, seed=seed,
                              models=model_cards, results=results, run=run, status=status)

        try:
            _measure_all(models, dtypes, batches, variants, device, scaled, seed, repeats, warmup, new_tokens, memory,
                         log, model_cards, results)
        except KeyboardInterrupt:
            if out is None or not results:
                raise BenchInterrupted(None, len(results)) from None
            raise BenchInterrupted(write_card(card("interrupted"), out), len(results)) from None
        done = card("complete")
        if out is not None:
            write_card(done, out)
        return done
    finally:
        torch.set_num_threads(old_threads)


def _measure_all(models, dtypes, batches, variants, device, scaled, seed, repeats, warmup, new_tokens, memory, log,
                 model_cards: list, results: list) -> None:
    """Every (model, dtype, batch) block, appended to ``results`` as it finishes (its model card first)."""
    for name in models:
        for dtype_name in dtypes:
            log(f"[{name}] building / loading the model ({dtype_name}, {device})")
            model, processor, desc = load_bench_model(name, parse_dtype(dtype_name)[1], scaled)
            model = model.to(device)
            cfg = flop_config(model)
            if name in ("scaled", "tiny"):
                desc["scaled_config"] = asdict(scaled if name == "scaled" else TINY)
            mcard = {"name": name, "dtype": dtype_name, "kind": desc.pop("kind"), "config": desc, "prompt": None}
            model_cards.append(mcard)
            for batch in batches:
                inputs, pdesc = make_bench_inputs(model, processor, batch, seed, bench_image_size(name))
                inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
                mcard["prompt"] = mcard["prompt"] or pdesc
                res = _bench_config(model, name, cfg, inputs, pdesc, variants, batch, repeats=repeats, warmup=warmup,
                                    new_tokens=new_tokens, memory=memory, dtype=dtype_name, device=device,
                                    threads=torch.get_num_threads(), seed=seed, scaled=scaled, log=log)
                results.append({"model": res.pop("model"), "dtype": dtype_name, **res})
            del model
            gc.collect()


def _bench_config(model, name: str, cfg, inputs: dict[str, Tensor], pdesc: dict[str, Any],
                  variants: list[Variant], batch: int, *, repeats: int, warmup: int, new_tokens: int, memory: bool,
                  dtype: str, threads: int, seed: int, scaled: ScaledConfig,
                  log: Callable[[str], None], device: str = "cpu") -> dict[str, Any]:
    """All variants on one (model, batch): untimed KV / token pass, interleaved timed rounds, memory."""
    from ..integrations.base import get_adapter

    adapter = get_adapter(model)
    units = adapter.unit_tokens(model, bench_layout(model, inputs))  # (tower tokens, projector rows) per pass
    shape = adapter.vision_shape(model)
    rows: dict[str, dict[str, Any]] = {}
    # 1. untimed: KV-cache bytes and token counts (also validates every method on this model)
    for v in variants:
        handle = v.apply(model)
        try:
            with torch.inference_mode():
                out = model(**inputs, use_cache=True, logits_to_keep=1)
            kv = cache_bytes(output_cache(out))
            del out
            sched, vis, proj_rows = token_schedules(model, inputs, handle, sum(r for _, r in units))
        finally:
            if handle is not None:
                handle.remove()
        rows[v.label] = {
            "label": v.label, "method": v.method, "options": v.options, "stage": v.stage,
            "visual_tokens": sum(vis) / len(vis), "visual_tokens_per_sample": vis,
            "layer_tokens": sched, "kv_cache_bytes": kv, "flops": prefill_flops(cfg, shape, units, sched, proj_rows),
            "flops_padded": prefill_flops(cfg, shape, units, padded(sched), proj_rows),
            "raw": {k: [] for k in RAW_KEYS},
        }
    # 2. timed rounds, interleaved
    probe = _Probe(model, device_sync(device))
    try:
        for r in range(warmup + repeats):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                handle = v.apply(model)
                try:
                    raw = probe.run(model, inputs, new_tokens, handle)
                finally:
                    if handle is not None:
                        handle.remove()
                if r >= warmup:
                    for k in RAW_KEYS:
                        rows[v.label]["raw"][k].append(raw[k])
            log(f"[{name} b={batch}] round {r + 1}/{warmup + repeats}"
                + (" (warm-up)" if r < warmup else "") + ": "
                + ", ".join(f"{lab} {rows[lab]['raw']['ttft_s'][-1] * 1e3:.0f} ms" for lab in rows
                            if r >= warmup))
    finally:
        probe.close()
    # 3. memory, one fresh process per variant
    for v in variants:
        if memory and device.startswith("cuda"):
            log(f"[{name} b={batch}] memory (CUDA allocator): {v.label}")
            rows[v.label]["memory"] = cuda_peak_memory(model, inputs, v, new_tokens, device)
        elif memory:
            log(f"[{name} b={batch}] memory probe: {v.label}")
            rows[v.label]["memory"] = probe_memory(name, v, batch, dtype=dtype, threads=threads,
                                                   new_tokens=new_tokens, seed=seed, scaled=scaled)
        else:
            rows[v.label]["memory"] = not_measured()
    # 4. summaries and ratios vs unpruned
    summarise_variants(rows)
    base = rows["unpruned"]
    return {"model": name, "batch": batch, "prompt_tokens": pdesc["tokens_per_sample"],
            "visual_tokens_unpruned": base["visual_tokens"], "variants": [rows[v.label] for v in variants]}

"""The part of a prefill that no token pruning removes, on this CPU: the decoder's time fitted as a + b L + c L^2.

    OMP_NUM_THREADS=1 python scripts/prefill_fixed_costs.py --model scaled-qwen2-vl --tokens 205 138 98 66 [--out F]

The FLOP-ideal speed-up assumes the prefill's time is proportional to its FLOPs. This builds a
bench model (``scaled`` or a scaled family model of ``vlmprune bench``, random weights), runs its
language model alone (``use_cache=False``, random input embeddings, default positions) at each
sequence length L of ``--tokens`` (e.g. a card's unpruned and pruned prompt lengths), fits the
median times to t = a + b L + c L^2 by least squares (c: attention's quadratic part; with
two or three lengths, c = 0), and times the ``lm_head`` on one row (what
``generate`` computes at the prefill: a read of the whole vocabulary matrix for a few FLOPs). The
intercept a is the per-forward cost that shrinking L cannot remove; the FLOP model has no such
term. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def _model(name: str):
    from vlmprune.bench.models import FAMILY_MODELS, ScaledConfig, build

    if name in FAMILY_MODELS:
        return build(name)
    if name == "scaled":
        from vlmprune.bench.decoder import make_model

        c = ScaledConfig()
        return make_model(hidden=c.hidden, layers=c.layers, vision_hidden=c.vision_hidden,
                          vision_layers=c.vision_layers)
    raise SystemExit(f"error: --model must be scaled or one of {', '.join(FAMILY_MODELS)}, got {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="scaled-qwen2-vl", help="scaled, or a scaled family model of vlmprune bench")
    ap.add_argument("--tokens", type=int, nargs="+", default=[205, 138, 98, 66], help="sequence lengths L")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--out", default="out/prefill_fixed_costs.json", help="results file (JSON)")
    args = ap.parse_args()
    if len(args.tokens) < 2 or min(args.tokens) < 1:
        raise SystemExit("error: --tokens needs at least two lengths >= 1")
    from vlmprune.integrations.base import get_adapter

    model = _model(args.model).eval()
    adapter = get_adapter(model)
    lm = adapter.get_language_model(model)
    head = model.get_output_embeddings()
    hidden = adapter.text_config(model).hidden_size
    g = torch.Generator().manual_seed(0)
    embeds = {n: torch.randn(1, n, hidden, generator=g) for n in args.tokens}
    times: dict[int, list[float]] = {n: [] for n in args.tokens}
    head_times: list[float] = []
    with torch.no_grad():
        for n in args.tokens:  # warm-up
            lm(inputs_embeds=embeds[n], use_cache=False)
        for _ in range(args.repeats):  # interleaved rounds
            for n in args.tokens:
                t = time.perf_counter()
                out = lm(inputs_embeds=embeds[n], use_cache=False)
                times[n].append(time.perf_counter() - t)
            last = out.last_hidden_state[:, -1:]
            t = time.perf_counter()
            head(last)
            head_times.append(time.perf_counter() - t)
    xs = list(args.tokens)
    ys = [statistics.median(times[n]) * 1e3 for n in xs]
    powers = 3 if len(xs) > 3 else 2
    design = torch.tensor([[float(x) ** p for p in range(powers)] for x in xs], dtype=torch.float64)
    coef = torch.linalg.lstsq(design, torch.tensor(ys, dtype=torch.float64)[:, None]).solution.flatten().tolist()
    intercept, slope, quad = (coef + [0.0])[:3]

    def fit(x: int) -> float:
        return intercept + slope * x + quad * x * x
    lm_head_ms = statistics.median(head_times) * 1e3
    print(f"{args.model}: language model alone, 1 thread = {torch.get_num_threads() == 1}, medians of {args.repeats}")
    print("| L | decoder ms | fit | fixed share a / t |")
    print("|---|---|---|---|")
    for x, y in zip(xs, ys):
        print(f"| {x} | {y:.1f} | {fit(x):.1f} | {100 * intercept / y:.0f}% |")
    print(f"fit: a = {intercept:.1f} ms, b = {slope:.3f} ms per token, c = {quad * 1e3:.4f} us per token^2; lm_head on one row: {lm_head_ms:.1f} ms "
          f"({head.weight.numel() * head.weight.element_size() / 1e6:.0f} MB of weights)")
    from vlmprune.bench.timing import machine_info

    result = {"command": f"python scripts/prefill_fixed_costs.py --model {args.model} --tokens "
                         + " ".join(map(str, xs)) + f" --repeats {args.repeats}",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
              "model": args.model, "weights": "random (vlmprune.bench.models, seed 0)",
              "decoder_ms": dict(zip(map(str, xs), ys)), "fit": {"a_ms": intercept, "b_ms_per_token": slope, "c_ms_per_token2": quad},
              "lm_head_one_row_ms": lm_head_ms}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

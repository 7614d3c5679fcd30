"""How a decoder layer's matmuls scale with the token count on this CPU (the FLOP-ideal assumes linearly).

    OMP_NUM_THREADS=1 python scripts/gemm_scaling.py [--hidden 512] [--inter 1376] [--out out/gemm_scaling.json]

Times ``x [M, hidden] @ W`` for the projections of one Llama layer (q/k/v/o: hidden x hidden, MLP:
hidden x inter, twice, and inter x hidden) at the token counts of the benchmark's prompts (635
unpruned, 204 = PruMerge+ keep=144 + 59 text, 364 = FastV 50%), in fp32 and bf16, one process,
interleaved rounds, medians. Prints the measured speed-up of M tokens over the 635-token case
next to the FLOP ratio 635 / M, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512, help="decoder width (the scaled bench model: 512)")
    ap.add_argument("--inter", type=int, default=1376, help="MLP width (the scaled bench model: 1376)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[635, 364, 204, 72], help="token counts M")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (median)")
    ap.add_argument("--out", default="out/gemm_scaling.json", help="results file (JSON)")
    args = ap.parse_args()
    h, i = args.hidden, args.inter
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        ws = [torch.randn(a, b, generator=g).to(dtype) for a, b in shapes]
        xs = {m: (torch.randn(m, h, generator=g).to(dtype), torch.randn(m, i, generator=g).to(dtype))
              for m in args.tokens}
        times: dict[int, list[float]] = {m: [] for m in args.tokens}

        def run(m: int) -> None:
            xh, xi = xs[m]
            for (a, _), w in zip(shapes, ws):
                (xh if a == h else xi) @ w

        for m in args.tokens:  # warm-up
            run(m)
        for _ in range(args.repeats):
            for m in args.tokens:
                t0 = time.perf_counter()
                run(m)
                times[m].append(time.perf_counter() - t0)
        base = statistics.median(times[args.tokens[0]])
        for m in args.tokens:
            med = statistics.median(times[m])
            rows.append({"dtype": str(dtype).replace("torch.", ""), "tokens": m, "median_s": med,
                         "speedup": base / med, "flop_ratio": args.tokens[0] / m})
    print(f"{'dtype':<10}{'tokens':>8}{'ms':>10}{'speed-up':>10}{'FLOP ratio':>12}{'vs ideal':>10}")
    for r in rows:
        print(f"{r['dtype']:<10}{r['tokens']:>8}{r['median_s'] * 1e3:>10.3f}{r['speedup']:>9.2f}x"
              f"{r['flop_ratio']:>11.2f}x{100 * (r['speedup'] / r['flop_ratio'] - 1):>+9.1f}%")
    out = {"command": "python scripts/gemm_scaling.py " + " ".join(
               f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "rows": rows}
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

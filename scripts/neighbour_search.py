"""What PruMerge's neighbour search costs on this CPU, piece by piece (the floor of its vision-stage overhead).

    OMP_NUM_THREADS=1 python scripts/neighbour_search.py [--centres 239] [--tokens 576] [--dim 192] [--out F]

PruMerge / PruMerge+ give each of its C centres the k = 32 patches whose keys are most similar
(``methods/prumerge.py``, step 3). On the testbed (576 patches, keys of width 192, 239 centres for
PruMerge+ on a typical image) that is one [C, N] similarity product and one top-k per centre
row. This times, on random keys of those shapes, one process, medians of interleaved rounds:
the fp32 similarity product (what the method computes) and the bf16 one (not used: it changes the
chosen neighbours), ``torch.topk`` over the N similarities, the two-stage top-k the method uses
(``methods.common.topk_indices``), a top-k over N / 4 entries (how much of a top-k is its per-row
cost), and the whole ``prumerge(..., plus=True, keep=C)`` call (C centres) on bf16 inputs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vlmprune.methods.common import topk_indices
from vlmprune.methods.prumerge import prumerge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--centres", type=int, default=239, help="centre rows C (PruMerge+ on the testbed: ~239)")
    ap.add_argument("--tokens", type=int, default=576, help="patches N")
    ap.add_argument("--dim", type=int, default=192, help="key width (the testbed's tower: 192)")
    ap.add_argument("--k", type=int, default=32, help="neighbours per centre (official: 32)")
    ap.add_argument("--repeats", type=int, default=50, help="timed rounds (median)")
    ap.add_argument("--out", default="out/neighbour_search.json", help="results file (JSON)")
    args = ap.parse_args()
    c, n, d, k = args.centres, args.tokens, args.dim, args.k
    if not (1 <= c <= n and 1 <= k and 8 * k <= n and n % 4 == 0 and d >= 1 and args.repeats >= 1):
        raise SystemExit(f"error: need 1 <= --centres <= --tokens, --tokens a multiple of 4 and >= 8 x --k "
                         f"(the two-stage top-k's range), --dim and --repeats >= 1; got centres={c}, tokens={n}, "
                         f"k={k}, dim={d}, repeats={args.repeats}")
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, n, d, generator=g).to(torch.bfloat16)  # a bf16 model's keys
    k32 = keys.float()
    centres32, centres16 = k32[:, :c], keys[:, :c]
    sims = torch.bmm(centres32, k32.transpose(1, 2))  # [1, C, N]
    attn = torch.softmax(torch.randn(1, n, generator=g) * 3, dim=1)
    feats = torch.randn(1, n, d, generator=g).to(torch.bfloat16)
    quarter = sims[..., : n // 4].contiguous()
    cases = {
        "similarity product fp32 [C, N]": lambda: torch.bmm(centres32, k32.transpose(1, 2)),
        "similarity product bf16 [C, N] (not used)": lambda: torch.bmm(centres16, keys.transpose(1, 2)),
        f"torch.topk({k}) over N": lambda: sims.topk(k, dim=-1, sorted=False),
        f"two-stage top-{k} (topk_indices, used)": lambda: topk_indices(sims, k),
        f"torch.topk({k}) over N / 4": lambda: quarter.topk(k, dim=-1, sorted=False),
        "prumerge(plus=True, keep=C), whole call": lambda: prumerge(attn, keys, feats, plus=True, keep=c),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    rows = [{"case": name, "median_ms": statistics.median(v) * 1e3, "per_row_us": statistics.median(v) * 1e6 / c}
            for name, v in times.items()]
    centres_used = int(prumerge(attn, keys, feats, plus=True, keep=c).counts[0]) - 1  # the extra token is not one
    print(f"C = {c} centre rows, N = {n}, keys {d} wide, k = {k}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); the whole call chose {centres_used} centres on these random inputs")
    print(f"| {'step':<45} | median ms | per centre row (us) |")
    print(f"|{'-' * 47}|-----------|---------------------|")
    for r in rows:
        print(f"| {r['case']:<45} | {r['median_ms']:9.3f} | {r['per_row_us']:19.2f} |")
    from vlmprune.bench.timing import machine_info

    out = {"command": "python scripts/neighbour_search.py " + " ".join(
               f"--{a} {getattr(args, a)}" for a in ("centres", "tokens", "dim", "k", "repeats")),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "shapes": {"centres": c, "tokens": n, "dim": d, "k": k, "repeats": args.repeats,
                      "centres_chosen_by_the_whole_call": centres_used},
           "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

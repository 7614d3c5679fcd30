"""What PruMerge's neighbour search costs on this CPU, piece by piece (the floor of its vision-stage overhead).

    OMP_NUM_THREADS=1 python scripts/neighbour_search.py [--centres 239] [--tokens 576] [--dim 192] [--out F]

PruMerge / PruMerge+ give each of its C centres the k = 32 patches whose keys are most similar
(``methods/prumerge.py``, step 3). On the testbed (576 patches, keys of width 192, 239 centres for
PruMerge+ on a typical image) that is one [C, N] similarity product and one top-k per centre
row. This times, on random keys of those shapes, one process, medians of interleaved rounds:
the similarity product in fp32 (``sim_dtype="float32"``) and in bf16 (the default for bf16 keys,
as the official code), ``torch.topk`` over the N similarities, the two-stage top-k of the tensor
path (``methods.common.topk_indices``), a top-k over N / 4 entries (how much of a top-k is its
per-row cost), the top-k and weighted sums of ``methods.neighbours.neighbour_sums`` on its tensor
path and with the CPU kernel (when numba imports), and the whole ``prumerge(..., plus=True,
keep=C)`` call (C centres) on bf16 inputs, both similarity dtypes. Prints a table and writes JSON.

``--testbed-images M`` (default 0: skipped) also counts, on the committed testbed's own keys in
bf16 (M ShapesVQA test images), how many of PruMerge+'s neighbours change between
``sim_dtype="keys"`` (bf16 products, the default) and ``"float32"``: one-hot features make each
merged token show its neighbour set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from vlmprune.methods.common import topk_indices
from vlmprune.methods.neighbours import CPU_KERNELS_ENV, cpu_kernel_available, neighbour_sums
from vlmprune.methods.prumerge import prumerge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--centres", type=int, default=239, help="centre rows C (PruMerge+ on the testbed: ~239)")
    ap.add_argument("--tokens", type=int, default=576, help="patches N")
    ap.add_argument("--dim", type=int, default=192, help="key width (the testbed's tower: 192)")
    ap.add_argument("--k", type=int, default=32, help="neighbours per centre (official: 32)")
    ap.add_argument("--repeats", type=int, default=50, help="timed rounds (median)")
    ap.add_argument("--testbed-images", type=int, default=0,
                    help="also count the neighbours that bf16 similarities change on the testbed's keys (M images)")
    ap.add_argument("--out", default="out/neighbour_search.json", help="results file (JSON)")
    args = ap.parse_args()
    c, n, d, k = args.centres, args.tokens, args.dim, args.k
    if not (1 <= c <= n and 1 <= k and 8 * k <= n and n % 4 == 0 and d >= 1 and args.repeats >= 1
            and args.testbed_images >= 0):
        raise SystemExit(f"error: need 1 <= --centres <= --tokens, --tokens a multiple of 4 and >= 8 x --k "
                         f"(the two-stage top-k's range), --dim and --repeats >= 1; got centres={c}, tokens={n}, "
                         f"k={k}, dim={d}, repeats={args.repeats}, testbed-images={args.testbed_images}")
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, n, d, generator=g).to(torch.bfloat16)  # a bf16 model's keys
    k32 = keys.float()
    centres32, centres16 = k32[:, :c], keys[:, :c]
    sims = torch.bmm(centres32, k32.transpose(1, 2))  # [1, C, N]
    attn = torch.softmax(torch.randn(1, n, generator=g) * 3, dim=1)
    feats = torch.randn(1, n, d, generator=g).to(torch.bfloat16)
    quarter = sims[..., : n // 4].contiguous()
    own = torch.arange(c)[None]  # [1, C] each centre's own column
    feats32 = feats.float()

    def kernels(on: bool, fn):  # the case runs with the CPU kernel on / off (the cases are interleaved)
        def run():
            os.environ[CPU_KERNELS_ENV] = "1" if on else "0"
            return fn()
        return run

    def sums(kernel: bool):
        return kernels(kernel, lambda: neighbour_sums(sims.clone(), own, attn, feats32, k))

    cases = {
        "similarity product fp32 [C, N]": lambda: torch.bmm(centres32, k32.transpose(1, 2)),
        "similarity product bf16 [C, N]": lambda: torch.bmm(centres16, keys.transpose(1, 2)),
        f"torch.topk({k}) over N": lambda: sims.topk(k, dim=-1, sorted=False),
        f"two-stage top-{k} (topk_indices)": lambda: topk_indices(sims, k),
        f"torch.topk({k}) over N / 4": lambda: quarter.topk(k, dim=-1, sorted=False),
        "neighbour_sums, tensor path": sums(False),
        "prumerge(plus=True, keep=C), sim_dtype=float32": kernels(True, lambda: prumerge(
            attn, keys, feats, plus=True, keep=c, sim_dtype="float32")),
        "prumerge(plus=True, keep=C), default": kernels(True, lambda: prumerge(attn, keys, feats, plus=True, keep=c)),
        "prumerge(plus=True, keep=C), default, no CPU kernel": kernels(False, lambda: prumerge(
            attn, keys, feats, plus=True, keep=c)),
    }
    if cpu_kernel_available():
        cases["neighbour_sums, CPU kernel"] = sums(True)
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
    print(f"| {'step':<55} | median ms | per centre row (us) |")
    print(f"|{'-' * 57}|-----------|---------------------|")
    for r in rows:
        print(f"| {r['case']:<55} | {r['median_ms']:9.3f} | {r['per_row_us']:19.2f} |")
    changed = testbed_neighbour_changes(args.testbed_images) if args.testbed_images else None
    if changed:
        print(f"testbed keys in bf16, {changed['images']} images, {changed['centres']} PruMerge+ centres: bf16 "
              f"similarities change {changed['neighbours_changed']:.1%} of the neighbours; "
              f"{changed['centres_changed']:.1%} of the centres get a different set")
    from vlmprune.bench.timing import machine_info

    out = {"command": "python scripts/neighbour_search.py " + " ".join(
               f"--{a.replace('_', '-')} {getattr(args, a)}" for a in ("centres", "tokens", "dim", "k", "repeats",
                                                                  "testbed_images")),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
           "shapes": {"centres": c, "tokens": n, "dim": d, "k": k, "repeats": args.repeats,
                      "centres_chosen_by_the_whole_call": centres_used},
           "rows": rows, "testbed_neighbour_changes": changed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


def testbed_neighbour_changes(images: int) -> dict:
    """PruMerge+ on the testbed's bf16 keys of ``images`` test images, both similarity dtypes."""
    import vlmprune.testbed as testbed
    from vlmprune.bench.models import make_bench_inputs
    from vlmprune.integrations.base import get_adapter

    model, processor = testbed.load(dtype=torch.bfloat16)
    inputs, _ = make_bench_inputs(model, processor, images)
    adapter = get_adapter(model)
    pixels = inputs["pixel_values"]
    with torch.no_grad():
        _, signals = adapter.encode_with_signals(model, pixels, adapter.vision_feature_layer(model),
                                                 adapter.select_strategy(model), adapter.image_layout(model, pixels))
    n = signals.keys.shape[1]
    onehot = torch.eye(n, dtype=torch.bfloat16).expand(signals.keys.shape[0], n, n)
    sets = {}
    for mode in ("keys", "float32"):
        r = prumerge(signals.cls_attn, signals.keys, onehot, plus=True, sim_dtype=mode)
        sets[mode] = [[set(torch.nonzero(r.tokens[b, t].float()).flatten().tolist()) - {i}
                       for t, i in enumerate(r.indices[b].tolist()) if i >= 0] for b in range(r.tokens.shape[0])]
    pairs = [(x, y) for a, b in zip(sets["keys"], sets["float32"]) for x, y in zip(a, b)]
    k = len(pairs[0][0])
    return {"images": images, "centres": len(pairs), "k_neighbors": k,
            "neighbours_changed": sum(len(x - y) for x, y in pairs) / (k * len(pairs)),
            "centres_changed": sum(x != y for x, y in pairs) / len(pairs)}


if __name__ == "__main__":
    main()

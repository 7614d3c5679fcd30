"""Benchmark: the PruMerge / PruMerge+ token-reduction step, vectorised vs a per-token loop.

    python -m vlmprune.bench.reduction --out results.json

Times ``vlmprune.methods.prumerge.prumerge`` (batched, vectorised) against ``prumerge_loop``
below, a straightforward implementation of the same algorithm with the structure of the official
code (a Python loop over images and, inside, over kept tokens). Only the reduction is timed: the
inputs ([CLS] attention, keys, features) are made up front. The [CLS] attention is a realistic
peaked softmax: a few dozen salient patches on a log-normal background, so that the IQR rule keeps
~30 tokens as on CLIP-L. The two implementations are timed interleaved (one loop call, then a
few vectorised calls, round after round) so that both see the same load on a shared machine.
Prints a table and writes JSON (median, quartiles and minimum of repeated runs after warm-up, the
machine's load average, the token counts, and the largest difference between the two outputs).

``prumerge_loop`` exists only as a reference for this benchmark and for the equivalence test; the
library never calls it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlmprune.methods.prumerge import prumerge

from .timing import loadavg, machine_info, summarise, time_call

__all__ = ["prumerge_loop", "make_inputs", "main"]


def prumerge_loop(
    cls_attn: Tensor, keys: Tensor, features: Tensor, *, plus: bool = False, k_neighbors: int = 32
) -> list[Tensor]:
    """Reference PruMerge(+) with the official code's loops; default options only.

    Same rules as ``prumerge`` (IQR per image, k = 0 -> 1, step clamped to >= 1, neighbours among
    all other patches, residual merge, extra token when some patch is not a centre). Returns one
    [count, D] tensor per image.
    """
    batch, num_tokens = cls_attn.shape
    outputs = []
    for b in range(batch):
        a = cls_attn[b].float()
        y = features[b].float()
        kk = keys[b].float()
        a_np = a.cpu().numpy()
        q1 = np.percentile(a_np, 25)  # float32, linear interpolation
        q3 = np.percentile(a_np, 75)
        fence = np.float32(np.float64(q3) + 1.5 * np.float64(np.float32(q3 - q1)))
        k = max(int(np.sum(a_np > fence)), 1)
        idx = torch.topk(a, k, largest=True, sorted=True).indices  # descending attention
        if plus:
            step = max((num_tokens // k) // 3, 1)
            kept = set(idx.tolist())
            grid = [g for g in range(0, num_tokens - 1, step) if g not in kept]
            idx = torch.cat([idx, torch.tensor(grid, dtype=torch.long)])
        centres = set(idx.tolist())
        compl = torch.tensor([j for j in range(num_tokens) if j not in centres], dtype=torch.long)

        x_c, a_c, k_c = y[idx], a[idx], F.normalize(kk[idx], p=2.0, dim=-1)
        x_p, a_p, k_p = y[compl], a[compl], F.normalize(kk[compl], p=2.0, dim=-1)
        knb = min(k_neighbors, num_tokens - 1)
        merged = x_c.clone()
        for i in range(len(idx)):
            if knb == 0:
                break
            rest_k = torch.cat([k_c[:i], k_c[i + 1 :], k_p])  # every other patch
            rest_x = torch.cat([x_c[:i], x_c[i + 1 :], x_p])
            rest_a = torch.cat([a_c[:i], a_c[i + 1 :], a_p])
            sims = rest_k @ k_c[i]  # cosine similarity to centre i
            nb = torch.topk(sims, knb, largest=True).indices
            merged[i] = x_c[i] + (rest_x[nb] * rest_a[nb, None]).sum(dim=0)
        parts = [merged]
        if len(compl):
            parts.append((x_p * a_p[:, None]).sum(dim=0, keepdim=True))
        outputs.append(torch.cat(parts).to(features.dtype))
    return outputs


def make_inputs(
    batch: int, num_tokens: int, dim: int, key_dim: int, *, salient: int = 24, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Peaked [CLS] attention [B, N] (IQR keeps ~30), keys [B, N, Dk], features [B, N, D]."""
    g = torch.Generator().manual_seed(seed)
    logits = 0.35 * torch.randn(batch, num_tokens, generator=g)  # log-normal background
    boost = 2.0 + 2.0 * torch.rand(batch, num_tokens, generator=g)
    hot = torch.rand(batch, num_tokens, generator=g).argsort(dim=1)[:, :salient]  # salient patches
    logits.scatter_add_(1, hot, boost.gather(1, hot))
    cls_logit = torch.full((batch, 1), 3.0)  # [CLS] attends to itself too: rows sum to < 1
    cls_attn = torch.softmax(torch.cat([cls_logit, logits], dim=1), dim=1)[:, 1:]
    keys = torch.randn(batch, num_tokens, key_dim, generator=g)
    features = torch.randn(batch, num_tokens, dim, generator=g)
    return cls_attn, keys, features


def _time_interleaved(
    fast: Callable[[], object], slow: Callable[[], object], args: argparse.Namespace
) -> tuple[list[float], list[float]]:
    """Wall times in ms of ``fast`` and ``slow``, interleaved so both see the same machine load.

    After warm-up, each of ``loop_repeats`` rounds times ``slow`` once and ``fast``
    ceil(repeats / loop_repeats) times.
    """
    for _ in range(args.warmup):
        fast()
    for _ in range(args.loop_warmup):
        slow()
    per_round = -(-args.repeats // args.loop_repeats)
    t_fast, t_slow = [], []
    for _ in range(args.loop_repeats):
        t_slow.append(time_call(slow) * 1e3)
        for _ in range(per_round):
            t_fast.append(time_call(fast) * 1e3)
    return t_fast, t_slow


def _ms(times: list[float]) -> dict[str, float]:
    """median, q1, q3, min and repeats of timings in ms."""
    st = summarise(times)
    return {"median": st["median"], "q1": st["q1"], "q3": st["q3"], "min": st["min"], "repeats": st["n"]}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    rows = []
    for plus in (False, True):
        method = "prumerge+" if plus else "prumerge"
        for batch in args.batch_sizes:
            a, k, y = make_inputs(batch, args.tokens, args.dim, args.key_dim, seed=args.seed)
            with torch.inference_mode():
                fast = prumerge(a, k, y, plus=plus)
                slow = prumerge_loop(a, k, y, plus=plus)
                same_counts = fast.counts.tolist() == [len(t) for t in slow]
                max_diff = max(
                    float((u - v).abs().max()) if same_counts else float("nan")
                    for u, v in zip(fast.unpad(), slow)
                )
                t_fast, t_slow = _time_interleaved(
                    lambda: prumerge(a, k, y, plus=plus), lambda: prumerge_loop(a, k, y, plus=plus), args
                )
            fast_ms, loop_ms = _ms(t_fast), _ms(t_slow)
            rows.append(
                {
                    "method": method,
                    "batch": batch,
                    "tokens_per_image": fast.counts.tolist(),
                    "mean_tokens": float(fast.counts.float().mean()),
                    "attention_tokens": fast.num_attention.tolist(),
                    "vectorised_ms": fast_ms,
                    "loop_ms": loop_ms,
                    "speedup": loop_ms["median"] / fast_ms["median"],
                    "speedup_of_min": min(t_slow) / min(t_fast),
                    "same_counts": same_counts,
                    "max_abs_diff": max_diff,
                }
            )
    return {
        "command": " ".join(["python -m vlmprune.bench.reduction", *argv]),
        "what": (
            "token-reduction step only (inputs precomputed); vectorised and loop runs interleaved; "
            "median (and quartiles, min) of repeats after warm-up; speedup = loop median / vectorised median"
        ),
        "threads": torch.get_num_threads(),
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": loadavg()},
        "config": {
            "tokens": args.tokens,
            "dim": args.dim,
            "key_dim": args.key_dim,
            "batch_sizes": args.batch_sizes,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "loop_warmup": args.loop_warmup,
            "loop_repeats": args.loop_repeats,
            "seed": args.seed,
            "dtype": "float32",
        },
        "results": rows,
    }


def _print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"PruMerge token reduction, N={report['config']['tokens']}, D={report['config']['dim']}, "
            f"Dk={report['config']['key_dim']}, torch {report['machine']['torch']}, {report['threads']} threads"
        )
    )
    columns = ("method", "B", "mean tokens", "vectorised ms", "loop ms", "speedup", "(of min)", "max |diff|")
    for col in columns:
        table.add_column(col, justify="right")
    for r in report["results"]:
        table.add_row(
            r["method"],
            str(r["batch"]),
            f"{r['mean_tokens']:.1f}",
            f"{r['vectorised_ms']['median']:.2f}",
            f"{r['loop_ms']['median']:.1f}",
            f"{r['speedup']:.0f}x",
            f"{r['speedup_of_min']:.0f}x",
            f"{r['max_abs_diff']:.1e}",
        )
    Console(width=max(Console().width, 130)).print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m vlmprune.bench.reduction",
        description="Time the PruMerge / PruMerge+ reduction step: vectorised vs per-token loop.",
    )
    parser.add_argument("--out", default=None, help="write the JSON report here")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=576, help="patches N (default: CLIP-L/14 at 336 px)")
    parser.add_argument("--dim", type=int, default=1024, help="feature width D")
    parser.add_argument("--key-dim", type=int, default=1024, help="key width Dk (all heads)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--loop-warmup", type=int, default=1)
    parser.add_argument("--loop-repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    report = run(args, argv)
    _print_table(report)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

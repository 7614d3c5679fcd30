"""The card's outputs: ``card.json`` with the plot (``write_card``), the speed-up plot
(``plot_card``) and the console tables (``print_card``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..plotting import pyplot, save_figure
from .card import OVERHEAD_PARTS
from .flops import flop_config_from_card, ideal_curve, two_level

__all__ = ["plot_card", "print_card", "write_card"]


def write_card(card: dict[str, Any], out: str | Path) -> Path:
    """Write ``out/speedup.png`` (its path goes to ``card["plot"]``) and ``out/card.json``; returns the latter."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_path = out / "speedup.png"
    plot_card(card, plot_path)
    card["plot"] = str(plot_path)
    path = out / "card.json"
    path.write_text(json.dumps(_clean(card), indent=1, allow_nan=False) + "\n")
    return path


def _clean(x: Any) -> Any:
    """JSON-safe copy: NaN / inf -> None (strict JSON has no NaN), tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def plot_card(card: dict[str, Any], path: str | Path) -> Path:
    """Prefill speed-up (end to end) vs visual tokens per sample, with the FLOP-ideal curves; one
    panel per model entry."""
    plt = pyplot()
    names = [m["name"] for m in card["models"]]
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), squeeze=False)
    markers = {b: m for b, m in zip(card["settings"]["batches"], "osD^v<>p*h")}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    method_color = {lab: colors[i % len(colors)] for i, lab in enumerate(card["settings"]["methods"])}
    for ax, mcard in zip(axes[0], card["models"]):
        res = [r for r in card["results"] if r["model"] == mcard["name"] and r.get("dtype") == mcard.get("dtype")]
        if not res:
            continue
        first = min(res, key=lambda r: r["batch"])
        fixed = mcard["config"]["vision"].get("fixed_image_tokens", True) is not None
        cfg = flop_config_from_card(mcard, with_vision=True) if fixed else None  # curves: one fixed-size image
        n = cfg.vision["projector_rows_per_image"] if fixed else int(round(first["visual_tokens_unpruned"]))
        text = int(first["prompt_tokens"][0]) - n
        xs = sorted(set([1, 2, 4, 8] + list(range(16, n + 1, 16)) + [n]))
        if fixed:
            ax.plot(xs, ideal_curve(cfg, text, xs), color="0.3", lw=1.5,
                    label="FLOP-ideal, tokens pruned before the LLM")
        drawn = set()
        for v in (first["variants"] if fixed else []):
            two = two_level(v["layer_tokens"][0]) if v["stage"] == "decoder" else None
            if two and two[0] not in drawn:
                drawn.add(two[0])
                p = two[0]
                ks = [k for k in xs if k <= n]
                avg = [(p * n + (cfg.num_layers - p) * k) / cfg.num_layers for k in ks]
                ax.plot(avg, ideal_curve(cfg, text, ks, prefix=p), color="0.3", lw=1.2, ls="--",
                        label=f"FLOP-ideal, pruned from decoder layer {p} (x = all-layer avg)")
        for r in res:
            for v in r["variants"]:
                if v["method"] is None:
                    continue
                x = v["visual_tokens"]
                c = method_color.get(v["label"], "k")
                ax.plot([x, x], [v["ratios"]["flop_ideal_speedup"], v["ratios"]["prefill_speedup"]], color=c,
                        lw=0.8, alpha=0.6)
                ax.scatter([x], [v["ratios"]["flop_ideal_speedup"]], facecolors="none", edgecolors=c,
                           marker=markers.get(r["batch"], "o"), s=50)
                ax.scatter([x], [v["ratios"]["prefill_speedup"]], color=c, marker=markers.get(r["batch"], "o"), s=50,
                           label=f"{v['label']} (batch {r['batch']})")
        ax.scatter([n], [1.0], color="k", marker="x", label="unpruned")
        ax.set_xlabel("visual tokens per sample (all-layer average)")
        ax.set_ylabel("prefill speed-up (time to first token)")
        ax.set_title(f"{mcard['name']}: {mcard.get('dtype')}, {card['settings']['threads']} thread(s)\n"
                     "filled = measured, hollow = FLOP-ideal for its token counts", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def _mb(x: Any) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def _x(x: Any, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}x"


def print_card(card: dict[str, Any], console: Any = None) -> None:
    """Rich tables (one per model and batch), the acceptance targets, the notes."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 170))
    s = card["settings"]
    m = card["machine"]
    console.print(f"[bold]{m['cpu_model']}[/], {m['cores_logical']} logical cores, torch {m['torch']}, "
                  f"transformers {m['transformers']}, {s['threads']} thread(s), dtype [bold]{' + '.join(s['dtype'])}[/] on {s.get('device', 'cpu')} "
                  f"(bf16 matmul here: {m['bf16_matmul']['slowdown']:.2f}x the fp32 time), "
                  f"median of {s['repeats']} after {s['warmup']} warm-up, {s['decode_steps']} decode steps")
    for r in card["results"]:
        t = Table(title=f"{r['model']} {r.get('dtype', '')}, batch {r['batch']} (prompt {r['prompt_tokens'][0]} tokens, "
                        f"{r['visual_tokens_unpruned']:.0f} visual)")
        cols = ("variant", "visual tok", "vision ms", "overhead ms (% prefill)", "prefill ms", "speed-up",
                "FLOP-ideal", "vs ideal", "LLM speed-up / ideal", "decode tok/s", "KV MB", "peak mem MB")
        for c in cols:
            t.add_column(c, justify="left" if c == "variant" else "right")
        for v in r["variants"]:
            md, ra = v["median"], v["ratios"]
            pruned = v["method"] is not None
            mem = v["memory"]["peak_rss_delta_bytes"]
            t.add_row(
                v["label"], f"{v['visual_tokens']:.1f}", f"{md['vision_s'] * 1e3:.1f}",
                f"{md['overhead_s'] * 1e3:.2f} ({100 * ra['overhead_fraction']:.2f}%)" if pruned else "-",
                f"{md['ttft_s'] * 1e3:.1f}", _x(ra["prefill_speedup"]),
                _x(ra["flop_ideal_speedup"]), f"{100 * ra['prefill_vs_ideal']:+.1f}%" if pruned else "-",
                f"{_x(ra['llm_prefill_speedup'])} / {_x(ra['llm_flop_ideal_speedup'])}" if pruned else "-",
                f"{md['decode_tokens_per_s']:.1f}" + (f" ({_x(ra['decode_speedup'])})" if pruned else ""),
                _mb(v["kv_cache_bytes"]) + (f" ({_x(ra['kv_cache_ratio'])})" if pruned else ""),
                _mb(mem) + (f" ({_x(ra['peak_memory_ratio'])})" if pruned and mem is not None else ""),
            )
        console.print(t)
        pruned = [v for v in r["variants"] if v["method"] is not None and "overhead_score_s" in v["median"]]
        if pruned:
            split = Table(title=f"{r['model']} {r.get('dtype', '')}, batch {r['batch']}: where the overhead goes (ms, median)")
            for c in ("variant", "stage", *OVERHEAD_PARTS, "total"):
                split.add_column(c, justify="left" if c in ("variant", "stage") else "right")
            for v in pruned:
                md = v["median"]
                split.add_row(v["label"], v.get("stage") or "-",
                              *(f"{md[f'overhead_{p}_s'] * 1e3:.2f}" for p in OVERHEAD_PARTS),
                              f"{md['overhead_s'] * 1e3:.2f}")
            console.print(split)
    console.print("[bold]acceptance targets[/]:")
    for tg in card["targets"]:
        if tg["met"] is None:
            console.print(f"  [yellow]-[/] {tg['name']}: {tg['detail']}")
            continue
        how = (f"[green]MET[/] with {100 * tg['margin']:.1f} points to spare" if tg["met"] else
               f"[red]MISSED[/] by {-100 * tg['margin']:.1f} points")
        console.print(f"  {tg['model']} b={tg['batch']} {tg['method']} ({tg.get('dtype')}): {tg['name']}: {how} "
                      f"(limit {100 * tg['threshold']:.0f}%); {tg['detail']}")
    for note in card["notes"]:
        console.print(f"note: {note}")

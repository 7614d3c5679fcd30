"""Benchmark: prefill time of decoder-stage pruning (FastV) against the unpruned model and an oracle.

    python -m vlmprune.bench.decoder --out results.json

Model: a LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` with random weights, scaled to fit a
CPU: 32 Llama decoder layers, head_dim 64, MLP ratio 11008/4096, 576 image tokens (336 px /
patch 14, CLIP-shaped tower reduced to a few narrow layers, since the tower costs the same in
every variant), a prompt of 35 system tokens + 576 image tokens + 24 question tokens as in
LLaVA-1.5. Width is 512 by default (LLaVA-1.5-7B: 4096). **float32**: on a CPU without bf16
acceleration bf16 matmuls are emulated and many times slower (``vlmprune bench`` measures it), which
would measure the emulation, not the pruning.

What is timed: one prefill, as ``generate`` runs it (``use_cache=True``, ``logits_to_keep=1``,
full model: vision tower, projector, decoder, head), for

* ``unpruned`` — the stock model;
* ``fastv R%`` — ``vlmprune.apply(model, "fastv", k=2, drop_ratio=R)``: scores from layer 1's
  q/k (last-token row), gather, per-layer masks/rotary, each layer's cache at its own length;
* ``oracle R%`` — the same model fed only the kept tokens from layer K on, with the kept indices
  known in advance: a hand-written layer loop over the stock decoder layers (no hooks, no
  scoring), the original positions of the kept tokens, its own DynamicCache. Its logits are
  checked against FastV's.

The machinery's overhead is ``fastv / oracle - 1`` (target: at most 5%). Because wall-clock
differences of a few percent drown in a shared machine's noise, the machinery's own work is also
timed directly ("self-time": scoring, gathering, masks and rotary tables of the new layouts, state
bookkeeping — everything the hooks do besides running the stock layers) and given as a fraction
of the oracle's time. Variants run interleaved
(one call of each, round after round) so that a shared machine's load hits all of them alike;
medians and minima of the repeated runs after warm-up are reported, with the load average.
Optional SparseVLM rows (``--sparsevlm``) show its prefill time at the three v1.5 budgets.
Prints a table (rich) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable

import torch

import vlmprune
from vlmprune.integrations.compat import cache_kwargs

from .models import N_QUESTION, N_SYSTEM
from .timing import PhaseClock, loadavg, machine_info, own_time, summarise, time_call

__all__ = ["make_model", "make_prompt", "oracle_prefill", "main"]


def make_model(*, hidden: int = 512, layers: int = 32, vision_hidden: int = 128, vision_layers: int = 2,
               vocab: int = 32064, seed: int = 0):
    """LLaVA-1.5-shaped random model (fp32, sdpa), scaled in width."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    heads = max(hidden // 64, 1)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=max(vision_hidden // 64, 1),
                              image_size=336, patch_size=14, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 11008 / 4096),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    model.config._attn_implementation = "sdpa"
    return model


def make_prompt(model, batch: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    rows = []
    for _ in range(batch):
        sys_ids = torch.randint(3, 32000, (N_SYSTEM - 1,), generator=g)
        q_ids = torch.randint(3, 32000, (N_QUESTION,), generator=g)
        rows.append(torch.cat([torch.tensor([1]), sys_ids, torch.full((576,), model.config.image_token_id), q_ids]))
    ids = torch.stack(rows).clamp(max=vocab - 1)
    ids[ids == 0] = 5
    ids[:, N_SYSTEM:N_SYSTEM + 576] = model.config.image_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}


@torch.inference_mode()
def oracle_prefill(model, inputs: dict[str, torch.Tensor], kept: torch.Tensor, k_layer: int) -> torch.Tensor:
    """The stock model fed only the ``kept`` columns [B, Lk] from layer ``k_layer`` on; last-token logits."""
    from transformers import DynamicCache

    base = model.model
    lm = base.language_model
    ids = inputs["input_ids"]
    embeds = base.get_input_embeddings()(ids)
    feats = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
    feats = torch.cat(feats, dim=0).to(embeds.dtype)
    h = embeds.masked_scatter((ids == model.config.image_token_id)[..., None], feats)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cache = DynamicCache(config=lm.config)
    pe = lm.rotary_emb(h, position_ids=pos)
    for i, layer in enumerate(lm.layers):
        if i == k_layer:
            h = h.gather(1, kept[:, :, None].expand(-1, -1, h.shape[-1]))
            pos = pos.gather(1, kept)
            pe = lm.rotary_emb(h, position_ids=pos)
        h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos, use_cache=True,
                  **cache_kwargs(cache))
    return model.lm_head(lm.norm(h[:, -1:]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--hidden", type=int, default=512, help="decoder width (LLaVA-1.5-7B: 4096)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=2, help="FastV K")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds after one warm-up round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--sparsevlm", action="store_true", help="also time SparseVLM at budgets 192/128/64")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = make_model(hidden=args.hidden, layers=args.layers)
    inputs = make_prompt(model, batch=args.batch)
    variants: dict[str, Callable[[], Any]] = {}
    info: dict[str, dict[str, Any]] = {}

    def stock():
        with torch.inference_mode():
            return model(**inputs, use_cache=True, logits_to_keep=1).logits

    ref_logits = stock()
    variants["unpruned"] = stock
    info["unpruned"] = {"visual_tokens_avg": 576.0}

    for keep in (0.5, 0.25):
        tag = f"{int(keep * 100)}%"
        h = vlmprune.apply(model, "fastv", k=args.k, drop_ratio=1 - keep)
        with torch.inference_mode():
            logits = model(**inputs, use_cache=True, logits_to_keep=1).logits
        kept = h.state.final_source.clone()
        h.remove()
        oracle_logits = oracle_prefill(model, inputs, kept, args.k)
        diff = float((logits[:, -1] - oracle_logits[:, -1]).abs().max())
        assert model.config._attn_implementation == "sdpa"
        variants[f"fastv {tag}"] = ("fastv", keep)
        variants[f"oracle {tag}"] = (lambda kept=kept: oracle_prefill(model, inputs, kept, args.k))
        kcount = int((kept >= 0).sum(1)[0]) - (inputs["input_ids"].shape[1] - 576)
        info[f"fastv {tag}"] = {"kept_visual": kcount, "visual_tokens_avg": (args.k * 576 + (args.layers - args.k)
                                                                             * kcount) / args.layers,
                                "max_logit_diff_vs_oracle": diff}
        info[f"oracle {tag}"] = {"kept_visual": kcount}
    if args.sparsevlm:
        for budget in (192, 128, 64):
            variants[f"sparsevlm {budget}"] = ("sparsevlm", budget)
            info[f"sparsevlm {budget}"] = {}

    def run(name: str) -> float:
        v = variants[name]
        if callable(v):
            return time_call(v)
        method, opt = v
        kwargs = {"k": args.k, "drop_ratio": 1 - opt} if method == "fastv" else {"budget": opt}
        h = vlmprune.apply(model, method, **kwargs)
        h.phase_timer = clock = PhaseClock()  # the machinery's own work, by phase
        try:
            t = time_call(stock)  # the stock call, with the pruning hooks installed
            selftimes.setdefault(name, []).append(own_time(clock))
            if method == "sparsevlm":
                info[name]["visual_tokens_avg"] = h.stats.avg_visual_tokens
                info[name]["visual_tokens_avg_output"] = h.stats.avg_visual_tokens_output
            return t
        finally:
            h.remove()

    times: dict[str, list[float]] = {name: [] for name in variants}
    selftimes: dict[str, list[float]] = {}
    for r in range(args.repeats + 1):
        for name in variants:
            t = run(name)
            if r > 0:
                times[name].append(t)
            else:
                selftimes.pop(name, None)  # warm-up
    assert torch.equal(stock(), ref_logits), "removing the pruning did not restore the model"

    rows = []
    for name, ts in times.items():
        st = summarise(ts, method="exclusive")
        rows.append({"variant": name, "median_s": st["median"], "min_s": st["min"], "q1_s": st["q1"],
                     "q3_s": st["q3"], "times_s": ts, **info.get(name, {})})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        r["speedup_vs_unpruned"] = by["unpruned"]["median_s"] / r["median_s"]
        if r["variant"].startswith("fastv"):
            o = by["oracle" + r["variant"][len("fastv"):]]
            r["overhead_vs_oracle_median"] = r["median_s"] / o["median_s"] - 1
            r["overhead_vs_oracle_min"] = r["min_s"] / o["min_s"] - 1
        if r["variant"] in selftimes:
            r["machinery_self_s"] = summarise(selftimes[r["variant"]])["median"]
            base = by.get("oracle" + r["variant"][len("fastv"):], r) if r["variant"].startswith("fastv") else r
            r["machinery_self_fraction"] = r["machinery_self_s"] / base["median_s"]

    result = {
        "command": "python -m vlmprune.bench.decoder " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "model": {"decoder_layers": args.layers, "hidden": args.hidden, "heads": max(args.hidden // 64, 1),
                  "intermediate": int(args.hidden * 11008 / 4096), "image_tokens": 576,
                  "prompt_tokens": int(inputs["input_ids"].shape[1]), "batch": args.batch, "dtype": "float32",
                  "attn_implementation": model.config._attn_implementation, "weights": "random"},
        "fastv_k": args.k, "threads": args.threads, "repeats": args.repeats,
        "machine": {**machine_info(), "loadavg": loadavg()},
        "note": "fp32: bf16 is only fast where the CPU accelerates it (see vlmprune bench's machine.bf16_matmul)",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Prefill, LLaVA-1.5-shaped ({args.layers} layers, width {args.hidden}, fp32, "
                        f"batch {args.batch}, {args.threads} thread(s))")
    for col in ("variant", "visual tok (kept / all-layer avg)", "median s", "min s", "speedup", "overhead vs oracle",
                "machinery self-time"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        kept = r.get("kept_visual")
        avg = r.get("visual_tokens_avg")
        vt = (f"{kept} / " if kept is not None else "") + (f"{avg:.1f}" if avg is not None else "")
        ov = r.get("overhead_vs_oracle_median")
        st = r.get("machinery_self_s")
        table.add_row(r["variant"], vt, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['speedup_vs_unpruned']:.2f}x",
                      "" if ov is None else f"{100 * ov:+.1f}% (min {100 * r['overhead_vs_oracle_min']:+.1f}%)",
                      "" if st is None else f"{1000 * st:.1f} ms ({100 * r['machinery_self_fraction']:.2f}%)")
    Console().print(table)
    print(f"load average {loadavg()}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

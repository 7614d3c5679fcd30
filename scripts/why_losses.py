"""Why pruning methods lose reading, counting and position on the testbed: three probes.

    python scripts/why_losses.py --n 50 --out docs/results/why-v14

For the ``read``, ``count`` and ``position`` questions of ShapesVQA (test split, first ``n`` of
each), the *relevant patches* R of a question are known from its scene: the code's character
cells (read), the patches of every object of the asked shape (count), the patches of the named
objects (position). The probes, all on the committed testbed:

1. **Knockout** (where the answer is formed): the unpruned model with R removed from the input of
   decoder layer p (p = 0..L-1; original positions kept), and, as a control, the same number of
   random non-R visual tokens removed at p. Once removing R at layer p no longer hurts, the
   family's answer no longer needs R's tokens from p on.
2. **Coverage** (what each method keeps): the fraction of R a method keeps -- in the features it
   passes to the LLM (vision stage: its kept patches; merged tokens count by their centre only) or
   after each prune point (decoder stage) -- next to its accuracy.
3. **Oracle at the method's budget**: at the same prune point and the same kept count, keep R
   first and fill the rest at random (and a random-only control). If the oracle recovers the
   unpruned accuracy, the method loses the family by *what it keeps*; if even the oracle fails,
   the count / point is too tight for how this testbed reads (the recipe), whatever is kept.

Writes ``why.json`` (a ``vlmprune.results/1`` run block + every row) and ``why.md`` (tables).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmprune import apply, runinfo
from vlmprune.eval.report import header
from vlmprune.integrations.base import get_adapter
from vlmprune.integrations.decoder import Decision, DecoderMethodBase, attach as attach_decoder
from vlmprune.testbed.model import CHECKPOINT_DIR, load as load_testbed
from vlmprune.testbed.prompt import PROMPT_TEMPLATE
from vlmprune.testbed.questions import PLURALS, SHAPES, Question, build_questions, normalize_answer, scene_for
from vlmprune.testbed.scenes import GRID, patch_pixels

FAMILIES = ("read", "count", "position")


@dataclass
class Probe:
    """One question with its relevant-patch mask ``rel`` [N] bool."""
    family: str
    question: str
    answer: str
    seed: int
    rel: np.ndarray


def relevant_patches(q: Question) -> np.ndarray:
    """[GRID*GRID] bool: the patches the question's answer depends on (see the module docstring)."""
    scene = scene_for(q)
    n = GRID * GRID
    if q.family == "read":
        rel = np.zeros(n, bool)
        t = scene.text
        rel[t.row * GRID + t.col + np.arange(len(t.code))] = True
        return rel
    words = q.question.lower().replace("?", " ").split()
    named = {s for s in SHAPES if s in words or PLURALS[s] in words}
    pix = patch_pixels(scene.object_mask)  # [N, P*P]
    rel = np.zeros(n, bool)
    for i, o in enumerate(scene.objects):
        if o.shape in named:
            rel |= (pix == i + 1).mean(1) >= 0.2
    return rel


def load_probes(n: int, split: str = "test") -> list[Probe]:
    out = []
    for fam in FAMILIES:
        for q in build_questions(split, fam, n):
            out.append(Probe(fam, q.question, q.answer, q.seed, relevant_patches(q)))
    return out


class MaskKeep(DecoderMethodBase):
    """Decoder-stage probe: at prune point ``point`` keep the visual tokens ``keep_fn`` chooses.

    ``self.rel`` [B, L0] bool over the padded input columns is set before each batch (True at the
    image columns of relevant patches). ``mode``: ``"drop-rel"`` (remove R), ``"drop-random"``
    (remove as many random non-R tokens as R has), ``"oracle"`` (keep R first, fill at random up
    to ``count``), ``"random"`` (``count`` random tokens).
    """

    name = "probe"

    def __init__(self, point: int, mode: str, count: int | None = None, positions: str = "original",
                 seed: int = 0) -> None:
        self.point, self.mode, self.count, self.positions = point, mode, count, positions
        self.rel: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def prune_layers(self, num_layers: int) -> list[int]:
        return [self.point]

    def select(self, view, attn) -> Decision:
        src = view.source.clamp(min=0)
        rel = self.rel.gather(1, src) & view.visual  # [B, L]
        noise = torch.rand(view.visual.shape, generator=self.gen)
        if self.mode == "drop-rel":
            return Decision(keep=view.visual & ~rel)
        if self.mode == "drop-random":
            others = view.visual & ~rel
            score = torch.where(others, noise, torch.full_like(noise, -1.0))
            rank = score.argsort(1, descending=True).argsort(1)
            return Decision(keep=view.visual & ~(others & (rank < rel.sum(1, keepdim=True))))
        # oracle / random: rank R first (oracle), then random, keep the top ``count``
        score = noise + (2.0 * rel.float() if self.mode == "oracle" else 0.0)
        score = torch.where(view.visual, score, torch.full_like(score, -1.0))
        rank = score.argsort(1, descending=True).argsort(1)
        return Decision(keep=view.visual & (rank < self.count))


def _rel_columns(input_ids: torch.Tensor, image_token_id: int, rel: list[np.ndarray]) -> torch.Tensor:
    """[B, L0] bool: True at the image columns of relevant patches (image tokens in patch order)."""
    out = torch.zeros(input_ids.shape, dtype=torch.bool)
    for b, r in enumerate(rel):
        cols = (input_ids[b] == image_token_id).nonzero().flatten()
        out[b, cols] = torch.from_numpy(r[: cols.numel()])
    return out


def run(model, processor, probes: list[Probe], *, probe: MaskKeep | None = None, spec: str | None = None,
        batch_size: int = 16) -> dict:
    """Accuracy per family and R coverage of one configuration (a probe object or a method spec)."""
    tok = processor.tokenizer
    tok.padding_side = "left"
    image_token_id = model.config.image_token_id
    handle = None
    if probe is not None:
        handle = attach_decoder(model, get_adapter(model), None, probe)
    elif spec is not None:
        handle = apply(model, spec)
    correct = {f: 0 for f in FAMILIES}
    total = {f: 0 for f in FAMILIES}
    cover: dict[str, list[list[float]]] = {f: [] for f in FAMILIES}  # per question: R kept fraction per stage
    tokens: list[float] = []
    try:
        for start in range(0, len(probes), batch_size):
            batch = probes[start:start + batch_size]
            images = [scene_for(Question(p.family, p.question, p.answer, p.seed)).image for p in batch]
            inputs = processor(images=images, text=[PROMPT_TEMPLATE.format(question=p.question) for p in batch],
                               padding=True, return_tensors="pt")
            rel_cols = _rel_columns(inputs["input_ids"], image_token_id, [p.rel for p in batch])
            if probe is not None:
                probe.rel = rel_cols
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            kept = _coverage(handle, rel_cols, [p.rel for p in batch])
            if handle is not None:
                tokens += handle.stats.visual_tokens_per_sample()
            for b, (p, text) in enumerate(zip(batch, texts)):
                total[p.family] += 1
                correct[p.family] += normalize_answer(text.strip()) == normalize_answer(p.answer)
                cover[p.family].append(kept[b])
    finally:
        if handle is not None:
            handle.remove()
    return {"accuracy": {f: 100.0 * correct[f] / max(total[f], 1) for f in FAMILIES},
            "n": total,
            # questions with an empty R (a count of an absent shape) have no coverage
            "coverage": {f: np.nanmean(np.array(cover[f], dtype=float), 0).round(4).tolist()
                         if cover[f] and cover[f][0] else [] for f in FAMILIES},
            "tokens": float(np.mean(tokens)) if tokens else float(GRID * GRID)}


def _coverage(handle, rel_cols: torch.Tensor, rel: list[np.ndarray]) -> list[list[float]]:
    """Per sample: the fraction of its R kept, per stage (vision: one value; decoder: per segment)."""
    bsz = rel_cols.shape[0]
    if handle is None:
        return [[] for _ in range(bsz)]
    if handle.stage == "vision":
        idx = handle.last_reduction.indices  # [B, M] kept patch indices, -1 = padding
        out = []
        for b in range(bsz):
            r = torch.from_numpy(rel[b])
            k = idx[b][idx[b] >= 0]
            kept = torch.zeros_like(r)
            kept[k.clamp(max=r.numel() - 1)] = True
            out.append([float((kept & r).sum()) / int(r.sum()) if r.any() else float("nan")])
        return out
    segs = handle.state.segments[1:]  # the layouts after each prune point
    out = []
    for b in range(bsz):
        n_rel = int(rel_cols[b].sum())
        row = []
        for seg in segs:
            src = seg.source[b][seg.valid[b] & seg.visual[b]].clamp(min=0)
            row.append(float(rel_cols[b, src].sum()) / n_rel if n_rel else float("nan"))
        out.append(row)
    return out


def fastv_count(budget: float, k: int, num_layers: int, n: int) -> int:
    """FastV's kept count for an all-layer average ``budget`` with pruning after layer k-1."""
    return round((budget * num_layers - k * n) / (num_layers - k))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=50, help="questions per family (read, count, position)")
    ap.add_argument("--out", type=Path, default=Path("out/why"), help="folder for why.json / why.md")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--only", default="knockout,coverage,oracle", help="which probes (comma-separated)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    only = set(args.only.split(","))
    if not only <= {"knockout", "coverage", "oracle"}:
        ap.error(f"--only takes knockout, coverage, oracle; got {args.only!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    model, processor = load_testbed()
    num_layers = model.config.text_config.num_hidden_layers
    n_vis = GRID * GRID
    probes = load_probes(args.n)
    t0 = time.time()
    run_block = runinfo.new_run("why-losses", model=runinfo.model_info(CHECKPOINT_DIR),
                                data=runinfo.shapesvqa_data("test", FAMILIES, args.n),
                                generation={"max_new_tokens": 8, "do_sample": False, "batch_size": args.batch_size})
    run_block["command"] = "python scripts/why_losses.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows: list[dict] = []
    path = args.out / "why.json"

    def record(probe_name: str, label: str, res: dict, **extra) -> None:
        rows.append({"probe": probe_name, "label": label, **extra, **res})
        print(f"{probe_name:9s} {label:44s} " + " ".join(f"{f}={res['accuracy'][f]:5.1f}" for f in FAMILIES)
              + f"  cov={res['coverage']}  tok={res['tokens']:.1f}  ({time.time() - t0:.0f}s)", flush=True)
        path.write_text(json.dumps({"schema": runinfo.RESULTS_SCHEMA, "run": run_block, "results": rows}, indent=1))

    record("baseline", "unpruned", run(model, processor, probes, batch_size=args.batch_size))
    if "knockout" in only:
        for p in range(num_layers):
            record("knockout", f"drop R at layer {p}", run(model, processor, probes, probe=MaskKeep(p, "drop-rel"),
                                                           batch_size=args.batch_size), point=p)
        for p in (0, 1):
            record("knockout", f"drop |R| random others at layer {p}",
                   run(model, processor, probes, probe=MaskKeep(p, "drop-random"), batch_size=args.batch_size), point=p)
    fv = fastv_count(166.5, 1, num_layers, n_vis)
    methods = [("prumerge+:keep=166", 0, 166, "compact"), ("prumerge+:keep=166,order=spatial", 0, 166, "compact"),
               (f"fastv:k=1,count={fv}", 1, fv, "original"), ("sparsevlm:budget=128", None, None, None),
               ("atp:checkpoint=testbed-144", None, None, None)]
    if "coverage" in only:
        for spec, *_ in methods:
            record("coverage", spec, run(model, processor, probes, spec=spec, batch_size=args.batch_size))
    if "oracle" in only:
        for point, count, positions in ((0, 166, "compact"), (0, 166, "original"), (1, fv, "original"),
                                        (1, 166, "original"), (2, fv, "original")):
            for mode in ("oracle", "random"):
                record("oracle", f"{mode}: {count} kept from layer {point} ({positions})",
                       run(model, processor, probes, probe=MaskKeep(point, mode, count, positions),
                           batch_size=args.batch_size), point=point, count=count, positions=positions, mode=mode)
    run_block.update(status="complete", finished=runinfo.now())
    path.write_text(json.dumps({"schema": runinfo.RESULTS_SCHEMA, "run": run_block, "results": rows}, indent=1))
    (args.out / "why.md").write_text(header(run_block) + _markdown(rows))
    print(f"wrote {path} and {args.out / 'why.md'}")
    return 0


def _markdown(rows: list[dict]) -> str:
    lines = ["| probe | configuration | tokens | read | count | position | R kept (per stage) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["accuracy"]
        cov = "; ".join(f"{f} " + "/".join(f"{100 * c:.0f}%" for c in r["coverage"][f]) for f in FAMILIES
                        if r["coverage"][f])
        lines.append(f"| {r['probe']} | {r['label']} | {r['tokens']:.1f} | {acc['read']:.0f} | {acc['count']:.0f} | "
                     f"{acc['position']:.0f} | {cov} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

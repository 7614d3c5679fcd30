"""Diagnostics of a testbed decoder under training (the figures of docs/testbed.md).

    python -m vlmprune.eval.testbed_diagnose MODEL_DIR answers    # exact answers on 1 / 2 / 5-object val scenes
    python -m vlmprune.eval.testbed_diagnose MODEL_DIR linear     # linear probe: object colour from the answer row
    python -m vlmprune.eval.testbed_diagnose MODEL_DIR corner     # linear probes: an object's corner at its patch / word / answer row
    python -m vlmprune.eval.testbed_diagnose MODEL_DIR attention  # answer-row attention share on object patches
    python -m vlmprune.eval.testbed_diagnose MODEL_DIR binding    # 2-object scenes: attention on the named vs the other object
    python -m vlmprune.eval.testbed_diagnose MODEL_DIR copying    # does an earlier turn's colour word leak into the answer?
    python -m vlmprune.eval.testbed_diagnose RUN_DIR vision       # stage-1 heads: accuracy on object/text patches
    python -m vlmprune.eval.testbed_diagnose RUN_A,RUN_B losses   # stage-2 answer loss, 50-step means, side by side

``MODEL_DIR`` is a saved model folder; ``python -m vlmprune.eval.testbed_diagnose RUN_DIR export OUT``
first writes one from a run's ``train_state.pt`` (mid-run evaluation).
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from ..testbed.prompt import format_follow_up, format_prompt
from ..testbed.questions import ask
from ..testbed.scenes import COLOR_NAMES, make_scene, patch_pixels, split_seed


def _load_run(run_dir: str):
    """(model, processor, saved checkpoint dict) of a training run folder's ``train_state.pt``."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    from ..testbed.model import build_model, build_processor

    if not (Path(run_dir) / "train_state.pt").exists() or not (Path(run_dir) / "tokenizer").exists():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (train_state.pt and tokenizer/ expected); "
                                "pass the --out folder of `vlmprune testbed train`")
    tok = PreTrainedTokenizerFast.from_pretrained(f"{run_dir}/tokenizer")
    saved = torch.load(f"{run_dir}/train_state.pt", weights_only=False)
    cfg = saved["config"]
    model = build_model(tok, vision=cfg.get("vision_overrides"), text=cfg.get("text_overrides"))
    model.load_state_dict(saved["model"])
    return model, build_processor(tok), saved


def export(run_dir: str, out: str) -> dict:
    """Save the model of ``run_dir/train_state.pt`` (with the run's tokenizer and processor) to ``out``."""
    model, processor, saved = _load_run(run_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return saved["state"]


@torch.no_grad()
def vision_heads(run_dir: str, n: int = 64) -> dict:
    """Accuracy of a run's stage-1 heads on validation scenes, counted on labelled patches only.

    Returns ``{"color" | "shape" | "char": (right, total)}`` over patches that show an object
    (colour, shape) or a code character, and ``{"shape@centre/SIZE": (right, total)}``: the shape
    head at each object's centre patch, per object size. Background patches are left out: they are
    ~95% of all patches and would hide a head that is at chance on objects. Also
    ``{"cls_attention_share": (sum, scenes)}``: the share of the [CLS] attention PruMerge reads
    that lands on object/text patches, summed over scenes.
    """
    from ..testbed.scenes import SHAPES, patch_labels
    from ..testbed.recipe.vision import VisionHeads, cls_attention, pixel_values_of

    model, processor, saved = _load_run(run_dir)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    heads.load_state_dict(saved["heads"])
    vision = model.model.vision_tower.eval()
    counts: dict = {}

    def add(key, right, total):
        r, t = counts.get(key, (0, 0))
        counts[key] = (r + int(right), t + int(total))

    for start in range(0, n, 16):
        scenes = [make_scene(split_seed("val", 500 + start + i), text=i % 2 == 0) for i in range(min(16, n - start))]
        hidden = vision(pixel_values_of(processor, [sc.image for sc in scenes]), output_hidden_states=True)
        patches = hidden.hidden_states[-2][:, 1:]
        cls_att = cls_attention(vision, hidden.hidden_states[-2])  # [B, N]
        for b, scene in enumerate(scenes):
            lab = patch_labels(scene)
            obj = torch.as_tensor(lab.object_or_text)
            r, t = counts.get("cls_attention_share", (0.0, 0))
            counts["cls_attention_share"] = (r + float(cls_att[b][obj].sum() / cls_att[b].sum()), t + 1)
            preds = {}
            for key in ("color", "shape", "char"):
                target = torch.as_tensor(getattr(lab, key))
                preds[key] = getattr(heads, key)(patches[b]).argmax(-1)
                m = target > 0
                add(key, (preds[key][m] == target[m]).sum(), m.sum())
            grid = int(len(preds["shape"]) ** 0.5)
            for o in scene.objects:
                r, c = o.center_patch
                add(f"shape@centre/{o.size}", preds["shape"][r * grid + c] == 1 + SHAPES.index(o.shape), 1)
    return counts


def answers(model, processor, n: int = 32, objects=(1, 2, 5), families=("color", "shape", "exist")) -> dict:
    """Exact-match counts per (objects, family) on validation scenes with exactly that many objects.

    Answered and scored by the evaluation harness (``run_items``: greedy, left-padded batches).
    """
    from .data import EvalItem
    from .harness import run_items

    class SceneItem(EvalItem):  # an evaluation item whose image is a given scene's
        def __init__(self, scene, **fields):
            super().__init__(**fields)
            self.scene = scene

        def image(self):
            return self.scene.image

    table = {}
    for k in objects:
        for fam in families:
            items = []
            for i in range(n):
                seed = split_seed("val", 5000 + i)
                scene = make_scene(seed, n_objects=k)
                q = ask(scene, fam, random.Random(seed))
                if q is not None:
                    items.append(SceneItem(scene, id=f"{k}-{fam}-{i}", family=fam, question=q.question, answer=q.answer))
            results, _ = run_items(model, processor, items, batch_size=16, max_new_tokens=6, progress=False)
            table[(k, fam)] = (sum(r.correct for r in results), len(results))
    return table


@torch.no_grad()
def _answer_rows(model, processor, scenes, questions):
    batch = processor(images=[s.image for s in scenes], text=[format_prompt(q) for q in questions],
                      return_tensors="pt", padding=True)
    return model(**batch, output_hidden_states=True).hidden_states


def linear_probe(model, processor, n: int = 240, train: int = 180, steps: int = 300, seed: int = 0) -> list[float]:
    """Held-out accuracy of a linear read-out of the single object's colour from the answer row, per hidden state."""
    scenes = [make_scene(split_seed("val", 20000 + i), n_objects=1) for i in range(n)]
    feats, labels = [], []
    for s in range(0, n, 16):
        chunk = scenes[s:s + 16]
        hs = _answer_rows(model, processor, chunk, [f"What color is the {c.objects[0].shape}?" for c in chunk])
        feats.append(torch.stack([h[:, -1] for h in hs], 1))
        labels += [COLOR_NAMES.index(c.objects[0].color) for c in chunk]
    torch.manual_seed(seed)
    return _probe_layers(torch.cat(feats), torch.tensor(labels), train, steps, len(COLOR_NAMES))


def _probe_layers(x: torch.Tensor, y: torch.Tensor, train: int, steps: int, classes: int) -> list[float]:
    """Held-out accuracy of a linear classifier of ``y`` from ``x[:, layer]`` [N, layers, D], per layer
    (the first ``train`` rows fit it, the rest score it)."""
    accs = []
    for layer in range(x.shape[1]):
        f = x[:, layer]
        f = (f - f[:train].mean(0)) / (f[:train].std(0) + 1e-5)
        w = torch.zeros(f.shape[1], classes, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.01)
        for _ in range(steps):
            loss = F.cross_entropy(f[:train] @ w, y[:train]) + 1e-3 * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        accs.append(float(((f[train:] @ w).argmax(1) == y[train:]).float().mean()))
    return accs


def corner_probe(model, processor, n: int = 400, train: int = 300, steps: int = 300,
                 seed: int = 0) -> dict[str, list[float]]:
    """Where is an object's corner readable? Linear probes per hidden state on "Which corner is the X in?".

    For ``n`` val scenes (one clearly placed, uniquely shaped object asked about each), the
    object's corner is probed from three places: its centre patch's image token (``patch``), the
    question's shape word (``word``) and the answer row (``answer``). Returns held-out accuracy
    per hidden state (index 0 = decoder input) for each; chance is about 0.25.
    """
    from ..testbed.questions import CORNERS, corner_objects
    from ..testbed.scenes import GRID, corner_of

    image_id, feats, labels, i = model.config.image_token_id, {"patch": [], "word": [], "answer": []}, [], 0
    while len(labels) < n:
        scene = make_scene(split_seed("val", 30000 + i))
        i += 1
        clear = corner_objects(scene)
        if not clear:
            continue
        o = clear[0]
        batch = processor(images=scene.image, text=format_prompt(f"Which corner is the {o.shape} in?"),
                          return_tensors="pt")
        ids = batch["input_ids"][0]
        word_id = processor.tokenizer(" " + o.shape, add_special_tokens=False)["input_ids"][-1]
        word = int((ids == word_id).nonzero()[-1, 0])
        r, c = o.center_patch
        patch = int((ids == image_id).nonzero()[r * GRID + c, 0])
        with torch.no_grad():
            hs = torch.stack(model(**batch, output_hidden_states=True).hidden_states)[:, 0]  # [layers + 1, L, D]
        for key, t in (("patch", patch), ("word", word), ("answer", len(ids) - 1)):
            feats[key].append(hs[:, t])
        labels.append(CORNERS.index(corner_of(o)))
    y = torch.tensor(labels)
    out = {}
    for key, rows in feats.items():
        torch.manual_seed(seed)
        out[key] = _probe_layers(torch.stack(rows), y, train, steps, len(CORNERS))
    return out


@torch.no_grad()
def attention_share(model, processor, batch_size: int = 8, step: int = 7777) -> tuple[float, list[list[tuple]]]:
    """Per layer and head: (share on object/text patches, share on all image tokens) from answer rows."""
    from ..testbed.recipe.batch import llm_batch
    from ..testbed.recipe.config import WORDS_GUIDE_ADDONS_OFF, TrainConfig
    from ..testbed.recipe.guide import AttentionGuide

    # answer rows on full images (not the recipe's word / read rows or its background dropout)
    cfg = TrainConfig(guide_weight=1.0, guide_rows="answer", guide_read_layers=None, bg_keep=1.0,
                      llm_batch=batch_size, patch_words=0.0, patch_position=False, **WORDS_GUIDE_ADDONS_OFF)
    batch = llm_batch(cfg, step, processor)
    g = batch.pop("guide")
    text = model.config.text_config
    guide = AttentionGuide(model, tuple(range(text.num_hidden_layers)), text.num_attention_heads)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
        probs = guide.probabilities(g["allowed"])
    finally:
        guide.remove()
    rows, target = g["rows"], g["targets"].float()
    image = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).float()
    out = []
    for p in probs:
        obj = (p * target[:, None, None]).sum(-1)
        img = (p * image[:, None, None]).sum(-1)
        out.append([(float(obj[:, h][rows].mean()), float(img[:, h][rows].mean())) for h in range(p.shape[1])])
    return float(target.sum() / image.sum()), out


def _two_object_questions(family: str, n: int, start: int = 9000):
    """(scene, question, named object index, other object index) on val scenes with two objects."""
    from collections import Counter

    out = []
    for i in range(n):
        scene = make_scene(split_seed("val", start + i), n_objects=2)
        key = "shape" if family == "color" else "color"
        counts = Counter(getattr(o, key) for o in scene.objects)
        if any(counts[getattr(o, key)] > 1 for o in scene.objects):
            continue  # the two objects share the attribute the question names
        a = random.Random(scene.seed).randrange(2)  # which object the question names (object_mask ids are 1, 2)
        named = scene.objects[a]
        q = f"What color is the {named.shape}?" if family == "color" else f"What shape is the {named.color} object?"
        out.append((scene, q, a + 1, 2 - a))
    return out


@torch.no_grad()
def binding(model, processor, family: str = "color", n: int = 40) -> tuple[int, list[list[tuple[float, float]]]]:
    """Per layer and head, mean attention from the answer row on the named object's patches and on the other's.

    Two-object validation scenes, "What color is the SHAPE?" (or "What shape is the COLOR object?"):
    a head that retrieves by the question puts more on the named object; one that reads the image
    as a whole splits between the two. Attention recomputed from q/k (sdpa stays on).
    """
    from ..testbed.recipe.guide import AttentionGuide

    text = model.config.text_config
    items = _two_object_questions(family, n)
    sums = None
    guide = AttentionGuide(model, tuple(range(text.num_hidden_layers)), text.num_attention_heads)
    try:
        for scene, q, a, b in items:
            batch = processor(images=[scene.image], text=[format_prompt(q)], return_tensors="pt")
            model(**batch)
            L = batch["input_ids"].shape[1]
            probs = guide.probabilities(torch.ones(1, L, L, dtype=torch.bool).tril())
            image = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
            pixels = torch.as_tensor(patch_pixels(scene.object_mask))  # [576, 196] object ids
            on = [(pixels == k).any(1) for k in (a, b)]
            rows = [torch.stack([p[0, :, -1, image][:, m].sum(-1) for m in on], -1) for p in probs]  # [heads, 2]
            sums = rows if sums is None else [s + r for s, r in zip(sums, rows)]
    finally:
        guide.remove()
    return len(items), [[(float(h[0]) / len(items), float(h[1]) / len(items)) for h in layer] for layer in sums]


@torch.no_grad()
def copying(model, processor, n: int = 60) -> dict:
    """Colour answers on two-object scenes with and without an earlier turn naming a colour.

    ``single``: the question alone; ``wrong``: after "Is there a WRONG SHAPE? no" (a colour not
    in the scene); ``right``: after "Is there a RIGHT SHAPE? yes". Counts (correct, answered WRONG,
    total): a decoder that copies colour words from the conversation instead of reading the image
    answers WRONG after the wrong prior and gains after the right one.
    """
    tok = processor.tokenizer

    def answer(scene, prior, q):
        text = format_prompt(prior[0] if prior else q)
        if prior:
            text += f" {prior[1]}</s>{format_follow_up(q)}"
        batch = processor(images=[scene.image], text=[text], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
        return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip().lower()

    res = {k: [0, 0, 0] for k in ("single", "wrong", "right")}
    for scene, q, a, _ in _two_object_questions("color", n):
        o = scene.objects[a - 1]
        wrong = random.Random(scene.seed).choice([c for c in COLOR_NAMES if c not in {x.color for x in scene.objects}])
        for key, prior in (("single", None), ("wrong", (f"Is there a {wrong} {o.shape}?", "no")),
                           ("right", (f"Is there a {o.color} {o.shape}?", "yes"))):
            got = answer(scene, prior, q)
            res[key][0] += got == o.color
            res[key][1] += got == wrong
            res[key][2] += 1
    return res


def loss_table(runs: list[str], every: int = 50, key: str = "lm") -> list[tuple[int, list[float | None]]]:
    """Stage-2 ``key`` loss of each run's ``history.jsonl``, averaged over steps [s, s + every)."""
    import json
    from pathlib import Path

    per_run = []
    for run in runs:
        path = Path(run) / "history.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: pass the --out folders of `vlmprune testbed train`")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        per_run.append({r["step"]: r.get(key, r["loss"]) for r in rows if r["stage"] == 2})
    last = max((max(h) for h in per_run if h), default=-1)
    table = []
    for start in range(0, last + 1, every):
        means = []
        for h in per_run:
            xs = [h[i] for i in range(start, start + every) if i in h]
            means.append(sum(xs) / len(xs) if xs else None)
        table.append((start, means))
    return table


def main(argv=None) -> None:  # pragma: no cover - thin CLI over the functions above
    ap = argparse.ArgumentParser(prog="python -m vlmprune.eval.testbed_diagnose", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("what", choices=["answers", "linear", "corner", "attention", "binding", "copying", "vision", "export", "losses"])
    ap.add_argument("out", nargs="?")
    ap.add_argument("--method", help="answers only: run under this pruning method, NAME[:key=value,...] "
                                     "(e.g. cls-topk:keep=85, close to a bg_keep=0.1 training input)")
    args = ap.parse_args(argv)
    if args.what == "export":
        if not args.out:
            ap.error("export needs OUT, the folder to write the model to")
        try:
            print(export(args.path, args.out))
        except FileNotFoundError as e:
            ap.error(str(e))
        return
    if args.method and args.what != "answers":
        ap.error("--method applies to 'answers' only")
    if args.what == "losses":
        runs, every = args.path.split(","), 50
        try:
            table = loss_table(runs, every)
        except FileNotFoundError as e:
            ap.error(str(e))
        print("| steps | " + " | ".join(runs) + " |")
        print("|---" * (len(runs) + 1) + "|")
        for start, means in table:
            cells = ["" if m is None else f"{m:.3f}" for m in means]
            print(f"| {start}-{start + every} | " + " | ".join(cells) + " |")
        return
    if args.what == "vision":
        try:
            counts = vision_heads(args.path)
        except FileNotFoundError as e:
            ap.error(str(e))
        for key, (right, total) in counts.items():
            if key == "cls_attention_share":
                print(f"[CLS] attention share on object/text patches: {right / max(total, 1):.3f} ({total} scenes)")
            else:
                print(f"{key}: {right}/{total} = {right / max(total, 1):.3f}")
        return
    from ..testbed.model import load

    model, processor = load(args.path)
    if args.what == "answers":
        import vlmprune
        from ..registry import parse_method_spec

        handle = None
        if args.method:
            try:
                name, opts = parse_method_spec(args.method)
                handle = vlmprune.apply(model, name, **opts) if name else None
            except (ValueError, TypeError) as e:
                ap.error(f"--method {args.method!r}: {e}")
        try:
            table = answers(model, processor)
        finally:
            if handle is not None:
                handle.remove()
        for (k, fam), (right, total) in table.items():
            print(f"objects={k} {fam}: {right}/{total}")
    elif args.what == "binding":
        for family in ("color", "shape"):
            n, table = binding(model, processor, family)
            print(f"{family} questions, {n} two-object scenes: attention on named / other object")
            for layer, heads in enumerate(table):
                print(f"layer {layer}: " + "  ".join(f"h{h} {a:.3f}/{b:.3f}" for h, (a, b) in enumerate(heads)))
    elif args.what == "copying":
        for key, (right, wrong, total) in copying(model, processor).items():
            print(f"{key}: correct {right}/{total}, answered the prior's wrong colour {wrong}/{total}")
    elif args.what == "corner":
        probes = corner_probe(model, processor)
        print("| probed at | " + " | ".join(f"h{k}" for k in range(len(probes["patch"]))) + " |")
        print("|---" * (len(probes["patch"]) + 1) + "|")
        for key, accs in probes.items():
            print(f"| {key} | " + " | ".join(f"{a:.2f}" for a in accs) + " |")
    elif args.what == "linear":
        for layer, acc in enumerate(linear_probe(model, processor)):
            print(f"hidden state {layer}: held-out colour accuracy {acc:.2f}")
    else:
        share, table = attention_share(model, processor)
        print(f"object/text share of image tokens: {share:.3f}")
        for layer, heads in enumerate(table):
            print(f"layer {layer}: " + "  ".join(f"h{h} obj {o:.3f} img {i:.3f}" for h, (o, i) in enumerate(heads)))


if __name__ == "__main__":  # pragma: no cover
    main()

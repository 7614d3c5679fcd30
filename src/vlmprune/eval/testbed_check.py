"""The testbed's acceptance checks (``docs/testbed.md``):

* unpruned accuracy per family on the test split;
* accuracy with blank images (should fall to about chance);
* accuracy when only 32 random visual tokens are kept (should lose >= 15 points);
* share of the [CLS] attention (the signal PruMerge uses) that lands on object patches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..testbed.scenes import make_scene, patch_labels, split_seed


def cls_attention_share(model, processor, n_scenes: int = 200, split: str = "test", batch: int = 16) -> dict:
    """Mean share of the [CLS] row's patch attention mass on object (or text) patches.

    The attention is the one PruMerge reads (``recipe.vision.cls_attention``: last vision layer, q/k from
    the penultimate hidden state, softmax over all keys of the concatenated-head logits).
    """
    from ..integrations.base import get_adapter
    from ..testbed.recipe.vision import cls_attention

    vt = get_adapter(model).get_vision_tower(model)
    shares, fractions = [], []
    for start in range(0, n_scenes, batch):
        scenes = [make_scene(split_seed(split, i)) for i in range(start, min(n_scenes, start + batch))]
        pv = processor.image_processor([sc.image for sc in scenes], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            att = cls_attention(vt, vt(pv.to(model.dtype), output_hidden_states=True).hidden_states[-2])
        for a, scene in zip(att, scenes):
            obj = torch.as_tensor(patch_labels(scene).object_or_text)
            shares.append(float(a[obj].sum() / a.sum()))
            fractions.append(float(obj.float().mean()))
    return {"scenes": n_scenes, "cls_attention_share_on_objects": float(np.mean(shares)),
            "object_patch_fraction": float(np.mean(fractions))}


def chance_accuracy() -> float:
    """Mean over families of the accuracy of always giving each family's most frequent answer.

    (Computed on the test split's first 300 questions per family; what a model that ignores the
    image can reach at best by guessing one answer per family.)
    """
    from collections import Counter

    from ..testbed.questions import FAMILIES, build_questions

    accs = []
    for fam in FAMILIES:
        answers = Counter(q.answer for q in build_questions("test", fam, 300))
        accs.append(answers.most_common(1)[0][1] / sum(answers.values()))
    return sum(accs) / len(accs)


def run_check(n: int = 300, out: Path = Path("out/testbed-check"), batch_size: int = 16, blank_n: int = 100,
              model=None, processor=None) -> dict:
    """Run every check on ``model``/``processor`` (default: the committed testbed)."""
    from ..testbed.model import load
    from . import report
    from .data import shapesvqa_items
    from .harness import evaluate

    if model is None:
        model, processor = load()
    items = shapesvqa_items("test", None, n)
    base = evaluate(model, processor, items, batch_size=batch_size)
    base.retention = 1.0
    blank = evaluate(model, processor, shapesvqa_items("test", None, blank_n, blank=True), batch_size=batch_size,
                     label="blank images", baseline=base)
    rnd = evaluate(model, processor, items, method="random", method_options={"keep": 32}, batch_size=batch_size,
                   baseline=base)
    results = [base, blank, rnd]
    report.print_table(results, title="testbed check (ShapesVQA test)")
    att = cls_attention_share(model, processor)
    print(json.dumps(att, indent=1))
    report.write(results, out, "check")
    summary = {"unpruned_mean": base.mean_accuracy, "min_family": min(f.accuracy for f in base.families),
               "blank_mean": blank.mean_accuracy, "random32_mean": rnd.mean_accuracy,
               "random32_drop_points": 100 * (base.mean_accuracy - rnd.mean_accuracy),
               "chance_mean": chance_accuracy(), **att}
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return summary

"""ATP figures: kept tokens over the image at each module (the paper's Figure 4), and kept-token count
against scene complexity (number of objects, presence of text).

Both run the model with trained ATP modules in hard (inference) mode on ShapesVQA test scenes and
read, per prefill, the patches alive after each module (``handle.state.context.keep_grids``) and
the per-sample counts (``handle.stats``). matplotlib with the Agg backend (no display needed).

    vlmprune train atp-viz runs/atp-144 --out out/atp-viz/144
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..plotting import pyplot, save_figure

__all__ = ["SceneRecord", "easy_and_cluttered", "complexity_scenes", "run_scenes", "plot_overlays",
           "plot_complexity", "run_viz"]


@dataclass
class SceneRecord:
    """One prefill's ATP decisions for one scene."""

    seed: int
    question: str
    n_objects: int
    has_text: bool
    module_layers: list[int]
    module_counts: list[int]
    average: float  # all-layer average visual tokens
    grids: list[list[bool]]  # [K][N]: patch alive after each module (raster order)


def _question(scene: Any, family: str | None, rnd: random.Random) -> str:
    from ..testbed.questions import FAMILIES, ask

    fams = [family] if family else list(FAMILIES)
    while True:
        q = ask(scene, rnd.choice(fams), rnd)
        if q is not None:
            return q.question
        if family:  # this scene does not support the family: fall back to any
            fams = list(FAMILIES)


def easy_and_cluttered(seeds: Sequence[int], family: str | None = "count", split: str = "test") -> list[tuple[Any, str]]:
    """For each seed an easy scene (1 object, no text) and a cluttered one (9 objects, text), with a question."""
    from ..testbed.scenes import make_scene, split_seed

    out = []
    for s in seeds:
        seed = split_seed(split, 700_000 + int(s))
        for n_obj, text in ((1, False), (9, True)):
            scene = make_scene(seed, n_objects=n_obj, text=text)
            out.append((scene, _question(scene, family, random.Random(f"{seed}:{n_obj}"))))
    return out


def complexity_scenes(n: int, split: str = "test", start: int = 800_000) -> list[tuple[Any, str]]:
    """``n`` scenes in a balanced design: 1..9 objects x with / without text; a random question each."""
    from ..testbed.scenes import make_scene, split_seed

    out = []
    for i in range(n):
        seed = split_seed(split, start + i)
        scene = make_scene(seed, n_objects=1 + i % 9, text=(i // 9) % 2 == 1)
        out.append((scene, _question(scene, None, random.Random(seed))))
    return out


def run_scenes(model: Any, processor: Any, handle: Any, scenes: Sequence[tuple[Any, str]], *,
               batch_size: int = 16) -> list[SceneRecord]:
    """Prefill each (scene, question) with the ATP handle attached (hard mode); one record per scene."""
    from ..testbed.prompt import format_prompt

    tok = processor.tokenizer
    tok.padding_side = "left"
    records = []
    for s in range(0, len(scenes), batch_size):
        chunk = scenes[s:s + batch_size]
        inputs = processor(images=[sc.image for sc, _ in chunk], text=[format_prompt(q) for _, q in chunk],
                           padding=True, return_tensors="pt")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            model(**inputs, use_cache=False)
        ctx, st = handle.state.context, handle.stats
        grids = torch.stack(ctx.keep_grids, dim=1).cpu()  # [B, K, N]
        for b, (sc, q) in enumerate(chunk):
            records.append(SceneRecord(seed=sc.seed, question=q, n_objects=len(sc.objects),
                                       has_text=sc.text is not None, module_layers=list(st.module_layers),
                                       module_counts=st.module_counts[b], average=st.atp_average[b],
                                       grids=grids[b].tolist()))
    return records


def plot_overlays(scenes: Sequence[tuple[Any, str]], records: Sequence[SceneRecord], grid: tuple[int, int],
                  path: str | Path, *, title: str = "") -> Path:
    """Rows = scenes, columns = the image and the patches alive after each module (dropped ones dimmed)."""
    plt = pyplot()
    k = len(records[0].module_counts)
    fig, axes = plt.subplots(len(records), k + 1, figsize=(2.1 * (k + 1), 2.3 * len(records)), squeeze=False)
    h, w = grid
    for r, ((scene, q), rec) in enumerate(zip(scenes, records)):
        img = np.asarray(scene.image.convert("RGB"), dtype=np.float32) / 255.0
        ph, pw = img.shape[0] / h, img.shape[1] / w
        ax = axes[r, 0]
        ax.imshow(img)
        ax.set_title(f"{rec.n_objects} obj{' + text' if rec.has_text else ''}\n{q[:34]}", fontsize=6)
        ax.set_ylabel(f"avg {rec.average:.0f}", fontsize=7)
        for j in range(k):
            alive = np.asarray(rec.grids[j], dtype=bool).reshape(h, w)
            up = np.kron(alive, np.ones((int(np.ceil(ph)), int(np.ceil(pw)))))[: img.shape[0], : img.shape[1]]
            shown = img * (0.25 + 0.75 * up[..., None])  # dropped patches dimmed to 25%
            ax = axes[r, j + 1]
            ax.imshow(shown)
            ax.set_title(f"after layer {rec.module_layers[j]}: {rec.module_counts[j]}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=130)


def plot_complexity(records: Sequence[SceneRecord], path: str | Path, *, target: float | None = None,
                    title: str = "") -> Path:
    """Left: all-layer average kept tokens vs number of objects (text / no text, mean and std, every
    scene as a dot). Right: mean kept count after each module vs number of objects."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    rng = np.random.default_rng(0)
    for has_text, color, label in ((False, "tab:blue", "no text"), (True, "tab:orange", "with text")):
        rs = [r for r in records if r.has_text == has_text]
        if not rs:
            continue
        x = np.array([r.n_objects for r in rs], dtype=float)
        y = np.array([r.average for r in rs])
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(x)) + (0.1 if has_text else -0.1), y, s=6, alpha=0.35, color=color)
        xs = sorted(set(x))
        means = [y[x == v].mean() for v in xs]
        stds = [y[x == v].std() for v in xs]
        ax.errorbar(xs, means, yerr=stds, color=color, marker="o", capsize=3, label=f"{label} (n={len(rs)})")
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target:.1f}")
    ax.set_xlabel("objects in the scene")
    ax.set_ylabel("visual tokens, all-layer average")
    ax.legend(fontsize=8)
    k = len(records[0].module_counts)
    xs = sorted({r.n_objects for r in records})
    for j in range(k):
        ys = [np.mean([r.module_counts[j] for r in records if r.n_objects == v]) for v in xs]
        ax2.plot(xs, ys, marker=".", label=f"after layer {records[0].module_layers[j]}")
    ax2.set_xlabel("objects in the scene")
    ax2.set_ylabel("visual tokens kept after the module")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=130)


def run_viz(checkpoint: str | Path, *, model: str | None = None, out: str | Path = "out/atp-viz",
            seeds: Sequence[int] = (0, 1, 2, 3), n: int = 240, batch_size: int = 16,
            family: str | None = "count") -> list[Path]:
    """Load the model and the ATP weights, write overlays.png, complexity.png and records.json to ``out``."""
    import vlmprune

    from ..testbed.model import load

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not seeds:
        raise ValueError("give at least one scene seed for the overlay figure")
    from ..integrations.base import get_adapter

    try:
        m, processor = load(model)
    except Exception as e:  # noqa: BLE001 -- a missing / corrupt folder: name it
        raise ValueError(f"could not load model {model or '(testbed)'}: {e}") from None
    adapter = get_adapter(m)
    if adapter.family != "llava":
        raise ValueError(f"atp-viz draws LLaVA-1.5 models (one grid per image, the ShapesVQA prompt); this is a "
                         f"{adapter.family} model: read its ATP decisions from handle.stats / "
                         "handle.state.context in Python instead")
    handle = vlmprune.apply(m, "atp", checkpoint=str(checkpoint))
    out = Path(out)
    try:
        cfg = handle.pruner.config
        grid = tuple(cfg.grid)
        name = Path(checkpoint).name
        pairs = easy_and_cluttered(seeds, family)
        over = run_scenes(m, processor, handle, pairs, batch_size=batch_size)
        p1 = plot_overlays(pairs, over, grid, out / "overlays.png",
                           title=f"ATP {name}: kept tokens after each module (easy vs cluttered scenes)")
        handle.stats.reset()
        comp = run_scenes(m, processor, handle, complexity_scenes(n), batch_size=batch_size)
        p2 = plot_complexity(comp, out / "complexity.png", target=cfg.target,
                             title=f"ATP {name}: kept tokens vs scene complexity ({n} test scenes)")
    finally:
        handle.remove()
    p3 = out / "records.json"
    p3.write_text(json.dumps({"checkpoint": str(checkpoint), "target": cfg.target,
                              "overlays": [asdict(r) for r in over], "complexity": [asdict(r) for r in comp]}))
    return [p1, p2, p3]

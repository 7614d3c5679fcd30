"""Accuracy harness: batched greedy generation (left padding), exact-match scoring, per-family tables.

Works on one process or sharded under ``accelerate launch`` (data parallel: each process takes a
slice of the items, results are gathered on the main process).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from ..testbed.questions import normalize_answer
from .data import EvalItem


@dataclass
class ItemResult:
    id: str
    family: str
    answer: str
    prediction: str
    correct: bool
    visual_tokens: float


@dataclass
class FamilyScore:
    family: str
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    visual_tokens: float


@dataclass
class EvalResult:
    label: str
    method: str | None
    options: dict[str, Any]
    families: list[FamilyScore]
    mean_accuracy: float
    mean_visual_tokens: float
    questions_per_s: float
    n: int
    retention: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    items: list[ItemResult] = field(default_factory=list)
    #: 95% interval of ``retention`` (paired bootstrap over the questions, see ``retention_interval``)
    retention_ci: list[float] | None = None

    def to_json(self, with_items: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_items:
            d.pop("items")
        return d


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def retention_interval(items: Sequence[ItemResult], baseline: Sequence[ItemResult], *, rounds: int = 4000,
                       seed: int = 0, level: float = 0.95) -> list[float] | None:
    """95% interval of the retention (mean over families of the accuracy, relative to the baseline's)
    by a paired bootstrap: the questions of each family are resampled with replacement, the same
    draw for the method and the baseline (they answered the same questions, matched by ``id``).
    None when the two runs do not share every question, or when over 1% of the draws give the baseline
    no correct answer (those draws are left out otherwise).
    """
    import numpy as np

    base = {(r.family, r.id): r.correct for r in baseline}
    fams: dict[str, list[tuple[bool, bool]]] = {}
    for r in items:
        if (r.family, r.id) not in base:
            return None
        fams.setdefault(r.family, []).append((r.correct, base[(r.family, r.id)]))
    if not fams or len(base) != sum(len(v) for v in fams.values()):
        return None
    rng = np.random.default_rng(seed)
    acc_m, acc_b = np.zeros(rounds), np.zeros(rounds)
    for pairs in fams.values():
        arr = np.array(pairs, dtype=float)  # [n, 2]: method, baseline
        idx = rng.integers(0, len(arr), size=(rounds, len(arr)))
        acc_m += arr[idx, 0].mean(1)
        acc_b += arr[idx, 1].mean(1)
    ok = acc_b > 0
    if ok.mean() < 0.99:  # a baseline this weak has no meaningful retention
        return None
    ratio = acc_m[ok] / acc_b[ok]
    tail = (1 - level) / 2
    return [float(np.quantile(ratio, tail)), float(np.quantile(ratio, 1 - tail))]


def summarize(label: str, method: str | None, options: dict, results: Sequence[ItemResult], seconds: float,
              baseline: EvalResult | None = None) -> EvalResult:
    fams: dict[str, list[ItemResult]] = {}
    for r in results:
        fams.setdefault(r.family, []).append(r)
    scores = []
    for fam, rs in fams.items():
        k = sum(r.correct for r in rs)
        lo, hi = wilson_interval(k, len(rs))
        scores.append(FamilyScore(fam, len(rs), k / len(rs), lo, hi, sum(r.visual_tokens for r in rs) / len(rs)))
    mean_acc = sum(s.accuracy for s in scores) / max(1, len(scores))
    res = EvalResult(label, method, dict(options), scores, mean_acc,
                     sum(r.visual_tokens for r in results) / max(1, len(results)),
                     len(results) / seconds if seconds > 0 else float("nan"), len(results), items=list(results))
    if baseline is not None and baseline.mean_accuracy > 0:
        res.retention = mean_acc / baseline.mean_accuracy
        res.retention_ci = retention_interval(res.items, baseline.items)
    return res


def _visual_tokens_per_sample(handle, input_ids: torch.Tensor, visual_ids: list[int]) -> list[float]:
    """Visual tokens each sample fed to the LLM in the last prefill (all-layer average for decoder
    methods); unpruned: its placeholders of any of ``visual_ids`` (images, videos)."""
    if handle is not None:
        return handle.stats.visual_tokens_per_sample()
    return torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device)).sum(1).float().tolist()


def check_items(model, processor, items: Sequence[EvalItem], prompt_template: str | None = None) -> None:
    """ValueError in one line, naming the record, when ``items`` cannot be prompted: a question that
    holds the processor's own image / video placeholder (the prompt places the images; a stray one
    would fail mid-run), or videos that ``model`` / ``processor`` cannot take (a family without video
    inputs, a processor without its video processor (it needs torchvision), or a prompt without a
    chat template)."""
    from ..integrations.base import video_view
    from .prompts import prompt_style

    marks = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    marks = sorted(m for m in marks | ({"<image>"} if prompt_template else set()) if isinstance(m, str) and m)
    for it in items:
        stray = next((m for m in marks if m in it.question), None)
        if stray is not None:
            raise ValueError(f"{it.where or it.id}: the question holds the placeholder {stray!r}, which the "
                             "prompt places itself; remove it from the question")
    video = next((it for it in items if it.visual == "video"), None)
    if video is None:
        return
    try:
        video_view(model, processor)
    except ValueError as e:
        raise ValueError(f"{video.where}: a video item, but {e}") from None
    if prompt_style(processor, prompt_template).build_video is None:
        raise ValueError(f"{video.where}: a video item needs the processor's chat template (a text template "
                         "has no video placeholder)")


def _batches(items: Sequence[EvalItem], batch_size: int) -> list[Sequence[EvalItem]]:
    """Consecutive runs of at most ``batch_size`` items of one kind (images, or videos)."""
    out: list[Sequence[EvalItem]] = []
    start = 0
    for k in range(1, len(items) + 1):
        if k == len(items) or k - start == batch_size or items[k].visual != items[start].visual:
            out.append(items[start:k])
            start = k
    return out


def run_items(model, processor, items: Sequence[EvalItem], *, handle=None, batch_size: int = 8,
              max_new_tokens: int = 8, prompt_template: str | None = None, progress: bool = True,
              description: str = "eval") -> tuple[list[ItemResult], float]:
    """Answer ``items`` with greedy decoding; returns per-item results and the seconds spent.

    Prompts: ``prompt_template`` when given, else the processor's chat template when it has one,
    else the ShapesVQA template (``eval.prompts.prompt_style``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .prompts import prompt_style

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_items(model, processor, items, prompt_template)
    style = prompt_style(processor, prompt_template)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    from ..integrations.base import get_adapter

    visual_ids = [v.image_token_id(model) for v in get_adapter(model).modality_views(model)]
    results: list[ItemResult] = []
    seconds = 0.0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(description, total=len(items))
        for batch in _batches(items, batch_size):
            video = batch[0].visual == "video"
            if video:
                pixels = {"videos": [it.pixels() for it in batch]}
                prompts = [style.build_video(it.question) for it in batch]
            else:  # a batch with an item of several images: the images nested per item
                nested = any(it.num_images > 1 for it in batch)
                pixels = {"images": [(p if isinstance(p, list) else [p]) if nested else p
                                     for p in (it.pixels() for it in batch)]}
                prompts = [style.build(it.question, images=it.num_images) for it in batch]
            t0 = time.perf_counter()
            inputs = processor(**pixels, text=prompts, padding=True, return_tensors="pt",
                               add_special_tokens=style.add_special_tokens)
            inputs = {k: v.to(model.device, model.dtype) if k.startswith("pixel_values") else v.to(model.device)
                      for k, v in inputs.items()}  # every pixel tensor (Video-LLaVA: pixel_values_images) in the model's dtype
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            seconds += time.perf_counter() - t0
            vis = _visual_tokens_per_sample(handle, inputs["input_ids"], visual_ids)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for it, text, v in zip(batch, texts, vis):
                pred = text.strip()
                results.append(ItemResult(it.id, it.family, it.answer, pred,
                                          normalize_answer(pred) == normalize_answer(it.answer), v))
            bar.update(task, advance=len(batch))
    return results, seconds


def label_for(method: str | None, options: dict[str, Any]) -> str:
    """A run's label: ``"unpruned"``, ``"fastv"``, ``"random keep=32,seed=1"``."""
    from ..registry import format_value

    return (method or "unpruned") + (" " + ",".join(f"{k}={format_value(v)}" for k, v in options.items())
                                     if options else "")


def evaluate(model, processor, items: Sequence[EvalItem], *, method: str | None = None,
             method_options: dict | None = None, label: str | None = None, baseline: EvalResult | None = None,
             batch_size: int = 8, max_new_tokens: int = 8, prompt_template: str | None = None,
             progress: bool = True) -> EvalResult:
    """Evaluate ``model`` (optionally pruned with ``method``) on ``items``; shards under accelerate."""
    import vlmprune

    from .distributed import gather_results, num_processes, shard

    options = dict(method_options or {})
    label = label or label_for(method, options)
    handle = vlmprune.apply(model, method, **options) if method else None
    try:
        local_items = shard(items)
        local, seconds = run_items(model, processor, local_items, handle=handle, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, prompt_template=prompt_template,
                                   progress=progress, description=label)
    finally:
        if handle is not None:
            handle.remove()
    all_results, seconds = gather_results(local, seconds, order=[it.id for it in items])
    result = summarize(label, method, options, all_results, seconds, baseline)
    result.extra["processes"] = num_processes()
    return result

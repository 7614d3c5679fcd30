"""Matmul FLOPs of the vision side (tower and projector), which pruning does not shrink and the
decoder totals of ``analytic.prefill_cost`` leave out."""

from __future__ import annotations

from typing import Any, Sequence

from .specs import ModelConfig

__all__ = ["vision_encoder_flops", "vision_tower_flops"]


def vision_encoder_flops(cfg: ModelConfig, images: int | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per MAC) of the vision tower and projector; not pruned, not in the
    decoder totals. ViT layer: ``2*n*(4*D^2 + 2*D*M) + 4*n^2*D`` (QKV/out projections,
    2-layer MLP, dense attention) for ``n`` patch tokens of width ``D``, MLP width ``M``;
    patch embedding ``2*n*D*3*p^2``. ``images`` defaults to the config's maximum views
    per sample (5 for AnyRes LLaVA-NeXT)."""
    v = cfg.vision
    if not v:
        return {"vision_tower": 0.0, "projector": 0.0}
    n_img = int(images if images is not None else v.get("max_images_per_sample", 1))
    n = int(v["tokens_per_image"])
    dd, m, p = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["patch_size"])
    per_layer = 2 * n * (4 * dd * dd + 2 * dd * m) + 4 * n * n * dd
    tower = n_img * (int(v["num_layers"]) * per_layer + 2 * n * dd * 3 * p * p)
    dims = [int(x) for x in cfg.projector.get("dims", [])]
    # projector input rows: CLS dropped (LLaVA); for Qwen2-VL's merger 4 patches are
    # concatenated into one 4*D row, so rows = merged tokens.
    rows = n_img * int(v.get("projector_rows_per_image", n - (1 if v.get("cls_token") else 0)))
    proj = sum(2 * rows * a * b for a, b in zip(dims, dims[1:]))
    return {"vision_tower": float(tower), "projector": float(proj)}


def vision_tower_flops(shape: dict[str, Any], units: Sequence[tuple[int, int]],
                       projector_rows: int | None = None) -> dict[str, float]:
    """Matmul FLOPs (2 per MAC) of the vision tower and projector for the tower passes ``units``
    (each ``(n, rows)``: ``n`` tokens in the tower's sequence, ``rows`` projector rows unpruned).

    ``shape`` is an adapter's ``vision_shape``: width ``hidden`` = D, ``layers``, MLP width
    ``intermediate`` = M with ``mlp_matrices`` (2: fc1/fc2, 3: SwiGLU), ``patch_in`` inputs per
    patch, ``window_tokens`` / ``full_layers`` (windowed attention), ``projector_dims`` and
    ``projector_after_pruning``. Per pass: layers x ``2*n*(4*D^2 + mats*D*M)``, attention
    ``4*n*a*D`` per layer (``a = n``, or ``min(n, window_tokens)`` in a windowed layer), patch
    embedding ``2*n*D*patch_in``. Projector: ``2*rows*a*b`` per layer of ``projector_dims``, on
    ``projector_rows`` rows when the projector runs after pruning and the count is given, else on
    every unpruned row."""
    d, m, layers = int(shape["hidden"]), int(shape["intermediate"]), int(shape["layers"])
    mats, patch_in = int(shape.get("mlp_matrices", 2)), int(shape["patch_in"])
    window, full = shape.get("window_tokens"), shape.get("full_layers")
    tower = 0.0
    for n, _ in units:
        n = int(n)
        linear = 2 * n * (4 * d * d + mats * d * m)
        if window:
            n_full = len(set(full or []))
            attention = 4 * n * d * (n_full * n + (layers - n_full) * min(n, int(window)))
        else:
            attention = layers * 4 * n * n * d
        tower += layers * linear + attention + 2 * n * d * patch_in
    rows = sum(int(r) for _, r in units)
    if projector_rows is not None and shape.get("projector_after_pruning", True):
        rows = int(projector_rows)
    dims = [int(x) for x in shape.get("projector_dims", [])]
    proj = sum(2 * rows * a * b for a, b in zip(dims, dims[1:]))
    return {"vision_tower": float(tower), "projector": float(proj)}


"""Research probes behind docs/testbed.md "Problem 3": how fast can per-patch shape be learnt?

    python scripts/shape_probes.py pixel-mlp [--snap 0]            # MLP on raw object-patch pixels
    python scripts/shape_probes.py tower --lr 1e-3 [--occupancy] [--mimetic] [--steps 150] [--snap 0]

``--snap 0`` draws object centres anywhere (the scenes before the patch-centre lattice); the
default is ShapesVQA's own ``CENTER_SNAP`` (14: centres on patch centres).

``tower`` trains a fresh testbed vision tower (sincos positions) on the shape loss of labelled
patches alone (dense scenes, batch 8) and prints held-out accuracy on labelled patches every 25
steps; ``--occupancy`` adds a per-patch 7x7 object-occupancy target, ``--mimetic`` ties query and
key projections at init. Both run on one thread.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from vlmprune.testbed.model import build_model, build_processor, build_tokenizer
from vlmprune.testbed.scenes import CENTER_SNAP, make_scene, patch_labels, split_seed
from vlmprune.testbed.recipe.vision import mimetic_attention, pixel_values_of, sincos_positions


def pixel_mlp(snap: int, n_scenes: int = 600, epochs: int = 30) -> None:
    x, y = [], []
    for i in range(n_scenes):
        scene = make_scene(split_seed("train", 777000 + i), text=False, snap=snap)
        pixels = np.asarray(scene.image, dtype=np.float32) / 255.0
        patches = pixels.reshape(24, 14, 24, 14, 3).transpose(0, 2, 1, 3, 4).reshape(576, -1)
        shape = patch_labels(scene).shape
        x.append(patches[shape > 0])
        y.append(shape[shape > 0] - 1)
    x, y = torch.tensor(np.concatenate(x)), torch.tensor(np.concatenate(y))
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    train = int(0.8 * len(x))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 6))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for epoch in range(epochs):
        perm = torch.randperm(train)
        for j in range(0, train, 256):
            idx = perm[j: j + 256]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4:
            with torch.no_grad():
                acc = (net(x[train:]).argmax(-1) == y[train:]).float().mean().item()
            print(f"epoch {epoch + 1} ({(epoch + 1) * train} samples): held-out accuracy {acc:.3f}", flush=True)


def tower(lr: float, steps: int, occupancy: bool, mimetic: bool, snap: int) -> None:
    tok = build_tokenizer()
    processor = build_processor(tok)
    vision = build_model(tok).model.vision_tower.train()
    sincos_positions(vision)
    if mimetic:
        mimetic_attention(vision)
    head, occ_head = torch.nn.Linear(192, 7), torch.nn.Linear(192, 49)
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters(), *occ_head.parameters()], lr=lr,
                            weight_decay=0.01)

    def batch(step: int, n: int = 8, split: str = "train"):
        scenes = [make_scene(split_seed(split, 123456 + step * n + i),
                             n_objects=random.Random(step * n + i).randint(12, 24), snap=snap) for i in range(n)]
        occ = [((sc.object_mask > 0).reshape(24, 7, 2, 24, 7, 2).mean((2, 5)) > 0.5).transpose(0, 2, 1, 3)
               .reshape(576, 49) for sc in scenes]
        shape = torch.as_tensor(np.stack([patch_labels(sc).shape for sc in scenes]))
        return pixel_values_of(processor, [sc.image for sc in scenes]), shape, torch.as_tensor(np.stack(occ)).float()

    start = time.time()
    for step in range(steps):
        pv, shape, occ = batch(step)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 30)
        hidden = vision(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
        labelled = shape > 0
        loss = F.cross_entropy(head(hidden)[labelled], shape[labelled])
        if occupancy:
            loss = loss + F.binary_cross_entropy_with_logits(occ_head(hidden), occ)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision.parameters(), 1.0)
        opt.step()
        if step % 25 == 24:
            vision.eval()
            with torch.no_grad():
                pv, shape, _ = batch(0, 16, "val")
                pred = head(vision(pv, output_hidden_states=True).hidden_states[-2][:, 1:]).argmax(-1)
            vision.train()
            labelled = shape > 0
            acc = (pred[labelled] == shape[labelled]).float().mean().item()
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out accuracy {acc:.3f} ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pixel-mlp", "tower"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--occupancy", action="store_true")
    ap.add_argument("--mimetic", action="store_true")
    ap.add_argument("--snap", type=int, default=CENTER_SNAP, help="lattice of object centres, px (0 = anywhere)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.what == "pixel-mlp":
        pixel_mlp(args.snap)
    else:
        tower(args.lr, args.steps, args.occupancy, args.mimetic, args.snap)

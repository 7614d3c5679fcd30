"""ShapesVQA scenes: procedural 336x336 images with shapes, distractors and optional text codes.

Every scene is a pure function of its seed (``make_scene(seed)``), so the train / validation /
test splits are just disjoint seed ranges (``split_seed``). Besides the RGB image, a scene keeps
its ground truth (objects, text) and per-patch label maps used to train the testbed's vision
tower (``patch_labels``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 patches per side -> 576 patch tokens

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses", "diamond": "diamonds"}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
COLOR_NAMES = tuple(COLORS)
# Object centres lie on the patch-centre lattice (7 + 14 k px): a small object then sits in one patch
# and each shape shows a fixed set of patch contents, which a from-scratch vision tower learns to
# name within the recipe's budget (docs/testbed.md, "Problem 3"); 0 draws centres anywhere.
CENTER_SNAP = PATCH
MAX_OBJECTS = 9  # per ShapesVQA scene
DENSE_MAX_OBJECTS = 32  # denser scenes for vision pretraining only
SIZES = {"small": 8, "medium": 17, "large": 28}  # radius in pixels; small covers one or two patches
# Code alphabet: upper-case letters and digits without the easily confused O/0 and I/1.
CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"

SPLIT_BASES = {"train": 10_000_000, "val": 1_000_000, "test": 2_000_000}
SPLIT_SIZES = {"train": 900_000_000, "val": 1_000_000, "test": 1_000_000}


def split_seed(split: str, index: int) -> int:
    """Seed of the ``index``-th scene of ``split``; the three splits' seed ranges never overlap."""
    if split not in SPLIT_BASES:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_BASES)}")
    if not 0 <= index < SPLIT_SIZES[split]:
        raise ValueError(f"scene index {index} out of range for split {split!r} (0..{SPLIT_SIZES[split] - 1})")
    return SPLIT_BASES[split] + index


CORNERS = ("topleft", "topright", "bottomleft", "bottomright")  # the position family's corner answers


def corner_of(obj: "SceneObject") -> str:
    """The image quadrant holding ``obj``'s centre, as the position family names it ("topleft", ...)."""
    half = IMAGE_SIZE / 2
    return ("top" if obj.cy < half else "bottom") + ("left" if obj.cx < half else "right")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float  # centre, pixels
    cy: float
    radius: float

    @property
    def center_patch(self) -> tuple[int, int]:
        """(row, col) of the patch holding the object's centre."""
        return min(int(self.cy // PATCH), GRID - 1), min(int(self.cx // PATCH), GRID - 1)


@dataclass(frozen=True)
class SceneText:
    code: str
    row: int  # patch row of the code
    col: int  # patch column of its first character (one character per patch cell)


@dataclass
class Scene:
    seed: int
    objects: list[SceneObject]
    text: SceneText | None
    image: Image.Image = field(repr=False)
    object_mask: np.ndarray = field(repr=False)  # [336, 336] int16: 0 background, i+1 object i


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Polygon vertices for the non-circle shapes."""
    def poly(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(phase + 2 * math.pi * i / n), cy + radius * math.sin(phase + 2 * math.pi * i / n))
                for i in range(n)]

    if shape == "square":
        return poly(4, r * 1.05, math.pi / 4 + rot * 0.15)
    if shape == "diamond":
        pts = poly(4, r, 0.0)
        return [(x, cy + (y - cy) * 1.25) if abs(y - cy) > 1e-6 else (x * 1.0, y) for x, y in pts]
    if shape == "triangle":
        return poly(3, r * 1.1, -math.pi / 2)
    if shape == "star":
        pts = []
        for i in range(10):
            radius = r * 1.1 if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, rot: float = 0.0) -> None:
    """Draw one filled shape of radius ``r`` centred at (cx, cy)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=fill)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=13)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Mildly textured grey background: a smooth random field plus pixel noise."""
    base = rng.uniform(105, 150)
    coarse = rng.normal(0, 10, size=(6, 6, 3))
    field_ = np.kron(coarse, np.ones((56, 56, 1)))  # 6*56 = 336
    noise = rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    return np.clip(base + field_ + noise, 0, 255).astype(np.uint8)


def make_scene(seed: int, *, n_objects: int | None = None, text: bool | None = None,
               snap: int = CENTER_SNAP) -> Scene:
    """Generate the scene for ``seed`` (deterministic). ``n_objects``/``text`` override the draws.

    ShapesVQA scenes hold 1..``MAX_OBJECTS`` objects; ``n_objects`` up to ``DENSE_MAX_OBJECTS``
    asks for a denser scene (used only to pretrain the vision tower; placement may fit fewer).
    ``snap`` (px) is the lattice of object centres (see ``CENTER_SNAP``; 0 = anywhere, for probes).
    """
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    n = n_objects if n_objects is not None else rnd.randint(1, MAX_OBJECTS)
    if not 1 <= n <= DENSE_MAX_OBJECTS:
        raise ValueError(f"n_objects must be in 1..{DENSE_MAX_OBJECTS} (ShapesVQA uses 1..{MAX_OBJECTS}), got {n}")
    has_text = text if text is not None else rnd.random() < 0.35

    canvas = Image.fromarray(_background(rng))
    draw = ImageDraw.Draw(canvas)
    mask = Image.new("I", (IMAGE_SIZE, IMAGE_SIZE), 0)
    mdraw = ImageDraw.Draw(mask)

    # Distractor marks: thin dim strokes and specks, never in a named colour.
    for _ in range(rnd.randint(2, 6)):
        x, y = rnd.uniform(0, IMAGE_SIZE), rnd.uniform(0, IMAGE_SIZE)
        shade = tuple(int(v) for v in rng.integers(70, 100, size=3))
        if rnd.random() < 0.5:
            draw.line([x, y, x + rnd.uniform(-12, 12), y + rnd.uniform(-12, 12)], fill=shade, width=1)
        else:
            draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=shade)

    occupied: list[tuple[float, float, float]] = []
    scene_text = None
    if has_text:
        length = rnd.choice((3, 4))
        code = "".join(rnd.choice(CODE_ALPHABET) for _ in range(length))
        row = rnd.randint(1, GRID - 2)
        col = rnd.randint(1, GRID - 1 - length)
        x0, y0 = col * PATCH, row * PATCH
        draw.rectangle([x0 - 1, y0 - 1, x0 + length * PATCH, y0 + PATCH], fill=(235, 235, 225))
        font = _font()
        for i, ch in enumerate(code):
            l, t, r, b = draw.textbbox((0, 0), ch, font=font)
            draw.text((x0 + i * PATCH + (PATCH - (r - l)) / 2 - l, y0 + (PATCH - (b - t)) / 2 - t), ch,
                      fill=(10, 10, 10), font=font)
        scene_text = SceneText(code, row, col)
        occupied.append((x0 + length * PATCH / 2, y0 + PATCH / 2, length * PATCH / 2 + 4))

    objects: list[SceneObject] = []
    tries = 0
    while len(objects) < n and tries < 2000:
        tries += 1
        size = rnd.choice(tuple(SIZES))
        r = SIZES[size] * rnd.uniform(0.9, 1.1)
        if snap:  # a patch centre (or a multiple of `snap` px from one) that keeps the object inside
            lo, hi = math.ceil((r + 2 - PATCH / 2) / snap), math.floor((IMAGE_SIZE - r - 2 - PATCH / 2) / snap)
            cx, cy = (PATCH / 2 + snap * rnd.randint(lo, hi) for _ in range(2))
        else:
            cx, cy = rnd.uniform(r + 2, IMAGE_SIZE - r - 2), rnd.uniform(r + 2, IMAGE_SIZE - r - 2)
        if any(math.hypot(cx - ox, cy - oy) < r + orad + 6 for ox, oy, orad in occupied):
            continue
        if scene_text is not None and _overlaps_text(cx, cy, r, scene_text):
            continue
        obj = SceneObject(rnd.choice(SHAPES), rnd.choice(COLOR_NAMES), size, cx, cy, r)
        rot = rnd.uniform(-1, 1)
        draw_shape(draw, obj.shape, cx, cy, r, COLORS[obj.color], rot)
        draw_shape(mdraw, obj.shape, cx, cy, r, len(objects) + 1, rot)
        occupied.append((cx, cy, r))
        objects.append(obj)
    return Scene(seed, objects, scene_text, canvas, np.asarray(mask, dtype=np.int16))


def _overlaps_text(cx: float, cy: float, r: float, t: SceneText) -> bool:
    x0, y0 = t.col * PATCH - 6, t.row * PATCH - 6
    x1, y1 = (t.col + len(t.code)) * PATCH + 6, (t.row + 1) * PATCH + 6
    nx, ny = min(max(cx, x0), x1), min(max(cy, y0), y1)
    return math.hypot(cx - nx, cy - ny) < r


def blank_image(seed: int = 0) -> Image.Image:
    """A scene-free image (textured background only), for the blank-image check."""
    return Image.fromarray(_background(np.random.default_rng(seed)))


@dataclass
class PatchLabels:
    """Per-patch targets ([576] each, raster order) for the vision tower's auxiliary objectives."""
    color: np.ndarray   # 0 = none, 1 + colour index
    shape: np.ndarray   # 0 = none, 1 + shape index
    center: np.ndarray  # 1 where an object's centre lies
    char: np.ndarray    # 0 = none, 1 + index in CODE_ALPHABET
    present: np.ndarray  # [len(SHAPES) * len(COLORS)] multi-hot colour-shape pairs (the [CLS] target)
    corner: np.ndarray | None = None  # 0 = none, 1 + CORNERS index of the covering object's centre

    @property
    def object_or_text(self) -> np.ndarray:
        """[576] bool: patches that show an object or a code character."""
        return (self.color > 0) | (self.char > 0)


def patch_pixels(pixel_map: np.ndarray) -> np.ndarray:
    """[336, 336] per-pixel map -> [576, 196]: row p holds the pixels of patch p (raster order)."""
    return pixel_map.reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID * GRID, PATCH * PATCH)


def patch_labels(scene: Scene) -> PatchLabels:
    """Label each patch by the object covering most of it (at least 20% of its pixels)."""
    m = patch_pixels(scene.object_mask)
    n_obj = len(scene.objects)
    counts = np.stack([(m == i + 1).sum(1) for i in range(n_obj)], 1) if n_obj else np.zeros((GRID * GRID, 0))
    color = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    corner = np.zeros(GRID * GRID, np.int64)
    if n_obj:
        best = counts.argmax(1)
        covered = counts.max(1) >= 0.2 * PATCH * PATCH
        for i, o in enumerate(scene.objects):
            sel = covered & (best == i)
            color[sel] = 1 + COLOR_NAMES.index(o.color)
            shape[sel] = 1 + SHAPES.index(o.shape)
            corner[sel] = 1 + CORNERS.index(corner_of(o))
    center = np.zeros(GRID * GRID, np.int64)
    present = np.zeros(len(SHAPES) * len(COLOR_NAMES), np.float32)
    for o in scene.objects:
        r, c = o.center_patch
        center[r * GRID + c] = 1
        present[SHAPES.index(o.shape) * len(COLOR_NAMES) + COLOR_NAMES.index(o.color)] = 1
    char = np.zeros(GRID * GRID, np.int64)
    if scene.text is not None:
        for i, ch in enumerate(scene.text.code):
            char[scene.text.row * GRID + scene.text.col + i] = 1 + CODE_ALPHABET.index(ch)
    return PatchLabels(color, shape, center, char, present, corner)

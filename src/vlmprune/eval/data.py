"""Evaluation items: ShapesVQA families, or a JSONL file of {"image" | "video", "question", "answer"} records
("image": one file, or a list of files for a question about several images)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..testbed.questions import FAMILIES, build_questions, check_family, scene_for
from ..testbed.scenes import blank_image


@dataclass
class EvalItem:
    id: str
    family: str
    question: str
    answer: str
    image_path: str | None = None  # JSONL items
    seed: int | None = None        # ShapesVQA items (the scene is re-generated on demand)
    blank: bool = False            # replace the image with a blank (background-only) one
    where: str | None = None       # JSONL items: "FILE:LINE" of the record, for error messages
    video_paths: tuple[str, ...] | None = None  # JSONL video items: the frames' image files, in order
    image_paths: tuple[str, ...] | None = None  # JSONL items of several images: their files, in order

    @property
    def visual(self) -> str:
        """``"video"`` for a video item (its frames), else ``"image"``."""
        return "video" if self.video_paths is not None else "image"

    def frames(self) -> list[Image.Image]:
        """A video item's frames, RGB, in order."""
        return [open_image(p, self.where) for p in self.video_paths or ()]

    @property
    def num_images(self) -> int:
        """Images of the item (0 for a video item)."""
        return 0 if self.video_paths is not None else len(self.image_paths) if self.image_paths else 1

    def pixels(self) -> Image.Image | list[Image.Image]:
        """What the processor gets for this item: its image, its images (several), or its video's frames."""
        if self.video_paths is not None:
            return self.frames()
        if self.image_paths:
            return [open_image(p, self.where) for p in self.image_paths]
        return self.image()

    def image(self) -> Image.Image:
        if self.blank:
            return blank_image(self.seed or 0)
        if self.image_path is not None:
            return open_image(self.image_path, self.where)
        from ..testbed.questions import Question
        return scene_for(Question(self.family, self.question, self.answer, self.seed)).image


def open_image(path: str | Path, where: str | None = None) -> Image.Image:
    """Open ``path`` as RGB; an unreadable image is a ``ValueError`` naming the file (and ``where``,
    the JSONL record's "FILE:LINE")."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"{where + ': ' if where else ''}cannot read image {path} ({e}); fix or remove "
                         "that record") from None


def parse_families(spec: str | Iterable[str] | None) -> list[str]:
    """"all" / None -> every family; "count,read" or a list -> those (validated)."""
    if spec is None or spec == "all":
        return list(FAMILIES)
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not names or any(not n for n in names):
        raise ValueError(f"empty family name in {spec!r}; pass e.g. 'exist,count' or 'all'")
    return [check_family(n) for n in names]


def shapesvqa_items(split: str = "test", families: str | Iterable[str] | None = None, n: int = 300, *,
                    blank: bool = False) -> list[EvalItem]:
    """The first ``n`` questions of each family of ``split``."""
    items = []
    for fam in parse_families(families):
        for k, q in enumerate(build_questions(split, fam, n)):
            items.append(EvalItem(f"{split}-{fam}-{k}", fam, q.question, q.answer, seed=q.seed, blank=blank))
    return items


def jsonl_items(path: str | Path) -> list[EvalItem]:
    """Read ``{"image": path, "question": ..., "answer": ..., ["family": ...], ["id": ...]}`` per line,
    ``{"image": [paths, ...], ...}`` for a question about several images (placed one after the other
    before the question), or ``{"video": [frame paths, ...], ...}`` for a video given as its frames'
    image files.

    Relative image paths are resolved against the JSONL file's folder. Every problem is reported
    with its line number; nothing is skipped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object "
                             'like {"image": "img.png", "question": "...", "answer": "..."}') from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        where = f"{path}:{lineno}"
        if ("image" in rec) == ("video" in rec):
            raise ValueError(f"{where}: give exactly one of image (a file, or a list of files) or video (a list of "
                             f"frame files), got {'both' if 'image' in rec else 'neither'}")
        kind = "image" if "image" in rec else "video"
        missing = [k for k in ("question", "answer") if not isinstance(rec.get(k), str) or not rec.get(k)]
        several = kind == "image" and isinstance(rec["image"], list)
        if several and (not rec["image"] or not all(isinstance(f, str) and f for f in rec["image"])):
            raise ValueError(f"{where}: image must be a file or a non-empty list of image files, got {rec['image']!r}")
        if kind == "image" and not several and (not isinstance(rec["image"], str) or not rec["image"]):
            missing.insert(0, "image")
        if kind == "video" and (not isinstance(rec["video"], list) or not rec["video"]
                                or not all(isinstance(f, str) and f for f in rec["video"])):
            raise ValueError(f"{where}: video must be a non-empty list of frame image files, got {rec['video']!r}")
        if missing:
            raise ValueError(f"{where}: missing or non-string field(s) {', '.join(missing)}; "
                             "required: image (or video), question, answer")
        files = []
        for name in (rec[kind] if several or kind == "video" else [rec["image"]]):
            img = Path(name)
            if not img.is_absolute():
                img = path.parent / img
            if not img.is_file():
                raise FileNotFoundError(f"{where}: {kind} file not found: {img}")
            open_image(img, where)  # every image is decoded once here, so none fails mid-run
            files.append(str(img))
        items.append(EvalItem(str(rec.get("id", f"{path.stem}-{lineno}")), str(rec.get("family", "jsonl")),
                              rec["question"], rec["answer"], image_path=files[0] if kind == "image" else None,
                              where=where, video_paths=tuple(files) if kind == "video" else None,
                              image_paths=tuple(files) if several and len(files) > 1 else None))
    if not items:
        raise ValueError(f"{path}: no records found")
    return items

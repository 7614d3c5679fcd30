"""ShapesVQA questions: six families with short exact-match answers, and conversations of several."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .prompt import format_prompt
from .scenes import COLOR_NAMES, IMAGE_SIZE, PLURALS, SHAPES, Scene, corner_of, make_scene, split_seed

FAMILIES = ("exist", "color", "shape", "count", "position", "read")
EXIST_NEGATIVES = ("random", "popular", "adversarial")
CORNERS = ("topleft", "topright", "bottomleft", "bottomright")


@dataclass(frozen=True)
class Question:
    family: str
    question: str
    answer: str
    seed: int  # scene seed
    subtype: str = ""  # e.g. the negative sampling kind for `exist`

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: lower-case, drop punctuation and whitespace."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


#: the two position-question templates ``ask`` writes ("Which corner is the star in?", "Is the star left
#: of the square?" / "... above ..."), for code that must recognise them from the text alone
POSITION_QUESTION = re.compile(r"^(Which corner is the \w+ in\?|Is the \w+ (left of|above) the \w+\?)$")


def corner_objects(scene: Scene) -> list:
    """Objects a corner question may ask about: uniquely shaped, centre >20 px from both midlines."""
    shape_count = Counter(o.shape for o in scene.objects)
    half = IMAGE_SIZE / 2
    return [o for o in scene.objects if shape_count[o.shape] == 1 and abs(o.cx - half) > 20 and abs(o.cy - half) > 20]


def ask(scene: Scene, family: str, rnd: random.Random) -> Question | None:
    """One question of ``family`` about ``scene``, or None when the scene does not support it."""
    check_family(family)
    objs = scene.objects
    pairs = {(o.color, o.shape) for o in objs}
    shape_count = Counter(o.shape for o in objs)
    color_count = Counter(o.color for o in objs)
    if family == "exist":
        if rnd.random() < 0.5:
            o = rnd.choice(objs)
            return Question("exist", f"Is there {_article(o.color)} {o.color} {o.shape}?", "yes", scene.seed, "positive")
        kind = rnd.choice(EXIST_NEGATIVES)
        cands: list[tuple[str, str]] = []
        if kind == "adversarial":  # a present shape in a colour it does not have here
            cands = [(c, s) for s in shape_count for c in COLOR_NAMES if (c, s) not in pairs]
        elif kind == "popular":  # a present colour on a shape that is absent
            cands = [(c, s) for c in color_count for s in SHAPES if s not in shape_count]
        if not cands:
            kind = "random"
            cands = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in pairs]
        c, s = rnd.choice(sorted(cands))
        return Question("exist", f"Is there {_article(c)} {c} {s}?", "no", scene.seed, kind)
    if family in ("color", "shape"):  # about an object named by its other attribute, unique in the scene
        by = "shape" if family == "color" else "color"
        counts = shape_count if by == "shape" else color_count
        unique = [o for o in objs if counts[getattr(o, by)] == 1]
        if not unique:
            return None
        o = rnd.choice(unique)
        question = f"What color is the {o.shape}?" if family == "color" else f"What shape is the {o.color} object?"
        return Question(family, question, getattr(o, family), scene.seed)
    if family == "count":
        # Mostly shapes that are present; sometimes an absent one (answer 0).
        s = rnd.choice(sorted(shape_count)) if rnd.random() < 0.85 else rnd.choice(SHAPES)
        return Question("count", f"How many {PLURALS[s]} are there?", str(shape_count.get(s, 0)), scene.seed)
    if family == "position":
        unique = [o for o in objs if shape_count[o.shape] == 1]
        if rnd.random() < 0.5:
            # Relation between two uniquely-shaped objects, clearly separated along the axis asked.
            axis = rnd.choice(("left", "above"))
            rel = [(a, b) for a in unique for b in unique if a is not b and
                   abs((a.cx - b.cx) if axis == "left" else (a.cy - b.cy)) > 24]
            if rel:
                a, b = rnd.choice(rel)
                truth = (a.cx < b.cx) if axis == "left" else (a.cy < b.cy)
                # balance yes/no by swapping the pair
                if (rnd.random() < 0.5) != truth:
                    a, b, truth = b, a, not truth
                word = "left of" if axis == "left" else "above"
                return Question("position", f"Is the {a.shape} {word} the {b.shape}?", "yes" if truth else "no",
                                scene.seed, axis)
        clear = corner_objects(scene)
        if not clear:
            return None
        o = rnd.choice(clear)
        return Question("position", f"Which corner is the {o.shape} in?", corner_of(o), scene.seed, "corner")
    # read
    if scene.text is None:
        return None
    return Question("read", "What is written in the image?", scene.text.code.lower(), scene.seed)


def _question_rng(seed: int, family: str) -> random.Random:
    return random.Random(f"{seed}:{family}")


def build_questions(split: str, family: str, n: int, *, start: int = 0) -> list[Question]:
    """The first ``n`` questions of ``family`` in ``split`` (one per supporting scene), deterministic."""
    check_family(family)
    if n < 0:
        raise ValueError(f"number of questions must be >= 0, got {n}")
    out: list[Question] = []
    # read questions need a scene with text; force it on every other scene to keep generation fast
    index = start
    while len(out) < n:
        seed = split_seed(split, index)
        index += 1
        scene = make_scene(seed, text=True if family == "read" else None)
        q = ask(scene, family, _question_rng(seed, family))
        if q is not None:
            out.append(q)
    return out


def scene_for(question: Question) -> Scene:
    """Re-create the scene a question was asked about."""
    return make_scene(question.seed, text=True if question.family == "read" else None)


def conversation(scene: Scene, rnd: random.Random, turns: int,
                 families: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Up to ``turns`` distinct (question, answer) pairs about ``scene``, in random order.

    Without ``families``, every family the scene supports is asked at least once when ``turns``
    allows, then further exist / count / position / colour / shape questions; with ``families``,
    questions of those families only. Deterministic given ``rnd``'s state.
    """
    qa = []
    if families:
        fams = [rnd.choice(families) for _ in range(4 * turns)]
    else:
        fams = list(FAMILIES) + [rnd.choice(("exist", "count", "position", "color", "shape")) for _ in range(turns)]
    for fam in fams:
        q = ask(scene, fam, rnd)
        if q is not None and all(q.question != prev for prev, _ in qa):
            qa.append((q.question, q.answer))
        if len(qa) >= turns:
            break
    rnd.shuffle(qa)
    return qa

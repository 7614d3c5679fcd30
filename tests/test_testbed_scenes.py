"""ShapesVQA: determinism, disjoint splits, and answers checked on hand-built scenes."""

import random

import numpy as np
import pytest

from vlmprune.testbed.questions import (FAMILIES, POSITION_QUESTION, ask, build_questions, corner_objects,
                                       normalize_answer)
from vlmprune.testbed.scenes import (GRID, PATCH, Scene, SceneObject, SceneText, make_scene, patch_labels,
                                     split_seed)


def test_scene_is_deterministic():
    a, b = make_scene(123), make_scene(123)
    assert a.objects == b.objects and a.text == b.text
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.size == (336, 336)
    assert not np.array_equal(np.asarray(make_scene(124).image), np.asarray(a.image))


def test_questions_are_deterministic():
    for fam in FAMILIES:
        assert build_questions("test", fam, 5) == build_questions("test", fam, 5)


def test_splits_are_disjoint():
    train = {split_seed("train", i) for i in (0, 10, 899_999_999)}
    val = {split_seed("val", i) for i in (0, 999_999)}
    test = {split_seed("test", i) for i in (0, 999_999)}
    lo = lambda s: (min(s), max(s))  # noqa: E731
    ranges = sorted([lo(val), lo(test), lo(train)])
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError, match="unknown split"):
        split_seed("dev", 0)
    with pytest.raises(ValueError, match="out of range"):
        split_seed("test", 1_000_000)


def test_objects_do_not_overlap_and_stay_inside():
    for seed in range(30):
        s = make_scene(seed)
        assert 1 <= len(s.objects) <= 9
        for i, o in enumerate(s.objects):
            assert o.radius <= o.cx <= 336 - o.radius and o.radius <= o.cy <= 336 - o.radius
            for p in s.objects[i + 1:]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) >= o.radius + p.radius


def test_object_centres_lie_on_patch_centres():
    """Centres at 7 + 14k px (scenes.CENTER_SNAP), objects inside the image; a small object labels one patch."""
    from vlmprune.testbed.scenes import CENTER_SNAP

    assert CENTER_SNAP == PATCH
    for seed in range(20):
        s = make_scene(seed, n_objects=9)
        lab = patch_labels(s)
        for i, o in enumerate(s.objects):
            assert (o.cx - PATCH / 2) % PATCH == 0 and (o.cy - PATCH / 2) % PATCH == 0
            assert o.radius <= o.cx <= 336 - o.radius and o.radius <= o.cy <= 336 - o.radius
            if o.size == "small":
                r, c = o.center_patch
                assert lab.shape[r * GRID + c] > 0
    free = [o for seed in range(5) for o in make_scene(seed, n_objects=9, snap=0).objects]  # probes: anywhere
    assert any((o.cx - PATCH / 2) % PATCH for o in free)


def test_dense_scenes_for_vision_pretraining():
    """Up to 32 objects on request (still non-overlapping, labelled); beyond that a clear error."""
    s = make_scene(5, n_objects=20, text=True)
    assert 12 <= len(s.objects) <= 20
    for i, o in enumerate(s.objects):
        for p in s.objects[i + 1:]:
            assert np.hypot(o.cx - p.cx, o.cy - p.cy) >= o.radius + p.radius
    assert (patch_labels(s).shape > 0).sum() > (patch_labels(make_scene(5, n_objects=2)).shape > 0).sum()
    with pytest.raises(ValueError, match="n_objects must be in 1..32"):
        make_scene(5, n_objects=33)


def _scene(objects, text=None):
    mask = np.zeros((336, 336), np.int16)
    return Scene(0, objects, text, None, mask)


RED_CIRCLE = SceneObject("circle", "red", "large", 50.0, 60.0, 28.0)       # top-left
BLUE_SQUARE = SceneObject("square", "blue", "medium", 280.0, 290.0, 17.0)  # bottom-right
RED_STAR = SceneObject("star", "red", "small", 250.0, 40.0, 8.0)           # top-right
BLUE_CIRCLE = SceneObject("circle", "blue", "small", 60.0, 250.0, 8.0)     # bottom-left


def _answers(scene, family, n=60):
    rnd = random.Random(0)
    return [q for q in (ask(scene, family, rnd) for _ in range(n)) if q is not None]


def test_color_shape_count_answers_on_constructed_scene():
    scene = _scene([RED_CIRCLE, BLUE_SQUARE, RED_STAR, BLUE_CIRCLE])
    for q in _answers(scene, "color"):  # only uniquely-shaped objects are asked about
        assert (q.question, q.answer) in {("What color is the square?", "blue"), ("What color is the star?", "red")}
    assert _answers(scene, "shape") == []  # every colour appears twice: no unambiguous question
    counts = {"How many circles are there?": "2", "How many squares are there?": "1", "How many stars are there?": "1",
              "How many triangles are there?": "0", "How many crosses are there?": "0",
              "How many diamonds are there?": "0"}
    qs = _answers(scene, "count")
    assert qs and all(counts[q.question] == q.answer for q in qs)


def test_exist_answers_and_negative_kinds():
    scene = _scene([RED_CIRCLE, BLUE_SQUARE])
    qs = _answers(scene, "exist", 200)
    present = {"Is there a red circle?", "Is there a blue square?"}
    for q in qs:
        assert (q.answer == "yes") == (q.question in present), q
        if q.subtype == "adversarial":  # a present shape in another colour
            assert any(s in q.question for s in ("circle", "square"))
        if q.subtype == "popular":  # a present colour on an absent shape
            assert any(c in q.question for c in ("red", "blue"))
            assert not any(s in q.question for s in ("circle", "square"))
    assert {q.subtype for q in qs} == {"positive", "random", "popular", "adversarial"}
    yes = sum(q.answer == "yes" for q in qs)
    assert 0.35 < yes / len(qs) < 0.65


def test_position_answers():
    scene = _scene([RED_CIRCLE, BLUE_SQUARE, RED_STAR])
    truth = {
        "Is the circle left of the square?": "yes", "Is the square left of the circle?": "no",
        "Is the circle left of the star?": "yes", "Is the star left of the circle?": "no",
        "Is the star left of the square?": "yes", "Is the square left of the star?": "no",
        "Is the circle above the square?": "yes", "Is the square above the circle?": "no",
        "Is the star above the square?": "yes", "Is the square above the star?": "no",
        "Is the circle above the star?": "no", "Is the star above the circle?": "yes",
        "Which corner is the circle in?": "topleft", "Which corner is the square in?": "bottomright",
        "Which corner is the star in?": "topright",
    }
    qs = _answers(scene, "position", 200)
    assert len({q.question for q in qs}) >= 8
    for q in qs:
        assert truth[q.question] == q.answer, q


def test_position_question_pattern_and_corner_objects_match_ask():
    """POSITION_QUESTION recognises exactly the position questions ``ask`` writes; corner questions ask
    about ``corner_objects`` only."""
    rnd = random.Random(0)
    seen = {"position": 0, "other": 0}
    for seed in range(60):
        scene = make_scene(seed)
        allowed = {o.shape for o in corner_objects(scene)}
        for family in FAMILIES:
            q = ask(scene, family, rnd)
            if q is None:
                continue
            assert bool(POSITION_QUESTION.match(q.question)) == (family == "position"), q
            seen["position" if family == "position" else "other"] += 1
            if q.subtype == "corner":
                assert q.question.split()[4] in allowed, q
    assert min(seen.values()) > 20
    scene = _scene([RED_CIRCLE, BLUE_SQUARE, RED_STAR, BLUE_CIRCLE])
    assert {o.shape for o in corner_objects(scene)} <= {"square", "star"}  # the two circles are not unique


def test_read_answer_and_missing_text():
    scene = _scene([RED_CIRCLE], SceneText("K7QZ", 3, 5))
    (q,) = _answers(scene, "read", 1)
    assert q.answer == "k7qz" and normalize_answer("K7QZ.") == "k7qz"
    assert _answers(_scene([RED_CIRCLE]), "read") == []


def test_unknown_family_is_rejected():
    with pytest.raises(ValueError, match="unknown question family 'colour'"):
        build_questions("test", "colour", 1)


def test_patch_labels_match_scene():
    scene = make_scene(7, text=True)
    lab = patch_labels(scene)
    assert lab.center.sum() == len({o.center_patch for o in scene.objects})
    for o in scene.objects:
        r, c = o.center_patch
        assert lab.shape[r * GRID + c] in (0, 1 + ["circle", "square", "triangle", "star", "cross", "diamond"].index(o.shape))
    t = scene.text
    chars = lab.char.reshape(GRID, GRID)[t.row, t.col:t.col + len(t.code)]
    assert (chars > 0).all() and lab.char.sum() > 0
    assert lab.present.sum() == len({(o.color, o.shape) for o in scene.objects})
    # text pixels really are where the labels say: the label box is light
    img = np.asarray(scene.image)
    box = img[t.row * PATCH:(t.row + 1) * PATCH, t.col * PATCH:(t.col + len(t.code)) * PATCH]
    assert box.mean() > 150

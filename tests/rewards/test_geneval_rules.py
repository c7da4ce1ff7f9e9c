"""GenEval rule logic on synthetic detections (rewards.md §1.8)."""

from __future__ import annotations

import numpy as np
import pytest

from rtdmd.rewards import geneval_rules as R
from rtdmd.rewards.geneval import object_names

NAMES = object_names()
CAT, DOG, CAR = NAMES.index("cat"), NAMES.index("dog"), NAMES.index("car")


def out(dets: dict[str, list[tuple]], h=100, w=100):
    """{class: [(x1,y1,x2,y2,score), ...]} -> mmdet-2 (bbox_per_class, segm_per_class) with box masks."""
    bbox, segm = [], []
    for n in NAMES:
        rows = np.array(dets.get(n, []), dtype=np.float32).reshape(-1, 5)
        bbox.append(rows)
        ms = []
        for r in rows:
            m = np.zeros((h, w), bool)
            m[int(r[1]):int(r[3]), int(r[0]):int(r[2])] = True
            ms.append(m)
        segm.append(ms)
    return bbox, segm


def colour_by_x(image, objects, cls):
    """Synthetic colour head: red if the box starts left of x=50, else blue."""
    return ["red" if o[0][0] < 50 else "blue" for o in objects]


def score(dets, md, colour_fn=colour_by_x, only_strict=False):
    b, s = out(dets)
    return R.score_image(None, b, s, md, NAMES, colour_fn, only_strict=only_strict)


def test_names_file():
    assert len(NAMES) == 80 and NAMES[0] == "person" and NAMES[-1] == "toothbrush"
    for n in ("traffic light", "wine glass", "dining table", "computer keyboard", "tv remote", "computer mouse",
              "hair drier"):
        assert n in NAMES


def test_constants():
    assert (R.THRESHOLD, R.COUNTING_THRESHOLD, R.MAX_OBJECTS, R.NMS_THRESHOLD, R.POSITION_THRESHOLD) == \
        (0.3, 0.9, 16, 1.0, 0.1)
    assert R.COLOURS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    assert R.COLOUR_TEMPLATES == ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}",
                                  "a photo of a {c} object")


def test_detection_filtering_threshold_sort_cap():
    rows = [(0, 0, 10, 10, s) for s in (0.31, 0.95, 0.29, 0.5)]
    b, s = out({"cat": rows})
    d = R.detections_from_output(b, s, NAMES, 0.3)
    assert [float(o[0][4]) for o in d["cat"]] == pytest.approx([0.95, 0.5, 0.31])  # sorted, score > 0.3 kept
    assert d["cat"][0][1].shape == (100, 100)
    d = R.detections_from_output(b, s, NAMES, 0.9)
    assert len(d["cat"]) == 1 and "dog" not in d
    many = [(i, i, i + 5, i + 5, 0.5 + i / 100) for i in range(20)]
    b, s = out({"dog": many})
    assert len(R.detections_from_output(b, s, NAMES, 0.3)["dog"]) == 16  # MAX_OBJECTS; NMS off (overlaps kept)
    assert R.compute_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert R.compute_iou([0, 0, 9, 9], [5, 0, 14, 9]) == pytest.approx(50 / 150)  # "+1" pixel convention


def test_counting_uses_the_0_9_threshold():
    md = {"tag": "counting", "include": [{"class": "dog", "count": 2}]}
    dets = {"dog": [(0, 0, 10, 10, 0.95), (20, 20, 30, 30, 0.92), (50, 50, 60, 60, 0.8)]}
    r = score(dets, md)
    assert r["accuracy"] == 1.0 and r["strict_accuracy"] == 1.0 and r["score"] == 1.0
    dets["dog"].append((70, 70, 80, 80, 0.91))  # three confident dogs
    r = score(dets, md)
    assert r["accuracy"] == 1.0  # standard: ">= count" (first `count` detections)
    assert r["strict_accuracy"] == 0.0 and r["score"] == pytest.approx(1 - 1 / 2)
    # same boxes under a non-counting tag use 0.3
    r = score(dets, {"tag": "single_object", "include": [{"class": "dog", "count": 1}]})
    assert r["accuracy"] == 1.0 and r["strict_accuracy"] == 0.0 and r["score"] == pytest.approx(1 - 3 / 1)


def test_count_term_can_go_negative_quirk():
    dets = {"cat": [(i * 10, 0, i * 10 + 5, 5, 0.95) for i in range(5)]}
    r = score(dets, {"tag": "counting", "include": [{"class": "cat", "count": 2}]})
    assert r["score"] == pytest.approx(1 - 3 / 2) and r["score"] < 0


def test_colour():
    md = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}]}
    assert score({"car": [(10, 10, 30, 30, 0.9)]}, md)["accuracy"] == 1.0
    r = score({"car": [(60, 10, 90, 30, 0.9)]}, md)  # classified blue
    assert r["accuracy"] == 0.0 and r["strict_accuracy"] == 0.0
    assert r["score"] == pytest.approx(np.mean([1.0, 0.0]))  # count term 1, colour term 0
    # two cars, one red: standard looks only at the first `count`=1 (the higher score)
    two = {"car": [(10, 10, 30, 30, 0.9), (60, 10, 90, 30, 0.8)]}
    r = score(two, md)
    assert r["accuracy"] == 1.0 and r["strict_accuracy"] == 0.0
    assert r["score"] == pytest.approx(np.mean([0.0, 0.0]))  # count off by one -> extra 0.0, no colour term
    md2 = {"tag": "color_attr", "include": [{"class": "car", "count": 2, "color": "red"}]}
    r = score(two, md2)
    assert r["strict_accuracy"] == 0.0 and r["score"] == pytest.approx(np.mean([1.0, 0.5]))


def test_relative_position_geometry():
    a = (np.array([0, 40, 20, 60, 1.0]), None)     # centre (10, 50)
    b = (np.array([60, 40, 80, 60, 1.0]), None)    # centre (70, 50)
    assert R.relative_position(a, b) == {"left of"}
    assert R.relative_position(b, a) == {"right of"}
    up = (np.array([60, 0, 80, 20, 1.0]), None)    # centre (70, 10): above b
    assert R.relative_position(up, b) == {"above"}
    assert R.relative_position(b, up) == {"below"}
    diag = (np.array([0, -20, 20, 0, 1.0]), None)  # up-left of b at 45°: dx=dy=-0.66 -> both
    assert R.relative_position(diag, b) == {"left of", "above"}
    # overlapping boxes within 0.1*(d_a+d_b) of each other: no relation
    near = (np.array([2, 40, 22, 60, 1.0]), None)
    assert R.relative_position(near, a) == set()


def test_position_requirement_and_quirk():
    md = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                         {"class": "cat", "count": 1, "position": ["left of", 0]}]}
    ok = {"dog": [(60, 40, 80, 60, 0.9)], "cat": [(0, 40, 20, 60, 0.9)]}
    r = score(ok, md)
    assert r["accuracy"] == 1.0 and r["strict_accuracy"] == 1.0 and r["score"] == 1.0
    bad = {"dog": [(0, 40, 20, 60, 0.9)], "cat": [(60, 40, 80, 60, 0.9)]}
    r = score(bad, md)
    assert r["accuracy"] == 0.0 and r["strict_accuracy"] == 0.0
    # rewards: dog count 1, cat count 1, position 0.0 AND the always-appended 1.0 (QUIRK)
    assert r["score"] == pytest.approx(np.mean([1.0, 1.0, 0.0, 1.0]))
    # target group missing: 0.0 and fail, no extra 1.0
    r = score({"cat": [(0, 40, 20, 60, 0.9)]}, md)
    assert r["accuracy"] == 0.0
    assert r["score"] == pytest.approx(np.mean([0.0, 1.0, 0.0]))
    # count mismatch with a position requirement: a single extra 0.0
    r = score({"dog": [(60, 40, 80, 60, 0.9)]}, md)
    assert r["score"] == pytest.approx(np.mean([1.0, 0.0, 0.0]))


def test_exclusion():
    md = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 2}]}
    one = {"cat": [(0, 0, 10, 10, 0.9)]}
    two = {"cat": [(0, 0, 10, 10, 0.9), (50, 50, 60, 60, 0.8)]}
    assert score(one, md)["accuracy"] == 1.0
    r = score(two, md)
    assert r["accuracy"] == 0.0            # exclude: >= 2 cats fails the standard metric
    assert r["strict_accuracy"] == 0.0     # strict: exact count (exclude itself is ignored)
    md_other = {"tag": "two_object", "include": [{"class": "cat", "count": 1}], "exclude": [{"class": "dog", "count": 1}]}
    r = score({"cat": [(0, 0, 10, 10, 0.9)], "dog": [(50, 50, 60, 60, 0.9)]}, md_other)
    assert r["accuracy"] == 0.0 and r["strict_accuracy"] == 1.0 and r["score"] == 1.0


def test_only_strict_and_grouped_sentinels():
    md = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    dets = {"cat": [(0, 0, 10, 10, 0.9)], "dog": [(50, 50, 60, 60, 0.9)]}
    r = score(dets, md, only_strict=True)
    assert r["accuracy"] == 0.0 and r["strict_accuracy"] == 1.0  # reference forces accuracy to 0
    assert r["grouped_strict"] == {t: (1.0 if t == "two_object" else -10.0) for t in R.TAGS}
    assert R.mean_without_sentinel([1.0, -10.0, 0.0]) == 0.5
    assert score({}, {"tag": "single_object", "include": []})["score"] == 0.0  # empty reward list -> 0

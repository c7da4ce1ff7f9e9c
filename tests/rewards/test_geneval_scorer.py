"""GenEval scorer: detector adapters (tiny HF Mask2Former, mmdet-3 layout), colour head, details."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rtdmd.rewards import RewardInputError
from rtdmd.rewards import geneval_rules as R
from rtdmd.rewards.geneval import (GenEvalScorer, group_per_class, masks_to_boxes, mmdet3_to_per_class,
                                   object_names)

NAMES = object_names()


def test_masks_to_boxes_and_grouping():
    m = np.zeros((2, 10, 12), bool)
    m[0, 2:5, 3:7] = True
    boxes = masks_to_boxes(m)
    assert boxes[0].tolist() == [3, 2, 7, 5] and boxes[1].tolist() == [0, 0, 0, 0]
    b, s = group_per_class(boxes, np.array([0.9, 0.4]), np.array([15, 15]), m, 80)
    assert len(b) == 80 and b[15].shape == (2, 5) and b[15][0, 4] == pytest.approx(0.9)
    assert b[0].shape == (0, 5) and len(s[15]) == 2 and s[15][0].dtype == bool


def test_mmdet3_adapter():
    inst = SimpleNamespace(bboxes=torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), scores=torch.tensor([0.8, 0.2]),
                           labels=torch.tensor([2, 0]), masks=torch.zeros(2, 9, 9, dtype=torch.bool))
    b, s = mmdet3_to_per_class(SimpleNamespace(pred_instances=inst))
    assert b[2].tolist() == [[1, 2, 3, 4, pytest.approx(0.8)]] and b[0][0, 4] == pytest.approx(0.2)
    assert s[2][0].shape == (9, 9)


def test_tiny_mask2former_adapter_smoke(tiny_scorers):
    s = tiny_scorers("geneval")
    ims = [Image.new("RGB", (80, 60), (200, 30, 30)), Image.new("RGB", (50, 90), (10, 10, 200))]
    res = s.detector(ims)
    assert len(res) == 2
    for (bbox, segm), im in zip(res, ims):
        assert len(bbox) == 80 and len(segm) == 80
        for c in range(80):
            assert bbox[c].shape[1] == 5 and len(segm[c]) == len(bbox[c])
            for row, m in zip(bbox[c], segm[c]):
                assert m.shape == (im.height, im.width) and m.any()
                x1, y1, x2, y2 = row[:4]
                assert 0 <= x1 < x2 <= im.width and 0 <= y1 < y2 <= im.height


def test_colour_head_tiny_clip(tiny_scorers):
    s = tiny_scorers("geneval")
    clf = s.colour_fn
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = np.zeros((64, 64), bool)
    mask[10:30, 10:30] = True
    objs = [(np.array([10, 10, 30, 30, 0.9]), mask), (np.array([0, 0, 64, 64, 0.9]), None)]
    cols = clf(img, objs, "car")
    assert len(cols) == 2 and all(c in R.COLOURS for c in cols)
    w = clf.classifier("car")
    assert w.shape[1] == 10 and torch.allclose(w.norm(dim=0), torch.ones(10), atol=1e-5)
    crop = clf.crop(img, objs[0])
    assert crop.size == (20, 20) and crop.getpixel((0, 0)) == (255, 0, 0)
    # outside the mask the object is pasted on #999 grey
    half = np.zeros((64, 64), bool)
    half[10:30, 10:20] = True
    crop = clf.crop(img, (np.array([10, 10, 30, 30, 0.9]), half))
    assert crop.getpixel((15, 5)) == (0x99, 0x99, 0x99)


class FakeDetector:
    def __init__(self, per_image):
        self.per_image = per_image
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for _ in images:
            dets = self.per_image
            bbox = [np.array(dets.get(n, []), np.float32).reshape(-1, 5) for n in NAMES]
            out.append((bbox, [[None] * len(b) for b in bbox]))
        return out


def test_scorer_details_and_metadata_checks():
    det = FakeDetector({"cat": [(0, 40, 20, 60, 0.9)], "dog": [(60, 40, 80, 60, 0.95)]})
    s = GenEvalScorer(det, colour_fn=lambda im, objs, cls: ["red"] * len(objs))
    md = [{"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of", 0]}]},
          {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "blue"}]},
          '{"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}']
    x = torch.rand(3, 3, 32, 32)
    d = s.score_details(x, ["p"] * 3, md)
    assert d["geneval"].tolist() == pytest.approx([1.0, 0.5, 1.0])
    assert d["accuracy"].tolist() == [1.0, 0.0, 1.0] and d["strict_accuracy"].tolist() == [1.0, 0.0, 1.0]
    assert d["position_accuracy"].tolist() == [1.0, -10.0, -10.0]
    assert d["colors_strict_accuracy"].tolist() == [-10.0, 0.0, -10.0]
    assert set(d) == {"geneval", "accuracy", "strict_accuracy"} | {f"{t}_{k}" for t in R.TAGS
                                                                   for k in ("accuracy", "strict_accuracy")}
    torch.testing.assert_close(s(x, ["p"] * 3, md), d["geneval"])
    with pytest.raises(RewardInputError, match="metadata"):
        s(x, ["p"] * 3)
    with pytest.raises(RewardInputError, match="'include'"):
        s(x[:1], ["p"], [{"tag": "counting"}])
    with pytest.raises(RewardInputError, match="'class' and 'count'"):
        s(x[:1], ["p"], [{"include": [{"class": "cat"}]}])


def test_chunks_of_at_most_64():
    det = FakeDetector({})
    s = GenEvalScorer(det, colour_fn=lambda *a: [])
    md = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}] * 130
    s([Image.new("RGB", (4, 4))] * 130, ["p"] * 130, md)
    assert det.calls == [44, 43, 43]  # numpy array_split into ceil(130/64)=3 near-equal chunks

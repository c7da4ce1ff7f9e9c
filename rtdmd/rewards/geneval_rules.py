"""GenEval rule logic, pure Python/numpy (rewards.md §1.8).

Inputs are the mmdet-2 style detector output of one image::

    bbox_per_class[c]  : array [N_c, 5]  rows [x1, y1, x2, y2, score]
    segm_per_class[c]  : sequence of N_c boolean H×W masks (or None)

``detections_from_output`` turns it into ``{class_name: [(bbox_row, mask|None), ...]}``.
Colour requirements go through an injectable ``colour_fn(image, objects, class_name)
-> [colour, ...]`` (one predicted colour name per object).

Two evaluations, both reproduced with the reference's quirks:

* :func:`evaluate` — standard GenEval correctness ("accuracy", 0/1);
* :func:`evaluate_reward` — strict correctness (0/1) and the partial-credit
  score (mean of the collected partial rewards). QUIRKs kept and pinned by tests:
  the count term can be negative when more than twice the requested objects are
  found; a failed count with a colour/position requirement adds one 0.0; a
  failed position check adds both 0.0 and 1.0; ``exclude`` entries are ignored.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
NMS_THRESHOLD = 1.0
POSITION_THRESHOLD = 0.1

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
#: Grouped per-tag lists hold this for every tag that is not the image's own.
SENTINEL = -10.0

Obj = tuple  # (bbox_row [5], mask | None)
ColourFn = Callable[[Any, list, str], list]
Detections = dict


def compute_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with the "+1" pixel convention (inclusive integer boxes)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a[:4])
    bx1, by1, bx2, by2 = (float(v) for v in b[:4])
    area_a = (ax2 - ax1 + 1) * (ay2 - ay1 + 1)
    area_b = (bx2 - bx1 + 1) * (by2 - by1 + 1)
    iw = max(min(ax2, bx2) - max(ax1, bx1) + 1, 0.0)
    ih = max(min(ay2, by2) - max(ay1, by1) + 1, 0.0)
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def threshold_for(metadata: dict) -> float:
    return COUNTING_THRESHOLD if metadata.get("tag") == "counting" else THRESHOLD


def detections_from_output(bbox_per_class: Sequence[np.ndarray], segm_per_class: Sequence | None,
                           class_names: Sequence[str], threshold: float,
                           max_objects: int = MAX_OBJECTS, nms_threshold: float = NMS_THRESHOLD) -> Detections:
    """Per class: sort by score desc, keep score > threshold, first ``max_objects``, greedy NMS (off at 1.0)."""
    detected: dict[str, list] = {}
    for c, name in enumerate(class_names):
        if c >= len(bbox_per_class):
            break
        boxes = np.asarray(bbox_per_class[c], dtype=np.float64).reshape(-1, 5)
        if len(boxes) == 0:
            continue
        order = np.argsort(boxes[:, 4], kind="stable")[::-1]
        order = order[boxes[order, 4] > threshold][:max_objects].tolist()
        objs = []
        while order:
            best = order.pop(0)
            mask = None
            if segm_per_class is not None and c < len(segm_per_class) and segm_per_class[c] is not None \
                    and len(segm_per_class[c]) > best:
                mask = segm_per_class[c][best]
            objs.append((boxes[best], mask))
            if nms_threshold < 1.0:
                order = [o for o in order if compute_iou(boxes[best], boxes[o]) < nms_threshold]
        if objs:
            detected[name] = objs
    return detected


def relative_position(obj_a: Obj, obj_b: Obj) -> set[str]:
    """Relations of A relative to B ("left of", "right of", "above", "below"); y points down."""
    ba = np.asarray(obj_a[0][:4], dtype=np.float64)
    bb = np.asarray(obj_b[0][:4], dtype=np.float64)
    ca, cb = (ba[:2] + ba[2:]) / 2, (bb[:2] + bb[2:]) / 2
    da, db = np.abs(ba[2:] - ba[:2]), np.abs(bb[2:] - bb[:2])
    offset = ca - cb
    rev = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (da + db), 0) * np.sign(offset)
    if np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def _no_colour(image, objects, cls):  # pragma: no cover - only reached without a colour head
    raise RuntimeError("a colour requirement needs a colour classifier (colour_fn)")


def evaluate(image: Any, objects: Detections, metadata: dict, colour_fn: ColourFn = _no_colour) -> tuple[bool, list[str]]:
    """Standard GenEval correctness (0/1 "accuracy") and the failure reasons."""
    correct = True
    reasons: list[str] = []
    groups: list[list | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        matched = True
        found = objects.get(cls, [])[:count]
        if len(found) < count:
            correct = matched = False
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colours = colour_fn(image, found, cls)
                if colours.count(req["color"]) < count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {cls}>={count}, found "
                                   f"{colours.count(req['color'])} {req['color']}; and "
                                   + ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours))
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tobj in groups[target]:
                            if rel not in relative_position(obj, tobj):
                                correct = matched = False
                                reasons.append(f"expected {cls} {rel} target, found "
                                               f"{relative_position(obj, tobj)} target")
                                break
                        if not matched:
                            break
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        cls, count = req["class"], int(req["count"])
        if len(objects.get(cls, [])) >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {len(objects.get(cls, []))}")
    return correct, reasons


def evaluate_reward(image: Any, objects: Detections, metadata: dict,
                    colour_fn: ColourFn = _no_colour) -> tuple[bool, float, list[str]]:
    """Strict correctness, partial score and reasons (the reference ``evaluate_reward``)."""
    correct = True
    reasons: list[str] = []
    rewards: list[float] = []
    groups: list[list | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], int(req["count"])
        matched = True
        found = objects.get(cls, [])  # all detections (not only the first `count`)
        rewards.append(1 - abs(count - len(found)) / count)  # QUIRK: negative when > 2*count found
        if len(found) != count:
            correct = matched = False
            reasons.append(f"expected {cls}=={count}, found {len(found)}")
            if "color" in req or "position" in req:
                rewards.append(0.0)
        else:
            if "color" in req:
                colours = colour_fn(image, found, cls)
                n_col = colours.count(req["color"])
                rewards.append(1 - abs(count - n_col) / count)
                if n_col != count:
                    correct = matched = False
                    reasons.append(f"expected {req['color']} {cls}=={count}, found {n_col}")
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    rewards.append(0.0)
                    reasons.append(f"no target for {cls} to be {rel}")
                else:
                    for obj in found:
                        for tobj in groups[target]:
                            if rel not in relative_position(obj, tobj):
                                correct = matched = False
                                rewards.append(0.0)
                                reasons.append(f"expected {cls} {rel} target")
                                break
                        if not matched:
                            break
                    rewards.append(1.0)  # QUIRK: always appended after the pair loop
        groups.append(found if matched else None)
    score = float(np.mean(rewards)) if rewards else 0.0
    return correct, score, reasons


def grouped(tag: str, value: float) -> dict[str, float]:
    """Per-tag entries for one image: its own tag gets ``value``, every other tag the −10 sentinel."""
    return {t: (float(value) if t == tag else SENTINEL) for t in TAGS}


def mean_without_sentinel(values: Sequence[float]) -> float:
    vals = [v for v in values if v != SENTINEL]
    return float(np.mean(vals)) if vals else float("nan")


def score_image(image: Any, bbox_per_class, segm_per_class, metadata: dict, class_names: Sequence[str],
                colour_fn: ColourFn = _no_colour, *, only_strict: bool = False) -> dict[str, Any]:
    """All GenEval numbers for one image: ``score``, ``accuracy``, ``strict_accuracy``, per-tag groups."""
    objects = detections_from_output(bbox_per_class, segm_per_class, class_names, threshold_for(metadata))
    strict, score, reasons = evaluate_reward(image, objects, metadata, colour_fn)
    if only_strict:
        acc = 0.0  # the reference forces accuracy to 0 when only_strict=True
    else:
        acc = float(evaluate(image, objects, metadata, colour_fn)[0])
    tag = metadata.get("tag", "")
    return {"score": score, "accuracy": acc, "strict_accuracy": float(strict),
            "grouped": grouped(tag, acc), "grouped_strict": grouped(tag, float(strict)),
            "reasons": reasons, "objects": objects}

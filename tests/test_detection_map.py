"""detection_map: COCO mAP@[.5:.95] and mAP@.5 (pycocotools), split into seen and unseen classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillc.passes.eval.detection import detection_map, detection_map_per_dim
from distillc.plugins.detection_data import Boxes, load_digit_scenes

CLASSES = ["a", "b", "c"]


def truth():
    """Three images: class a and b in the first, c in the second, a crowd region of a in the third."""
    return Boxes.from_images([
        ([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1]),
        ([[5, 5, 25, 15]], [2]),
        ([[0, 0, 30, 30], [40, 40, 50, 50]], [0, 0], [True, False]),
    ])


def perfect(gt: Boxes):
    out = []
    for i in range(len(gt)):
        boxes, labels, crowd = gt.image(i)
        out.append((boxes[~crowd], np.linspace(0.9, 0.5, int((~crowd).sum())), labels[~crowd]))
    return out


def test_perfect_predictions_score_one_everywhere():
    result = detection_map(perfect(truth()), truth(), CLASSES, seen=[0, 1], unseen=[2])
    assert result["map"] == pytest.approx(1.0) and result["map50"] == pytest.approx(1.0)
    assert result["seen"]["map"] == pytest.approx(1.0) and result["unseen"]["map"] == pytest.approx(1.0)
    assert all(v["ap"] == pytest.approx(1.0) for v in result["per_class"].values())
    assert result["images"] == 3 and result["boxes"] == 4 and result["predictions"] == 4


def test_box_shifted_to_iou_two_thirds_passes_four_of_ten_thresholds():
    # [0, 10] shifted by 2 px: IoU 80 / 120 = 0.667 >= 0.50 .. 0.65, < 0.70 .. 0.95
    gt = [([[0, 0, 10, 10]], [0])]
    result = detection_map([([[2, 0, 12, 10]], [0.9], [0])], gt, ["a"])
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(0.4)


def test_box_shifted_past_half_overlap_misses_even_at_iou_one_half():
    gt = [([[0, 0, 10, 10]], [0])]
    result = detection_map([([[4, 0, 14, 10]], [0.9], [0])], gt, ["a"])  # IoU 60 / 140 = 0.43
    assert result["map50"] == pytest.approx(0.0) and result["map"] == pytest.approx(0.0)


def test_hand_computed_ranking_with_one_false_positive():
    # One class, two objects. Detections by score: hit (P 1, R .5), miss (P .5, R .5), hit (P 2/3, R 1).
    # Interpolated precision is 1 at recall points 0 .. 0.50 (51 of 101) and 2/3 above (50 of 101).
    gt = [([[0, 0, 10, 10]], [0]), ([[20, 20, 40, 40]], [0])]
    predictions = [([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [0, 0]), ([[20, 20, 40, 40]], [0.7], [0])]
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    result = detection_map(predictions, gt, ["a"])
    assert result["map"] == pytest.approx(expected, abs=1e-9) and result["map50"] == pytest.approx(expected, abs=1e-9)


def test_seen_and_unseen_are_scored_apart():
    gt = truth()
    predictions = perfect(gt)
    predictions[1] = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))  # class c (unseen) never found
    result = detection_map(predictions, gt, CLASSES, seen=[0, 1], unseen=[2])
    assert result["seen"]["map"] == pytest.approx(1.0)
    assert result["unseen"]["map"] == pytest.approx(0.0)
    assert result["map"] == pytest.approx(2 / 3)  # mean over the three classes
    # a wrong class is a miss for the truth's class and a false positive for its own
    predictions[1] = (np.array([[5, 5, 25, 15]]), np.array([0.9]), np.array([1]))
    relabelled = detection_map(predictions, gt, CLASSES, seen=[0, 1], unseen=[2])
    assert relabelled["unseen"]["map"] == pytest.approx(0.0) and relabelled["seen"]["map"] < 1.0


def test_empty_predictions_score_zero_and_classes_without_truth_are_left_out():
    empty = [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int))] * 3
    result = detection_map(empty, truth(), CLASSES + ["d"], seen=[0, 1, 2], unseen=[3])
    assert result["map"] == 0.0 and result["map50"] == 0.0 and result["seen"]["map"] == 0.0
    assert result["per_class"]["d"] == {"ap": None, "ap50": None} and result["unseen"]["map"] is None


def test_crowd_regions_are_neither_targets_nor_false_positives():
    gt = truth()
    predictions = perfect(gt)
    with_crowd_hit = list(predictions)
    boxes, scores, labels = predictions[2]
    with_crowd_hit[2] = (np.vstack([boxes, [[2, 2, 28, 28]]]), np.append(scores, 0.95), np.append(labels, 0))
    assert detection_map(with_crowd_hit, gt, CLASSES)["map"] == pytest.approx(1.0)


def test_tensors_are_accepted_and_per_dim_results_are_keyed_by_dim():
    gt = truth()
    as_tensors = [tuple(torch.as_tensor(np.asarray(a)) for a in p) for p in perfect(gt)]
    shifted = [(torch.as_tensor(b) + 2.0, s, lab) for b, s, lab in as_tensors]
    per_dim = detection_map_per_dim({64: as_tensors, 16: shifted}, gt, CLASSES, seen=[0, 1], unseen=[2])
    assert list(per_dim) == ["16", "64"]
    assert per_dim["64"]["map"] == pytest.approx(1.0) and per_dim["16"]["map"] < per_dim["64"]["map"]


def test_only_the_best_scored_detections_count():
    gt = [([[0, 0, 10, 10]], [0])]
    noise = [[20 + i, 20, 30 + i, 30] for i in range(5)]
    predictions = [(noise + [[0, 0, 10, 10]], [0.9] * 5 + [0.1], [0] * 6)]
    assert detection_map(predictions, gt, ["a"], max_detections=5)["map"] == 0.0
    assert detection_map(predictions, gt, ["a"], max_detections=6)["map"] > 0.0


@pytest.mark.parametrize("predictions, words", [
    ([], "0 images of predictions for 1"),
    ([([[0, 0, 1, 1]], [0.5, 0.4], [0])], "1 boxes, 2 scores"),
    ([([[0, 0, 1, 1]], [0.5], [3])], "labels must lie in 0..0"),
    ([([[5, 0, 1, 1]], [0.5], [0])], "x1 >= x0"),
])
def test_malformed_predictions_are_refused(predictions, words):
    with pytest.raises(ValueError, match=words):
        detection_map(predictions, [([[0, 0, 10, 10]], [0])], ["a"])


def test_digit_scene_ground_truth_scores_one_against_itself():
    data = load_digit_scenes(image_size=32, val_fraction=0.5, seed=1, options={"scenes": 12})
    result = detection_map(perfect(data.val_boxes), data.val_boxes, data.detection_classes,
                           seen=data.seen, unseen=data.unseen)
    assert result["seen"]["map"] == pytest.approx(1.0) and result["boxes"] == len(data.val_boxes.labels)

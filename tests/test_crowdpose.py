"""CrowdPose: the reader (load_crowdpose + read_coco), the official-toolkit metric and
eval.crowdpose."""
import copy
import json
import math

import numpy as np
import pytest

from common.datasets import (CROWDPOSE_FLIP_PAIRS, CROWDPOSE_JOINTS, CROWDPOSE_SIGMAS,
                             CROWDPOSE_SKELETON, CROWDPOSE_UPPER, load_crowdpose, read_coco)
from common.metrics import crowd_split, crowdpose_eval
from common.utils import UserError
from helpers import SHARED, assert_one_line_error, run_script

GT = SHARED / "crowdpose" / "annotations" / "test_crowdpose.json"
DETS = SHARED / "crowdpose" / "annotations" / "test_crowdpose_det_AP_40.json"
IMAGES = SHARED / "crowdpose" / "images"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
THRESHOLDS = np.linspace(0.5, 0.95, 10)


def as_results(gt, shift=0.0, image_ids=None):
    """The labeled persons (of `image_ids`, default all) as predictions with score 1, moved by
    `shift` pixels."""
    out = []
    for a in gt["annotations"]:
        if a["num_keypoints"] and (image_ids is None or a["image_id"] in image_ids):
            kp = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
            kp[:, :2] += shift
            kp[:, 2] = 1.0
            out.append({"image_id": a["image_id"], "category_id": 1,
                        "keypoints": kp.ravel().tolist(), "score": 1.0})
    return out


def three_splits(path):
    """The shared sample plus a copy of image 103319 under id 1: crowd index 0.1 (easy), 0.5
    (medium), 0.8 (hard)."""
    gt = json.loads(GT.read_text())
    crowd = {106848: 0.1, 103319: 0.5}
    for img in gt["images"]:
        img["crowdIndex"] = crowd[img["id"]]
    gt["images"].append(dict(gt["images"][1], id=1, crowdIndex=0.8))
    gt["annotations"] += [dict(copy.deepcopy(a), id=a["id"] + 10 ** 6, image_id=1)
                          for a in gt["annotations"] if a["image_id"] == 103319]
    path.write_text(json.dumps(gt))
    return gt


def test_constants_consistent():
    assert len(CROWDPOSE_JOINTS) == len(CROWDPOSE_SIGMAS) == 14
    for a, b in CROWDPOSE_FLIP_PAIRS:  # a flip pair joins a left joint to the same right joint
        assert CROWDPOSE_JOINTS[a].replace("left", "right") == CROWDPOSE_JOINTS[b]
        assert CROWDPOSE_SIGMAS[a] == CROWDPOSE_SIGMAS[b]
    assert ({CROWDPOSE_JOINTS[i].split("_")[-1] for i in CROWDPOSE_UPPER}
            == {"shoulder", "elbow", "wrist", "head", "neck"})
    assert all(0 <= a < 14 and 0 <= b < 14 for a, b in CROWDPOSE_SKELETON)


@needs_shared
def test_read_crowdpose_sample():
    coco = load_crowdpose(GT)
    records, skipped = read_coco(coco, IMAGES, aspect_ratio=0.75)
    # 5 persons, one without labeled joints
    assert len(records) == 4 and skipped["no_joints"] == 1
    assert all(r["joints"].shape == (14, 2) and r["visible"].shape == (14,) for r in records)
    oks_areas = sorted(0.53 * a["bbox"][2] * a["bbox"][3] for a in coco.anns.values()
                       if a["num_keypoints"])
    # the toolkit's OKS area, for OKS-NMS
    assert sorted(r["area"] for r in records) == pytest.approx(oks_areas)
    dets, _ = read_coco(coco, IMAGES, 0.75, det_json=DETS, det_thresh=0.5)
    assert len(dets) == sum(d["score"] >= 0.5 for d in json.loads(DETS.read_text()))


@needs_shared
def test_cli_gt_vs_gt(tmp_path):
    gt = json.loads(GT.read_text())
    (tmp_path / "res.json").write_text(json.dumps(as_results(gt)))
    out = tmp_path / "metrics.json"
    p = run_script("-m", ["eval.crowdpose", "--gt", GT, "--results", tmp_path / "res.json", "--out",
                          out])
    assert "type=medium | maxDets= 20 ] = 1.000" in p.stdout
    m = json.loads(out.read_text())
    assert all(m[k] == 1.0 for k in ("AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_medium"))
    # both sample images (crowd index 0.33, 0.39) are medium: the toolkit reports -1 for an empty
    # split
    assert m["AP_easy"] == m["AP_hard"] == -1.0
    three = three_splits(tmp_path / "three.json")
    m = crowdpose_eval(tmp_path / "three.json", as_results(three), verbose=False)
    assert m == {k: 1.0 for k in m} and len(m) == 9


@needs_shared
def test_split_by_crowd_index(tmp_path):
    gt = three_splits(tmp_path / "gt.json")
    assert (crowd_split(load_crowdpose(tmp_path / "gt.json"))
            == {"easy": [106848], "medium": [103319], "hard": [1]})
    for image_id, split in ((106848, "easy"), (103319, "medium"), (1, "hard")):
        # exact on one image, 100 px off on the others: only that image's split scores
        results = (as_results(gt, 0.0, {image_id})
                   + as_results(gt, 100.0, {i for i in (106848, 103319, 1)} - {image_id}))
        m = crowdpose_eval(tmp_path / "gt.json", results, verbose=False)
        splits = ("easy", "medium", "hard")
        assert [m[f"AP_{s}"] for s in splits] == [float(s == split) for s in splits]
        assert 0 < m["AP"] < 1
    # the papers' 0.1 threshold (--crowd-easy 0.1): 0.1 is no longer below it, the easy split is
    # empty
    m = crowdpose_eval(tmp_path / "gt.json", as_results(gt), verbose=False, easy=0.1)
    assert m["AP_easy"] == -1.0 and m["AP_medium"] == 1.0


def test_oks_uses_053_box_area(tmp_path):
    """One person, a prediction 10 px off on every labeled joint: AP counts the OKS thresholds it
    passes."""
    w, h = 100.0, 200.0
    rng = np.random.default_rng(0)
    xy = np.stack([50 + rng.uniform(0, w, 14), 40 + rng.uniform(0, h, 14)], 1)
    v = np.full(14, 2.0)
    # unlabeled head and neck: left out of the OKS mean whatever the prediction there
    v[[12, 13]] = 0
    gt = {"images": [{"id": 7, "file_name": "a.jpg", "width": 300, "height": 300,
                      "crowdIndex": 0.5}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                           "bbox": [50, 40, w, h], "num_keypoints": 12,
                           "keypoints": np.concatenate([xy * (v[:, None] > 0), v[:, None]],
                                                       1).ravel().tolist()}],
          "categories": [{"id": 1, "name": "person", "keypoints": CROWDPOSE_JOINTS}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    pred = xy + [6.0, 8.0]
    pred[[12, 13]] += 500.0
    results = [{"image_id": 7, "category_id": 1, "score": 0.9,
                "keypoints": np.concatenate([pred, np.ones((14, 1))], 1).ravel().tolist()}]

    def oks(area):  # OKS = mean over labeled joints of exp(-d^2 / (2 area (2 sigma)^2)), d = 10 px
        return np.mean([math.exp(-100.0 / (2 * area * (2 * s) ** 2))
                        for s in CROWDPOSE_SIGMAS[:12]])

    expected = oks(0.53 * w * h)
    passed = (THRESHOLDS <= expected).sum()
    # the area convention changes the answer here
    assert passed != (THRESHOLDS <= oks(w * h)).sum()
    assert np.abs(THRESHOLDS - expected).min() > 0.005   # not on a threshold
    m = crowdpose_eval(tmp_path / "gt.json", results, verbose=False)
    assert m["AP"] == pytest.approx(passed / 10) and m["AR"] == pytest.approx(passed / 10)
    assert (m["AP50"], m["AP75"]) == pytest.approx((float(expected >= 0.5),
                                                    float(expected >= 0.75)))


def test_bad_input_one_line_errors(tmp_path):
    gt = {"images": [{"id": 3, "file_name": "a.jpg", "width": 10, "height": 10}], "annotations": [],
          "categories": [{"id": 1, "name": "person", "keypoints": CROWDPOSE_JOINTS}]}
    (tmp_path / "plain.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text("[]")
    p = run_script("-m", ["eval.crowdpose", "--gt", tmp_path / "plain.json", "--results",
                          tmp_path / "res.json"],
                   expect=2)
    assert_one_line_error(p, "plain.json", "image id 3", "crowdIndex")
    gt["images"][0]["crowdIndex"] = 0.3
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    p = run_script("-m", ["eval.crowdpose", "--gt", tmp_path / "gt.json", "--results",
                          tmp_path / "none.json"],
                   expect=2)
    assert_one_line_error(p, "none.json", "not found")
    (tmp_path / "dets.json").write_text(json.dumps([{"image_id": 3, "category_id": 1,
                                                     "bbox": [1, 1, 5, 5], "score": 0.9}]))
    p = run_script("-m", ["eval.crowdpose", "--gt", tmp_path / "gt.json", "--results",
                          tmp_path / "dets.json"],
                   expect=2)
    assert_one_line_error(p, "dets.json", "every result needs")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(UserError, match="dict.json: results must be a JSON list"):
        crowdpose_eval(tmp_path / "gt.json", tmp_path / "dict.json", verbose=False)
    coco17 = [{"image_id": 3, "category_id": 1, "keypoints": [0.0] * 51, "score": 1.0}]
    with pytest.raises(UserError, match="length 51, expected 42"):
        crowdpose_eval(tmp_path / "gt.json", coco17, verbose=False)

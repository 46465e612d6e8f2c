"""AI Challenger reader: the official json and the COCO-style conversion give the same person
crops."""
import json
from pathlib import Path

import numpy as np
import pytest

from common.datasets import AIC_JOINTS, read_aic
from common.utils import UserError
from helpers import SHARED

COCO_STYLE = SHARED / "aic" / "annotations" / "test_aic.json"
IMAGES = SHARED / "aic" / "images"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
COCO_TO_AIC_V = {2: 1, 1: 2, 0: 3}  # COCO visible / occluded / unlabeled -> AIC's 1 / 2 / 3


def official_from_coco_style(coco):
    """The official layout of the same persons: per image its file stem, [x1, y1, x2, y2] boxes, AIC
    v flags."""
    out = []
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        boxes, keypoints = {}, {}
        for n, a in enumerate(anns, start=1):
            x, y, w, h = a["bbox"]
            boxes[f"human{n}"] = [x, y, x + w, y + h]
            kp = np.array(a["keypoints"]).reshape(-1, 3)
            keypoints[f"human{n}"] = [int(v) for x, y, c in kp for v in (x, y, COCO_TO_AIC_V[c])]
        out.append({"url": img.get("url", ""), "image_id": Path(img["file_name"]).stem,
                    "human_annotations": boxes, "keypoint_annotations": keypoints})
    return out


def test_constants():
    assert len(AIC_JOINTS) == 14
    for a, b in [(0, 3), (1, 4), (2, 5), (6, 9), (7, 10), (8, 11)]:  # the left/right pairs
        assert AIC_JOINTS[a].replace("right", "left") == AIC_JOINTS[b]


@needs_shared
def test_coco_style_sample_boxes():
    coco = json.loads(COCO_STYLE.read_text())
    records, skipped = read_aic(COCO_STYLE, IMAGES, aspect_ratio=0.75)
    assert len(records) == 9 and skipped == {"bad_box": 0}
    assert all(Path(r["image"]).is_file() and r["joints"].shape == (14, 2) for r in records)
    # bbox [279, 55, 213, 544]: a tall box keeps its height, the width grows to 0.75 x 544 = 408;
    # both x 1.25
    r = records[0]
    assert r["center"].tolist() == [279 + 213 / 2, 55 + 544 / 2]
    assert r["scale"] == pytest.approx([408 * 1.25, 544 * 1.25])
    # bbox [0, 109, 473, 486]: a wide box keeps its width, the height grows to 473 / 0.75
    r = records[5]
    assert r["center"].tolist() == [473 / 2, 109 + 486 / 2]
    assert r["scale"] == pytest.approx([473 * 1.25, 473 / 0.75 * 1.25])
    v = np.array(coco["annotations"][0]["keypoints"]).reshape(-1, 3)[:, 2]
    assert records[0]["visible"].tolist() == (v > 0).astype(float).tolist()


@needs_shared
def test_official_format_same_records(tmp_path):
    official = official_from_coco_style(json.loads(COCO_STYLE.read_text()))
    official[0]["human_annotations"]["human9"] = [10, 10, 10.5, 200]  # under 1 px wide: no crop
    (tmp_path / "keypoint_train_annotations_20170909.json").write_text(json.dumps(official))
    got, skipped = read_aic(tmp_path / "keypoint_train_annotations_20170909.json", IMAGES, 0.75)
    want, _ = read_aic(COCO_STYLE, IMAGES, 0.75)
    assert skipped == {"bad_box": 1} and len(got) == len(want) == 9
    for g, w in zip(got, want):
        assert g["image"] == w["image"] and isinstance(g["image_id"], str)
        for key in ("center", "scale", "joints", "visible"):
            np.testing.assert_array_equal(g[key], w[key])
        assert g["area"] == w["area"]


@needs_shared
def test_bad_input_one_line_errors(tmp_path):
    cases = {"mpii.json": [{"image": "a.jpg", "joints": [[1, 2]]}],
             "dict.json": {"annotations": []},
             "short.json": [{"image_id": "abc", "human_annotations": {"human1": [1, 2, 30, 40]},
                             "keypoint_annotations": {"human1": [1, 2, 1] * 17}}],
             "box.json": [{"image_id": "abc", "human_annotations": {"human1": [1, 2, 30]}}]}
    needles = {"mpii.json": "not AI Challenger", "dict.json": "not AI Challenger",
               "short.json": "image abc .* 51", "box.json": "image abc human1"}
    for name, content in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(UserError, match=f"{name}: {needles[name]}") as e:
            read_aic(tmp_path / name, IMAGES, 0.75)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="nowhere: image directory not found"):
        read_aic(COCO_STYLE, tmp_path / "nowhere", 0.75)
    with pytest.raises(UserError, match="missing.json: AIC annotation file not found"):
        read_aic(tmp_path / "missing.json", IMAGES, 0.75)

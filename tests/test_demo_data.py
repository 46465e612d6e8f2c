"""The synthetic demo set must be a valid, evaluable, deterministic COCO person-keypoints
dataset."""
import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common.utils import UserError
from data.demo import KEYPOINT_NAMES, SPLITS, make_demo

# 68 images: just over the threshold at which make_demo uses a process pool, so the pooled and
# in-process paths can be compared.
N_TRAIN, N_VAL, SIZE = 60, 8, 192


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _ann_path(root, split):
    return os.path.join(root, "annotations", f"person_keypoints_{split}.json")


def _load(root, split):
    with open(_ann_path(root, split)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo") / "d", seed=0, n_train=N_TRAIN, n_val=N_VAL,
                     workers=1)


def _keypoints(ann):
    return np.array(ann["keypoints"], dtype=float).reshape(17, 3)


def test_layout_and_coco_fields(root):
    assert sorted(os.listdir(root)) == ["DONE.json", "annotations", "train2017", "val2017"]
    for split, n in zip(SPLITS, (N_TRAIN, N_VAL)):
        coco = _quiet(COCO, _ann_path(root, split))
        assert len(coco.getImgIds()) == n
        assert coco.loadCats(1)[0]["keypoints"] == KEYPOINT_NAMES
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= n  # 1-3 people per image
        for a in anns:
            kp = _keypoints(a)
            assert len(a["keypoints"]) == 51 and set(kp[:, 2]) <= {0, 1, 2}
            assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
            assert a["category_id"] == 1 and a["iscrowd"] == 0 and a["area"] > 0
        assert np.mean([a["num_keypoints"] > 0 for a in anns]) > 0.9
        # Occlusion and truncation both occur somewhere in the training split.
        if split == "train2017":
            v = np.concatenate([_keypoints(a)[:, 2] for a in anns])
            assert (v == 1).any() and (v == 0).any() and (v == 2).mean() > 0.7


def test_keypoints_inside_image_and_bbox(root):
    for split in SPLITS:
        for a in _load(root, split)["annotations"]:
            kp = _keypoints(a)
            lab, unl = kp[:, 2] > 0, kp[:, 2] == 0
            assert (kp[unl, :2] == 0).all()
            assert ((kp[lab, :2] >= 0) & (kp[lab, :2] < SIZE)).all()
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0
            assert (kp[lab, 0] >= x - 1e-6).all() and (kp[lab, 0] <= x + w + 1e-6).all()
            assert (kp[lab, 1] >= y - 1e-6).all() and (kp[lab, 1] <= y + h + 1e-6).all()
            assert a["area"] <= w * h


def test_images_decode_with_stated_size(root):
    for split in SPLITS:
        for img in _load(root, split)["images"]:
            with Image.open(os.path.join(root, split, img["file_name"])) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (img["width"], img["height"]) == (SIZE, SIZE)


def test_left_right_follow_facing_direction(root):
    """Facing the viewer (face drawn, nose labeled) puts the person's left on the image's right;
    seen from behind (both ears labeled, nose not) it is on the image's left. This is what makes
    horizontal flip with a left/right label swap consistent with the pixels."""
    n_front = n_back = 0
    for a in _load(root, "train2017")["annotations"]:
        kp = _keypoints(a)
        if not (kp[5, 2] and kp[6, 2]):
            continue
        if kp[0, 2]:
            assert kp[5, 0] > kp[6, 0]
            if kp[1, 2] and kp[2, 2]:
                assert kp[1, 0] > kp[2, 0]
            n_front += 1
        elif kp[3, 2] and kp[4, 2]:
            assert kp[5, 0] < kp[6, 0] and kp[3, 0] < kp[4, 0]
            n_back += 1
    assert n_front > 10 and n_back > 3


def test_gt_as_results_scores_ap_one(root):
    gt = _quiet(COCO, _ann_path(root, "val2017"))
    res = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
           for a in gt.loadAnns(gt.getAnnIds()) if a["num_keypoints"] > 0]
    ev = COCOeval(gt, _quiet(gt.loadRes, res), "keypoints")
    _quiet(lambda: (ev.evaluate(), ev.accumulate(), ev.summarize()))
    assert ev.stats[0] == pytest.approx(1.0)


def test_deterministic_and_independent_of_workers(root, tmp_path):
    other = make_demo(tmp_path / "pooled", seed=0, n_train=N_TRAIN, n_val=N_VAL, workers=2)
    for split in SPLITS:
        assert _load(root, split) == _load(other, split)
        for name in os.listdir(os.path.join(root, split)):
            with open(os.path.join(root, split, name),
                      "rb") as f1, open(os.path.join(other, split, name), "rb") as f2:
                assert f1.read() == f2.read()


def test_seed_changes_data_and_images_do_not_depend_on_counts(root, tmp_path):
    small = make_demo(tmp_path / "s0", seed=0, n_train=2, n_val=2)
    seed1 = make_demo(tmp_path / "s1", seed=1, n_train=2, n_val=2)
    for split in SPLITS:
        name = _load(small, split)["images"][0]["file_name"]
        read = lambda r: open(os.path.join(r, split, name), "rb").read()
        assert read(small) == read(root)  # image i is a function of (seed, split, i) only
        assert read(seed1) != read(small)
        assert _load(seed1, split)["annotations"] != _load(small, split)["annotations"]


def test_cache_reuses_and_regenerates_when_stale(tmp_path):
    root = tmp_path / "c"
    make_demo(root, seed=0, n_train=2, n_val=1)
    ann = _ann_path(root, "val2017")
    os.utime(ann, (0, 0))  # mark it: a regeneration would write a fresh mtime
    make_demo(root, seed=0, n_train=2, n_val=1)
    assert os.path.getmtime(ann) == 0
    make_demo(root, seed=0, n_train=3, n_val=1)  # different config: rebuilt in place
    assert os.path.getmtime(ann) != 0 and len(_load(root, "train2017")["images"]) == 3
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_refuses_to_overwrite_unrelated_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError):
        make_demo(tmp_path, n_train=1, n_val=1)
    assert (tmp_path / "precious.txt").read_text() == "keep me"

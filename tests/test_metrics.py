"""Tests of common/metrics.py and the eval CLIs: hand-computed cases plus the real shared samples
when present."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from common.metrics import (COCO_SIGMAS, coco_keypoint_eval, keypoint_recall, load_mpii_gt,
                            match_mpii_gt, mpii_pckh, oks_iou, oks_nms)
from common.utils import UserError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
COCO_GT = SHARED / "coco" / "annotations" / "test_coco.json"
COCO_PREDS = SHARED / "coco" / "annotations" / "example_coco_preds.json"
MPII_MAT = SHARED / "mpii" / "annot" / "detections_our_format.mat"
MPII_ANN = SHARED / "mpii" / "annot" / "test_mpii.json"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample data not available")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


# --------------------------------------------------------------------------------------------------
#   COCO AP

def tiny_coco(path, k=17):
    """3 persons on 2 images, hand-written keypoints spread over a ~100 px tall box, all labelled
    and visible."""
    rng = np.random.default_rng(0)
    anns = []
    for ann_id, (image_id, x0, y0) in enumerate([(1, 50, 40), (1, 250, 60), (2, 120, 30)], start=1):
        xy = np.stack([x0 + rng.uniform(0, 60, k), y0 + rng.uniform(0, 120, k)], 1)
        kpts = np.concatenate([xy, np.full((k, 1), 2.0)], 1).ravel().round(1).tolist()
        anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                     "area": 4000.0, "bbox": [x0, y0, 60, 120], "num_keypoints": k,
                     "keypoints": kpts})
    gt = {"images": [{"id": 1, "width": 400, "height": 300},
                     {"id": 2, "width": 400, "height": 300}],
          "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(k)],
                          "skeleton": []}]}
    path.write_text(json.dumps(gt))
    return gt


def gt_as_results(gt, shift=0.0):
    """Every annotated person as a detection with score 1, every keypoint moved by (shift, shift)
    pixels."""
    results = []
    for a in gt["annotations"]:
        if a.get("iscrowd", 0) or a["num_keypoints"] == 0:
            continue
        kpts = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        kpts[:, :2] += shift
        kpts[:, 2] = 1.0
        results.append({"image_id": a["image_id"], "category_id": 1,
                        "keypoints": kpts.ravel().tolist(), "score": 1.0})
    return results


def test_coco_ap_self_and_shifts(tmp_path):
    gt = tiny_coco(tmp_path / "gt.json")
    ap = [coco_keypoint_eval(str(tmp_path / "gt.json"), gt_as_results(gt, s), verbose=False)["AP"]
          for s in (0, 2, 5)]
    assert ap[0] == pytest.approx(1.0)
    assert ap[0] > ap[1] > ap[2]


def test_coco_results_path_empty_and_caller_list_untouched(tmp_path):
    gt = tiny_coco(tmp_path / "gt.json")
    results = gt_as_results(gt)
    (tmp_path / "res.json").write_text(json.dumps(results))
    assert (coco_keypoint_eval(str(tmp_path / "gt.json"), str(tmp_path / "res.json"),
                               verbose=False)["AP"] == 1.0)
    coco_keypoint_eval(str(tmp_path / "gt.json"), results, verbose=False)
    # loadRes adds keys to its input
    assert set(results[0]) == {"image_id", "category_id", "keypoints", "score"}
    zeros = coco_keypoint_eval(str(tmp_path / "gt.json"), [], verbose=False)
    assert len(zeros) == 10 and all(v == 0.0 for v in zeros.values())


def test_coco_other_keypoint_count_needs_sigmas(tmp_path):
    gt = tiny_coco(tmp_path / "gt14.json", k=14)
    # CrowdPose
    sigmas = [.079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089, .079, .079]
    assert coco_keypoint_eval(str(tmp_path / "gt14.json"), gt_as_results(gt), sigmas=sigmas,
                              verbose=False)["AP"] == pytest.approx(1.0)
    with pytest.raises(UserError, match="expected 51"):
        coco_keypoint_eval(str(tmp_path / "gt14.json"), gt_as_results(gt), verbose=False)


def test_coco_missing_gt_is_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.json"):
        coco_keypoint_eval(str(tmp_path / "nope.json"), [], verbose=False)


def test_coco_malformed_results_and_gt_without_area_are_user_errors(tmp_path):
    gt = tiny_coco(tmp_path / "gt.json")
    results = gt_as_results(gt)
    del results[0]["score"]
    with pytest.raises(UserError, match="every result needs.*score"):
        coco_keypoint_eval(str(tmp_path / "gt.json"), results, verbose=False)
    with pytest.raises(UserError, match="every result needs"):
        coco_keypoint_eval(str(tmp_path / "gt.json"), [[1, 2]], verbose=False)
    del gt["annotations"][0]["area"]
    (tmp_path / "noarea.json").write_text(json.dumps(gt))
    with pytest.raises(UserError, match="noarea.json.*no 'area'"):
        coco_keypoint_eval(str(tmp_path / "noarea.json"), gt_as_results(gt), verbose=False)


@needs_shared
def test_coco_real_gt_self_ap():
    gt = json.loads(COCO_GT.read_text())
    assert (coco_keypoint_eval(str(COCO_GT), gt_as_results(gt),
                               verbose=False)["AP"] == pytest.approx(1.0))


@needs_shared
def test_coco_cli_real_preds(tmp_path):
    out = tmp_path / "metrics.json"
    proc = run_cli("eval.coco", "--gt", str(COCO_GT), "--results", str(COCO_PREDS), "--out",
                   str(out))
    assert proc.returncode == 0, proc.stderr
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all" in proc.stdout
    assert round(json.loads(out.read_text())["AP"], 4) == 0.8609


def test_coco_cli_missing_gt(tmp_path):
    missing = tmp_path / "missing_gt.json"
    proc = run_cli("eval.coco", "--gt", str(missing), "--results", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert (proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
            and str(missing) in proc.stderr)


# --------------------------------------------------------------------------------------------------
#   OKS NMS

def test_oks_iou_hand_computed():
    sigmas = np.array([0.1, 0.2])
    g = np.array([[0.0, 0.0, 1.0], [10.0, 0.0, 1.0]])
    d = np.array([[[3.0, 4.0, 1.0], [10.0, 0.0, 0.1]]])
    # e_j = d_j^2 / (2 sigma_j)^2 / ((area_g + area_d) / 2) / 2; areas 100 and 300 -> mean 200.
    e0 = 25 / (2 * 0.1) ** 2 / 200 / 2  # = 1.5625
    assert oks_iou(g, d, 100.0, [300.0], sigmas)[0] == pytest.approx((math.exp(-e0) + 1.0) / 2)
    # With a visibility threshold the candidate's second joint (confidence 0.1) no longer counts.
    assert oks_iou(g, d, 100.0, [300.0], sigmas, vis_thresh=0.5)[0] == pytest.approx(math.exp(-e0))


def test_oks_nms_keeps_distinct_drops_duplicate():
    base = np.concatenate([np.random.default_rng(1).uniform(0, 100, (17, 2)), np.ones((17, 1))], 1)
    moved = base.copy()
    moved[:, :2] += 300
    near = base.copy()
    near[:, :2] += 0.5
    db = [{"keypoints": base, "score": 0.8, "area": 5000.0},
          {"keypoints": near, "score": 0.9, "area": 5000.0},
          {"keypoints": moved, "score": 0.7, "area": 5000.0}]
    assert oks_nms(db, thresh=0.9) == [1, 2]
    # A moderately shifted pose survives a loose threshold and is suppressed once the threshold
    # drops below its OKS.
    mid = base.copy()
    mid[:, :2] += 4.0
    mid_oks = oks_iou(base, mid[None], 5000.0, [5000.0])[0]
    assert 0.2 < mid_oks < 0.9
    db = [db[0], {"keypoints": mid, "score": 0.5, "area": 5000.0}]
    assert oks_nms(db, thresh=mid_oks + 0.01) == [0, 1]
    assert oks_nms(db, thresh=mid_oks - 0.01) == [0]
    assert oks_nms([]) == []
    assert len(COCO_SIGMAS) == 17


# --------------------------------------------------------------------------------------------------
#   PCKh

def synthetic_mpii(n=2):
    """n persons, every joint at (101, 101) 1-based, head box 30x40 -> diagonal 50, head size 0.6*50
    = 30 px."""
    return {"pos_gt_src": np.full((16, 2, n), 101.0), "jnt_missing": np.zeros((16, n)),
            "headboxes_src": np.stack([np.zeros((2, n)),
                                       np.stack([np.full(n, 30.0), np.full(n, 40.0)])])}


def test_pckh_hand_computed():
    gt = synthetic_mpii()
    preds = np.full((2, 16, 2), 100.0)           # 0-based: exactly on the 1-based ground truth
    # r_ankle: 15 px = 0.5 x 30 exactly -> correct (`<=`)
    preds[0, 0] += [9.0, 12.0]
    preds[0, 1] += [15.0 + 1e-9, 0.0]            # r_knee: just beyond the threshold -> wrong
    gt["jnt_missing"][5, 1] = 1                  # l_ankle of person 1 is not annotated ...
    preds[1, 5] += 1000.0                        # ... so its bad prediction is ignored
    preds[:, 6:8] += 500.0                       # pelvis and thorax wrong, but outside the mean
    preds[1, 9] += [0.0, 20.0]                   # head top wrong for person 1
    r = mpii_pckh(preds, gt)
    assert r["per_joint"][0] == 100.0 and r["per_joint"][1] == 50.0 and r["per_joint"][5] == 100.0
    assert r["per_joint"][6] == 0.0 and r["per_joint"][7] == 0.0
    assert r["Ankle"] == 100.0 and r["Knee"] == 75.0 and r["Head"] == 75.0 and r["Wrist"] == 100.0
    # 14 joints x 2 persons - 1 missing = 27 counted; r_knee and head top wrong -> 25 correct.
    assert r["Mean"] == pytest.approx(100 * 25 / 27)
    # At 0.1 (3 px) the 15 px r_ankle fails as well.
    assert r["Mean@0.1"] == pytest.approx(100 * 24 / 27)


def test_pckh_index_selects_columns():
    gt = synthetic_mpii(3)
    # column 2 elsewhere: only correct if index picks it
    gt["pos_gt_src"][:, :, 2] += 50.0
    preds = np.full((1, 16, 2), 150.0)
    assert mpii_pckh(preds, gt, index=[2])["Mean"] == 100.0
    assert mpii_pckh(preds, gt, index=[0])["Mean"] == 0.0
    with pytest.raises(UserError, match="shape"):
        mpii_pckh(preds, gt)


def test_load_mpii_gt_errors(tmp_path):
    with pytest.raises(UserError, match="absent.mat"):
        load_mpii_gt(str(tmp_path / "absent.mat"))
    scipy.io.savemat(tmp_path / "partial.mat", {"pos_gt_src": np.zeros((16, 2, 3))})
    with pytest.raises(UserError, match="partial.mat.*jnt_missing"):
        load_mpii_gt(str(tmp_path / "partial.mat"))


@needs_shared
def test_mpii_real_gt_subset_is_100():
    gt = load_mpii_gt(str(MPII_MAT))
    annotations = json.loads(MPII_ANN.read_text())
    index = match_mpii_gt(annotations, gt)
    # PROVENANCE: the sample persons are validation entries 0-2
    assert index.tolist() == [0, 1, 2]
    preds = np.array([a["joints"] for a in annotations]) - 1.0  # our reader's 0-based coordinates
    r = mpii_pckh(preds, gt, index)
    assert all(r[k] == 100.0 for k in ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle",
                                       "Mean"))
    annotations[1]["joints"][3][0] += 40.0        # moved person: no column matches any more
    with pytest.raises(UserError, match="person 1"):
        match_mpii_gt(annotations, gt)


@needs_shared
def test_mpii_real_old_predictions():
    gt = load_mpii_gt(str(MPII_MAT))
    pos_pred_src = scipy.io.loadmat(MPII_MAT)["pos_pred_src"]      # 1-based, (16, 2, 2958)
    r = mpii_pckh(np.transpose(pos_pred_src, (2, 0, 1)) - 1.0, gt)
    assert 50 < r["Mean"] < 100
    # value recorded in PROVENANCE.md
    assert round(r["Mean"], 2) == 82.34


@needs_shared
def test_mpii_cli_subset_json(tmp_path):
    annotations = json.loads(MPII_ANN.read_text())
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([(np.array(a["joints"]) - 1.0).tolist() for a in annotations]))
    out = tmp_path / "pckh.json"
    proc = run_cli("eval.mpii", "--preds", str(preds), "--gt-mat", str(MPII_MAT), "--ann",
                   str(MPII_ANN), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if "Head" in line)
    assert header.split("|")[1:-1] == [f" {n:>6} "
                                       for n in ("Head", "Shoulder", "Elbow", "Wrist", "Hip",
                                                 "Knee", "Ankle", "Mean", "Mean@0.1")]
    assert json.loads(out.read_text())["Mean"] == 100.0


def test_mpii_cli_missing_gt(tmp_path):
    missing = tmp_path / "missing_gt.mat"
    proc = run_cli("eval.mpii", "--preds", str(tmp_path / "p.json"), "--gt-mat", str(missing))
    assert proc.returncode == 2
    assert (proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
            and str(missing) in proc.stderr)


# --------------------------------------------------------------------------------------------------
#   PCK torso (MRPose Eq. 3)

def pck_torso(pred, gt, visible, thr=0.2, rhip=12, lsho=5):
    """PCK with r = thr: joint i is correct when ||y_i - y^_i|| / ||y_rhip - y_lsho|| <= thr.

    pred, gt: (N,K,2); visible: (N,K) bool, joints to score. Defaults are COCO indices (right hip
    12, left shoulder 5). Samples whose torso is not annotated (either joint invisible, or zero
    length) cannot be normalised and are skipped. Returns (per_joint (K,) percent, mean percent over
    all counted joints); NaN where nothing counted."""
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    torso = np.linalg.norm(gt[:, rhip] - gt[:, lsho], axis=-1)                   # (N,)
    usable = visible[:, rhip] & visible[:, lsho] & (torso > 0)
    counted = visible & usable[:, None]
    dist = np.linalg.norm(pred - gt, axis=-1) / np.where(usable, torso, 1.0)[:, None]
    hits = (dist <= thr) & counted
    with np.errstate(invalid="ignore", divide="ignore"):
        per_joint = 100.0 * hits.sum(0) / counted.sum(0)
        mean = 100.0 * hits.sum() / counted.sum()
    return per_joint, float(mean)


def test_pck_torso_hand_computed():
    # torso = |(0,0)-(3,4)| = 5 -> threshold 0.2*5 = 1 px
    gt = np.array([[[0.0, 0.0], [3.0, 4.0], [10.0, 10.0]],
                   [[0.0, 0.0], [3.0, 4.0], [10.0, 10.0]]])
    pred = gt.copy()
    pred[0, 0] += [0.6, 0.8]                                # exactly 1 px -> correct
    pred[0, 1] += [1.1, 0.0]                                # 1.1 px -> wrong
    pred[0, 2] += [50.0, 0.0]                               # far, but not visible -> ignored
    visible = np.array([[True, True, False],
                        # sample 1 has no right hip: cannot be normalised
                        [False, True, True]])
    per_joint, mean = pck_torso(pred, gt, visible, thr=0.2, rhip=0, lsho=1)
    assert per_joint[0] == 100.0 and per_joint[1] == 0.0 and np.isnan(per_joint[2])
    assert mean == 50.0


# --------------------------------------------------------------------------------------------------
#   Keypoint recall (ICON Table 6)

def test_keypoint_recall_counts_visible_joints_only():
    conf = np.array([[0.95, 0.35, 0.05], [0.55, 0.99, 0.75]])
    flags = np.array([[2, 2, 1], [2, 0, 2]])
    r = keypoint_recall(conf, flags, 2)
    assert r["0.1"] == 1.0 and r["0.5"] == 0.75 and r["0.6"] == 0.5 and r["0.9"] == 0.25
    # per joint: joint 2 counts from flag 1
    r = keypoint_recall(conf, flags, np.array([2, 2, 1]))
    assert r["0.1"] == 0.8 and r["0.9"] == 0.2

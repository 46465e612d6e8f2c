"""Pose-estimation metrics: COCO OKS-AP (via pycocotools), OKS-NMS, MPII PCKh, CrowdPose AP and
ICON's keypoint recall.

Conventions (coordinates are pixels of the original image):
- COCO ground truth and results use COCO's own convention (continuous, 0-based); nothing is shifted.
- MPII: `.mat` ground truth (`pos_gt_src`, `headboxes_src`) is MATLAB 1-based. Predictions passed to
  `mpii_pckh` are 0-based (what our MPII reader produces after subtracting 1 from the 1-based
  annotations, as HRNet does); the evaluator adds 1 back before comparing, exactly like
  HRNet/SimpleBaseline's `MPIIDataset.evaluate`.
- HRNet-format `valid.json` annotations (`joints`) are 1-based, i.e. directly comparable with
  `pos_gt_src`.
"""
import contextlib
import io
import os

import numpy as np
import scipy.io
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common.datasets import CROWDPOSE_SIGMAS, check_crowdpose, load_coco, load_crowdpose
from common.utils import UserError, load_json

# --------------------------------------------------------------------------------------------------
# COCO keypoint AP

# Official per-keypoint OKS sigmas (pycocotools' default kpt_oks_sigmas), order nose, eyes, ears,
# shoulders, elbows, wrists, hips, knees, ankles (left before right).
COCO_SIGMAS = (np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87,
                         .87, .89, .89]) / 10.0)

COCO_STAT_NAMES = ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]


def load_results(results, coco_gt, num_joints):
    """Keypoint results (a list, or a path to a json list) checked against the ground truth, so that
    a malformed entry is a one-line error naming the source instead of an assertion deep inside
    pycocotools' loadRes."""
    where = "results"
    if not isinstance(results, list):
        where = os.fspath(results)
        results = load_json(where, "results")
        if not isinstance(results, list):
            raise UserError(f"{where}: results must be a JSON list of COCO result dicts")
    fields = {"image_id", "category_id", "keypoints", "score"}
    malformed = [r for r in results if not isinstance(r, dict) or not fields <= set(r)]
    if malformed:
        raise UserError(f"{where}: every result needs {', '.join(sorted(fields))}; found "
                        f"{str(malformed[0])[:80]}")
    bad = [r for r in results if len(r["keypoints"]) != 3 * num_joints]
    if bad:
        raise UserError(f"{where}: image {bad[0]['image_id']} has a keypoints list of length "
                        f"{len(bad[0]['keypoints'])}, expected {3 * num_joints} ({num_joints} "
                        f"joints x 3)")
    unknown = {r["image_id"] for r in results} - set(coco_gt.getImgIds())
    if unknown:  # loadRes would only assert, without saying which image
        raise UserError(f"{where}: image_id {sorted(unknown)[0]} is not in the ground truth")
    return results


def coco_keypoint_eval(gt, results, sigmas=None, verbose=True):
    """OKS keypoint AP/AR with pycocotools' COCOeval.

    gt: path to a COCO keypoint annotation json or a pycocotools COCO object.
    results: list of {image_id, category_id, keypoints (3K flat), score} or a path to such a json.
    sigmas: per-keypoint OKS sigmas (default COCO_SIGMAS); required when K != 17 (e.g. CrowdPose).
    Returns {AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl} as floats in [0, 1].
    """
    coco_gt = gt if isinstance(gt, COCO) else load_coco(gt)
    sigmas = COCO_SIGMAS if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    results = load_results(results, coco_gt, len(sigmas))
    if not results:  # loadRes indexes results[0]; an empty submission simply scores zero
        return {name: 0.0 for name in COCO_STAT_NAMES}

    # loadRes writes 'area', 'bbox', 'id' into each dict: copy so the caller's list stays untouched.
    results = [dict(r) for r in results]
    # pycocotools' progress lines ("Loading and preparing results... index created!") say nothing a
    # user can act on: silenced; verbose keeps the summary table
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "keypoints")
        coco_eval.params.kpt_oks_sigmas = sigmas
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
        coco_eval.summarize()
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, coco_eval.stats)}


# --------------------------------------------------------------------------------------------------
# OKS non-maximum suppression (SimpleBaseline/HRNet lib/nms/nms.py)

def oks_iou(g, d, area_g, area_d, sigmas=None, vis_thresh=None):
    """OKS between one pose g (K,3) and candidates d (M,K,3) -> (M,).

    As in HRNet's NMS (not COCOeval): the scale is the mean of the two areas, and all K joints count
    unless vis_thresh is given, in which case only joints with confidence > vis_thresh in BOTH poses
    count (HRNet's `list(vg > t) and list(vd > t)` actually keeps only the candidate's mask; its
    COCO evaluation never passes t).
    """
    sigmas = COCO_SIGMAS if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
    d = np.asarray(d, dtype=np.float64).reshape(len(area_d), len(g), 3)
    variances = (2 * sigmas) ** 2
    sq_dist = ((d[:, :, :2] - g[None, :, :2]) ** 2).sum(-1)                      # (M, K)
    scale = (area_g + np.asarray(area_d, dtype=np.float64))[:, None] / 2 + np.spacing(1)
    e = sq_dist / variances / scale / 2
    if vis_thresh is None:
        mask = np.ones_like(e, dtype=bool)
    else:
        mask = (g[None, :, 2] > vis_thresh) & (d[:, :, 2] > vis_thresh)
    count = mask.sum(1)
    return np.where(count > 0, (np.exp(-e) * mask).sum(1) / np.maximum(count, 1), 0.0)


def oks_nms(kpts_db, thresh=0.9, sigmas=None, vis_thresh=None):
    """Greedy NMS on poses: keep the best-scoring pose, drop every other with OKS > thresh, repeat.

    kpts_db: list of {'keypoints': (K,3), 'score': float, 'area': float}. Returns kept indices, best
    score first.
    """
    if not kpts_db:
        return []
    scores = np.array([p["score"] for p in kpts_db], dtype=np.float64)
    kpts = np.stack([np.asarray(p["keypoints"], dtype=np.float64).reshape(-1, 3) for p in kpts_db])
    areas = np.array([p["area"] for p in kpts_db], dtype=np.float64)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(int(i))
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, vis_thresh)
        order = order[1:][ovr <= thresh]
    return keep


# --------------------------------------------------------------------------------------------------
# MPII PCKh (the official evaluation as ported in SimpleBaseline/HRNet lib/dataset/mpii.py)

# Rows of the papers' PCKh table: each is the unweighted mean of the listed joints' PCKh, as the
# official table.
MPII_GROUPS = {"Head": (9, 8), "Shoulder": (13, 12), "Elbow": (14, 11), "Wrist": (15, 10),
               "Hip": (3, 2), "Knee": (4, 1), "Ankle": (5, 0)}
MPII_NOT_IN_MEAN = (6, 7)  # pelvis and thorax: not part of the benchmark's mean
MPII_SC_BIAS = 0.6         # head size = 0.6 x head-box diagonal (the official normaliser)
MPII_TABLE = list(MPII_GROUPS) + ["Mean", "Mean@0.1"]


def load_mpii_gt(mat_path):
    """Read an MPII gt_valid.mat-style file -> dict(pos_gt_src (16,2,N), jnt_missing (16,N),
    headboxes_src (2,2,N)).

    All coordinates are MATLAB 1-based; jnt_missing is 1 for joints that were not annotated."""
    if not os.path.isfile(mat_path):
        raise UserError(f"{mat_path}: MPII ground-truth .mat not found")
    try:
        mat = scipy.io.loadmat(mat_path)
    except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise UserError(f"{mat_path}: cannot read as a .mat file ({e})") from None
    expected = {"pos_gt_src": (16, 2), "jnt_missing": (16,), "headboxes_src": (2, 2)}
    for key in expected:
        if key not in mat:
            raise UserError(f"{mat_path}: key '{key}' missing (expected the gt_valid.mat layout)")
    gt = {key: np.asarray(mat[key], dtype=np.float64) for key in expected}
    n = gt["pos_gt_src"].shape[-1]
    for key, lead in expected.items():
        if gt[key].shape != lead + (n,):
            raise UserError(f"{mat_path}: '{key}' has shape {gt[key].shape}, expected "
                            f"{lead + (n,)}")
    return gt


def mpii_pckh(preds, gt, index=None):
    """PCKh table of `preds` (M,16,2), 0-based pixels, against the .mat columns `index` (M,) (None =
    all N, in order).

    Returns {Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle, Mean, Mean@0.1} in percent plus
    'per_joint' (16 PCKh@0.5 values, NaN for a joint with no annotated instance in the subset)."""
    preds = np.asarray(preds, dtype=np.float64)
    index = np.arange(gt["pos_gt_src"].shape[-1]) if index is None else np.asarray(index)
    if preds.shape != (len(index), 16, 2):
        raise UserError(f"predictions have shape {preds.shape}, expected ({len(index)}, 16, 2)")
    pos_gt = gt["pos_gt_src"][:, :, index]                                 # (16, 2, M), 1-based
    visible = gt["jnt_missing"][:, index] == 0                             # (16, M)
    boxes = gt["headboxes_src"][:, :, index]
    headsize = MPII_SC_BIAS * np.linalg.norm(boxes[1] - boxes[0], axis=0)  # (M,)
    # 0-based -> 1-based, like HRNet
    pos_pred = np.transpose(preds, (1, 2, 0)) + 1.0
    scaled_err = np.linalg.norm(pos_pred - pos_gt, axis=1) / headsize      # (16, M)

    count = visible.sum(1)
    in_mean = np.ones(16, dtype=bool)
    in_mean[list(MPII_NOT_IN_MEAN)] = False

    def pck(thr):
        # `<=` as in the official code: a prediction exactly at thr x head size is correct.
        hits = ((scaled_err <= thr) & visible).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_joint = 100.0 * hits / count
            # The official mean weights each joint's PCKh by its share of annotated joints
            # (jnt_ratio), which equals all hits over all annotated joints, pelvis and thorax
            # excluded.
            mean = 100.0 * hits[in_mean].sum() / count[in_mean].sum()
        return per_joint, mean

    per_joint, mean = pck(0.5)
    _, mean_01 = pck(0.1)
    table = {name: float(np.mean(per_joint[list(joints)])) for name, joints in MPII_GROUPS.items()}
    table.update({"Mean": float(mean), "Mean@0.1": float(mean_01), "per_joint": per_joint.tolist()})
    return table


def match_mpii_gt(annotations, gt, tol=1.0):
    """Column of the .mat for each person of an HRNet-format valid.json list -> (M,) int array.

    A person matches the column whose annotated joints have the same missing pattern and lie within
    `tol` pixels (both 1-based: valid.json stores the MATLAB coordinates). Lets a subset of the
    validation split be evaluated."""
    pos_gt = np.transpose(gt["pos_gt_src"], (2, 0, 1))  # (N, 16, 2)
    annotated = gt["jnt_missing"].T == 0                 # (N, 16)
    index = np.empty(len(annotations), dtype=np.int64)
    for i, person in enumerate(annotations):
        joints = np.asarray(person["joints"], dtype=np.float64)
        vis = np.asarray(person["joints_vis"]) > 0
        same_pattern = (annotated == vis).all(1)
        # Largest joint error over the annotated joints; columns with another missing pattern are
        # ruled out.
        err = np.where(vis, np.linalg.norm(pos_gt - joints, axis=2), 0.0).max(1)
        err[~same_pattern] = np.inf
        best = int(err.argmin())
        if err[best] > tol:
            raise UserError(f"person {i} ({person.get('image', '?')}): no ground-truth column "
                            f"within {tol} px (closest {err[best]:.2f} px)")
        index[i] = best
    return index


# --------------------------------------------------------------------------------------------------
# CrowdPose AP: the numbers of the official crowdposetools (Jeff-sjtu/CrowdPose crowdpose-api), with
# pycocotools. crowdposetools is pycocotools' COCOeval with: CrowdPose sigmas, OKS area = 0.53 x GT
# box w x h (set on the GT by load_crowdpose / check_crowdpose), maxDets 20, only the 'all' area row
# reported, and AP per crowd-index split.

CROWDPOSE_STAT_NAMES = ["AP", "AP50", "AP75", "AR", "AR50", "AR75", "AP_easy", "AP_medium",
                        "AP_hard"]
# crowdposetools' summarize calls get_type_result(first=0.2, second=0.8): easy < 0.2 <= medium < 0.8
# <= hard, in every commit. ICON's text says easy 0-0.1, medium 0.1-0.8; the published CrowdPose
# numbers come from the toolkit.
CROWD_EASY, CROWD_HARD = 0.2, 0.8


def crowd_split(coco_gt, easy=CROWD_EASY, hard=CROWD_HARD):
    """Image ids of the easy / medium / hard CrowdPose subsets by crowd index (crowdposetools'
    split())."""
    split = {"easy": [], "medium": [], "hard": []}
    for img in coco_gt.dataset["images"]:
        c = img["crowdIndex"]
        split["easy" if c < easy else "medium" if c < hard else "hard"].append(img["id"])
    return split


def crowdpose_eval(gt, results, verbose=True, easy=CROWD_EASY, hard=CROWD_HARD):
    """CrowdPose keypoint AP/AR as crowdposetools computes them.

    gt: path to a CrowdPose json or a pycocotools COCO object of one (its areas are set to the OKS
    area). results: list of {image_id, category_id, keypoints (42 flat), score} or a path to such a
    json. Returns {AP, AP50, AP75, AR, AR50, AR75, AP_easy, AP_medium, AP_hard} as floats in [0, 1];
    AP_<split> is rounded to 4 places and is -1 for a split without ground truth, as the toolkit
    reports them."""
    if isinstance(gt, COCO):
        check_crowdpose(gt.dataset, "ground truth")
        coco_gt = gt
    else:
        coco_gt = load_crowdpose(gt)
    results = load_results(results, coco_gt, len(CROWDPOSE_SIGMAS))
    if not results:  # loadRes indexes results[0]; an empty submission scores zero
        return {name: 0.0 for name in CROWDPOSE_STAT_NAMES}

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress lines
        # loadRes writes into the dicts: copies
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        coco_eval = COCOeval(coco_gt, coco_dt, "keypoints")
    p = coco_eval.params
    p.kpt_oks_sigmas = np.array(CROWDPOSE_SIGMAS)
    p.maxDets = [20]
    # the toolkit also runs medium/large but reports only 'all'
    p.areaRng, p.areaRngLbl = [[0, 1e5 ** 2]], ["all"]

    def evaluate(image_ids):
        """(T, R, K) precision and (T, K) recall over `image_ids` at area 'all', 20 detections."""
        p.imgIds = image_ids
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        return coco_eval.eval["precision"][..., 0, 0], coco_eval.eval["recall"][..., 0, 0]

    # COCOeval.summarize: the mean over the settings that have ground truth (-1 marks none)
    def mean(s):
        return float(s[s > -1].mean()) if (s > -1).any() else -1.0

    precision, recall = evaluate(sorted(coco_gt.getImgIds()))
    t50, t75 = np.isclose(p.iouThrs, 0.5), np.isclose(p.iouThrs, 0.75)
    stats = {"AP": mean(precision), "AP50": mean(precision[t50]), "AP75": mean(precision[t75]),
             "AR": mean(recall), "AR50": mean(recall[t50]), "AR75": mean(recall[t75])}
    for name, image_ids in crowd_split(coco_gt, easy, hard).items():
        # get_type_result: np.mean over the whole precision array (so -1 if the split has no ground
        # truth), rounded
        stats[f"AP_{name}"] = round(float(np.mean(evaluate(image_ids)[0])), 4)
    if verbose:  # the toolkit's table
        for name, value in stats.items():
            kind = "Average Precision  (AP)" if name.startswith("AP") else "Average Recall     (AR)"
            iou = {"50": "0.50", "75": "0.75"}.get(name[2:], "0.50:0.95")
            row = f"type={name[3:]:>6s}" if "_" in name else "area=   all"
            print(f" {kind} @[ IoU={iou:<9} | {row} | maxDets= 20 ] = {value:0.3f}")
    return stats


# --------------------------------------------------------------------------------------------------
# Keypoint recall (ICON Table 6)

RECALL_THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def keypoint_recall(conf, flags, visible_flag, thresholds=RECALL_THRESHOLDS):
    """Share of visible GT keypoints (raw flag >= visible_flag, a number or one per joint) whose
    predicted confidence (heatmap maximum) exceeds t, per threshold t."""
    vis = flags >= visible_flag
    return {f"{t:.1f}": float((conf[vis] > t).mean()) if vis.any() else float("nan")
            for t in thresholds}

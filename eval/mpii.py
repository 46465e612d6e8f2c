"""MPII PCKh evaluation (official rule: head size = 0.6 x head-box diagonal, correct when dist <=
thr x head size).

    python -m eval.mpii --preds pred.mat --gt-mat gt_valid.mat [--ann valid.json] [--out
    metrics.json]

Coordinate conventions of --preds:
  .mat   key 'preds' (M,16,2[+]) in 1-BASED MATLAB pixels: HRNet/SimpleBaseline's pred.mat
         (their evaluate() adds 1 to the 0-based predictions before saving).
  .json list of M per-person 16x2 lists ([x, y], extra columns ignored) in 0-BASED pixels (our own
  output).
Joints are in MPII order (r_ankle ... l_wrist). Without --ann the predictions must cover every
column of --gt-mat in order; with --ann (HRNet valid.json, 1-based joints) person i of the file is
matched to its .mat column, so a subset of the validation split can be evaluated.
"""
import argparse
import os

import numpy as np
import scipy.io

from common.datasets import check_mpii_person
from common.metrics import MPII_TABLE, load_mpii_gt, match_mpii_gt, mpii_pckh
from common.utils import UserError, load_json, run_main, save_json


def load_preds(path):
    """Predictions as (M,16,2) 0-based pixels, whichever of the two formats `path` is."""
    if path.endswith(".mat"):
        if not os.path.isfile(path):
            raise UserError(f"{path}: predictions not found")
        try:
            mat = scipy.io.loadmat(path)
        except (ValueError, OSError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
            raise UserError(f"{path}: cannot read as a .mat file ({e})") from None
        if "preds" not in mat:
            raise UserError(f"{path}: key 'preds' missing (expected HRNet's pred.mat)")
        preds, base = mat["preds"], 1
    elif path.endswith(".json"):
        preds, base = load_json(path, "predictions"), 0
    else:
        raise UserError(f"{path}: predictions must be a .mat or a .json file")
    try:
        preds = np.asarray(preds, dtype=np.float64)
    except ValueError:
        raise UserError(f"{path}: predictions are not a regular M x 16 x 2 array") from None
    if preds.ndim != 3 or preds.shape[1] != 16 or preds.shape[2] < 2:
        raise UserError(f"{path}: predictions have shape {preds.shape}, expected (M, 16, 2)")
    return preds[:, :, :2] - base


def format_table(metrics):
    """Markdown table with the papers' columns."""
    widths = [max(len(name), 6) for name in MPII_TABLE]  # 6 = len("100.00")
    header = "| " + " | ".join(f"{name:>{w}}" for name, w in zip(MPII_TABLE, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    row = ("| " + " | ".join(f"{metrics[name]:>{w}.2f}" for name,
                             w in zip(MPII_TABLE, widths)) + " |")
    return "\n".join([header, rule, row])


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preds", required=True,
                        help="pred.mat (1-based, key 'preds') or .json (0-based)")
    parser.add_argument("--gt-mat", required=True,
                        help="gt_valid.mat (pos_gt_src, jnt_missing, headboxes_src)")
    parser.add_argument("--ann", help="HRNet valid.json listing the persons the predictions belong "
                                      "to")
    parser.add_argument("--out", help="write the metrics dict here as JSON")
    args = parser.parse_args()

    gt = load_mpii_gt(args.gt_mat)
    preds = load_preds(args.preds)
    index = None
    if args.ann:
        annotations = load_json(args.ann, "MPII annotations")
        if not isinstance(annotations, list):
            raise UserError(f"{args.ann}: not an MPII annotation list in the HRNet format")
        for i, person in enumerate(annotations):  # the matching reads these two
            check_mpii_person(person, i, args.ann, keys=("joints", "joints_vis"))
        if len(annotations) != len(preds):
            raise UserError(f"{args.ann}: {len(annotations)} persons but {len(preds)} predictions "
                            f"in {args.preds}")
        index = match_mpii_gt(annotations, gt)
    elif len(preds) != gt["pos_gt_src"].shape[-1]:
        raise UserError(f"{args.preds}: {len(preds)} predictions but {gt['pos_gt_src'].shape[-1]} "
                        f"persons in {args.gt_mat} (pass --ann to evaluate a subset)")

    metrics = mpii_pckh(preds, gt, index)
    print(f"PCKh@0.5 on {len(preds)} persons")
    print(format_table(metrics))
    if args.out:
        save_json(args.out, metrics)


if __name__ == "__main__":
    run_main(main)

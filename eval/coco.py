"""COCO keypoint evaluation (OKS AP with pycocotools' COCOeval).

    python -m eval.coco --gt person_keypoints_val2017.json --results preds.json [--out metrics.json]
"""
import argparse
import json

from common.metrics import coco_keypoint_eval
from common.utils import run_main, save_json


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True, help="COCO keypoint annotation json (ground truth)")
    parser.add_argument("--results", required=True,
                        help="COCO results json: list of {image_id, category_id, keypoints (3K), "
                             "score}")
    parser.add_argument("--out", help="write the metrics dict here as JSON")
    args = parser.parse_args()

    # verbose prints COCOeval's 10-line table
    metrics = coco_keypoint_eval(args.gt, args.results, verbose=True)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if args.out:
        save_json(args.out, metrics)


if __name__ == "__main__":
    run_main(main)

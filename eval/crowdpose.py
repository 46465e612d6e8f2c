"""CrowdPose keypoint evaluation: the official crowdposetools numbers (OKS AP with pycocotools'
COCOeval).

    python -m eval.crowdpose --gt crowdpose_test.json --results preds.json [--out metrics.json]

Prints the toolkit's table (AP, AP50, AP75, AR, AR50, AR75 at maxDets 20; AP easy / medium / hard by
crowd index) and its values as one JSON line.
"""
import argparse
import json

from common.metrics import CROWD_EASY, CROWD_HARD, crowdpose_eval
from common.utils import run_main, save_json


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gt", required=True,
                        help="CrowdPose annotation json (ground truth, images with crowdIndex)")
    parser.add_argument("--results", required=True,
                        help="results json: list of {image_id, category_id, keypoints (3 x 14), "
                             "score}")
    parser.add_argument("--out", help="write the metrics dict here as JSON")
    parser.add_argument("--crowd-easy", type=float, default=CROWD_EASY,
                        help="crowd index below which an image is easy (toolkit 0.2; ICON's text "
                             "says 0.1)")
    parser.add_argument("--crowd-hard", type=float, default=CROWD_HARD,
                        help="crowd index from which an image is hard")
    args = parser.parse_args()

    metrics = crowdpose_eval(args.gt, args.results, verbose=True, easy=args.crowd_easy,
                             hard=args.crowd_hard)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    if args.out:
        save_json(args.out, metrics)


if __name__ == "__main__":
    run_main(main)

"""The repository's data folder. A dataset preset (--data coco, mpii, crowdpose, imagenet) reads
data/<name> unless --data-root names another root: the dataset itself or, usually, a link to it
(`ln -s /path/to/coco data/coco`, git-ignored). data/README.md shows each layout; the demo set is
generated under data/cache (data/demo.py)."""
import os

from common.utils import UserError

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
PATH_FLAGS = ("data_root", "ann", "images", "val_ann", "val_images", "gt_mat")


def dataset_root(args, presets):
    """args.data_root as the run will read it (get_args sets it, the plan shows it); None where no
    path comes from a root. --data demo generates its data and reads no path flag, folder reads
    --images alone, a dataset every path flag of its script (--gt-mat: MPII alone); a flag that
    --data does not read is refused, not ignored. A dataset's root, --data-root or data/<name>,
    supplies each path the run reads and the command line leaves out (training: all of them;
    --eval-only: the validation set's; --summary: none). The run's start checks that it exists
    (common.plan.begin), not --dry-run or --summary."""
    flags = [f for f in PATH_FLAGS if hasattr(args, f)]

    def reads(data):
        return {"demo": [], "folder": ["images"]}.get(
            data, [f for f in flags if f != "gt_mat" or data == "mpii"])

    for f in flags:
        if getattr(args, f) is not None and f not in reads(args.data):
            flag = "--" + f.replace("_", "-")
            what = ("generates its data and reads no dataset path" if args.data == "demo"
                    else f"does not read {flag}")
            raise UserError(f"{flag} {getattr(args, f)}: --data {args.data} {what}; {flag} is read "
                            f"by --data {'|'.join(p for p in presets if f in reads(p))}")
    if args.data == "folder" and args.images is None:
        raise UserError("--data folder needs --images DIR")
    if args.data == "demo" or args.data == "folder":
        return None
    needed = [] if args.summary else [f for f in reads(args.data) if f != "data_root" and not (
        getattr(args, "eval_only", False) and f in ("ann", "images"))]
    if args.data_root is not None or all(getattr(args, f) is not None for f in needed):
        return args.data_root
    return os.path.join(DATA_DIR, args.data)

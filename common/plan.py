"""The run plan: presets resolved into every setting of a run, for the four scripts' `--dry-run`
(one JSON object; nothing read or built), OUT/args.json and `--help`'s preset tables, and the flags
every script shares (`finish_parser`) or the pose scripts share (`add_pose_eval_args`)."""
import argparse
import json
import os
from fractions import Fraction

from common import datasets, ssl
from common.dist import is_main, world_size
from common.utils import UserError, save_json

# Flags that name a file or folder, and the words that name it in a "not found" error.
PATH_FLAGS = {"data_root": "data root", "ann": "annotation file", "images": "image folder",
              "val_ann": "validation annotation file", "val_images": "validation image folder",
              "gt_mat": "MPII gt_valid.mat", "det_json": "detection file", "weights": "checkpoint",
              "teacher": "teacher checkpoint", "unlabeled_ann": "unlabeled annotation file",
              "unlabeled_images": "unlabeled image folder", "skeletons": "skeletons file",
              "pretrained": "pretrained backbone file", "resume": "checkpoint"}
POSITIVE = ("iters", "epochs", "batch_size", "crop_size", "print_freq")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """A flag's default after its help, unless the default is None (then a preset or the code
    decides, and the help says which) or the flag is a switch (its help says what it turns on or
    off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default in (None, argparse.SUPPRESS)
                or not action.option_strings or action.nargs == 0
                or isinstance(action, argparse.BooleanOptionalAction)):
            return text
        return text + " (default: %(default)s)"


def preset_table(presets, title):
    """A plain-text table: one row per setting, one column per preset (a missing value: '-')."""
    keys = list(dict.fromkeys(k for preset in presets.values() for k in preset))
    def cell(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    rows = [[title] + list(presets)] + [["--" + k.replace("_", "-")]
                                        + [cell(p.get(k, "-")) for p in presets.values()]
                                        for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def finish_parser(p, presets, protocols=None, *, out):
    """What every script's parser shares: the help's layout and epilog (the preset tables), and the
    flags that say how a job runs, not what the method computes (`out`: the --out default's
    words)."""
    p.formatter_class = HelpFormatter
    g = p.add_argument_group("running")
    g.add_argument("-j", "--workers", type=int, default=None,
                   help="data loader processes per rank, at most the CPUs available (default: the "
                        "--data preset)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the run's random draws: initialisation, sampling, augmentation")
    g.add_argument("--data-seed", type=int, default=0,
                   help="seed of the data: the generated demo set and --labeled's draw (fixed "
                        "while --seed varies a run)")
    g.add_argument("--amp", nargs="?", const="bf16", default=None,
                   choices=["auto", "none", "bf16", "fp16"],
                   help="autocast: auto (bf16 where native: CUDA, AVX512-BF16/AMX CPUs; else "
                        "fp32), none (fp32), bf16 (bare --amp) or fp16 with loss scaling (default: "
                        "fp32; the demo preset: auto)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the trained model (inductor)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available")
    g.add_argument("--summary", action="store_true", help="print parameters and GFLOPs, then exit")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the run saved in PATH (bare --resume: OUT/checkpoint.pth)")
    g.add_argument("--out", default=None, help=f"output folder (default: {out})")
    g.add_argument("--print-freq", type=int, default=20, help="iterations between progress lines")
    g.add_argument("--dry-run", action="store_true",
                   help="print the resolved run plan as one JSON object and exit (reads no data or "
                        "weights)")
    epilog = ["values of --data's presets, used where the command line gives none:",
              preset_table(presets, "--data")]
    if protocols:
        epilog += ["", "--protocol presets (on top of --data's; the command line still wins):",
                   preset_table(protocols, "--protocol")]
    p.epilog = "\n".join(epilog)


def add_pose_eval_args(p):
    """The evaluation flags of the top-down pose scripts (mrpose.py, icon.py): the validation set,
    its boxes and the checkpoint to score, read by common/topdown.py and `pose_eval`."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--val-ann", default=None,
                   help="validation annotation file (overrides --data-root)")
    g.add_argument("--val-images", default=None,
                   help="validation image folder (overrides --data-root)")
    g.add_argument("--gt-mat", default=None, help="MPII gt_valid.mat (head boxes for PCKh)")
    g.add_argument("--det-json", default=None, help="person detections for val (default: GT boxes)")
    g.add_argument("--det-thresh", type=float, default=0.0,
                   help="box score threshold for --det-json")
    g.add_argument("--no-flip-test", dest="flip_test", action="store_false",
                   help="evaluate without averaging the flipped image's heatmaps (flip test is on "
                        "by default)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="epochs between evaluations (default 1; with --iters about 2000 "
                        "iterations)")
    g.add_argument("--eval-only", action="store_true",
                   help="evaluate --weights (or a fresh model) and exit")
    g.add_argument("--weights", default=None, help="checkpoint to evaluate or start from")
    g.add_argument("--oracle", action="store_true",
                   help="evaluate the ground truth through the heatmap path")
    return g


def apply_presets(args, preset):
    """Every setting the command line left at None takes the preset's value; then the checks every
    script shares (positive counts, --resume's default path)."""
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in POSITIVE:
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} {getattr(args, k)}: must be at least 1")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 or more")
    return args


def resume_path(args):
    """--resume PATH, or OUT/checkpoint.pth for a bare --resume (None without --resume)."""
    if args.resume is True:
        return os.path.join(args.out, "checkpoint.pth")
    return args.resume or None


def init_words(pretrained):
    """Where the backbone's weights come from, in words."""
    if pretrained in (None, "none"):
        return "scratch (random initialisation)"
    if pretrained == "torchvision":
        return "torchvision ImageNet weights (downloaded on first use)"
    return f"file {pretrained}"


def cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cap_workers(args):
    """DataLoader workers per rank, at most the CPUs this process may use (more only make PyTorch
    warn and the processes compete); returns the note to print, or None."""
    n = cpus()
    if getattr(args, "workers", None) is None or args.workers <= n:
        return None
    note = f"--workers {args.workers} capped at the {n} CPUs available"
    args.workers = n
    return note


def make_plan(args, *, lr_effective, augmentation, eval=None):
    """The plan: every argparse dest after presets (tuples as lists), then the derived entries."""
    plan = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()}
    plan.update(world_size=world_size(), lr_effective=lr_effective,
                init=init_words(getattr(args, "pretrained", None)), augmentation=augmentation)
    if eval is not None:
        plan["eval"] = eval
    return plan


def check_paths(args):
    """Every file or folder named on the command line exists: a one-line error before any process
    group starts, so that under torchrun each rank stops at once (rank 0 alone prints it, see
    run_main)."""
    for key, what in PATH_FLAGS.items():
        path = (resume_path(args) if key == "resume" and hasattr(args, "resume")
                else getattr(args, key, None))
        if key == "pretrained" and path in ("torchvision", "none"):
            continue
        if isinstance(path, str) and not os.path.exists(path):
            raise UserError(f"{path}: {what} not found (--{key.replace('_', '-')})")


def begin(args, plan_fn, summary_fn=None):
    """The start of a script's main(): check the paths, cap the workers and, on rank 0, write
    OUT/args.json (a training run's: --summary and --eval-only leave the args.json of the run that
    trained OUT's model as it was). Returns True when nothing is left to run: --dry-run printed the
    plan, or --summary `summary_fn(args)`'s model size."""
    note = cap_workers(args)
    plan = plan_fn(args)
    if args.dry_run:
        print(json.dumps(plan, indent=1, ensure_ascii=False))
        return True
    check_paths(args)
    if is_main():
        if note:
            print(note)
        if not (getattr(args, "summary", False) or getattr(args, "eval_only", False)):
            save_json(os.path.join(args.out, "args.json"), plan)
    if summary_fn is not None and args.summary:
        summary_fn(args)
        return True
    return False


def pose_augmentation(args):
    """The top-down training augmentation (common.datasets.TopDownDataset), its law and factors."""
    return {"law": f"half-body with p half_body_prob (more than {datasets.HALF_BODY_MIN_JOINTS} "
                   f"labeled joints); scale x N(1, sf) clipped to 1 ± sf; with p "
                   f"{datasets.P_ROTATION} rotation N(0, rf) clipped to ±2rf, else 0; horizontal "
                   f"flip p {datasets.P_FLIP}",
            "scale_factor": args.scale_factor, "rot_factor": args.rot_factor, "flip": args.flip,
            "half_body_prob": args.half_body_prob}


def moco_v2_views(args):
    """MoCo v2's two views (common.ssl), the law and its one factor."""
    ratio = "-".join(str(Fraction(r).limit_denominator(10)) for r in ssl.CROP_RATIO)
    return {"law": f"MoCo v2 aug-plus: random resized crop (scale {ssl.CROP_SCALE[0]:g}-"
                   f"{ssl.CROP_SCALE[1]:g}, ratio {ratio}), colour jitter {ssl.JITTER} p "
                   f"{ssl.P_JITTER}, grayscale p {ssl.P_GRAY}, Gaussian blur σ "
                   f"{ssl.BLUR_SIGMA[0]:g}-{ssl.BLUR_SIGMA[1]:g} p {ssl.P_BLUR}, horizontal flip p "
                   f"{ssl.P_FLIP}",
            "crop_size": args.crop_size}


# the evaluation split of each --data without --val-ann (common.topdown.data_paths' layouts)
DEFAULT_SPLITS = {"coco": "val2017", "demo": "val2017 (generated demo)", "mpii": "valid",
                  "crowdpose": "crowdpose_test"}


def pose_eval(args):
    """What the evaluation of a pose script will use, from the arguments alone (no file is read)."""
    boxes = (f"detections {args.det_json} (score >= {args.det_thresh})" if args.det_json
             else "ground-truth boxes")
    split = (os.path.basename(args.val_ann).removesuffix(".json").removeprefix("person_keypoints_")
             if args.val_ann else DEFAULT_SPLITS.get(args.data, args.data))
    return {"boxes": boxes, "split": split, "flip_test": args.flip_test}


def pose_plan(args):
    """The plan of mrpose.py and icon.py: Adam's lr is not scaled with the batch."""
    return make_plan(args, lr_effective=args.lr, augmentation=pose_augmentation(args),
                     eval=pose_eval(args))

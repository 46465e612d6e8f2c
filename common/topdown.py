"""The top-down pipeline of the pose scripts (mrpose.py, icon.py): data for --data
demo|coco|mpii|crowdpose, the set-up of main(), the flip-test prediction, COCO results with OKS-NMS
and the official metrics, the schedule, checkpoint loading and the evaluation outputs. The scripts
keep their model, loss and training loop; `args` is the script's argparse namespace."""
import math
import os

import numpy as np
import scipy.io
import torch

from common import dist
from common.datasets import (COCO_FLIP_PAIRS, COCO_SKELETON, COCO_UPPER, CROWDPOSE_FLIP_PAIRS,
                             CROWDPOSE_SIGMAS, CROWDPOSE_SKELETON, CROWDPOSE_UPPER, MPII_FLIP_PAIRS,
                             MPII_SKELETON, MPII_UPPER, TopDownDataset, load_coco, load_crowdpose,
                             read_coco, read_mpii)
from common.devaug import JpegCrops, collate_jpeg, resolve_data_device
from common.heatmap import decode_heatmaps, flip_back, gaussian_targets
from common.metrics import (coco_keypoint_eval, crowdpose_eval, load_mpii_gt, match_mpii_gt,
                            mpii_pckh, oks_nms)
from common.plots import plot_predictions
from common.transforms import heatmap_to_image, normalize
from common.utils import (UserError, atomic_write, load_checkpoint, load_json, read_log,
                          save_checkpoint, save_json, seed_everything, write_log)
from data.demo import demo_root


# ----------------------------------------------------------------------------------------------
# Model size

def summary(model, input_size):
    """Parameters and multiply-accumulates for one input (papers call GMACs 'GFLOPs')."""
    from torch.utils.flop_counter import FlopCounterMode
    n_params = sum(p.numel() for p in model.parameters())
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size[1], input_size[0]))
    return n_params, counter.get_total_flops() / 2 / 1e9


# ----------------------------------------------------------------------------------------------
# Data

def data_paths(args):
    """Annotation files and image folders of --data: --ann/--images/--val-ann/--val-images/--gt-mat
    where given, the others in --data-root's layout (data/README.md; get_args resolved the root,
    data.dataset_root)."""
    # --data demo: the generated root the script puts here (data.demo.demo_root)
    root = args.data_root
    paths = dict.fromkeys(["train_ann", "train_images", "val_ann", "val_images", "gt_mat"])
    if root and args.data == "mpii":  # the HRNet layout
        paths.update(train_ann=os.path.join(root, "annot", "train.json"),
                     val_ann=os.path.join(root, "annot", "valid.json"),
                     train_images=os.path.join(root, "images"),
                     val_images=os.path.join(root, "images"),
                     gt_mat=os.path.join(root, "annot", "gt_valid.mat"))
    # data/README's layout; trainval to train, test to evaluate (the papers')
    elif root and args.data == "crowdpose":
        paths.update(train_ann=os.path.join(root, "annotations", "crowdpose_trainval.json"),
                     val_ann=os.path.join(root, "annotations", "crowdpose_test.json"),
                     train_images=os.path.join(root, "images"),
                     val_images=os.path.join(root, "images"))
    elif root:  # the COCO layout, images in ROOT/{split}2017 or ROOT/images/{split}2017
        for split in ("train", "val"):
            images = os.path.join(root, f"{split}2017")
            paths[f"{split}_ann"] = os.path.join(root, "annotations",
                                                 f"person_keypoints_{split}2017.json")
            paths[f"{split}_images"] = (images if os.path.isdir(images)
                                        else os.path.join(root, "images", f"{split}2017"))
    for key, flag in [("train_ann", "ann"), ("train_images", "images"), ("val_ann", "val_ann"),
                      ("val_images", "val_images"), ("gt_mat", "gt_mat")]:
        paths[key] = getattr(args, flag) or paths[key]
    return paths


def missing_root(args, paths, needed):
    """The one-line error for a root that a needed path comes from but that does not exist."""
    root = args.data_root
    if root and not os.path.isdir(root) and any(
            paths[k] and paths[k].startswith(os.path.join(root, "")) for k in needed):
        return UserError(f"{root}: data root not found (--data-root)")  # as plan.check_paths
    return None


def parse_labeled(text):
    """--labeled: N persons (int), or P% of the training persons (a float fraction; ICON's
    protocol)."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else int(text)
    except ValueError:
        raise UserError(f"--labeled {text}: expected a number of persons or a percentage (e.g. "
                        f"1000 or 5%)") from None
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise UserError(f"--labeled {text}: must be a positive count or a percentage up to 100%")
    return value


def split_labeled(records, n, seed, order="random"):
    """(labeled, the other persons) of --labeled N (or a fraction): the file's first N persons
    (`first`: Xie et al.'s official subsets), N seeded-drawn persons (`random`), or every person of
    N seeded-drawn images (`images`: MSCL's "randomly select 1K ... samples as labeled images")."""
    rng = np.random.default_rng(seed)
    if order == "images":  # an image is its file: MPII's records carry one image_id per person
        images = list(dict.fromkeys(r["image"] for r in records))
        n = round(n * len(images)) if isinstance(n, float) else n
        if n > len(images):
            raise UserError(f"--labeled {n}: only {len(images)} training images have a person with "
                            f"labeled joints")
        chosen = {images[k] for k in rng.permutation(len(images))[:n]}
        labeled = np.array([r["image"] in chosen for r in records], bool)
    else:
        n = round(n * len(records)) if isinstance(n, float) else n
        if n > len(records):
            raise UserError(f"--labeled {n}: only {len(records)} training persons have labeled "
                            f"joints")
        labeled = np.zeros(len(records), bool)
        labeled[np.arange(n) if order == "first" else rng.permutation(len(records))[:n]] = True
    return ([r for r, k in zip(records, labeled) if k],
            [r for r, k in zip(records, labeled) if not k])


def build_data(args, train):
    """(train_dataset or None, val_dataset, evaluation info) for --data."""
    aspect = args.input_size[0] / args.input_size[1]
    paths = data_paths(args)
    needed = ["val_ann", "val_images"] + (["train_ann", "train_images"] if train else []) + \
        (["gt_mat"] if args.data == "mpii" else [])
    error = missing_root(args, paths, needed)
    if error:
        raise error
    if any(paths[k] is None for k in needed):
        flags = dict(train_ann="--ann", train_images="--images", val_ann="--val-ann",
                     val_images="--val-images", gt_mat="--gt-mat")
        raise UserError(f"--data {args.data} needs --data-root (or "
                        f"{'/'.join(flags[k] for k in needed)})")
    train_records = None
    if args.data == "mpii":
        val_records, _ = read_mpii(paths["val_ann"], paths["val_images"], aspect)
        gt = load_mpii_gt(paths["gt_mat"])
        # .mat column of each kept person (the reader skips persons without labeled joints; image_id
        # = position)
        index = match_mpii_gt(load_json(paths["val_ann"]), gt)[[r["image_id"] for r in val_records]]
        info = dict(kind="mpii", gt=gt, index=index, skeleton=MPII_SKELETON)
        flip_pairs, upper = MPII_FLIP_PAIRS, MPII_UPPER
        if train:
            train_records, skipped = read_mpii(paths["train_ann"], paths["train_images"], aspect)
    elif args.data == "crowdpose":
        coco = load_crowdpose(paths["val_ann"])
        val_records, _ = read_coco(coco, paths["val_images"], aspect, det_json=args.det_json,
                                   det_thresh=args.det_thresh)
        info = dict(kind="crowdpose", coco=coco, skeleton=CROWDPOSE_SKELETON,
                    # crowdpose_val, crowdpose_test
                    split=os.path.basename(paths["val_ann"]).removesuffix(".json"))
        flip_pairs, upper = CROWDPOSE_FLIP_PAIRS, CROWDPOSE_UPPER
        if train:
            train_records, skipped = read_coco(load_crowdpose(paths["train_ann"]),
                                               paths["train_images"], aspect)
    else:
        coco = load_coco(paths["val_ann"], image_info=args.det_json is not None)
        val_records, _ = read_coco(coco, paths["val_images"], aspect, det_json=args.det_json,
                                   det_thresh=args.det_thresh)
        # image_info_test-dev2017.json -> test-dev2017, person_keypoints_val2017.json -> val2017:
        # the results file name
        split = os.path.basename(paths["val_ann"]).removesuffix(".json").removeprefix(
            "person_keypoints_")
        info = dict(kind="coco", coco=coco, skeleton=COCO_SKELETON,
                    split=split.removeprefix("image_info_"))
        flip_pairs, upper = COCO_FLIP_PAIRS, COCO_UPPER
        if train:
            # persons in the file's order: `--labeled-order first` takes the first N
            coco = load_coco(paths["train_ann"])
            train_records, skipped = read_coco(coco, paths["train_images"], aspect,
                                               image_ids=[im["id"]
                                                          for im in coco.dataset["images"]])
    if train and dist.is_main():
        print(f"train: {len(train_records)} persons from {paths['train_ann']}; skipped {skipped}")
    info["unlabeled"] = []
    if train and args.labeled:
        order = getattr(args, "labeled_order", "random")
        train_records, info["unlabeled"] = split_labeled(train_records, args.labeled,
                                                         args.data_seed, order)
        if dist.is_main():
            images = len({r["image"] for r in train_records})
            print(f"--labeled {args.labeled} ({order}): {len(train_records)} persons of {images} "
                  f"images; {len(info['unlabeled'])} persons left unlabeled")
    if train and not train_records:
        raise UserError(f"{paths['train_ann']}: no trainable person (every annotation lacks "
                        f"labeled joints)")
    if not val_records:
        raise UserError(f"{paths['val_ann']}: no person to evaluate")
    val = TopDownDataset(val_records, args.input_size, flip_pairs, upper)
    # --data-device: the same items with JPEG bytes for the image (common/devaug.py)
    dataset = JpegCrops if getattr(args, "data_device", "workers") != "workers" else TopDownDataset
    train_ds = dataset(train_records, args.input_size, flip_pairs, upper, train=True,
                       scale_factor=args.scale_factor, rot_factor=args.rot_factor, flip=args.flip,
                       half_body_prob=args.half_body_prob, seed=args.seed) if train else None
    info["flip_pairs"] = flip_pairs
    return train_ds, val, info


# ----------------------------------------------------------------------------------------------
# Evaluation: flip test, decoding, back-projection, then the official metric.

@torch.no_grad()
def predict(model, dataset, args, device, info, oracle=False):
    """Image-space joints (N, K, 2) and confidences (N, K) for every sample, gathered over ranks."""
    model.eval()
    subset = torch.utils.data.Subset(dataset, dist.shard_indices(len(dataset)))
    loader = torch.utils.data.DataLoader(subset,
                                         batch_size=max(1, args.batch_size // dist.world_size()),
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    out_index, out_coords, out_conf, shown = [], [], [], None
    for batch in loader:
        x = normalize(batch["image"].to(device, non_blocking=True), bgr=getattr(args, "bgr", False))
        if oracle:  # the ground truth itself through the identical path
            heat, _ = gaussian_targets(batch["joints"], batch["visible"], args.input_size,
                                       args.heatmap_size, args.sigma)
        # fp32 even when training with --amp: the argmax, quarter offset and rescoring are sensitive
        # to bf16
        else:
            heat = model(to_memory_format(x, args)).float()
            if args.flip_test:
                flipped = flip_back(model(to_memory_format(x.flip(3), args)).float(),
                                    info["flip_pairs"])
                # the flipped map is one pixel off (HRNet's shift for the x -> W-1-x mirror)
                flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
                heat = (heat + flipped) * 0.5
        coords, conf = decode_heatmaps(heat.cpu())
        if shown is None:
            shown = (batch["image"][:8], coords[:8] * 4, conf[:8])
        out_coords.append(heatmap_to_image(coords, batch["center"], batch["scale"],
                                           args.heatmap_size))
        out_conf.append(conf)
        out_index.append(batch["index"])
    # a rank whose shard is empty (fewer samples than ranks) sends empty tensors
    k = args.num_joints
    parts = dist.gather_objects((torch.cat(out_index + [torch.zeros(0, dtype=torch.long)]),
                                 torch.cat(out_coords + [torch.zeros(0, k, 2)]),
                                 torch.cat(out_conf + [torch.zeros(0, k)])))
    index, coords, conf = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = index.argsort()
    return coords[order].numpy(), conf[order].numpy(), shown


def coco_results(records, coords, conf, in_vis_thresh=0.2, oks_thresh=0.9, sigmas=None):
    """COCO result dicts: pose score = box score x mean confidence above 0.2, OKS-NMS at 0.9 per
    image."""
    per_image = {}
    for r, xy, c in zip(records, coords, conf):
        valid = c > in_vis_thresh
        score = r["score"] * (c[valid].mean() if valid.any() else 0.0)
        per_image.setdefault(r["image_id"], []).append(
            dict(keypoints=np.concatenate([xy, c[:, None]], 1), score=float(score),
                 area=float(r["scale"].prod())))
    results = []
    for image_id, people in per_image.items():
        for i in oks_nms(people, oks_thresh, sigmas):
            results.append(dict(image_id=int(image_id), category_id=1, score=people[i]["score"],
                                keypoints=[round(float(v), 3)
                                           for v in people[i]["keypoints"].reshape(-1)]))
    return results


def evaluate(model, dataset, args, device, info, oracle=False, verbose=True):
    """Metrics dict (COCO AP... or MPII PCKh table), COCO-format results, crops for the figure."""
    coords, conf, shown = predict(model, dataset, args, device, info, oracle)
    if info["kind"] == "mpii":  # the predictions themselves are the results: pred.mat
        return mpii_pckh(coords, info["gt"], index=info["index"]), coords, shown
    if info["kind"] == "crowdpose":  # crowdposetools: its sigmas in the NMS and the metric
        results = coco_results(dataset.records, coords, conf, sigmas=CROWDPOSE_SIGMAS)
        return (crowdpose_eval(info["coco"], results) if dist.is_main() else {}), results, shown
    results = coco_results(dataset.records, coords, conf)
    # test-dev: the evaluation server scores the results file
    if "annotations" not in info["coco"].dataset:
        return {}, results, shown
    metrics = coco_keypoint_eval(info["coco"], results, verbose=verbose) if dist.is_main() else {}
    return metrics, results, shown


def validate(pose, val_ds, args, device, info, others=None, oracle=False):
    """Evaluate network 1 (`pose`, the reported one) and write its outputs; `others` (network 2, the
    ensemble of --semi dual) are scored for the log only. Returns the log entries: metrics and
    metrics_<name>."""
    metrics, results, shown = evaluate(pose, val_ds, args, device, info, oracle=oracle)
    log = {"metrics": metrics}
    for name, model in (others or {}).items():
        log[f"metrics_{name}"] = evaluate(model, val_ds, args, device, info, verbose=False)[0]
    if dist.is_main():
        write_eval_outputs(args, metrics, results, shown, info)
    return log


# ----------------------------------------------------------------------------------------------
# The set-up of a pose script's main() (mrpose.py, icon.py): process group, data, loader and
# schedule, resume

def setup(args):
    """The process group (under torchrun), this rank's seeds and --data-device: (device, the
    device that decodes the crops or None)."""
    rank, _, device = dist.setup(args.device)
    data_device = resolve_data_device(args.data_device)
    seed_everything(args.seed + rank)
    return device, data_device


def load_data(args):
    """build_data's (train or None, val, info), the demo set generated on first use (then cached
    under data/cache); rank 0 makes OUT."""
    if args.data == "demo":
        args.data_root = demo_root(args.data_seed)
    train_ds, val_ds, info = build_data(args, train=not args.eval_only)
    if dist.is_main():
        os.makedirs(args.out, exist_ok=True)
    return train_ds, val_ds, info


def train_loader(args, train_ds, device, data_device):
    """(loader, sampler, schedule) of this rank's share: --batch-size is the total over ranks. The
    schedule is (total iterations, epochs, lr milestones in iterations, evaluate every N epochs):
    --lr-steps are epochs unless --iters is given; without --eval-every, evaluation is every epoch,
    or about every 2,000 iterations under --iters."""
    world = dist.world_size()
    per_rank = args.batch_size // world
    if per_rank < 1 or per_rank * world > len(train_ds):
        raise UserError(f"--batch-size {args.batch_size} does not fit {world} ranks and "
                        f"{len(train_ds)} training persons")
    loader, sampler = dist.train_loader(train_ds, per_rank, workers=args.workers, seed=args.seed,
                                        device=device, collate_fn=collate_jpeg
                                        if data_device is not None else None)
    n = len(loader)
    total = args.iters or args.epochs * n
    milestones = [s if args.iters else s * n for s in args.lr_steps]
    eval_every = args.eval_every or (max(1, 2000 // n) if args.iters else 1)
    return loader, sampler, (total, math.ceil(total / n), milestones, eval_every)


def resume_run(args, load, total_iters, epochs, iters_per_epoch):
    """Where training starts: (epoch, iteration, best score, epochs, log entries so far). Under
    --resume, `load(path)` restores the networks and training state and returns (epoch, iteration,
    best score)."""
    if not args.resume:
        return 0, 0, -1.0, epochs, []
    epoch, it, best = load(args.resume)
    if it >= total_iters:
        raise UserError(f"{args.resume}: the run is complete ({it} of {total_iters} iterations); "
                        f"raise --iters or --epochs to train on")
    # a run stopped inside an epoch (--iters) counts that epoch as done: loop on to the new total
    epochs = max(epochs, epoch + math.ceil((total_iters - it) / iters_per_epoch))
    history = read_log(os.path.join(args.out, "log.jsonl"), epoch)
    if dist.is_main():
        print(f"resumed from {args.resume} at epoch {epoch}, iteration {it}")
    return epoch, it, best, epochs, history


# ----------------------------------------------------------------------------------------------
# Checkpoints and outputs

def to_memory_format(x, args):
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


RESNET_KEYS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")


def from_official_names(model, state):
    """A released model's state_dict in our names, or None if it has them already. The model class
    maps head prefixes (`OFFICIAL_KEYS`) and says where the released top-level ResNet keys go
    (`OFFICIAL_RESNET_PREFIX`: "backbone.", pose_resnet's; HRNet's "", its names are ours)."""
    own = model.state_dict()
    table = getattr(type(model), "OFFICIAL_KEYS", {})
    prefix = getattr(type(model), "OFFICIAL_RESNET_PREFIX", "backbone.")
    if (all(k in own for k in state) or not any(k.startswith("layer1.") for k in state)
        or (not table and not prefix)):
        return None
    renamed = {}
    for k, v in state.items():
        if k.startswith(RESNET_KEYS):
            k = prefix + k
        else:
            k = next((new + k[len(old):] for old, new in table.items() if k.startswith(old)), k)
        renamed[k] = v
    return renamed


def load_weights(model, path, state=None, flags="--arch/--backbone/--head-channels/--data"):
    """Model weights from a checkpoint (ours, a bare state_dict, or a released SimpleBaseline/
    SimMRPose/HRNet model; `state` if already loaded from `path`), or one line naming `flags` if
    they don't fit. Returns True when they had official names: SimpleBaseline/SimMRPose models,
    trained on BGR (--bgr); released HRNets load under our names and took RGB."""
    state = load_checkpoint(path) if state is None else state
    # ours, the official checkpoint.pth.tar (whose 'model' is a name)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a model checkpoint (no state_dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    official = from_official_names(model, state)
    own = model.state_dict()
    # the BatchNorm counters that files saved by PyTorch < 0.4.1 lack
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")},
             **(state if official is None else official)}
    wrong = ([k for k in own if k not in state
              or state[k].shape != own[k].shape] + [k for k in state if k not in own])
    if wrong:
        k = wrong[0]
        expected = tuple(own[k].shape) if k in own else "nothing"
        found = tuple(state[k].shape) if k in state else "nothing"
        raise UserError(f"{path}: does not fit this model ({len(wrong)} tensors differ, e.g. {k}: "
                        f"expected {expected}, found {found}; check {flags})")
    model.load_state_dict(state)
    return official is not None


def save_outputs(out, state, history, best_state=None):
    """Rank 0's files after an epoch: best.pth (the inference model) when the score improved,
    checkpoint.pth (to resume) and log.jsonl (every epoch so far)."""
    if best_state is not None:
        save_checkpoint(os.path.join(out, "best.pth"), best_state)
    save_checkpoint(os.path.join(out, "checkpoint.pth"), state)
    write_log(os.path.join(out, "log.jsonl"), history)


def print_epoch(log, epochs):
    """The epoch's line: its losses, img/s and metrics; then network 2's and the ensemble's."""
    print(f"epoch {log['epoch']}/{epochs}: "
          + "".join(f"{k} {v:.6f}, " for k, v in log.items()
                    if isinstance(v, float) and k not in ("lr", "img_per_s"))
          + f"{log['img_per_s']:.1f} img/s"
          + (f", {format_metrics(log['metrics'])}" if "metrics" in log else ""), flush=True)
    for k, v in log.items():
        if k.startswith("metrics_"):
            print(f"  {k.removeprefix('metrics_')}: {format_metrics(v)}", flush=True)


def main_metric(metrics):
    return metrics.get("AP", metrics.get("Mean", 0.0))


def format_metrics(m):
    keys = (["AP", "AP50", "AP75", "APm", "APl", "AR", "AP_easy", "AP_medium", "AP_hard"]
            if "AP" in m else
            ["Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"])
    return " ".join(f"{k} {m[k]:.4f}" if "AP" in m or "AR" in m else f"{k} {m[k]:.2f}"
                    for k in keys if k in m)


def results_file(args, info):
    """COCO's results name, person_keypoints_[split]_[alg]_results.json, as the evaluation server
    wants it; alg is the --out folder's name (the server splits the name at '_')."""
    alg = os.path.basename(os.path.normpath(args.out)).replace("_", "-")
    if info["kind"] == "crowdpose":  # no server: the annotation file's name stands for the split
        return os.path.join(args.out, f"{info['split']}_{alg}_results.json")
    return os.path.join(args.out,
                        f"person_keypoints_{info.get('split', 'val2017')}_{alg}_results.json")


def write_eval_outputs(args, metrics, results, shown, info):
    save_json(os.path.join(args.out, "metrics.json"), metrics)
    if info["kind"] == "mpii":
        # HRNet/SimpleBaseline's pred.mat: 'preds' (persons in valid.json order, 16, 2), 1-based
        # MATLAB pixels; `python -m eval.mpii --preds pred.mat --gt-mat gt_valid.mat` scores it
        atomic_write(os.path.join(args.out, "pred.mat"),
                     lambda f: scipy.io.savemat(f, {"preds": results + 1.0}))
    elif results is not None:
        save_json(results_file(args, info), results)
    if shown is not None:
        plot_predictions(os.path.join(args.out, "predictions.png"), shown[0], shown[1].numpy(),
                         shown[2].numpy(), info["skeleton"])
    if results is not None and not metrics:
        print(f"{len(results)} results for {info.get('split')} in {results_file(args, info)}: no "
              f"annotations to score them here; submit the file to the COCO evaluation server",
              flush=True)
        return
    print(("oracle " if args.oracle else "") + "val: " + format_metrics(metrics), flush=True)


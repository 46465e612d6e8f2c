"""Simple Multi-Resolution Representation Learning for Human Pose Estimation (Tran et al., 2020).

SimpleBaseline and the four multi-resolution heads of the paper (MRHeatNet1/2, MRFeaNet1/2) on a
torchvision ResNet, trained top-down with the joints MSE of Eq. (1) and evaluated with COCO OKS AP
(pycocotools) or MPII PCKh. One file: arguments, data, model, loss, DDP training, evaluation.

    python mrpose.py --data demo                                   # laptop CPU, minutes
    torchrun --nproc_per_node=4 mrpose.py --data coco --data-root /data/coco --arch mrfeanet2 \
        --backbone resnet50 --pretrained torchvision              # Table I
    python mrpose.py --data coco --data-root /data/coco --eval-only --weights runs/x/best.pth
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from common import dist
from common.backbone import ResNetFeatures, load_backbone
from common.datasets import (COCO_FLIP_PAIRS, COCO_SKELETON, COCO_UPPER, MPII_FLIP_PAIRS, MPII_SKELETON,
                             MPII_UPPER, TopDownDataset, load_coco, read_coco, read_mpii)
from common.heatmap import decode_heatmaps, flip_back, gaussian_targets, joints_mse_loss
from common.metrics import coco_keypoint_eval, load_mpii_gt, match_mpii_gt, mpii_pckh, oks_nms
from common.plots import plot_predictions
from common.transforms import heatmap_to_image, normalize
from common.utils import (Progress, UserError, autocast, check_finite, load_checkpoint, load_json, rng_state,
                          run_main, save_checkpoint, save_json, seed_everything, set_rng_state)
from data.demo import default_demo_root, make_demo

# ----------------------------------------------------------------------------------------------
# Arguments. Paper defaults (Sec. IV) per dataset; `None` means "take the preset of --data".

PRESETS = {
    # COCO: 256x192, rotation ±30°, scale ±40%, flip; Adam 1e-3, x0.1 at 120 and 150, 170 epochs
    "coco": dict(backbone="resnet50", input_size=(192, 256), epochs=170, lr_steps=(120, 150), lr=1e-3,
                 scale_factor=0.4, rot_factor=30.0, batch_size=64, workers=4, head_channels=256, channels_last=False),
    # MPII: 256x256, rotation ±30°, scale ±25%, flip; drops at 90 and 120, 140 epochs
    "mpii": dict(backbone="resnet50", input_size=(256, 256), epochs=140, lr_steps=(90, 120), lr=1e-3,
                 scale_factor=0.25, rot_factor=30.0, batch_size=64, workers=4, head_channels=256, channels_last=False),
    # demo: ResNet-18 from scratch within 10 minutes on a 2-core CPU (not a paper setting): a small input, a
    # 64-channel deconv head (1.5x faster than 256 and, from scratch on 3K persons, it learns faster), a short
    # schedule with a higher lr, no rotation (the demo people are already tilted)
    "demo": dict(backbone="resnet18", input_size=(96, 128), epochs=5, lr_steps=(3,), lr=2e-3,
                 scale_factor=0.25, rot_factor=0.0, batch_size=16, eval_every=2, workers=1, head_channels=64,
                 channels_last=True),
}
# MSCL's transfer protocol (MSCL Sec. 4.3): SimpleBaseline-R50, GT boxes, no flip test
PROTOCOLS = {
    "mscl-coco": dict(data="coco", arch="simplebaseline", backbone="resnet50", iters=36000,
                      lr_steps=(24000, 30000), flip_test=False),
    "mscl-mpii": dict(data="mpii", arch="simplebaseline", backbone="resnet50", iters=30000, input_size=(192, 256),
                      lr_steps=(15000, 21000), flip_test=False),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="simplebaseline",
                   choices=["simplebaseline", "mrheatnet1", "mrheatnet2", "mrfeanet1", "mrfeanet2"])
    p.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
    p.add_argument("--pretrained", default=None, help="'torchvision' (ImageNet, downloads) or a backbone .pth")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS), help="MSCL transfer preset")
    # data
    p.add_argument("--data", default="demo", choices=["demo", "coco", "mpii"])
    p.add_argument("--data-root", default=None)
    p.add_argument("--ann", default=None, help="training annotation file (overrides --data-root)")
    p.add_argument("--images", default=None, help="training image folder (overrides --data-root)")
    p.add_argument("--val-ann", default=None)
    p.add_argument("--val-images", default=None)
    p.add_argument("--gt-mat", default=None, help="MPII gt_valid.mat (head boxes for PCKh)")
    p.add_argument("--det-json", default=None, help="person detections for val (default: GT boxes)")
    p.add_argument("--det-thresh", type=float, default=0.0, help="box score threshold for --det-json")
    p.add_argument("--labeled", type=int, default=None, help="train on N seeded random images (few-label)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"))
    p.add_argument("--head-channels", type=int, default=None, help="deconv width C of SimpleBaseline/MRHeatNet (paper: 256)")
    p.add_argument("--sigma", type=float, default=2.0, help="Gaussian σ of the targets (heatmap pixels)")
    # augmentation
    p.add_argument("--scale-factor", type=float, default=None)
    p.add_argument("--rot-factor", type=float, default=None)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no flip augmentation")
    p.add_argument("--half-body-prob", type=float, default=0.0, help="HRNet half-body augmentation")
    # optimisation
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="iteration budget (overrides --epochs)")
    p.add_argument("--lr-steps", type=int, nargs="+", default=None, help="x0.1 at these epochs (or iterations with --iters)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (paper: 1e-3)")
    p.add_argument("--batch-size", type=int, default=None, help="total over all ranks")
    p.add_argument("--workers", type=int, default=None, help="data loader processes per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=["bf16", "fp16"])
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    # evaluation and outputs
    p.add_argument("--no-flip-test", dest="flip_test", action="store_false")
    p.add_argument("--eval-every", type=int, default=None, help="epochs between evaluations (default 1; with --iters about 2000 iterations)")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--weights", default=None, help="checkpoint to evaluate or start from")
    p.add_argument("--oracle", action="store_true", help="evaluate the ground truth through the heatmap path")
    p.add_argument("--summary", action="store_true", help="print parameters and GFLOPs, then exit")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    p.add_argument("--out", default=None)
    p.add_argument("--print-freq", type=int, default=20)
    args = p.parse_args(argv)
    if args.protocol:  # the protocol's values become defaults: flags on the command line still win
        p.set_defaults(**PROTOCOLS[args.protocol])
        args = p.parse_args(argv)
    for k, v in PRESETS[args.data].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.input_size = tuple(args.input_size)
    args.heatmap_size = (args.input_size[0] // 4, args.input_size[1] // 4)
    args.num_joints = 16 if args.data == "mpii" else 17
    args.out = args.out or os.path.join("runs", f"mrpose-{args.data}-{args.arch}-{args.backbone}")
    return args


# ----------------------------------------------------------------------------------------------
# Model (Sec. II-III, Figs. 2-4). Deconv = 4x4 transposed conv, stride 2, pad 1, no bias, BN, ReLU.
# Every combination is an element-wise sum (MRFeaNet: the mean of four maps), as the official code
# (tqtrunghnvn/SimMRPose) does; the figures leave the operator open.

def deconv(cin, cout):
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def side_conv(cin, k):
    """1x1 conv to k low-resolution heatmaps; BN + ReLU follow it in the official code."""
    return nn.Sequential(nn.Conv2d(cin, k, 1), nn.BatchNorm2d(k), nn.ReLU(inplace=True))


def bare_deconv(k):
    """Last upsampling of a heatmap branch: a transposed conv alone (official code)."""
    return nn.ConvTranspose2d(k, k, 4, stride=2, padding=1, bias=False)


class PoseNet(nn.Module):
    """Backbone + head; heads start from N(0, 0.001) weights and zero biases (SimpleBaseline)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def init_head(self):
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class SimpleBaseline(PoseNet):
    """Fig. 2: three 256-channel deconvs on C5, then a 1x1 conv to k heatmaps at 1/4 resolution."""

    def __init__(self, backbone, k, c=256):
        super().__init__(backbone)
        self.deconv1, self.deconv2, self.deconv3 = deconv(backbone.channels[3], c), deconv(c, c), deconv(c, c)
        self.final_layer = nn.Conv2d(c, k, 1)
        self.init_head()

    def forward(self, x):
        c5 = self.backbone(x)[3]
        return self.final_layer(self.deconv3(self.deconv2(self.deconv1(c5))))


class MRHeatNet1(SimpleBaseline):
    """Fig. 3a: heatmaps at 1/16 are upsampled and added to the heatmaps at 1/8; their sum is
    upsampled to 1/4 and added to the final heatmaps."""

    def __init__(self, backbone, k, c=256):
        super().__init__(backbone, k, c)
        self.side1, self.side1_up = side_conv(c, k), deconv(k, k)
        self.side2, self.side2_up = side_conv(c, k), bare_deconv(k)
        self.init_head()

    def forward(self, x):
        c5 = self.backbone(x)[3]
        d16 = self.deconv1(c5)
        d8 = self.deconv2(d16)
        h8 = self.side2(d8) + self.side1_up(self.side1(d16))  # out-of-place: autograd keeps both inputs
        return self.final_layer(self.deconv3(d8)) + self.side2_up(h8)


class MRHeatNet2(SimpleBaseline):
    """Fig. 3b: heatmaps of each deconv stage go up to 1/4 on their own and all are summed."""

    def __init__(self, backbone, k, c=256):
        super().__init__(backbone, k, c)
        self.side1 = side_conv(c, k)
        self.side1_up = nn.Sequential(deconv(k, k), bare_deconv(k))
        self.side2, self.side2_up = side_conv(c, k), bare_deconv(k)
        self.init_head()

    def forward(self, x):
        c5 = self.backbone(x)[3]
        d16 = self.deconv1(c5)
        d8 = self.deconv2(d16)
        return (self.final_layer(self.deconv3(d8)) + self.side1_up(self.side1(d16))
                + self.side2_up(self.side2(d8)))


class MRFeaNet(PoseNet):
    """Fig. 4: a deconv branch from each of C3, C4, C5 up to 1/4; the mean of the three and C2
    goes through a 1x1 conv to k heatmaps.

    MRFeaNet1 (Fig. 4a, halve=False): every deconv has C channels. MRFeaNet2 (Fig. 4b, halve=True):
    channels halve per step (8C -> 4C -> 2C -> C). C is the width of C2, as the paper defines it:
    256 for ResNet-50/101/152 (the official code's 256), 64 for ResNet-18/34, where the official
    code's fixed 256 cannot be added to a 64-channel C2 and crashes."""

    def __init__(self, backbone, k, halve):
        super().__init__(backbone)
        c = backbone.channels[0]

        def branch(cin, steps):
            layers = []
            for _ in range(steps):
                cout = cin // 2 if halve else c
                layers.append(deconv(cin, cout))
                cin = cout
            return nn.Sequential(*layers)

        self.branch3, self.branch4, self.branch5 = (branch(backbone.channels[i], i) for i in (1, 2, 3))
        self.final_layer = nn.Conv2d(c, k, 1)
        self.init_head()

    def forward(self, x):
        c2, c3, c4, c5 = self.backbone(x)
        return self.final_layer((c2 + self.branch3(c3) + self.branch4(c4) + self.branch5(c5)) / 4)


def build_model(args):
    backbone = ResNetFeatures(args.backbone, torchvision_weights=args.pretrained == "torchvision")
    report = None
    if args.pretrained not in (None, "torchvision"):
        report = load_backbone(backbone, args.pretrained)
    k = args.num_joints
    c = args.head_channels
    model = {"simplebaseline": lambda: SimpleBaseline(backbone, k, c), "mrheatnet1": lambda: MRHeatNet1(backbone, k, c),
             "mrheatnet2": lambda: MRHeatNet2(backbone, k, c), "mrfeanet1": lambda: MRFeaNet(backbone, k, halve=False),
             "mrfeanet2": lambda: MRFeaNet(backbone, k, halve=True)}[args.arch]()
    return model, report


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
    """Annotation files and image folders of --data under --data-root; --ann/--images/--val-ann/
    --val-images/--gt-mat override any of them."""
    root = args.data_root
    if args.data == "demo":
        root = default_demo_root(args.seed)
    elif root is not None and not os.path.isdir(root):
        raise UserError(f"{root}: data root not found")
    paths = dict.fromkeys(["train_ann", "train_images", "val_ann", "val_images", "gt_mat"])
    if root and args.data == "mpii":  # the HRNet layout
        paths.update(train_ann=os.path.join(root, "annot", "train.json"), val_ann=os.path.join(root, "annot", "valid.json"),
                     train_images=os.path.join(root, "images"), val_images=os.path.join(root, "images"),
                     gt_mat=os.path.join(root, "annot", "gt_valid.mat"))
    elif root:  # the COCO layout, images in ROOT/{split}2017 or ROOT/images/{split}2017
        for split in ("train", "val"):
            images = os.path.join(root, f"{split}2017")
            paths[f"{split}_ann"] = os.path.join(root, "annotations", f"person_keypoints_{split}2017.json")
            paths[f"{split}_images"] = images if os.path.isdir(images) else os.path.join(root, "images", f"{split}2017")
    for key, flag in [("train_ann", "ann"), ("train_images", "images"), ("val_ann", "val_ann"),
                      ("val_images", "val_images"), ("gt_mat", "gt_mat")]:
        paths[key] = getattr(args, flag) or paths[key]
    return paths


def split_labeled(records, n, seed):
    """Few-label protocol: N images drawn with a seeded permutation; the rest is the unlabeled set."""
    image_ids = sorted({r["image_id"] for r in records})
    if n > len(image_ids):
        raise UserError(f"--labeled {n}: only {len(image_ids)} training images have labeled persons")
    perm = np.random.default_rng(seed).permutation(len(image_ids))
    labeled = {image_ids[i] for i in perm[:n]}
    return [r for r in records if r["image_id"] in labeled], sorted(set(image_ids) - labeled)


def build_data(args, train):
    """(train_dataset or None, val_dataset, evaluation info) for --data."""
    aspect = args.input_size[0] / args.input_size[1]
    if args.data == "demo":
        if dist.is_main():
            make_demo(default_demo_root(args.seed), seed=args.seed)  # generated once, then cached
        dist.barrier()
    paths = data_paths(args)
    needed = ["val_ann", "val_images"] + (["train_ann", "train_images"] if train else []) + \
        (["gt_mat"] if args.data == "mpii" else [])
    if any(paths[k] is None for k in needed):
        raise UserError(f"--data {args.data} needs --data-root (or --{'/--'.join(k.replace('_', '-') for k in needed)})")
    train_records = None
    if args.data == "mpii":
        val_records, _ = read_mpii(paths["val_ann"], paths["val_images"], aspect)
        gt = load_mpii_gt(paths["gt_mat"])
        # .mat column of each kept person (the reader skips persons without labeled joints; image_id = position)
        index = match_mpii_gt(load_json(paths["val_ann"]), gt)[[r["image_id"] for r in val_records]]
        info = dict(kind="mpii", gt=gt, index=index, skeleton=MPII_SKELETON)
        flip_pairs, upper = MPII_FLIP_PAIRS, MPII_UPPER
        if train:
            train_records, skipped = read_mpii(paths["train_ann"], paths["train_images"], aspect)
    else:
        coco = load_coco(paths["val_ann"])
        val_records, _ = read_coco(coco, paths["val_images"], aspect, det_json=args.det_json, det_thresh=args.det_thresh)
        info = dict(kind="coco", coco=coco, skeleton=COCO_SKELETON)
        flip_pairs, upper = COCO_FLIP_PAIRS, COCO_UPPER
        if train:
            train_records, skipped = read_coco(load_coco(paths["train_ann"]), paths["train_images"], aspect)
    if train and dist.is_main():
        print(f"train: {len(train_records)} persons from {paths['train_ann']}; skipped {skipped}")
    if train and args.labeled:
        train_records, unlabeled = split_labeled(train_records, args.labeled, args.seed)
        if dist.is_main():
            print(f"--labeled {args.labeled}: {len(train_records)} persons; {len(unlabeled)} images left unlabeled")
    if train and not train_records:
        raise UserError(f"{paths['train_ann']}: no trainable person (every annotation lacks labeled joints)")
    if not val_records:
        raise UserError(f"{paths['val_ann']}: no person to evaluate")
    val = TopDownDataset(val_records, args.input_size, flip_pairs, upper)
    train_ds = TopDownDataset(train_records, args.input_size, flip_pairs, upper, train=True,
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
    loader = torch.utils.data.DataLoader(subset, batch_size=max(1, args.batch_size // dist.world_size()),
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    out_index, out_coords, out_conf, shown = [], [], [], None
    for batch in loader:
        x = normalize(batch["image"].to(device, non_blocking=True))
        if oracle:  # the ground truth itself through the identical path
            heat, _ = gaussian_targets(batch["joints"], batch["visible"], args.input_size, args.heatmap_size, args.sigma)
        else:
            with autocast(args, device):
                heat = model(to_memory_format(x, args)).float()
                if args.flip_test:
                    flipped = flip_back(model(to_memory_format(x.flip(3), args)).float(), info["flip_pairs"])
                    # the flipped map is one pixel off (HRNet's shift for the x -> W-1-x mirror)
                    flipped = torch.cat([flipped[..., :1], flipped[..., :-1]], dim=-1)
                    heat = (heat + flipped) * 0.5
        coords, conf = decode_heatmaps(heat.cpu())
        if shown is None:
            shown = (batch["image"][:8], coords[:8] * 4, conf[:8])
        out_coords.append(heatmap_to_image(coords, batch["center"], batch["scale"], args.heatmap_size))
        out_conf.append(conf)
        out_index.append(batch["index"])
    k = args.num_joints  # a rank whose shard is empty (fewer samples than ranks) sends empty tensors
    parts = dist.gather_objects((torch.cat(out_index + [torch.zeros(0, dtype=torch.long)]),
                                 torch.cat(out_coords + [torch.zeros(0, k, 2)]), torch.cat(out_conf + [torch.zeros(0, k)])))
    index, coords, conf = (torch.cat([p[i] for p in parts]) for i in range(3))
    order = index.argsort()
    return coords[order].numpy(), conf[order].numpy(), shown


def coco_results(records, coords, conf, in_vis_thresh=0.2, oks_thresh=0.9):
    """COCO result dicts: pose score = box score x mean confidence above 0.2, OKS-NMS at 0.9 per image."""
    per_image = {}
    for r, xy, c in zip(records, coords, conf):
        valid = c > in_vis_thresh
        score = r["score"] * (c[valid].mean() if valid.any() else 0.0)
        per_image.setdefault(r["image_id"], []).append(
            dict(keypoints=np.concatenate([xy, c[:, None]], 1), score=float(score), area=float(r["scale"].prod())))
    results = []
    for image_id, people in per_image.items():
        for i in oks_nms(people, oks_thresh):
            results.append(dict(image_id=int(image_id), category_id=1, score=people[i]["score"],
                                keypoints=[round(float(v), 3) for v in people[i]["keypoints"].reshape(-1)]))
    return results


def evaluate(model, dataset, args, device, info, oracle=False):
    """Metrics dict (COCO AP... or MPII PCKh table), COCO-format results, crops for the figure."""
    coords, conf, shown = predict(model, dataset, args, device, info, oracle)
    if info["kind"] == "mpii":
        return mpii_pckh(coords, info["gt"], index=info["index"]), None, shown
    results = coco_results(dataset.records, coords, conf)
    metrics = coco_keypoint_eval(info["coco"], results, verbose=dist.is_main()) if dist.is_main() else {}
    return metrics, results, shown


# ----------------------------------------------------------------------------------------------
# Training helpers

def to_memory_format(x, args):
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def load_weights(model, path, state=None):
    """Model weights from a checkpoint (ours, or a bare state_dict; `state` if already loaded from `path`);
    a clear error if they don't fit."""
    state = load_checkpoint(path) if state is None else state
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a model checkpoint (no state_dict of tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    wrong = [k for k in own if k not in state or state[k].shape != own[k].shape] + [k for k in state if k not in own]
    if wrong:
        k = wrong[0]
        expected = tuple(own[k].shape) if k in own else "nothing"
        found = tuple(state[k].shape) if k in state else "nothing"
        raise UserError(f"{path}: does not fit this model ({len(wrong)} tensors differ, e.g. {k}: expected "
                        f"{expected}, found {found}; check --arch/--backbone/--head-channels/--data)")
    model.load_state_dict(state)


def check_resume_args(path, saved, args):
    """--resume continues the saved run: the model and the schedule must not change (--epochs/--iters may
    grow, which is how an interrupted run is finished)."""
    for k in ("arch", "backbone", "head_channels", "input_size", "batch_size", "lr", "lr_steps", "amp"):
        was, now = saved.get(k), getattr(args, k)
        was, now = (list(v) if isinstance(v, (list, tuple)) else v for v in (was, now))
        if k in saved and was != now:
            raise UserError(f"{path}: saved with --{k.replace('_', '-')} {was}, this run has {now}; "
                            f"resume with the same settings or use another --out")


def main_metric(metrics):
    return metrics.get("AP", metrics.get("Mean", 0.0))


def main():
    args = get_args()
    rank, world, device = dist.setup(args.device)
    main_proc = dist.is_main()
    seed_everything(args.seed + rank)
    model, report = build_model(args)
    if args.summary:
        n, gmacs = summary(model, args.input_size)
        print(f"{args.arch} {args.backbone} {args.input_size[0]}x{args.input_size[1]}, {args.num_joints} joints: "
              f"{n:,} parameters, {gmacs:.2f} GFLOPs (multiply-accumulates)")
        return
    if report and main_proc:
        print(report)
    if args.weights:
        load_weights(model, args.weights)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    train_ds, val_ds, info = build_data(args, train=not args.eval_only)
    if main_proc:
        os.makedirs(args.out, exist_ok=True)

    if args.eval_only:
        metrics, results, shown = evaluate(model, val_ds, args, device, info, oracle=args.oracle)
        if main_proc:
            write_eval_outputs(args, metrics, results, shown, info)
        dist.cleanup()
        return

    # Data: each rank sees its share of every epoch; batch size is the total over ranks.
    per_rank = args.batch_size // world
    if per_rank < 1 or per_rank * world > len(train_ds):
        raise UserError(f"--batch-size {args.batch_size} does not fit {world} ranks and {len(train_ds)} training persons")
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=per_rank, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    iters_per_epoch = len(loader)
    total_iters = args.iters or args.epochs * iters_per_epoch
    epochs = math.ceil(total_iters / iters_per_epoch)
    # lr steps are epochs unless --iters is given; the schedule itself steps every iteration
    milestones = [s if args.iters else s * iters_per_epoch for s in args.lr_steps]
    eval_every = args.eval_every or (max(1, 2000 // iters_per_epoch) if args.iters else 1)

    ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    # Adam, no weight decay (Sec. IV)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, best = 0, 0, -1.0
    ckpt_path = os.path.join(args.out, "checkpoint.pth")
    if args.resume:
        ckpt = load_checkpoint(ckpt_path)
        check_resume_args(ckpt_path, ckpt.get("args", {}), args)
        load_weights(model, ckpt_path, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, it, best = ckpt["epoch"], ckpt["iteration"], ckpt["best"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if main_proc:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}, iteration {it}")
    if main_proc:
        print(f"{args.arch} {args.backbone}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_ds)} train / {len(val_ds)} val persons; {iters_per_epoch} it/epoch x {epochs} epochs "
              f"= {total_iters} iterations on {world} x {device}")

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        model.train()
        progress = Progress(min(iters_per_epoch, total_iters - it), args.print_freq, main_proc, f"epoch {epoch + 1} ")
        loss_sum, n_iters, n_seen, t0 = torch.zeros((), device=device), 0, 0, time.time()
        for i, batch in enumerate(loader):
            if it >= total_iters:
                break
            x = to_memory_format(normalize(batch["image"].to(device, non_blocking=True)), args)
            target, weight = gaussian_targets(batch["joints"].to(device), batch["visible"].to(device),
                                              args.input_size, args.heatmap_size, args.sigma)
            with autocast(args, device):
                output = ddp_model(x)
            loss = joints_mse_loss(output.float(), target, weight)  # Eq. (1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            it += 1
            loss_sum += loss.detach()
            n_iters += 1
            n_seen += x.shape[0] * world
            if (i + 1) % args.print_freq == 0:
                mean_loss = dist.all_reduce_mean(loss.detach())  # the same on every rank: all stop together
                check_finite(mean_loss, it, ckpt_path)
                progress.step(i, args.print_freq * per_rank * world, loss=mean_loss.item(),
                              lr=optimizer.param_groups[0]["lr"])
        epoch_loss = dist.all_reduce_mean(loss_sum / max(1, n_iters))
        check_finite(epoch_loss, it, ckpt_path)
        log = dict(epoch=epoch + 1, iteration=it, loss=epoch_loss.item(), lr=optimizer.param_groups[0]["lr"],
                   img_per_s=n_seen / (time.time() - t0))
        last = it >= total_iters
        if (epoch + 1) % eval_every == 0 or last:
            dist.broadcast_buffers(model)
            metrics, results, shown = evaluate(model, val_ds, args, device, info)
            log["metrics"] = metrics
            if main_proc:
                score = main_metric(metrics)
                write_eval_outputs(args, metrics, results, shown, info)
                if score > best:
                    best = score
                    save_checkpoint(os.path.join(args.out, "best.pth"), {"model": model.state_dict(), "args": vars(args),
                                                                         "epoch": epoch + 1, "metrics": metrics})
        rngs = dist.gather_objects(rng_state())
        if main_proc:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                        "epoch": epoch + 1, "iteration": it, "best": best, "args": vars(args),
                                        "rng": rngs})
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(log) + "\n")
            print(f"epoch {epoch + 1}/{epochs}: loss {log['loss']:.6f}, {log['img_per_s']:.1f} img/s"
                  + (f", {format_metrics(log['metrics'])}" if "metrics" in log else ""), flush=True)
        if last:
            break
    dist.cleanup()


def format_metrics(m):
    keys = ["AP", "AP50", "AP75", "APm", "APl", "AR"] if "AP" in m else ["Head", "Shoulder", "Elbow", "Wrist",
                                                                        "Hip", "Knee", "Ankle", "Mean", "Mean@0.1"]
    return " ".join(f"{k} {m[k]:.4f}" if "AP" in m or "AR" in m else f"{k} {m[k]:.2f}" for k in keys if k in m)


def write_eval_outputs(args, metrics, results, shown, info):
    save_json(os.path.join(args.out, "metrics.json"), metrics)
    if results is not None:
        save_json(os.path.join(args.out, "results.json"), results)
    if shown is not None:
        plot_predictions(os.path.join(args.out, "predictions.png"), shown[0], shown[1].numpy(), shown[2].numpy(),
                         info["skeleton"])
    print(("oracle " if args.oracle else "") + "val: " + format_metrics(metrics), flush=True)


if __name__ == "__main__":
    run_main(main)

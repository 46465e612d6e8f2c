"""Simple Multi-Resolution Representation Learning for Human Pose Estimation (Tran et al., 2020).

SimpleBaseline and the four multi-resolution heads of the paper (MRHeatNet1/2, MRFeaNet1/2) on a
torchvision ResNet, trained top-down with the joints MSE of Eq. (1) and evaluated with COCO OKS AP
(pycocotools) or MPII PCKh. One file: arguments, data, model, loss, DDP training, evaluation.

    python mrpose.py --data demo                                   # laptop CPU, minutes
    torchrun --nproc_per_node=4 mrpose.py --data coco --data-root /data/coco --arch mrfeanet2 \
        --backbone resnet50 --pretrained torchvision              # Table I
    python mrpose.py --data coco --data-root /data/coco --eval-only --weights runs/x/best.pth
    python mrpose.py --data demo --labeled 300 --semi dual       # semi-supervised (common/semi.py)
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
from common.devaug import (DATA_DEVICE_HELP, DATA_DEVICES, collate_jpeg, decode_crops,
                           resolve_data_device)
from common.heatmap import gaussian_targets, joints_mse_loss
from common.plan import (apply_presets, begin, finish_parser, make_plan, pose_augmentation,
                         pose_eval, resume_path)
from common.posenet import PoseNet, SimpleBaseline, deconv
from common.semi import PairedDataset, build_semi, build_unlabeled
from common.topdown import (build_data, evaluate, format_metrics, load_weights, main_metric,
                            parse_labeled, summary, to_memory_format, write_eval_outputs)
from common.transforms import normalize
from common.utils import (AMP_CHOICES, AMP_HELP, Progress, UserError, autocast, check_finite,
                          check_resume_args, load_checkpoint, rng_state, compile_model, run_main,
                          save_checkpoint, seed_everything, set_rng_state)
from data.demo import demo_root

# ----------------------------------------------------------------------------------------------
# Arguments. Paper defaults (Sec. IV) per dataset; `None` means "take the preset of --data".

PRESETS = {
    # COCO: 256x192, flip; Adam 1e-3, x0.1 at 120 and 150, 170 epochs. Augmentation: the official
    # configs that produced Tables I/III (ROT_FACTOR 40, SCALE_FACTOR 0.3,
    # common.datasets.draw_scale_rotation); the paper's text gives the pair swapped ("rotation ±30°,
    # scale ±40%")
    "coco": dict(backbone="resnet50", input_size=(192, 256), epochs=170, lr_steps=(120, 150),
                 lr=1e-3, scale_factor=0.3, rot_factor=40.0, batch_size=64, workers=4,
                 head_channels=256, channels_last=False, pretrained="torchvision"),
    # MPII: 256x256, flip; drops at 90 and 120, 140 epochs; official config ROT_FACTOR 30,
    # SCALE_FACTOR 0.25
    "mpii": dict(backbone="resnet50", input_size=(256, 256), epochs=140, lr_steps=(90, 120),
                 lr=1e-3, scale_factor=0.25, rot_factor=30.0, batch_size=64, workers=4,
                 head_channels=256, channels_last=False, pretrained="torchvision"),
    # demo: ResNet-18 from scratch within 10 minutes on a 2-core CPU (not a paper setting): a small
    # input, a 64-channel deconv head (1.5x faster than 256 and, from scratch on 3K persons, it
    # learns faster), a short schedule with a higher lr, no rotation (the demo people are already
    # tilted)
    "demo": dict(backbone="resnet18", input_size=(96, 128), epochs=5, lr_steps=(3,), lr=2e-3,
                 scale_factor=0.25, rot_factor=0.0, batch_size=16, eval_every=2, workers=1,
                 head_channels=64, channels_last=True, pretrained="none", amp="auto"),
}
# MSCL's transfer protocol (MSCL Sec. 4.3): SimpleBaseline-R50 fine-tuned inside Xie et al.'s dual
# networks (ESCP), GT boxes, no flip test; `--semi none` is Table 1's supervised-only
# SimpleBaseline* row. Batch 128 pairs (paper silent: 36K x 128 = 30.8 epochs of COCO's 149,813
# persons, the official 1K config's 30 epochs with drops at 20/25 = 24K/30K), Xie et al.'s
# augmentation (scale 0.25, rotation 30), the official first-N-persons subsets; MPII+AIC with Joint
# Cutout 5 (the only released MPII+AIC config)
PROTOCOLS = {
    "mscl-coco": dict(data="coco", arch="simplebaseline", backbone="resnet50", iters=36000,
                      lr_steps=(24000, 30000), flip_test=False, semi="dual", batch_size=128,
                      scale_factor=0.25, rot_factor=30.0, labeled_order="first"),
    "mscl-mpii": dict(data="mpii", arch="simplebaseline", backbone="resnet50", iters=30000,
                      input_size=(192, 256), lr_steps=(15000, 21000), flip_test=False, semi="dual",
                      batch_size=128, scale_factor=0.25, rot_factor=30.0, joint_cutout=5),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="simplebaseline",
                   choices=["simplebaseline", "mrheatnet1", "mrheatnet2", "mrfeanet1", "mrfeanet2"],
                   help="pose model: SimpleBaseline (Fig. 2) or a multi-resolution head (Figs. "
                        "3-4)")
    p.add_argument("-a", "--backbone", default=None,
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                   help="the ResNet (default: the --data preset)")
    p.add_argument("--pretrained", default=None,
                   help="backbone init: 'torchvision' (ImageNet, downloads; the coco/mpii "
                   "presets, as the paper), 'none' (from scratch; the demo preset) or a backbone "
                   ".pth")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="MSCL transfer preset (second table below)")
    # data
    p.add_argument("--data", default="demo", choices=["demo", "coco", "mpii"],
                   help="dataset and its preset (table below); demo is generated, no download")
    p.add_argument("--data-root", default=None,
                   help="dataset root: COCO (annotations/, train2017/, val2017/) or "
                   "MPII (annot/, images/) layout")
    p.add_argument("--ann", default=None, help="training annotation file (overrides --data-root)")
    p.add_argument("--images", default=None, help="training image folder (overrides --data-root)")
    p.add_argument("--val-ann", default=None,
                   help="validation annotation file (overrides --data-root)")
    p.add_argument("--val-images", default=None,
                   help="validation image folder (overrides --data-root)")
    p.add_argument("--gt-mat", default=None, help="MPII gt_valid.mat (head boxes for PCKh)")
    p.add_argument("--det-json", default=None, help="person detections for val (default: GT boxes)")
    p.add_argument("--det-thresh", type=float, default=0.0,
                   help="box score threshold for --det-json")
    p.add_argument("--labeled", type=parse_labeled, default=None,
                   help="train on N persons, or P%% of them (few-label; images with "
                        "--labeled-order images)")
    p.add_argument("--labeled-order", default="random", choices=["first", "random", "images"],
                   help="--labeled takes the first N persons of the annotation file (official "
                        "subsets), a seeded draw of N persons, or every person of N seeded-drawn "
                        "images (images: MSCL's text)")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="network input width and height (default: the --data preset)")
    p.add_argument("--head-channels", type=int, default=None,
                   help="deconv width C of SimpleBaseline/MRHeatNet (paper: 256)")
    p.add_argument("--sigma", type=float, default=2.0,
                   help="Gaussian σ of the targets (heatmap pixels)")
    p.add_argument("--bgr", action=argparse.BooleanOptionalAction, default=None,
                   help="feed BGR channels as the official code does (cv2); default: on for "
                        "--weights in the official SimpleBaseline/SimMRPose names or from a --bgr "
                        "run, off otherwise")
    # semi-supervised training (common/semi.py): Xie et al.'s dual networks, one network, or ICON's
    # pseudo-labels
    p.add_argument("--semi", default=None, choices=["none", "dual", "cons", "pseudo"],
                   help="semi-supervised training: Xie et al.'s dual networks, one network's "
                        "consistency, or ICON's pseudo-labels (default: none; --protocol mscl-*: "
                        "dual)")
    p.add_argument("--unlabeled", default="all", choices=["all", "rest"],
                   help="unlabeled persons: every training person (official) or those outside "
                        "--labeled")
    p.add_argument("--unlabeled-ann", default=None,
                   help="unlabeled persons of AI Challenger instead (official or COCO-style json; "
                        "MPII + AIC)")
    p.add_argument("--unlabeled-images", default=None, help="image folder of --unlabeled-ann")
    p.add_argument("--joint-cutout", type=int, default=0,
                   help="Joint Cutout boxes per hard view (official MPII+AIC: 5)")
    p.add_argument("--teacher", default=None,
                   help="--semi pseudo: checkpoint trained on the labeled set only")
    p.add_argument("--weights2", default=None,
                   help="--semi dual: network 2's start (--weights is network 1's)")
    p.add_argument("--hard-rot-factor", type=float, default=None,
                   help="--semi dual|cons: the hard view's rotation N(0, rf) clipped to ±2rf, p "
                        "0.8 (default: --rot-factor)")
    # augmentation
    p.add_argument("--scale-factor", type=float, default=None,
                   help="sf: scale x N(1, sf) clipped to 1 ± sf (default: the --data preset)")
    p.add_argument("--rot-factor", type=float, default=None,
                   help="rf: rotation N(0, rf) clipped to ±2rf, p 0.6, degrees (default: the "
                        "--data preset)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="turn off the horizontal-flip augmentation (on by default)")
    p.add_argument("--half-body-prob", type=float, default=0.0, help="HRNet half-body augmentation")
    # optimisation
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: the --data preset)")
    p.add_argument("--iters", type=int, default=None, help="iteration budget (overrides --epochs)")
    p.add_argument("--lr-steps", type=int, nargs="+", default=None,
                   help="x0.1 at these epochs (or iterations with --iters; "
                   "default: the --data preset)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam learning rate, not scaled with the batch "
                   "(paper: 1e-3; default: the --data preset)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="total over all ranks (default: the --data preset)")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="data loader processes per rank, at most the CPUs available (default: the "
                        "--data preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--amp", nargs="?", const="bf16", default=None, choices=AMP_CHOICES,
                   help=AMP_HELP)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the trained model (inductor)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the --data preset)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available")
    p.add_argument("--data-device", default="workers", choices=DATA_DEVICES, help=DATA_DEVICE_HELP)
    # evaluation and outputs
    p.add_argument("--no-flip-test", dest="flip_test", action="store_false",
                   help="evaluate without averaging the flipped image's heatmaps (flip test is on "
                        "by default)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="epochs between evaluations (default 1; with --iters about 2000 "
                        "iterations)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate --weights (or a fresh model) and exit")
    p.add_argument("--weights", default=None, help="checkpoint to evaluate or start from")
    p.add_argument("--oracle", action="store_true",
                   help="evaluate the ground truth through the heatmap path")
    p.add_argument("--summary", action="store_true", help="print parameters and GFLOPs, then exit")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="continue the run saved in PATH (bare --resume: OUT/checkpoint.pth)")
    p.add_argument("--out", default=None, help="output folder (default: "
                                               "runs/mrpose-DATA-ARCH-BACKBONE)")
    p.add_argument("--print-freq", type=int, default=20, help="iterations between progress lines")
    finish_parser(p, PRESETS, PROTOCOLS)
    args = p.parse_args(argv)
    if args.protocol:  # the protocol's values become defaults: flags on the command line still win
        p.set_defaults(**PROTOCOLS[args.protocol])
        args = p.parse_args(argv)
    if args.pretrained is None and (args.eval_only or args.weights or args.resume or args.summary):
        # the weights come from a checkpoint (or are not needed): nothing to download
        args.pretrained = "none"
    apply_presets(args, PRESETS[args.data])
    args.semi = None if args.semi == "none" else args.semi
    if args.weights2 and args.semi != "dual":
        raise UserError("--weights2: network 2 exists only under --semi dual")
    if args.protocol == "mscl-mpii" and args.semi and not args.unlabeled_ann:
        raise UserError("--protocol mscl-mpii: the unlabeled set is AI Challenger train "
                        "(--unlabeled-ann, --unlabeled-images); --semi none trains the "
                        "supervised-only row")
    args.input_size = tuple(args.input_size)
    args.heatmap_size = (args.input_size[0] // 4, args.input_size[1] // 4)
    args.num_joints = 16 if args.data == "mpii" else 17
    args.out = args.out or os.path.join("runs", f"mrpose-{args.data}-{args.arch}-{args.backbone}")
    args.resume = resume_path(args)
    return args


def run_plan(args):
    """The --dry-run plan and OUT/args.json (common/plan.py); Adam's lr is not scaled with the
    batch."""
    return make_plan(args, lr_effective=args.lr, augmentation=pose_augmentation(args),
                     eval=pose_eval(args))


# ----------------------------------------------------------------------------------------------
# Model (Sec. II-III, Figs. 2-4). Deconv = 4x4 transposed conv, stride 2, pad 1, no bias, BN, ReLU.
# Every combination is an element-wise sum (MRFeaNet: the mean of four maps), as the official code
# (tqtrunghnvn/SimMRPose) does; the figures leave the operator open. SimpleBaseline (Fig. 2),
# `deconv` and the head initialisation live in common/posenet.py, shared with icon.py.

def side_conv(cin, k):
    """1x1 conv to k low-resolution heatmaps; BN + ReLU follow it in the official code."""
    return nn.Sequential(nn.Conv2d(cin, k, 1), nn.BatchNorm2d(k), nn.ReLU(inplace=True))


def bare_deconv(k):
    """Last upsampling of a heatmap branch: a transposed conv alone (official code)."""
    return nn.ConvTranspose2d(k, k, 4, stride=2, padding=1, bias=False)


class MRHeatNet1(SimpleBaseline):
    """Fig. 3a: heatmaps at 1/16 are upsampled and added to the heatmaps at 1/8; their sum is
    upsampled to 1/4 and added to the final heatmaps."""

    # official mrheat1_pose_resnet names -> ours (deconv1..3 and final_layer are named alike)
    OFFICIAL_KEYS = {"s_conv1.": "side1.", "s_deconv1.": "side1_up.", "s_conv2.": "side2.",
                     "s_deconv2.": "side2_up."}

    def __init__(self, backbone, k, c=256):
        super().__init__(backbone, k, c)
        self.side1, self.side1_up = side_conv(c, k), deconv(k, k)
        self.side2, self.side2_up = side_conv(c, k), bare_deconv(k)
        self.init_head()

    def forward(self, x):
        c5 = self.backbone(x)[3]
        d16 = self.deconv1(c5)
        d8 = self.deconv2(d16)
        # out-of-place: autograd keeps both inputs
        h8 = self.side2(d8) + self.side1_up(self.side1(d16))
        return self.final_layer(self.deconv3(d8)) + self.side2_up(h8)


class MRHeatNet2(SimpleBaseline):
    """Fig. 3b: heatmaps of each deconv stage go up to 1/4 on their own and all are summed."""

    OFFICIAL_KEYS = {"s_conv1.": "side1.", "s_deconv1.": "side1_up.0.",
                     # official mrheat2_pose_resnet names -> ours
                     "s_deconv12.": "side1_up.1.", "s_conv2.": "side2.", "s_deconv2.": "side2_up."}

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

    # official mrfea1/mrfea2_pose_resnet names -> ours: deconv1x from C5, deconv2x from C4, deconv3
    # from C3
    OFFICIAL_KEYS = {"deconv11.": "branch5.0.", "deconv12.": "branch5.1.",
                     "deconv13.": "branch5.2.", "deconv21.": "branch4.0.",
                     "deconv22.": "branch4.1.", "deconv3.": "branch3.0."}

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

        self.branch3, self.branch4, self.branch5 = (branch(backbone.channels[i], i)
                                                    for i in (1, 2, 3))
        self.final_layer = nn.Conv2d(c, k, 1)
        self.init_head()

    def forward(self, x):
        c2, c3, c4, c5 = self.backbone(x)
        return self.final_layer((c2 + self.branch3(c3) + self.branch4(c4) + self.branch5(c5)) / 4)


def build_model(args):
    backbone = ResNetFeatures(args.backbone, torchvision_weights=args.pretrained == "torchvision")
    report = None
    if args.pretrained not in (None, "none", "torchvision"):
        report = load_backbone(backbone, args.pretrained)
    k = args.num_joints
    c = args.head_channels
    model = {"simplebaseline": lambda: SimpleBaseline(backbone, k, c),
             "mrheatnet1": lambda: MRHeatNet1(backbone, k, c),
             "mrheatnet2": lambda: MRHeatNet2(backbone, k, c),
             "mrfeanet1": lambda: MRFeaNet(backbone, k, halve=False),
             "mrfeanet2": lambda: MRFeaNet(backbone, k, halve=True)}[args.arch]()
    return model, report


# --resume refuses a change of these (the model and the schedule)
RESUME_KEYS = ("arch", "backbone", "head_channels", "input_size", "batch_size", "lr", "lr_steps",
               "amp", "bgr", "semi")


def main():
    args = get_args()
    if begin(args, run_plan):
        return
    rank, world, device = dist.setup(args.device)
    data_device = resolve_data_device(args.data_device)
    main_proc = dist.is_main()
    seed_everything(args.seed + rank)
    model, report = build_model(args)
    if args.summary:
        n, gmacs = summary(model, args.input_size)
        head = (f"{model.final_layer.in_channels}-channel head (C2's width)"
                if args.arch.startswith("mrfea")
                else f"{args.head_channels}-channel head" + ("" if args.head_channels == 256
                                                             else " (the paper's is 256)"))
        print(f"{args.arch} {args.backbone} {args.input_size[0]}x{args.input_size[1]}, {head}, "
              f"{args.num_joints} joints (--data {args.data} preset): {n:,} parameters, "
              f"{gmacs:.2f} GFLOPs (multiply-accumulates)")
        return
    if report and main_proc:
        print(report)
    official = False
    if args.weights:
        ckpt = load_checkpoint(args.weights)
        official = load_weights(model, args.weights, ckpt)
        if args.bgr is None:
            args.bgr = (official or bool(isinstance(ckpt.get("args"), dict)
                                         and ckpt["args"].get("bgr")))
    if main_proc and args.bgr:
        print(f"BGR input{' (official checkpoint)' if official else ''}")
    # --semi: a wrapper that trains `model` (network 1, the reported one) with network 2 or a frozen
    #   teacher
    semi_model = build_semi(args.semi, model, lambda: build_model(args)[0], args, args.teacher) \
        if args.semi and not args.eval_only else None
    # e.g. a supervised run with another seed: two trained networks that differ
    if args.weights2 and semi_model:
        load_weights(semi_model.nets[1], args.weights2)
    trained = semi_model or model
    trained.to(device)
    if args.channels_last:
        trained.to(memory_format=torch.channels_last)
    if args.data == "demo":  # generated on first use, then cached under data/cache
        args.data_root = demo_root(args.seed)
    train_ds, val_ds, info = build_data(args, train=not args.eval_only)
    if main_proc:
        os.makedirs(args.out, exist_ok=True)

    if args.eval_only:
        metrics, results, shown = evaluate(model, val_ds, args, device, info, oracle=args.oracle)
        if main_proc:
            write_eval_outputs(args, metrics, results, shown, info)
        dist.cleanup()
        return

    if semi_model:  # an item is a (labeled, unlabeled) pair; an epoch walks the unlabeled set
        train_ds = PairedDataset(train_ds, build_unlabeled(args, train_ds, info), args.seed)
    # Data: each rank sees its share of every epoch; batch size is the total over ranks.
    per_rank = args.batch_size // world
    if per_rank < 1 or per_rank * world > len(train_ds):
        raise UserError(f"--batch-size {args.batch_size} does not fit {world} ranks and "
                        f"{len(train_ds)} training persons")
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=per_rank, sampler=sampler,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         drop_last=True, collate_fn=collate_jpeg
                                         if data_device is not None else None)
    iters_per_epoch = len(loader)
    total_iters = args.iters or args.epochs * iters_per_epoch
    epochs = math.ceil(total_iters / iters_per_epoch)
    # lr steps are epochs unless --iters is given; the schedule itself steps every iteration
    milestones = [s if args.iters else s * iters_per_epoch for s in args.lr_steps]
    eval_every = args.eval_every or (max(1, 2000 // iters_per_epoch) if args.iters else 1)

    # BatchNorm over the whole batch under CUDA DDP, as the official runs had it on one GPU
    # (SyncBatchNorm, as mscl.py); the conversion swaps BN children in place, so `model` stays
    # network 1 inside `trained`
    trained = dist.convert_sync_bn(trained, device)
    ddp_model = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda"
                                        else None) \
        if world > 1 else trained
    ddp_model = compile_model(ddp_model, args.compile)
    # Adam, no weight decay (Sec. IV); one optimiser over both networks with --semi dual (official)
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, best = 0, 0, -1.0
    ckpt_path = os.path.join(args.out, "checkpoint.pth")
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        if args.bgr is None:
            args.bgr = bool(ckpt.get("args", {}).get("bgr", False))
        check_resume_args(args.resume, ckpt.get("args", {}), args, RESUME_KEYS)
        load_weights(model, args.resume, ckpt)
        if args.semi == "dual":
            load_weights(semi_model.nets[1], args.resume, ckpt["model2"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, it, best = ckpt["epoch"], ckpt["iteration"], ckpt["best"]
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if it >= total_iters:
            raise UserError(f"{args.resume}: the run is complete ({it} of {total_iters} "
                            f"iterations); raise --iters or --epochs to train on")
        # a run stopped inside an epoch (--iters) counts that epoch as done: go on to the new total
        epochs = max(epochs, start_epoch + math.ceil((total_iters - it) / iters_per_epoch))
        if main_proc:
            print(f"resumed from {args.resume} at epoch {start_epoch}, iteration {it}")
    args.bgr = bool(args.bgr)
    if main_proc:
        init = {"torchvision": "ImageNet (torchvision)",
                "none": "scratch"}.get(args.pretrained, args.pretrained)
        print(f"{args.arch} {args.backbone} (backbone from {init}): "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_ds)} train / "
              f"{len(val_ds)} val persons; {iters_per_epoch} it/epoch x {epochs} epochs = "
              f"{total_iters} iterations on {world} x {device}")

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        trained.train()
        progress = Progress(min(iters_per_epoch, total_iters - it), args.print_freq, main_proc,
                            f"epoch {epoch + 1} ")
        loss_sum, n_iters, n_seen, t0 = torch.zeros((), device=device), 0, 0, time.time()
        semi_sums = {}
        for i, batch in enumerate(loader):
            if it >= total_iters:
                break
            if data_device is not None:  # the workers read bytes: decode and crop the batch here
                batch = decode_crops(batch, data_device, args.input_size)
            labeled = batch["labeled"] if semi_model else batch
            x = to_memory_format(normalize(labeled["image"].to(device, non_blocking=True),
                                           bgr=args.bgr), args)
            target, weight = gaussian_targets(labeled["joints"].to(device),
                                              labeled["visible"].to(device), args.input_size,
                                              args.heatmap_size, args.sigma)
            if semi_model:  # Xie et al.'s consistency step or ICON's Eq. (6), common/semi.py
                xu = to_memory_format(
                    normalize(batch["unlabeled"]["image"].to(device, non_blocking=True),
                              bgr=args.bgr), args)
                view = semi_model.draw_view(np.random.default_rng([args.seed, rank, it]),
                                            xu.shape[0])
                with autocast(args, device):
                    out = ddp_model(x, xu, view)
                loss, parts = semi_model.loss(out, target, weight)
                for k, v in parts.items():
                    semi_sums[k] = semi_sums.get(k, 0) + v
            else:
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
                # the same on every rank: all stop together
                mean_loss = dist.all_reduce_mean(loss.detach())
                check_finite(mean_loss, it, ckpt_path)
                progress.step(i, args.print_freq * per_rank * world, loss=mean_loss.item(),
                              lr=optimizer.param_groups[0]["lr"])
        epoch_loss = dist.all_reduce_mean(loss_sum / max(1, n_iters))
        check_finite(epoch_loss, it, ckpt_path)
        log = dict(epoch=epoch + 1, iteration=it, loss=epoch_loss.item(),
                   lr=optimizer.param_groups[0]["lr"], img_per_s=n_seen / (time.time() - t0))
        # per-term losses; peakN: the collapse monitor (mean peak of network N's unlabeled easy-view
        # heatmaps)
        log.update({k: dist.all_reduce_mean(v / max(1, n_iters)).item() for k,
                    v in semi_sums.items()})
        last = it >= total_iters
        if (epoch + 1) % eval_every == 0 or last:
            dist.broadcast_buffers(trained)
            metrics, results, shown = evaluate(model, val_ds, args, device, info)
            log["metrics"] = metrics
            # logged, not reported
            for name, extra in (semi_model.eval_models() if semi_model else {}).items():
                log[f"metrics_{name}"] = evaluate(extra, val_ds, args, device, info,
                                                  verbose=False)[0]
            if main_proc:
                score = main_metric(metrics)
                write_eval_outputs(args, metrics, results, shown, info)
                if score > best:
                    best = score
                    save_checkpoint(os.path.join(args.out, "best.pth"),
                                    {"model": model.state_dict(), "args": vars(args),
                                                                         "epoch": epoch + 1,
                                     "metrics": metrics})
        rngs = dist.gather_objects(rng_state())
        if main_proc:
            extra = {"model2": semi_model.nets[1].state_dict()} if args.semi == "dual" else {}
            save_checkpoint(ckpt_path, {"model": model.state_dict(),
                                        "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(),
                                        "scaler": scaler.state_dict(), "epoch": epoch + 1,
                                        "iteration": it, "best": best, "args": vars(args),
                                        "rng": rngs, **extra})
            with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(log) + "\n")
            print(f"epoch {epoch + 1}/{epochs}: loss {log['loss']:.6f}, {log['img_per_s']:.1f} "
                  f"img/s"
                  + (f", {format_metrics(log['metrics'])}" if "metrics" in log else ""), flush=True)
            if semi_model:
                print("  " + ", ".join([f"{k} {log[k]:.4g}" for k in semi_sums] + [
                    f"{k.removeprefix('metrics_')}: {format_metrics(v)}" for k, v in log.items()
                    if k.startswith("metrics_")]), flush=True)
        if last:
            break
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)


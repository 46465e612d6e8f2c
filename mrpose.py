"""Simple Multi-Resolution Representation Learning for Human Pose Estimation (Tran et al., 2020).

SimpleBaseline and the paper's four multi-resolution heads (MRHeatNet1/2, MRFeaNet1/2) on a
torchvision ResNet, trained top-down with the joints MSE of Eq. (1), evaluated with COCO OKS AP or
MPII PCKh.

    python mrpose.py --data demo                                   # laptop CPU, minutes
    torchrun --nproc_per_node=4 mrpose.py --data coco --data-root /data/coco --arch mrfeanet2 \
        --backbone resnet50 --pretrained torchvision              # Table I
    python mrpose.py --data coco --data-root /data/coco --eval-only --weights runs/x/best.pth
    python mrpose.py --data demo --labeled 300 --semi dual       # semi-supervised (common/semi.py)
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn

from common import dist
from common.backbone import ResNetFeatures, load_backbone
from common.devaug import DATA_DEVICE_HELP, DATA_DEVICES, decode_crops
from common.heatmap import gaussian_targets, joints_mse_loss
from common.plan import (add_pose_eval_args, apply_presets, begin, finish_parser, init_words,
                         pose_plan, resume_path)
from common.posenet import PoseNet, SimpleBaseline, deconv
from common.semi import PairedDataset, build_semi, build_unlabeled
from common.topdown import (load_data, load_weights, main_metric, parse_labeled, print_epoch,
                            resume_run, save_outputs, setup, summary, to_memory_format,
                            train_loader, validate)
from common.transforms import normalize
from common.utils import (Progress, UserError, autocast, check_finite, check_resume_args,
                          compile_model, load_checkpoint, restore_training, rng_state, run_main)
from data import dataset_root

# ----------------------------------------------------------------------------------------------
# Arguments. Paper defaults (Sec. IV) per dataset; `None` means "take the preset of --data".

PRESETS = {
    # COCO and MPII: the official configs of Tables I/III (the text swaps COCO's rf and sf)
    "coco": dict(backbone="resnet50", input_size=(192, 256), epochs=170, lr_steps=(120, 150),
                 lr=1e-3, scale_factor=0.3, rot_factor=40.0, batch_size=64, workers=4,
                 head_channels=256, channels_last=False, pretrained="torchvision"),
    "mpii": dict(backbone="resnet50", input_size=(256, 256), epochs=140, lr_steps=(90, 120),
                 lr=1e-3, scale_factor=0.25, rot_factor=30.0, batch_size=64, workers=4,
                 head_channels=256, channels_last=False, pretrained="torchvision"),
    # demo (not a paper setting): ResNet-18 from scratch in 10 minutes on a 2-core CPU; a 64-channel
    # head learns faster from scratch; no rotation (the demo people are already tilted)
    "demo": dict(backbone="resnet18", input_size=(96, 128), epochs=5, lr_steps=(3,), lr=2e-3,
                 scale_factor=0.25, rot_factor=0.0, batch_size=16, eval_every=2, workers=1,
                 head_channels=64, channels_last=True, pretrained="none", amp="auto"),
}
# MSCL's transfer protocol (its Sec. 4.3): SimpleBaseline-R50 in Xie et al.'s dual networks, GT
# boxes, no flip test; 36K iterations of 128 pairs = the official 1K config's 30 epochs
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
                   help="SimpleBaseline (Fig. 2) or a multi-resolution head (Figs. 3-4)")
    p.add_argument("-a", "--backbone", default=None,
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
                   help="the ResNet (default: the --data preset)")
    p.add_argument("--pretrained", default=None,
                   help="backbone init: 'torchvision' (ImageNet), 'none' (scratch) or a backbone "
                        ".pth (default: the --data preset)")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="MSCL transfer preset (second table below)")
    # data
    p.add_argument("--data", default="demo", choices=["demo", "coco", "mpii"],
                   help="dataset and its preset (table below); demo is generated, no download")
    p.add_argument("--data-root", default=None,
                   help="COCO (annotations/, train2017/, val2017/) or MPII (annot/, images/) root "
                        "(default: data/DATA in the repository)")
    p.add_argument("--ann", default=None, help="training annotation file (overrides --data-root)")
    p.add_argument("--images", default=None, help="training image folder (overrides --data-root)")
    p.add_argument("--labeled", type=parse_labeled, default=None,
                   help="train on N persons, or P%% of them (few-label)")
    p.add_argument("--labeled-order", default="random", choices=["first", "random", "images"],
                   help="--labeled: the file's first N persons, N drawn ones, or those of N images")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="network input width and height (default: the --data preset)")
    p.add_argument("--head-channels", type=int, default=None,
                   help="deconv width C of SimpleBaseline/MRHeatNet (paper: 256)")
    p.add_argument("--sigma", type=float, default=2.0,
                   help="Gaussian σ of the targets (heatmap pixels)")
    p.add_argument("--bgr", action=argparse.BooleanOptionalAction, default=None,
                   help="BGR input (cv2's); default: on for --weights saved so (official, --bgr)")
    # semi-supervised training (common/semi.py)
    p.add_argument("--semi", default=None, choices=["none", "dual", "cons", "pseudo"],
                   help="Xie et al.'s dual networks or one network's consistency, or ICON's "
                        "pseudo-labels (default: none)")
    p.add_argument("--unlabeled", default="all", choices=["all", "rest"],
                   help="unlabeled persons: every training person or those outside --labeled")
    p.add_argument("--unlabeled-ann", default=None,
                   help="AI Challenger's persons instead (official or COCO-style json; MPII+AIC)")
    p.add_argument("--unlabeled-images", default=None, help="image folder of --unlabeled-ann")
    p.add_argument("--joint-cutout", type=int, default=0,
                   help="Joint Cutout boxes per hard view (official MPII+AIC: 5)")
    p.add_argument("--teacher", default=None,
                   help="--semi pseudo: checkpoint trained on the labeled set only")
    p.add_argument("--weights2", default=None,
                   help="--semi dual: network 2's start (--weights is network 1's)")
    p.add_argument("--hard-rot-factor", type=float, default=None,
                   help="--semi dual|cons: the hard view's rf, p 0.8 (default: --rot-factor)")
    # augmentation
    p.add_argument("--scale-factor", type=float, default=None,
                   help="sf: scale x N(1, sf) clipped to 1 ± sf (default: the --data preset)")
    p.add_argument("--rot-factor", type=float, default=None,
                   help="rf: rotation N(0, rf) clipped to ±2rf, p 0.6, degrees (default: preset)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="turn off the horizontal-flip augmentation (on by default)")
    p.add_argument("--half-body-prob", type=float, default=0.0, help="HRNet half-body augmentation")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: preset)")
    p.add_argument("--iters", type=int, default=None, help="iteration budget (overrides --epochs)")
    p.add_argument("--lr-steps", type=int, nargs="+", default=None,
                   help="x0.1 at these epochs (iterations with --iters; default: preset)")
    p.add_argument("--lr", type=float, default=None,
                   help="Adam's, not scaled with the batch (paper: 1e-3; default: preset)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="total over all ranks (default: the --data preset)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the --data preset)")
    p.add_argument("--data-device", default="workers", choices=DATA_DEVICES, help=DATA_DEVICE_HELP)
    add_pose_eval_args(p)  # the val set, its boxes, --eval-only, --weights (common/plan.py)
    finish_parser(p, PRESETS, PROTOCOLS, out="runs/mrpose-DATA-ARCH-BACKBONE")
    args = p.parse_args(argv)
    if args.protocol:  # the protocol's values become defaults: flags on the command line still win
        p.set_defaults(**PROTOCOLS[args.protocol])
        args = p.parse_args(argv)
    if args.pretrained is None and (args.eval_only or args.weights or args.resume or args.summary):
        # the weights come from a checkpoint (or are not needed): nothing to download
        args.pretrained = "none"
    apply_presets(args, PRESETS[args.data])
    args.data_root = dataset_root(args, PRESETS)
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


run_plan = pose_plan  # the --dry-run plan and OUT/args.json (common/plan.py)


# ----------------------------------------------------------------------------------------------
# Model (Sec. II-III, Figs. 2-4) on common/posenet.py's SimpleBaseline (Fig. 2) and `deconv` (4x4
# transposed conv, stride 2, BN, ReLU). Maps combine by sum, as the official code (README).

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

    # official mrheat2_pose_resnet names -> ours
    OFFICIAL_KEYS = {"s_conv1.": "side1.", "s_deconv1.": "side1_up.0.",
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
    """Fig. 4: deconv branches from C3, C4, C5 up to 1/4, averaged with C2, then a 1x1 conv to k
    heatmaps. Every deconv has C channels (MRFeaNet1, Fig. 4a) or they halve per step (MRFeaNet2,
    halve=True: 8C -> 4C -> 2C -> C); C is the width of C2, as Sec. III-B defines it."""

    # official mrfea1/mrfea2_pose_resnet names -> ours: deconv1x from C5, 2x from C4, 3 from C3
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
    """(the --arch model, the --pretrained file's loading report or None)."""
    backbone = ResNetFeatures(args.backbone, torchvision_weights=args.pretrained == "torchvision")
    report = None
    if args.pretrained not in (None, "none", "torchvision"):
        report = load_backbone(backbone, args.pretrained)
    k, c = args.num_joints, args.head_channels
    model = {"simplebaseline": lambda: SimpleBaseline(backbone, k, c),
             "mrheatnet1": lambda: MRHeatNet1(backbone, k, c),
             "mrheatnet2": lambda: MRHeatNet2(backbone, k, c),
             "mrfeanet1": lambda: MRFeaNet(backbone, k, halve=False),
             "mrfeanet2": lambda: MRFeaNet(backbone, k, halve=True)}[args.arch]()
    return model, report


def print_summary(args):
    model = build_model(args)[0]
    n, gmacs = summary(model, args.input_size)
    c = model.final_layer.in_channels if args.arch.startswith("mrfea") else args.head_channels
    head = f"{c}-channel head" + (" (C2's width)" if args.arch.startswith("mrfea") else
                                  "" if c == 256 else " (the paper's is 256)")
    print(f"{args.arch} {args.backbone} {args.input_size[0]}x{args.input_size[1]}, {head}, "
          f"{args.num_joints} joints (--data {args.data} preset): {n:,} parameters, "
          f"{gmacs:.2f} GFLOPs (multiply-accumulates)")


def build_networks(args, device):
    """(network 1, the --semi wrapper or None) on `device`, with --weights (and --bgr's default)
    and --weights2. Network 1 is evaluated and saved; the wrapper trains it."""
    model, report = build_model(args)
    if report and dist.is_main():
        print(report)
    official = False
    if args.weights:
        ckpt = load_checkpoint(args.weights)
        official = load_weights(model, args.weights, ckpt)
        if args.bgr is None:
            args.bgr = (official or bool(isinstance(ckpt.get("args"), dict)
                                         and ckpt["args"].get("bgr")))
    if dist.is_main() and args.bgr:
        print(f"BGR input{' (official checkpoint)' if official else ''}")
    semi_model = build_semi(args.semi, model, lambda: build_model(args)[0], args, args.teacher) \
        if args.semi and not args.eval_only else None
    # e.g. a supervised run with another seed: two trained networks that differ
    if args.weights2 and semi_model:
        load_weights(semi_model.nets[1], args.weights2)
    trained = semi_model or model
    trained.to(device)
    if args.channels_last:
        trained.to(memory_format=torch.channels_last)
    return model, semi_model


# ----------------------------------------------------------------------------------------------
# Train step: Eq. (1), the joints MSE (common/heatmap.py), or under --semi common/semi.py's loss

def train_step(model, semi_model, batch, args, device, it):
    """(loss, its terms, labeled crops) of one batch; `model` runs the forward (DDP, compiled)."""
    labeled = batch["labeled"] if semi_model else batch
    x = to_memory_format(normalize(labeled["image"].to(device, non_blocking=True), bgr=args.bgr),
                         args)
    target, weight = gaussian_targets(labeled["joints"].to(device), labeled["visible"].to(device),
                                      args.input_size, args.heatmap_size, args.sigma)
    if semi_model:
        xu = batch["unlabeled"]["image"].to(device, non_blocking=True)
        xu = to_memory_format(normalize(xu, bgr=args.bgr), args)
        view = semi_model.draw_view(np.random.default_rng([args.seed, dist.rank(), it]),
                                    xu.shape[0])
        with autocast(args, device):
            out = model(x, xu, view)
        loss, parts = semi_model.loss(out, target, weight)
    else:
        with autocast(args, device):
            output = model(x)
        loss, parts = joints_mse_loss(output.float(), target, weight), {}  # Eq. (1)
    return loss, parts, x.shape[0]


# ----------------------------------------------------------------------------------------------
# Training, as MoCo's main_moco.py: main() sets up (common/topdown.py), then each epoch trains,
# evaluates (common/topdown.py's validate) and saves

def train(loader, model, semi_model, optimizer, scheduler, scaler, epoch, it, total_iters, args,
          device, data_device):
    """One epoch, or up to iteration `total_iters`. Returns the epoch's log entry (losses averaged
    over iterations and ranks, lr, img/s) and the iteration reached."""
    world = dist.world_size()
    model.train()
    progress = Progress(min(len(loader), total_iters - it), args.print_freq, dist.is_main(),
                        f"epoch {epoch + 1} ")
    sums, n_iters, n_seen, t0 = {}, 0, 0, time.time()
    for i, batch in enumerate(loader):
        if it >= total_iters:
            break
        if data_device is not None:  # the workers read bytes: decode and crop the batch here
            batch = decode_crops(batch, data_device, args.input_size)
        loss, parts, n = train_step(model, semi_model, batch, args, device, it)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        it, n_iters, n_seen = it + 1, n_iters + 1, n_seen + n * world
        for k, v in {"loss": loss.detach(), **parts}.items():
            sums[k] = sums.get(k, 0) + v
        if (i + 1) % args.print_freq == 0:  # the same on every rank: all stop together
            mean_loss = dist.all_reduce_mean(loss.detach())
            check_finite(mean_loss, it, os.path.join(args.out, "checkpoint.pth"))
            progress.step(i, args.print_freq * n * world, loss=mean_loss.item(),
                          lr=optimizer.param_groups[0]["lr"])
    # per-term losses; peakN: the collapse monitor (network N's mean peak on unlabeled views)
    means = {k: dist.all_reduce_mean(v / max(1, n_iters)) for k, v in sums.items()}
    check_finite(means["loss"], it, os.path.join(args.out, "checkpoint.pth"))
    return dict(epoch=epoch + 1, iteration=it, loss=means.pop("loss").item(),
                lr=optimizer.param_groups[0]["lr"], img_per_s=n_seen / (time.time() - t0),
                **{k: v.item() for k, v in means.items()}), it


# --resume refuses a change of these (the model, the schedule and the data)
RESUME_KEYS = ("arch", "backbone", "head_channels", "input_size", "batch_size", "lr", "lr_steps",
               "amp", "bgr", "semi", "data", "seed", "data_seed", "ann", "images",
               "labeled")


def resume(path, args, model, semi_model, **states):
    """The run saved in `path`: the networks, then each of `states`; (epoch, iteration, best)."""
    ckpt = load_checkpoint(path)
    if args.bgr is None:
        args.bgr = bool(ckpt.get("args", {}).get("bgr", False))
    check_resume_args(path, ckpt.get("args", {}), args, RESUME_KEYS)
    load_weights(model, path, ckpt)
    if args.semi == "dual":
        load_weights(semi_model.nets[1], path, ckpt["model2"])
    epoch, it = restore_training(path, ckpt, dist.rank(), **states)
    return epoch, it, ckpt["best"]


def main():
    args = get_args()
    if begin(args, run_plan, print_summary):  # --dry-run, --summary: nothing to train
        return
    device, data_device = setup(args)
    model, semi_model = build_networks(args, device)
    trained = semi_model or model  # what the optimiser trains
    train_ds, val_ds, info = load_data(args)
    if args.eval_only:
        validate(model, val_ds, args, device, info, oracle=args.oracle)
        dist.cleanup()
        return
    if semi_model:  # an item is a (labeled, unlabeled) pair; an epoch walks the unlabeled set
        train_ds = PairedDataset(train_ds, build_unlabeled(args, train_ds, info), args.seed)
    loader, sampler, (total_iters, epochs, milestones, eval_every) = train_loader(
        args, train_ds, device, data_device)

    # SyncBatchNorm under CUDA DDP (README); it swaps BN children in place: `model` stays network 1
    trained = dist.convert_sync_bn(trained, device)
    ddp_model = compile_model(dist.ddp(trained, device), args.compile)
    # Adam, no weight decay (Sec. IV); one optimiser over both networks with --semi dual (official)
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, best, epochs, history = resume_run(
        args, lambda path: resume(path, args, model, semi_model, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler),
        total_iters, epochs, len(loader))
    args.bgr = bool(args.bgr)
    if dist.is_main():
        print(f"{args.arch} {args.backbone} (backbone: {init_words(args.pretrained)}): "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_ds)} train / "
              f"{len(val_ds)} val persons; {len(loader)} it/epoch x {epochs} epochs = "
              f"{total_iters} iterations on {dist.world_size()} x {device}")

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        log, it = train(loader, ddp_model, semi_model, optimizer, scheduler, scaler, epoch, it,
                        total_iters, args, device, data_device)
        last = it >= total_iters
        best_state = None
        if (epoch + 1) % eval_every == 0 or last:
            dist.broadcast_buffers(trained)
            log.update(validate(model, val_ds, args, device, info,
                                semi_model.eval_models() if semi_model else None))
            if dist.is_main() and main_metric(log["metrics"]) > best:
                best = main_metric(log["metrics"])
                best_state = {"model": model.state_dict(), "args": vars(args), "epoch": epoch + 1,
                              "metrics": log["metrics"]}
        history.append(log)
        rngs = dist.gather_objects(rng_state())
        if dist.is_main():
            extra = {"model2": semi_model.nets[1].state_dict()} if args.semi == "dual" else {}
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch + 1, "iteration": it, "best": best, "args": vars(args),
                     "rng": rngs, **extra}
            save_outputs(args.out, state, history, best_state)
            print_epoch(log, epochs)
        if last:
            break
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)

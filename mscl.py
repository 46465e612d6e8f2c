"""Multi-Scale Contrastive Learning (MSCL) pretraining for human pose estimation.

SimSiam on four scales (Bao et al., IEICE TIS 2024): one ResNet sees two augmented views; its
stages conv2_x..conv5_x, fused by an enhanced FPN (Eqs. 1-2), each get a projector and a predictor
(Eqs. 3-4) and the symmetric negative cosine with stop-gradient (Eqs. 5-6), weighted by λ (Eq. 7).
The ResNet is exported as `backbone.pth` in torchvision key names for `mrpose.py --pretrained`.

    python mscl.py --data demo                                                # laptop CPU, minutes
    torchrun --nproc_per_node=4 mscl.py --data imagenet --data-root /data/imagenet   # Sec. 4.1
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common import dist
from common.backbone import RESNETS, ResNetFeatures
from common.datasets import list_images, read_image
from common.devaug import (AUG_DEVICE_HELP, AUG_DEVICES, BatchAppearance, CropFlip,
                           resolve_aug_device)
from common.plan import apply_presets, begin, finish_parser, make_plan, moco_v2_views, resume_path
from common.plots import plot_curves
from common.ssl import moco_v2_augmentation
from common.utils import (Progress, UserError, autocast, check_finite, compile_model,
                          finish_pretraining, gmacs, resume_pretraining, rng_state, run_main,
                          save_checkpoint, seed_everything, write_log)
from data import dataset_root
from data.demo import demo_root

# ----------------------------------------------------------------------------------------------
# Arguments: the paper's settings per --data; `None` in the parser means "the preset's value".

# Sec. 4.1: ResNet-50 at 224 px, batch 256 on 4 GPUs, SGD lr 0.05 x batch / 256, cosine, 100 epochs
IMAGENET = dict(backbone="resnet50", crop_size=224, epochs=100, lr=0.05, batch_size=256, workers=4,
                fix_pred_lr=True)
PRESETS = {
    "imagenet": IMAGENET,
    "coco": dict(IMAGENET, epochs=800, lr=0.3),  # train2017 images, unlabeled (Sec. 4.7.2)
    "folder": IMAGENET,  # any folder of images (--images DIR)
    # not a paper setting: a base lr of 0.4 (0.1 at batch 64), so that 3 epochs (93 iterations, a
    # few CPU minutes) visibly lower the loss
    "demo": dict(IMAGENET, backbone="resnet18", crop_size=64, epochs=3, lr=0.4, batch_size=64,
                 workers=1, amp="auto"),
}
DEFAULT_SCALE_WEIGHTS = [1.0, 2.0, 2.0, 5.0]  # Table 4's best


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-a", "--backbone", default=None, choices=list(RESNETS),
                   help="the ResNet (default: the --data preset)")
    # model (Sec. 3)
    p.add_argument("--dim", type=int, default=512, help="FPN vector and projector output width")
    p.add_argument("--pred-dim", type=int, default=128, help="predictor hidden width")
    p.add_argument("--fpn-width", type=int, default=256, help="width of the FPN's Conv1 laterals")
    p.add_argument("--fusion", default="conv-pool", choices=["conv-pool", "pool-conv"],
                   help="Pool-Conv2 of Eqs. 1-2: conv-pool = 3x3 Conv2 on the fused map, then "
                        "global max pooling; pool-conv = global max pooling, then a 1x1 Conv2")
    p.add_argument("--scale-weights", type=float, nargs=4, default=DEFAULT_SCALE_WEIGHTS,
                   metavar="λ", help="λ of Eq. 7 for F1..F4, in proportion (Table 4)")
    p.add_argument("--no-fpn", dest="fpn", action="store_false",
                   help="Table 5 #2: each stage global-average-pooled into its projector")
    p.add_argument("--single-scale", action="store_true",
                   help="conv5_x alone; with --no-fpn --dim 2048 --pred-dim 512 this is SimSiam "
                        "(Table 5 #1)")
    p.add_argument("--shared-heads", action="store_true",
                   help="one projector and one predictor for all scales (needs the FPN)")
    # data
    p.add_argument("--data", default="demo", choices=list(PRESETS),
                   help="training images and their preset (table below); demo is generated")
    p.add_argument("--data-root", default=None,
                   help="ImageNet root (train/<class>/*) or COCO root (train2017/) (default: "
                        "data/DATA in the repository)")
    p.add_argument("--images", default=None,
                   help="a folder of images (any layout; overrides --data-root)")
    p.add_argument("--crop-size", type=int, default=None,
                   help="RandomResizedCrop output side (default: the --data preset)")
    # optimisation (Sec. 4.1)
    p.add_argument("--epochs", type=int, default=None,
                   help="length of the cosine schedule (default: the --data preset)")
    p.add_argument("--iters", type=int, default=None,
                   help="stop after this many iterations in all; the schedule still spans --epochs")
    p.add_argument("--lr", type=float, default=None,
                   help="base lr; the lr used is lr x batch / 256 (default: the --data preset)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", "--wd", dest="wd", type=float, default=1e-4,
                   help="SGD weight decay")
    p.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, default=None,
                   help="hold the predictors' lr at its initial value (on in every preset)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help="total over all ranks, rounded down to a multiple of the ranks (default: "
                        "the --data preset)")
    p.add_argument("--aug-device", default="auto", choices=AUG_DEVICES, help=AUG_DEVICE_HELP)
    finish_parser(p, PRESETS, out="runs/mscl-DATA-RUN-BACKBONE")
    args = p.parse_args(argv)
    apply_presets(args, PRESETS[args.data])
    args.data_root = dataset_root(args, PRESETS)
    if args.shared_heads and not args.fpn and not args.single_scale:
        raise UserError("--shared-heads needs the FPN: without it the four scales have different "
                        "widths")
    if min(args.scale_weights) < 0 or sum(args.scale_weights) <= 0:
        raise UserError(f"--scale-weights {args.scale_weights}: need non-negative weights with a "
                        f"positive sum")
    args.out = args.out or os.path.join("runs",
                                        f"mscl-{args.data}-{run_name(args)}-{args.backbone}")
    args.resume = resume_path(args)
    return args


def run_plan(args):
    """The --dry-run plan and OUT/args.json, with the lr after the batch scaling."""
    return make_plan(args, lr_effective=batch_and_lr(args, dist.world_size())[2],
                     augmentation=moco_v2_views(args))


def run_name(args):
    """What the run is, for its folder: simsiam (Table 5 #1), ms-nofpn (#2), mscl (#3, #4), or
    single-fpn / single-nofpn (no paper row); then a non-default fusion and λ (Table 4)."""
    if args.single_scale:
        name = "simsiam" if not args.fpn and (args.dim, args.pred_dim) == (2048, 512) else \
            f"single-{'fpn' if args.fpn else 'nofpn'}"
    else:
        name = "mscl" if args.fpn else "ms-nofpn"
    if args.fpn and args.fusion != "conv-pool":
        name += "-" + args.fusion
    if not args.single_scale and args.scale_weights != DEFAULT_SCALE_WEIGHTS:
        name += "-l" + "-".join(f"{w:g}" for w in args.scale_weights)
    return name


def scale_names(args):
    """F1..F4, or F4 alone: the scales in the log, the plot and the printed lines."""
    return [f"F{i + 1}" for i in ([3] if args.single_scale else range(4))]


def scale_weights(args):
    """λ normalised to sum 1; a single scale has λ = 1."""
    return [1.0] if args.single_scale else [w / sum(args.scale_weights) for w in args.scale_weights]


# ----------------------------------------------------------------------------------------------
# Data: two MoCo v2 views of every image (Sec. 4.2)

class TwoViews(torch.utils.data.Dataset):
    """Unlabeled images; each item is two independent augmentations of one image."""

    def __init__(self, files, transform):
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = read_image(self.files[i])
        return self.transform(img), self.transform(img)


def image_folder(args):
    """The folder of --data's training images (labels and annotations are never read): --images,
    the demo's, or the one inside the root (get_args resolves it: data.dataset_root)."""
    if args.images:
        return args.images
    if args.data == "demo":
        return os.path.join(demo_root(args.data_seed), "train2017")
    candidates = (["train"] if args.data == "imagenet"
                  else ["train2017", os.path.join("images", "train2017")])
    for c in candidates:
        if os.path.isdir(os.path.join(args.data_root, c)):
            return os.path.join(args.data_root, c)
    raise UserError(f"{args.data_root}: no {' or '.join(candidates)} folder inside (give --images "
                    f"DIR for another layout)")


# ----------------------------------------------------------------------------------------------
# Liftable block: the enhanced FPN, the heads and the loss (Sec. 3). It needs only `import torch,
# torch.nn as nn, torch.nn.functional as F`; every function takes explicit arguments. The choices
# where the paper is silent are listed in README.md.

class FeaturePyramid(nn.Module):
    """The enhanced FPN: one out_dim vector F_i per stage feature f_i; the last stage given is the
    top. `fusion` orders Pool-Conv2: conv-pool = a 3x3 Conv2 on the fused map, then global max
    pooling (FPN's); pool-conv = global max pooling, then a 1x1 Conv2 (cheaper, but every F_i then
    lies in a `width`-dimensional subspace)."""

    def __init__(self, in_channels, width=256, out_dim=512, fusion="conv-pool"):
        super().__init__()
        self.fusion = fusion
        # FPN's convs: with bias, no BN or ReLU
        self.conv1 = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        k = 3 if fusion == "conv-pool" else 1
        self.conv2 = nn.ModuleList(nn.Conv2d(width, out_dim, k, padding=k // 2)
                                   for _ in in_channels)

    def forward(self, feats):
        lateral = [conv(f) for conv, f in zip(self.conv1, feats)]
        out = []
        for i, lat in enumerate(lateral):
            # Eq. (1): a level adds the next level's lateral alone (no accumulated top-down path)
            # Eq. (2): the top level has none
            if i + 1 < len(lateral):
                lat = lat + F.interpolate(lateral[i + 1], size=lat.shape[-2:], mode="nearest")
            if self.fusion == "conv-pool":
                fused = F.adaptive_max_pool2d(self.conv2[i](lat), 1)
            else:
                fused = self.conv2[i](F.adaptive_max_pool2d(lat, 1))
            out.append(torch.flatten(fused, 1))
        return out


def projector(in_dim, dim):
    """SimSiam's projector: hidden width = input width (512 after the FPN, as the paper says), the
    hidden FCs without bias, the output BN without affine parameters."""
    head = nn.Sequential(  # Eq. (3): (FC-BN-ReLU) x 2, FC-BN
        nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
        nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim), nn.ReLU(inplace=True),
        nn.Linear(in_dim, dim), nn.BatchNorm1d(dim, affine=False))
    head[6].bias.requires_grad = False  # the BN after it cancels it (SimSiam)
    return head


def predictor(dim, pred_dim):
    """SimSiam's predictor: a bottleneck of width pred_dim, the first FC without bias."""
    return nn.Sequential(  # Eq. (4): FC(FC-BN-ReLU)
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim))


def D(p, z):
    """Negative cosine similarity of predictions p and targets z, batch mean; z's gradient is
    stopped (the text's reading of Eq. 6)."""
    return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()  # Eq. (5)


def mscl_loss(p1, p2, z1, z2, weights):
    """(total, [loss of each scale]) from lists over scales of the two views' predictions p and
    projections z. `weights` are λ in proportion, as Table 4 states them: the total divides by
    their sum, so that it stays on one scale's range (-1 at best)."""
    per_scale = [0.5 * D(a, zb) + 0.5 * D(b, za) for a, b, za, zb in zip(p1, p2, z1, z2)]  # Eq. (6)
    total = sum(w * loss for w, loss in zip(weights, per_scale)) / sum(weights)  # Eq. (7)
    return total, per_scale


@torch.no_grad()
def normalised_std(z):
    """SimSiam's collapse check (Sec. 4.1): the std over the batch of the L2-normalised z, averaged
    over channels; about 1/sqrt(dim) when healthy, 0 on collapse."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


# End of the liftable block.


# ----------------------------------------------------------------------------------------------
# The siamese network (Fig. 1) and its optimiser (SimSiam's main_simsiam.py)

class MSCL(nn.Module):
    """A shared ResNet, the FPN (or global average pooling) and a projector and predictor per scale,
    for both views. --single-scale --no-fpn is SimSiam."""

    def __init__(self, backbone="resnet50", dim=512, pred_dim=128, fpn=True, single_scale=False,
                 shared_heads=False, fpn_width=256, fusion="conv-pool"):
        super().__init__()
        self.backbone = ResNetFeatures(backbone)
        # SimSiam's zero_init_residual: each residual block's last BN starts at 0 (no random draw)
        for m in self.backbone.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                nn.init.zeros_(m.bn2.weight)
        self.levels = [3] if single_scale else [0, 1, 2, 3]  # f1..f4 = conv2_x..conv5_x
        channels = [self.backbone.channels[i] for i in self.levels]
        self.neck = FeaturePyramid(channels, fpn_width, dim, fusion) if fpn else None
        in_dims = [dim] * len(channels) if fpn else channels
        n_heads = 1 if shared_heads else len(self.levels)
        self.projectors = nn.ModuleList(projector(d, dim) for d in in_dims[:n_heads])
        self.predictors = nn.ModuleList(predictor(dim, pred_dim) for _ in range(n_heads))

    def encode(self, x):
        """One view -> the projections z of every scale."""
        feats = self.backbone(x)
        feats = [feats[i] for i in self.levels]
        if self.neck is not None:
            vectors = self.neck(feats)
        else:  # global average pooling, as ResNet and SimSiam
            vectors = [torch.flatten(F.adaptive_avg_pool2d(f, 1), 1) for f in feats]
        return [self.projectors[k % len(self.projectors)](v) for k, v in enumerate(vectors)]

    def forward(self, x1, x2):
        """Lists over scales of p1, p2 (predictions) and z1, z2 (projections, still attached: the
        loss stops their gradient)."""
        z1, z2 = self.encode(x1), self.encode(x2)
        p1 = [self.predictors[k % len(self.predictors)](z) for k, z in enumerate(z1)]
        p2 = [self.predictors[k % len(self.predictors)](z) for k, z in enumerate(z2)]
        return p1, p2, z1, z2


def build_model(args):
    return MSCL(args.backbone, args.dim, args.pred_dim, args.fpn, args.single_scale,
                args.shared_heads, args.fpn_width, args.fusion)


def build_optimizer(model, init_lr, args):
    """SGD; the predictors form a group of their own, whose lr --fix-pred-lr holds."""
    pred = [p for n, p in model.named_parameters() if n.startswith("predictors.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("predictors.")]
    groups = [{"params": rest, "fix_lr": False}, {"params": pred, "fix_lr": args.fix_pred_lr}]
    return torch.optim.SGD(groups, init_lr, momentum=args.momentum, weight_decay=args.wd)


def batch_and_lr(args, world):
    """(per-rank batch, total batch used, initial lr): the batch is rounded down to a multiple of
    the ranks, and the lr follows the batch used (base lr x batch / 256)."""
    per_rank = args.batch_size // world
    batch = per_rank * world
    return per_rank, batch, args.lr * batch / 256


def adjust_learning_rate(optimizer, init_lr, epoch, epochs):
    """Cosine decay once per epoch over `epochs`; a fix_lr group keeps init_lr."""
    cur_lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    for group in optimizer.param_groups:
        group["lr"] = init_lr if group["fix_lr"] else cur_lr
    return cur_lr


# ----------------------------------------------------------------------------------------------
# Training (MoCo's main_moco.py: main builds and resumes, train runs one epoch, save writes)

def train(loader, model, optimizer, scaler, epoch, lr, it, total_iters, args, device,
          appearance=None):
    """One epoch, or up to iteration `total_iters`, of SGD on the weighted loss (DDP averages the
    gradients over ranks); `appearance` finishes the views on the device (--aug-device). Returns
    the epoch's log.jsonl entry (means over ranks) and the iteration reached."""
    world, weights, names = dist.world_size(), scale_weights(args), scale_names(args)
    ckpt_path = os.path.join(args.out, "checkpoint.pth")  # named by a non-finite loss's error
    model.train()
    progress = Progress(min(len(loader), total_iters - it), args.print_freq, dist.is_main(),
                        f"epoch {epoch + 1} ")
    # running sums: the total loss, each scale's loss, each scale's normalised std of z1
    sums, n_iter, n_pairs, t0 = torch.zeros(1 + 2 * len(names), device=device), 0, 0, time.time()
    for i, (x1, x2) in enumerate(loader):
        if it >= total_iters:
            break
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        if appearance is not None:  # uint8 crops: colour, grayscale and blur a batch at a time
            x1, x2 = appearance(x1).to(device), appearance(x2).to(device)
        with autocast(args, device):
            p1, p2, z1, z2 = model(x1, x2)
        loss, per_scale = mscl_loss(p1, p2, z1, z2, weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        it, n_iter, n_pairs = it + 1, n_iter + 1, n_pairs + x1.shape[0] * world
        sums += torch.stack([loss.detach()] + [s.detach() for s in per_scale]
                            + [normalised_std(z) for z in z1])
        if (i + 1) % args.print_freq == 0:  # the same on every rank: all stop together
            mean_loss = dist.all_reduce_mean(loss.detach())
            check_finite(mean_loss, it, ckpt_path)
            progress.step(i, args.print_freq * loader.batch_size * world, loss=mean_loss.item(),
                          lr=lr)
    means = dist.all_reduce_mean(sums / max(1, n_iter))
    check_finite(means, it, ckpt_path)
    means, k = means.tolist(), len(names)
    return dict(epoch=epoch + 1, iteration=it, loss=means[0],
                loss_scales=dict(zip(names, means[1:1 + k])), z_std=dict(zip(names, means[1 + k:])),
                z_std_healthy=1 / math.sqrt(args.dim), lr=lr,
                pairs_per_s=n_pairs / (time.time() - t0)), it


# what a resumed run must keep: model, schedule and data (--iters only says where to stop)
RESUME_KEYS = ("data", "backbone", "fusion", "single_scale", "fpn", "shared_heads", "dim",
               "pred_dim", "fpn_width", "scale_weights", "crop_size", "batch_size", "lr",
               "fix_pred_lr", "momentum", "wd", "epochs", "amp", "seed", "data_seed", "images")


def save(args, model, optimizer, scaler, history, rngs):
    """Rank 0's outputs after each epoch: checkpoint.pth (to resume), backbone.pth (to transfer),
    log.jsonl and loss.png over `history`, and the epoch's line."""
    log, names = history[-1], scale_names(args)
    save_checkpoint(os.path.join(args.out, "checkpoint.pth"),
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": log["epoch"],
                     "iteration": log["iteration"], "args": vars(args), "rng": rngs})
    # the ResNet alone in torchvision key names: resnetXX().load_state_dict(.., strict=False)
    # misses only fc.*, and mrpose.py --pretrained loads it as is
    save_checkpoint(os.path.join(args.out, "backbone.pth"), model.backbone.state_dict())
    write_log(os.path.join(args.out, "log.jsonl"), history)
    plot_curves(os.path.join(args.out, "loss.png"), [e["epoch"] for e in history],
                {"total (Eq. 7)": [e["loss"] for e in history],
                 **{n: [e["loss_scales"][n] for e in history] for n in names}}, xlabel="epoch")
    scales = lambda d: " ".join(f"{n} {v:.4f}" for n, v in d.items())  # noqa: E731
    print(f"epoch {log['epoch']}/{args.epochs}: loss {log['loss']:.4f} "
          f"({scales(log['loss_scales'])}), z std {scales(log['z_std'])} (healthy "
          f"~{log['z_std_healthy']:.4f}), lr {log['lr']:.4g}, {log['pairs_per_s']:.1f} pairs/s",
          flush=True)


def print_summary(args):
    """--summary: parameters and multiply-accumulates of one view through the encoder (ResNet, FPN,
    projectors) and through the ResNet alone, the part that transfers."""
    model = build_model(args).eval()
    macs = [gmacs(fn, (args.crop_size, args.crop_size)) for fn in (model.encode, model.backbone)]
    n, n_backbone = (sum(p.numel() for p in m.parameters()) for m in (model, model.backbone))
    print(f"MSCL {args.backbone} ({run_name(args)}) at {args.crop_size} px: {n:,} parameters "
          f"({n_backbone:,} in the ResNet); {macs[0]:.2f} GFLOPs (multiply-accumulates) per view "
          f"through the encoder, {macs[1]:.2f} in the ResNet")


def main():
    args = get_args()
    if begin(args, run_plan, print_summary):  # --dry-run, --summary: nothing to train
        return
    rank, world, device = dist.setup(args.device)
    aug_device = resolve_aug_device(args.aug_device, device)
    seed_everything(args.seed + rank)
    files = list_images(image_folder(args))
    model = dist.convert_sync_bn(build_model(args), device).to(device)  # SyncBN, as SimSiam
    train_ds = TwoViews(files, CropFlip(args.crop_size) if aug_device is not None
                        else moco_v2_augmentation(args.crop_size))
    appearance = BatchAppearance(aug_device) if aug_device is not None else None
    per_rank, batch, init_lr = batch_and_lr(args, world)
    if per_rank < 2:
        raise UserError(f"--batch-size {args.batch_size} gives {per_rank} image(s) to each of "
                        f"{world} ranks; BatchNorm needs at least 2 per rank")
    if batch > len(train_ds):
        raise UserError(f"--batch-size {args.batch_size} is larger than the {len(train_ds)} "
                        f"training images (an epoch would be empty)")
    loader, sampler = dist.train_loader(train_ds, per_rank, workers=args.workers, seed=args.seed,
                                        device=device)
    total_iters = min(args.iters or math.inf, args.epochs * len(loader))
    ddp_model = compile_model(dist.ddp(model, device), args.compile)
    optimizer = build_optimizer(model, init_lr, args)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, history = resume_pretraining(args, RESUME_KEYS, total_iters, ("fpn",),
                                                  model=model, optimizer=optimizer, scaler=scaler)
    if dist.is_main():
        os.makedirs(args.out, exist_ok=True)
        rounded = (f" (--batch-size {args.batch_size} rounded down to {per_rank} x {world} ranks)"
                   if batch != args.batch_size else "")
        print(f"MSCL {args.backbone} ({run_name(args)}), λ "
              f"{' '.join(f'{w:.3f}' for w in scale_weights(args))}: "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {len(train_ds)} images "
              f"at {args.crop_size} px; {len(loader)} it/epoch x {args.epochs} epochs on {world} x "
              f"{device}; lr {args.lr} x {batch}/256 = {init_lr:.5g}{rounded}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        if it >= total_iters:
            break
        sampler.set_epoch(epoch)
        lr = adjust_learning_rate(optimizer, init_lr, epoch, args.epochs)
        log, it = train(loader, ddp_model, optimizer, scaler, epoch, lr, it, total_iters, args,
                        device, appearance)
        history.append(log)
        rngs = dist.gather_objects(rng_state())  # a collective: every rank takes part
        if dist.is_main():
            save(args, model, optimizer, scaler, history, rngs)
    finish_pretraining(args.out, model)


if __name__ == "__main__":
    run_main(main)

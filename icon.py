"""Inter-image Contrastive Consistency for Multi-Person Pose Estimation (ICON, Xu et al., AAAI
2023).

A top-down pose network (SimpleBaseline on a ResNet, or HRNet) trained with the joints MSE plus two
contrastive terms on a training-only projection head: SKCC (Eq. (1)) over keypoint embeddings across
the people of a batch, PRCC (Eqs. (2)-(4)) over the 8 limb pairs, with hard sampling; Eq. (5) adds
them to the MSE. Inference is the baseline's (a SimpleBaseline one also evaluates in `mrpose.py
--eval-only --weights`). Fig. 5's embeddings: `python -m eval.icon_embeddings`.

    python icon.py --data demo                                  # laptop CPU, minutes
    python icon.py --data demo --lambda-p 0                     # the baseline, same schedule
    torchrun --nproc_per_node=4 icon.py --data coco --data-root /data/coco   # Table 3, SBN-R50
    python icon.py --data demo --labeled 10% --semi dual        # Table 4, SSPose + ICON

The paper's runs: README.md.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import dist
from common.backbone import RESNETS, ResNetFeatures, load_backbone
from common.datasets import COCO_JOINTS, CROWDPOSE_JOINTS, MPII_JOINTS, TopDownDataset, read_coco
from common.devaug import DATA_DEVICE_HELP, DATA_DEVICES, decode_crops
from common.heatmap import gaussian_targets, joints_mse_loss
from common.hrnet import PoseHighResolutionNet, load_hrnet_pretrained
from common.metrics import keypoint_recall
from common.plan import (add_pose_eval_args, apply_presets, begin, finish_parser, pose_plan,
                         resume_path)
from common.posenet import SimpleBaseline
from common.semi import (Ensemble, PairedDataset, argmax_joints, build_semi, build_unlabeled,
                         heatmaps_of, pseudo_label_mask)
from common.topdown import (data_paths, load_data, load_weights, main_metric, parse_labeled,
                            predict, print_epoch, resume_run, save_outputs, setup, summary,
                            to_memory_format, train_loader, validate)
from common.transforms import normalize
from common.utils import (Progress, UserError, autocast, check_finite, check_resume_args,
                          compile_model, load_checkpoint, restore_training, rng_state, run_main,
                          save_json)
from data import dataset_root

# ----------------------------------------------------------------------------------------------
# Arguments: the paper's defaults (§Implementation Details) per dataset; None: --data's preset

# HRNet's schedule and augmentation ("the learning rate follows HRNet"); batch "16" per GPU on 4
PRESETS = {
    # Table 3 also 384x288: --input-size 288 384
    "coco": dict(backbone="resnet50", input_size=(192, 256), epochs=210, lr_steps=(170, 200),
                 lr=1e-3, scale_factor=0.35, rot_factor=45.0, half_body_prob=0.3, batch_size=64,
                 workers=4, head_channels=256, channels_last=False),
    # 256x256, as the MPII baselines it compares with (the text: --input-size 384 384)
    "mpii": dict(backbone="resnet50", input_size=(256, 256), epochs=180, lr_steps=(145, 170),
                 lr=1e-3, scale_factor=0.35, rot_factor=45.0, half_body_prob=0.3, batch_size=64,
                 workers=4, head_channels=256, channels_last=False),
    "crowdpose": dict(backbone="resnet50", input_size=(192, 256), epochs=220, lr_steps=(180, 210),
                      lr=1e-3, scale_factor=0.35, rot_factor=45.0, half_body_prob=0.3,
                      batch_size=64, workers=4, head_channels=256, channels_last=False),
    # mrpose.py's demo preset with the contrast on; not a paper setting
    "demo": dict(backbone="resnet18", input_size=(96, 128), epochs=5, lr_steps=(3,), lr=2e-3,
                 scale_factor=0.25, rot_factor=0.0, half_body_prob=0.0, batch_size=16, eval_every=2,
                 workers=1, head_channels=64, channels_last=True, amp="auto"),
}
JOINT_NAMES = {"coco": COCO_JOINTS, "demo": COCO_JOINTS, "mpii": MPII_JOINTS,
               "crowdpose": CROWDPOSE_JOINTS}
HRNETS = {"hrnet_w32": 32, "hrnet_w48": 48}
# the flags a checkpoint must match, named in its error
MODEL_FLAGS = "--backbone/--head-channels/--data"
# HRNet's release
HRNET_IMAGENET = {"hrnet_w32": "hrnet_w32-36af842e.pth", "hrnet_w48": "hrnet_w48-8ef0771d.pth"}
# Eqs. (2)-(3): "8 pairs ... adjacent joints (e.g. elbow -> wrist)": the limb bones, where M_kij = 1
# (a pair with M = 0 would be the zero vector, so only these are built)
LIMB_PAIRS = {
    "coco": [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)],
    "demo": [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)],
    "mpii": [(13, 14), (14, 15), (12, 11), (11, 10), (3, 4), (4, 5), (2, 1), (1, 0)],
    "crowdpose": [(0, 2), (2, 4), (1, 3), (3, 5), (6, 8), (8, 10), (7, 9), (9, 11)],
}
# joints whose raw flag says "labeled", not "visible" (CrowdPose's head and neck: v = 1 in every
# labeled person); they count from v = 1. MPII's json has no occlusion flag: every labeled joint
LABEL_ONLY_JOINTS = {"coco": [], "demo": [], "mpii": [], "crowdpose": [12, 13]}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-a", "--backbone", default=None, choices=list(RESNETS) + list(HRNETS),
                   help="resnet*: SimpleBaseline on that ResNet; hrnet_w32/w48: HRNet")
    p.add_argument("--pretrained", default=None,
                   help="ResNet: 'torchvision' (ImageNet, downloads; the coco/mpii/crowdpose "
                        "default), a backbone .pth or 'none' (scratch, the demo's); HRNet: "
                        "hrnet_w32-36af842e.pth (coco/mpii/crowdpose ask for it) or 'none'")
    p.add_argument("--head-channels", type=int, default=None, help="SimpleBaseline's deconv width")
    # ICON (§Method, §Implementation Details)
    p.add_argument("--lambda-p", type=float, default=1.0, help="λp of Eq. (5); 0: the baseline")
    p.add_argument("--lambda-1", type=float, default=0.3, help="λ1 of Eq. (5), SKCC")
    p.add_argument("--lambda-2", type=float, default=0.7, help="λ2 of Eq. (5), PRCC")
    p.add_argument("--no-skcc", dest="skcc", action="store_false", help="Table 5's Base+PRCC")
    p.add_argument("--no-prcc", dest="prcc", action="store_false", help="Table 5's Base+SKCC")
    p.add_argument("--tau", type=float, default=0.07, help="temperature τ of Eqs. (1), (4)")
    p.add_argument("--sampling", default="hard", choices=["hard", "random", "all"], help="Table 7")
    p.add_argument("--contrast", default="inter", choices=["inter", "intra"],
                   help="Table 5: across the instances of the batch, or within each instance")
    p.add_argument("--num-queries", type=int, default=256, help="queries per query class (Table 8)")
    p.add_argument("--num-negatives", type=int, default=512, help="per query class (Table 8)")
    p.add_argument("--hard-q", type=int, nargs=2, default=[5, 8], metavar=("SKCC", "PRCC"),
                   help="hard sampling: number of query classes Q")
    p.add_argument("--hard-h", type=int, nargs=2, default=[6, 4], metavar=("SKCC", "PRCC"),
                   help="hard sampling: number of negative classes H per query class")
    p.add_argument("--embed-dim", type=int, default=256, help="m, the projection head's width")
    p.add_argument("--region-thresh", type=float, default=0.5, help="a joint's pixels: target >=")
    p.add_argument("--visible-flag", type=int, default=2, choices=[1, 2],
                   help="lowest raw visibility flag counted as visible (contrast, --recall, "
                        "embeddings); 1 adds occluded joints")
    # data
    p.add_argument("--data", default="demo", choices=list(PRESETS),
                   help="dataset and its preset (table below); demo is generated, no download")
    p.add_argument("--data-root", default=None,
                   help="dataset root, in its official layout (default: data/DATA in the "
                        "repository)")
    p.add_argument("--ann", default=None, help="training annotation file (overrides --data-root)")
    p.add_argument("--images", default=None, help="training image folder (overrides --data-root)")
    p.add_argument("--labeled", type=parse_labeled, default=None, help="N persons or P%% of them")
    # semi-supervised (Table 4; common/semi.py, as mrpose.py --semi)
    p.add_argument("--semi", default=None, choices=["none", "dual", "pseudo"],
                   help="dual = SSPose (two networks), pseudo = Eq. (6) (frozen --teacher)")
    p.add_argument("--unlabeled", default="rest", choices=["all", "rest"],
                   help="unlabeled persons: those outside --labeled (ICON's) or all (Xie et al.'s)")
    p.add_argument("--teacher", default=None, help="--semi pseudo: a labeled-only checkpoint")
    p.add_argument("--joint-cutout", type=int, default=0, help="--semi dual: boxes per hard view")
    p.add_argument("--hard-rot-factor", type=float, default=None,
                   help="--semi dual: the hard view's rotation rf, p 0.8 (default: --rot-factor)")
    p.add_argument("--contrast-crops", default="all", choices=["all", "labeled"],
                   help="--semi: the contrast's persons, labeled and unlabeled or labeled only")
    p.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="network input width and height (default: the --data preset)")
    p.add_argument("--sigma", type=float, default=2.0, help="targets' σ (heatmap pixels)")
    # augmentation
    p.add_argument("--scale-factor", type=float, default=None,
                   help="sf: scale x N(1, sf) clipped to 1 ± sf")
    p.add_argument("--rot-factor", type=float, default=None,
                   help="rf: rotation N(0, rf) clipped to ±2rf, p 0.6, degrees")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="turn off the horizontal-flip augmentation (on by default)")
    p.add_argument("--half-body-prob", type=float, default=None, help="HRNet's half-body")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: preset)")
    p.add_argument("--iters", type=int, default=None, help="iteration budget (overrides --epochs)")
    p.add_argument("--lr-steps", type=int, nargs="+", default=None,
                   help="x0.1 at these epochs (or iterations with --iters)")
    p.add_argument("--lr", type=float, default=None, help="Adam's, not scaled with the batch")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="total over all ranks")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: the --data preset)")
    p.add_argument("--data-device", default="workers", choices=DATA_DEVICES, help=DATA_DEVICE_HELP)
    evaluation = add_pose_eval_args(p)  # the val set, its boxes, --eval-only, --weights
    evaluation.add_argument("--recall", action="store_true", help="Table 6's keypoint recall")
    finish_parser(p, PRESETS, out="runs/icon-DATA-BACKBONE[-SEMI][-baseline]")
    args = p.parse_args(argv)
    apply_presets(args, PRESETS[args.data])
    args.data_root = dataset_root(args, PRESETS)
    args.input_size = tuple(args.input_size)
    args.heatmap_size = (args.input_size[0] // 4, args.input_size[1] // 4)
    args.num_joints = len(JOINT_NAMES[args.data])
    args.semi = None if args.semi == "none" else args.semi
    args.unlabeled_ann = args.unlabeled_images = None  # ICON's unlabeled persons: the same set
    # --no-skcc / --no-prcc drop one term of Eq. (5); the other keeps its λ (paper silent)
    args.lambda_1 = args.lambda_1 if args.skcc else 0.0
    args.lambda_2 = args.lambda_2 if args.prcc else 0.0
    args.contrast_on = args.lambda_p > 0 and (args.lambda_1 > 0 or args.lambda_2 > 0)
    for flag in ("tau", "num_queries", "num_negatives", "embed_dim"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if args.backbone in HRNETS and args.pretrained == "torchvision":
        raise UserError("--pretrained torchvision: torchvision has no HRNet; pass the official "
                        "ImageNet .pth file")
    # ImageNet, as the paper; none for the demo or weights from a checkpoint / not needed
    if args.pretrained is None:
        if args.data == "demo" or args.eval_only or args.weights or args.resume or args.summary:
            args.pretrained = "none"
        elif args.backbone in HRNETS:
            raise UserError(f"--backbone {args.backbone} on --data {args.data}: pass --pretrained "
                            f"{HRNET_IMAGENET[args.backbone]} (HRNet's ImageNet weights) or "
                            f"--pretrained none")
        else:
            args.pretrained = "torchvision"
    if not 0 < args.region_thresh <= 1:
        raise UserError("--region-thresh must be in (0, 1]")
    args.out = args.out or os.path.join("runs", f"icon-{args.data}-{args.backbone}"
                                        + (f"-{args.semi}" if args.semi else "")
                                        + ("" if args.contrast_on else "-baseline"))
    args.resume = resume_path(args)
    return args


run_plan = pose_plan  # the --dry-run plan and OUT/args.json (common/plan.py)


# ----------------------------------------------------------------------------------------------
# Model (§Approach Overview): the baseline pose network, and a training-only projection head
# "parallel to the regression head" on ResNet's "res-4" (C4, stride 16) or HRNet's stage 3

class ProjectionHead(nn.Module):
    """f_proj: D-channel map -> unit m-dimensional pixel embeddings at the heatmaps' 1/4 (fp32)."""

    def __init__(self, cin, m, heatmap_size):
        super().__init__()
        self.heatmap_size = heatmap_size
        self.net = nn.Sequential(nn.Conv2d(cin, m, 1, bias=False), nn.BatchNorm2d(m),
                                 nn.ReLU(inplace=True), nn.Conv2d(m, m, 1))

    def forward(self, tap):
        w, h = self.heatmap_size
        z = F.interpolate(self.net(tap), size=(h, w), mode="bilinear", align_corners=False)
        return F.normalize(z.float(), dim=1)


class Tapped(nn.Module):
    """A pose network that also returns the map its projection head reads, in one forward (as DDP
    expects): ResNet's C4, or HRNet's stage-3 branches upsampled to 1/4 and concatenated."""

    def __init__(self, pose):
        super().__init__()
        self.pose = pose

    def forward(self, x):
        if isinstance(self.pose, PoseHighResolutionNet):
            heatmaps, stage3 = self.pose(x, return_stage3=True)
            size = stage3[0].shape[-2:]
            return heatmaps, torch.cat([stage3[0]] + [F.interpolate(y, size=size, mode="bilinear",
                                                                    align_corners=False)
                                                      for y in stage3[1:]], 1)
        return self.pose(x, return_c4=True)


class ICON(nn.Module):
    """What trains: `net`, a Tapped pose network or (--semi) common/semi.py's wrapper of them, and
    each trained network's projection head, applied to the passes with gradient it returns."""

    def __init__(self, net, heads):
        super().__init__()
        self.net, self.heads = net, nn.ModuleList(heads)

    def forward(self, *inputs):
        out = self.net(*inputs)
        if isinstance(out, dict):  # --semi: per network, its labeled crops and its hard view
            for key in ("sup", "cons"):
                out[key] = [(h, head(tap)) for (h, tap), head in zip(out[key], self.heads)]
            return out
        heatmaps, tap = out
        return heatmaps, self.heads[0](tap)


def build_model(args):
    """(pose network, projection head or None when the contrast is off, backbone loading report)."""
    report = None
    if args.backbone in HRNETS:
        pose = PoseHighResolutionNet(HRNETS[args.backbone], args.num_joints)
        if args.pretrained not in (None, "none"):
            report = load_hrnet_pretrained(pose, args.pretrained)
    else:
        backbone = ResNetFeatures(args.backbone,
                                  torchvision_weights=args.pretrained == "torchvision")
        if args.pretrained not in (None, "none", "torchvision"):
            report = load_backbone(backbone, args.pretrained)
        pose = SimpleBaseline(backbone, args.num_joints, args.head_channels)
    # built after the pose network, so the pose network's initialisation does not depend on it
    return pose, build_head(args, pose), report


def build_head(args, pose):
    """The projection head of a pose network (None when the contrast is off)."""
    if not args.contrast_on:
        return None
    channels = (sum(pose.stage3_channels) if isinstance(pose, PoseHighResolutionNet)
                else pose.backbone.channels[2])
    return ProjectionHead(channels, args.embed_dim, args.heatmap_size)


def print_summary(args):
    pose, head, _ = build_model(args)
    n, gmacs = summary(pose, args.input_size)
    extra = (f"; training-only projection head {sum(p.numel() for p in head.parameters()):,} "
             f"parameters" if head else "")
    print(f"{args.backbone} {args.input_size[0]}x{args.input_size[1]}, {args.num_joints} joints: "
          f"{n:,} parameters, {gmacs:.2f} GFLOPs (multiply-accumulates) at inference{extra}")


def build_networks(args, device):
    """(pose networks, their projection heads, the trained module, common/semi.py's wrapper or
    None), on `device`. poses[0] is evaluated and saved; --semi dual adds network 2."""
    pose, head, report = build_model(args)
    if report and dist.is_main():
        print(report)
    if args.weights:
        load_weights(pose, args.weights, flags=MODEL_FLAGS)
    poses, heads, semi = [pose], [head] if head else [], None
    if args.semi and not args.eval_only:
        other = build_model(args)[0]  # network 2 (dual) or the frozen teacher (pseudo)
        # with the contrast, each trained network also returns its tapped map; a teacher does not
        tapped = Tapped if head else (lambda f: f)
        semi = build_semi(args.semi, tapped(pose),
                          lambda: tapped(other) if args.semi == "dual" else other, args,
                          args.teacher)
        if args.semi == "dual":
            poses.append(other)
            heads += [build_head(args, other)] if head else []
    trained = ICON(semi or Tapped(pose), heads) if head else semi or pose
    trained.to(device)
    if args.channels_last:
        trained.to(memory_format=torch.channels_last)
    return poses, heads, trained, semi


# ----------------------------------------------------------------------------------------------
# ICON's contrast, SKCC (Eq. (1)) and PRCC (Eqs. (2)-(4)) with hard sampling: one block that needs
# only torch and takes explicit arguments; `icon_contrast` is its entry point. In the paper's order:
# keypoint pixels and Eq. (1), pair embeddings (Eqs. (2)-(3); Eq. (4) is Eq. (1) on them), hard
# sampling, then Eq. (5)'s sum. Batched over query classes and queries: the only Python loop is over
# SKCC and PRCC.

# --sampling random (§Hard Sampling): query and negative class counts, drawn uniformly each step
# (PRCC's 4-8 negative classes capped at the 7 other pairs)
RANDOM_COUNTS = {"skcc": dict(queries=(6, 9), negatives=(5, 10)),
                 "prcc": dict(queries=(3, 5), negatives=(4, 8))}
# a logit that vanishes in exp() yet keeps logsumexp's gradient finite (|i·j|/τ <= 1/0.07)
MASKED = -1e4


def region_offsets(sigma, thresh):
    """(dx, dy) offsets (O, 2) of the pixels whose Gaussian target exp(-d²/2σ²) is >= thresh."""
    r = int(sigma * 3)
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    keep = (dx ** 2 + dy ** 2) <= -2 * sigma ** 2 * math.log(thresh) + 1e-6
    return torch.stack([dx[keep], dy[keep]], -1)


def keypoint_embeddings(emb, joints, usable, input_size, offsets, claim=None):
    """Embeddings (B, K, O, m) of every joint's region pixels and their validity (B, K, O): a usable
    joint's on-map pixels that are its own, the nearest centre among the joints that `claim` them
    (B, K; default `usable`), so no pixel is its own negative."""
    b, m, h, w = emb.shape
    k = joints.shape[1]
    stride = joints.new_tensor([input_size[0] / w, input_size[1] / h])
    # the pixel gaussian_targets centres the Gaussian on
    mu = torch.trunc(joints / stride + 0.5).long()
    centre_on = (mu[..., 0] >= 0) & (mu[..., 0] < w) & (mu[..., 1] >= 0) & (mu[..., 1] < h)
    px = mu[:, :, None, :] + offsets.to(mu.device)
    on = (px[..., 0] >= 0) & (px[..., 0] < w) & (px[..., 1] >= 0) & (px[..., 1] < h)
    claim = usable if claim is None else claim | usable
    # (B, K, O, K): pixel -> every centre
    d2 = ((px[:, :, :, None] - mu[:, None, None]) ** 2).sum(-1).float()
    owner = d2.masked_fill(~claim[:, None, None, :], math.inf).argmin(-1)
    own = owner == torch.arange(k, device=mu.device)[:, None]
    valid = (usable & centre_on)[..., None] & on & own
    index = px[..., 1].clamp(0, h - 1) * w + px[..., 0].clamp(0, w - 1)
    flat = emb.permute(0, 2, 3, 1).reshape(b, h * w, m)
    return flat[torch.arange(b, device=emb.device)[:, None, None], index], valid


def sample_contrast(valid, qc, neg_classes, num_queries, num_negatives, intra, person=None):
    """Eq. (1)'s draws for the query classes `qc`, indexed into the class-major pool (C, B*O) of
    `valid` (B, C, O): queries with replacement (ReCo); positives P_i the class's pixels in another
    person (inter; `person` (B,) ids) or the query's own joint's other pixels (intra); negatives
    N_i drawn from the negative classes (inter) or all of them in the query's instance (intra)."""
    b, c, o = valid.shape
    device = valid.device
    ok = valid.transpose(0, 1).reshape(c, b * o)
    inst = torch.arange(b, device=device).repeat_interleave(o)  # instance of each pool entry
    qi = torch.multinomial(ok[qc].float(), num_queries, replacement=True)  # (nq, Nq)
    q_inst = inst[qi]
    if intra:
        same = q_inst[..., None] == inst  # (nq, Nq, B*O)
        pos_mask = ok[qc][:, None] & same & (qi[..., None] != torch.arange(b * o, device=device))
    else:
        pid = torch.arange(b, device=device) if person is None else person.to(device)
        pos_mask = ok[qc][:, None] & (pid[q_inst][..., None] != pid[inst])
    candidates = (neg_classes[:, :, None] & ok[None]).reshape(len(qc), c * b * o)
    if intra:
        neg_index = None
        neg_mask = candidates[:, None, :] & (q_inst[..., None] == inst.repeat(c))  # (nq, Nq, C*B*O)
    else:
        # (nq, Nn)
        neg_index = torch.multinomial(candidates.float(), num_negatives, replacement=True)
        neg_mask = None
    return dict(qi=qi, q_inst=q_inst, pos_mask=pos_mask, neg_index=neg_index, neg_mask=neg_mask)


def info_nce(q, pos, pos_mask, neg, neg_mask, tau):
    """Eq. (1) (Eq. (4) on pair embeddings), batched over query classes:
        L_i = 1/|P_i| Σ_{p ∈ P_i} -log( e^{i·p/τ} / (e^{i·p/τ} + Σ_{n ∈ N_i} e^{i·n/τ}) )
    q (nq, Nq, m); pos (nq, P, m), pos_mask (nq, Nq, P); neg (nq, N, m) or shared (N, m), neg_mask
    (nq, Nq, N) or None. Mean over queries, then classes -> (loss, classes that contributed)."""
    s_pos = q @ pos.transpose(-1, -2) / tau  # (nq, Nq, P)
    s_neg = q @ neg.transpose(-1, -2) / tau  # (nq, Nq, N)
    has_neg = torch.ones_like(pos_mask[..., 0])
    if neg_mask is not None:
        s_neg = s_neg.masked_fill(~neg_mask, MASKED)
        has_neg = neg_mask.any(-1)
    lse = torch.logsumexp(s_neg, -1, keepdim=True)
    nll = torch.logaddexp(s_pos, lse) - s_pos  # -log(e^sp / (e^sp + Σ e^sn)), stable
    n_pos = pos_mask.sum(-1)
    per_query = (nll * pos_mask).sum(-1) / n_pos.clamp(min=1)
    has = (n_pos > 0) & has_neg
    per_class = (per_query * has).sum(-1) / has.sum(-1).clamp(min=1)
    counted = has.any(-1)
    return (per_class * counted).sum() / counted.sum().clamp(min=1), int(counted.sum())


def pair_embeddings(feats, valid, pairs):
    """Eq. (3): f_kij = M_kij (f_ki + f_kj) / 2 over the limb pairs (M = 1), re-normalised; region
    pixel o of joint i pairs with pixel o of joint j, valid where both are."""
    a, b = (torch.tensor(s, device=feats.device) for s in zip(*pairs))
    return F.normalize((feats[:, a] + feats[:, b]) / 2, dim=-1), valid[:, a] & valid[:, b]


def class_hardness(heatmaps, target, usable):
    """Per-class hardness, "larger uncertainty (entropy of joint prediction value) and prediction
    loss": heatmap entropy / log HW plus MSE over the usable instances, each scaled to max 1."""
    heat = heatmaps.detach().float()
    p = heat.relu().flatten(2) + 1e-12
    p = p / p.sum(-1, keepdim=True)
    entropy = -(p * p.log()).sum(-1) / math.log(p.shape[-1])
    mse = ((heat - target) ** 2).flatten(2).mean(-1)
    n = usable.sum(0).clamp(min=1)
    e, l = (entropy * usable).sum(0) / n, (mse * usable).sum(0) / n
    return e / e.max().clamp(min=1e-12) + l / l.max().clamp(min=1e-12)


def choose_classes(sampling, hardness, proto, eligible, present, q, h, counts):
    """Query classes (nq,) and their negative classes (nq, C) as a mask. hard: the q hardest, each
    against the h most similar prototypes ("feature similarity ... cosine"); random: uniform counts
    and classes; all: every eligible class against every other present class."""
    c = len(eligible)
    device = eligible.device
    n_eligible = int(eligible.sum())
    other = present[None, :] & ~torch.eye(c, dtype=torch.bool, device=device)
    if sampling == "all":
        qc = eligible.nonzero()[:, 0]
        neg = other[qc]
    else:
        if sampling == "hard":
            qc = hardness.masked_fill(~eligible, -math.inf).topk(min(q, n_eligible)).indices
            keys = proto[qc] @ proto.T  # cosine similarity of unit prototypes
            n_neg = torch.full((len(qc),), h, device=device)
        else:
            lo, hi = counts["queries"]
            nq = min(int(torch.randint(lo, hi + 1, ())), n_eligible)
            qc = torch.rand(c, device=device).masked_fill(~eligible, -math.inf).topk(nq).indices
            keys = torch.rand(len(qc), c, device=device)
            lo, hi = counts["negatives"]
            hi = min(hi, c - 1)
            n_neg = torch.randint(min(lo, hi), hi + 1, (len(qc),), device=device)
        keys = keys.masked_fill(~other[qc], -math.inf)
        rank = keys.argsort(-1, descending=True).argsort(-1)  # 0 = most similar / first drawn
        neg = (rank < n_neg[:, None]) & other[qc]
    keep = neg.any(-1)
    return qc[keep], neg[keep]


def contrast_term(feats, valid, hardness, *, sampling, num_query_classes, num_negative_classes,
                  random_counts, num_queries, num_negatives, tau, intra, person=None):
    """SKCC (Eq. (1)) or PRCC (Eq. (4)): feats (B, C, O, m) unit embeddings of the C classes
    (keypoints or limb pairs), valid (B, C, O), hardness (C,) -> (loss, query classes used)."""
    b, c, o, m = feats.shape
    count = valid.sum(-1)  # (B, C) pixels per instance and class
    present = (count > 0).any(0)
    # a query class needs a positive: in two persons (inter), two pixels of one joint (intra)
    if intra:
        eligible = (count >= 2).any(0)
    else:
        pid = torch.arange(b, device=feats.device) if person is None else person.to(feats.device)
        differ = (pid[:, None] != pid[None, :])[..., None]
        eligible = ((count > 0)[:, None] & (count > 0)[None] & differ).any(0).any(0)
    pool = feats.transpose(0, 1).reshape(c, b * o, m)
    ok = valid.transpose(0, 1).reshape(c, b * o)
    with torch.no_grad():  # class prototypes for hard negatives
        proto = F.normalize((pool * ok[..., None]).sum(1), dim=-1)
    qc, neg_classes = choose_classes(sampling, hardness, proto, eligible, present,
                                     num_query_classes, num_negative_classes, random_counts)
    if len(qc) == 0:
        return feats.sum() * 0, 0
    s = sample_contrast(valid, qc, neg_classes, num_queries, num_negatives, intra, person)
    q = pool[qc[:, None], s["qi"]]
    flat = pool.reshape(c * b * o, m)
    neg = flat if intra else flat[s["neg_index"]]
    return info_nce(q, pool[qc], s["pos_mask"], neg, s["neg_mask"], tau)


def icon_contrast(heatmaps, emb, joints, target, usable, *, input_size, pairs, claim=None,
                  person=None, lambda_1=0.3, lambda_2=0.7, tau=0.07, sigma=2.0, region_thresh=0.5,
                  sampling="hard", intra=False, num_queries=256, num_negatives=512, hard_q=(5, 8),
                  hard_h=(6, 4), random_counts=RANDOM_COUNTS):
    """L_ctrcon = λ1 L_sin + λ2 L_pair (Eq. (5)) of one pool of person crops (defaults: the
    paper's). heatmaps, target (B, K, h, w); emb (B, m, h, w) unit pixel embeddings; joints (B, K,
    2) input pixels; usable, claim (B, K); person (B,) ids -> (loss, {"skcc", "prcc"} detached)."""
    offsets = region_offsets(sigma, region_thresh)
    feats, valid = keypoint_embeddings(emb, joints, usable, input_size, offsets, claim)
    hardness = class_hardness(heatmaps, target, usable.float()) if sampling == "hard" else None
    shared = dict(sampling=sampling, num_queries=num_queries, num_negatives=num_negatives, tau=tau,
                  intra=intra, person=person)
    ctr = emb.sum() * 0  # the head stays in the graph when no class qualifies: DDP needs its grads
    terms = {}
    if lambda_1 > 0:
        l_sin, _ = contrast_term(feats, valid, hardness, num_query_classes=hard_q[0],
                                 num_negative_classes=hard_h[0],
                                 random_counts=random_counts["skcc"], **shared)  # Eq. (1)
        ctr = ctr + lambda_1 * l_sin
        terms["skcc"] = l_sin.detach()
    if lambda_2 > 0:
        pair_feats, pair_valid = pair_embeddings(feats, valid, pairs)  # Eqs. (2)-(3)
        a, b = (list(s) for s in zip(*pairs))
        pair_hardness = None if hardness is None else (hardness[a] + hardness[b]) / 2
        l_pair, _ = contrast_term(pair_feats, pair_valid, pair_hardness,
                                  num_query_classes=hard_q[1], num_negative_classes=hard_h[1],
                                  random_counts=random_counts["prcc"], **shared)  # Eq. (4)
        ctr = ctr + lambda_2 * l_pair
        terms["prcc"] = l_pair.detach()
    return ctr, terms


# ----------------------------------------------------------------------------------------------
# The train step: Eq. (5); under --semi (Table 4), Eq. (7): common/semi.py's loss (SSPose's dual
# networks, or Eq. (6)'s pseudo-label teacher) plus each trained network's contrast

# γ of Eq. (6): a pseudo-labeled joint enters the contrast where its map's peak reaches it
PSEUDO_GAMMA = 0.75


def visible_flags(args):
    """(K,) the lowest raw flag at which each joint counts as visible ("only the visible keypoint
    categories are considered")."""
    t = torch.full((args.num_joints,), float(args.visible_flag))
    t[LABEL_ONLY_JOINTS[args.data]] = 1.0
    return t


def train_step(model, semi, batch, args, device, rng):
    """One batch through `model` (DDP and compiled) -> the loss and its terms (detached). With the
    contrast off (λp = 0) this is mrpose.py's step exactly."""
    labeled = batch["labeled"] if semi else batch
    x = to_memory_format(normalize(labeled["image"].to(device, non_blocking=True)), args)
    joints = labeled["joints"].to(device)
    target, weight = gaussian_targets(joints, labeled["visible"].to(device), args.input_size,
                                      args.heatmap_size, args.sigma)
    if semi:
        xu = batch["unlabeled"]["image"].to(device, non_blocking=True)
        xu = to_memory_format(normalize(xu), args)
        with autocast(args, device):
            out = model(x, xu, semi.draw_view(rng, xu.shape[0]))
        loss, terms = semi.loss(out, target, weight)  # Eq. (6), or the dual loss
        outs = out["sup"]
    else:
        with autocast(args, device):
            out = model(x)
        outs = [out]
        loss = joints_mse_loss(heatmaps_of(out).float(), target, weight)  # L_mse
        terms = {"mse": loss.detach()}
    if not args.contrast_on:
        return loss, terms
    usable = (labeled["vis_flag"].to(device) >= visible_flags(args).to(device)) & (weight > 0)
    person = labeled["pid"].to(device)
    for i, (heatmaps, emb) in enumerate(outs):  # each trained network's own pool
        pool = [heatmaps.float(), emb, joints, target, usable, weight > 0, person]
        if semi and args.contrast_crops == "all":  # its unlabeled crops with gradient too
            teacher = out["targets"][i]
            stride = teacher.new_tensor([args.input_size[0] / teacher.shape[-1],
                                         args.input_size[1] / teacher.shape[-2]])
            confident = pseudo_label_mask(teacher.detach(), PSEUDO_GAMMA) > 0
            heatmaps_u, emb_u = out["cons"][i]
            pool_u = [heatmaps_u.float(), emb_u, argmax_joints(teacher.detach()) * stride, teacher,
                      confident, confident, batch["unlabeled"]["pid"].to(device)]
            pool = [torch.cat(pair) for pair in zip(pool, pool_u)]
        heatmaps, emb, joints_p, target_p, usable_p, claim, person_p = pool
        ctr, parts = icon_contrast(heatmaps, emb, joints_p, target_p, usable_p, claim=claim,
                                   person=person_p, input_size=args.input_size,
                                   pairs=LIMB_PAIRS[args.data], lambda_1=args.lambda_1,
                                   lambda_2=args.lambda_2, tau=args.tau, sigma=args.sigma,
                                   region_thresh=args.region_thresh, sampling=args.sampling,
                                   intra=args.contrast == "intra", num_queries=args.num_queries,
                                   num_negatives=args.num_negatives, hard_q=args.hard_q,
                                   hard_h=args.hard_h)
        loss = loss + args.lambda_p * ctr  # Eq. (5) (Eq. (7) under --semi)
        terms.update({f"{k}{i + 1}" if semi else k: v for k, v in parts.items()})
    return loss, terms


# ----------------------------------------------------------------------------------------------
# Training, as MoCo's main_moco.py: main() sets up, then each epoch trains (train), evaluates
# (validate) and saves (common/topdown.py's save_outputs)

# --resume refuses a change of these (the model, the loss, the schedule and the data)
RESUME_KEYS = ("backbone", "head_channels", "input_size", "batch_size", "lr", "lr_steps", "amp",
               "lambda_p", "lambda_1", "lambda_2", "tau", "sampling", "contrast", "num_queries",
               "num_negatives", "hard_q", "hard_h", "embed_dim", "region_thresh", "visible_flag",
               "semi", "contrast_crops", "data", "seed", "data_seed", "ann", "images",
               "labeled")


def train(loader, model, semi, optimizer, scheduler, scaler, epoch, it, total_iters, args, device,
          data_device):
    """One epoch, or up to iteration `total_iters`. Returns the epoch's log entry (each term of the
    step averaged over iterations and ranks, lr, img/s) and the iteration reached."""
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
        loss, terms = train_step(model, semi, batch, args, device,
                                 np.random.default_rng([args.seed, dist.rank(), it]))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        it += 1
        values = {"loss": loss.detach(), **terms}
        sums = {k: sums.get(k, 0) + v for k, v in values.items()}
        n_iters += 1
        n = (batch["labeled"] if semi else batch)["image"].shape[0] * world
        n_seen += n
        if (i + 1) % args.print_freq == 0:
            # the same on every rank: all stop together
            mean = {k: dist.all_reduce_mean(v) for k, v in values.items()}
            check_finite(mean["loss"], it, os.path.join(args.out, "checkpoint.pth"))
            progress.step(i, args.print_freq * n, lr=optimizer.param_groups[0]["lr"],
                          **{k: v.item() for k, v in mean.items()})
    means = {k: dist.all_reduce_mean(v / max(1, n_iters)) for k, v in sums.items()}
    check_finite(means["loss"], it, os.path.join(args.out, "checkpoint.pth"))
    return dict(epoch=epoch + 1, iteration=it, **{k: v.item() for k, v in means.items()},
                lr=optimizer.param_groups[0]["lr"], img_per_s=n_seen / (time.time() - t0)), it


def resume(path, args, poses, heads, **states):
    """Load the run saved in `path`: the pose network(s) and projection head(s), then each of
    `states` (optimizer=...). Returns (epoch, iteration, best score)."""
    ckpt = load_checkpoint(path)
    check_resume_args(path, ckpt.get("args", {}), args, RESUME_KEYS)
    load_weights(poses[0], path, ckpt, flags=MODEL_FLAGS)
    if len(poses) == 2:
        load_weights(poses[1], path, ckpt["model2"], flags=MODEL_FLAGS)
    for key, head in zip(("proj", "proj2"), heads):
        head.load_state_dict(ckpt[key])
    epoch, it = restore_training(path, ckpt, dist.rank(), **states)
    return epoch, it, ckpt["best"]


def validate_recall(pose, val_ds, args, device, info):
    """Table 6: keypoint recall (common/metrics.py) on GT boxes; every rank predicts, rank 0 writes
    recall.json."""
    gt_ds = val_ds
    if args.det_json:  # val_ds holds detections
        records, _ = read_coco(info["coco"], data_paths(args)["val_images"],
                               args.input_size[0] / args.input_size[1])
        gt_ds = TopDownDataset(records, args.input_size, info["flip_pairs"], [])
    _, conf, _ = predict(pose, gt_ds, args, device, info)
    flags = np.stack([r.get("vis_flag", 2 * r["visible"]) for r in gt_ds.records])
    recall = keypoint_recall(conf, flags, visible_flags(args).numpy())
    if dist.is_main():
        save_json(os.path.join(args.out, "recall.json"), recall)
        print("recall: " + " ".join(f"{t} {v:.3f}" for t, v in recall.items()), flush=True)
    return {"recall": recall}


def main():
    args = get_args()
    if begin(args, run_plan, print_summary):  # --dry-run, --summary: nothing to train
        return
    device, data_device = setup(args)
    poses, heads, trained, semi = build_networks(args, device)
    pose = poses[0]
    train_ds, val_ds, info = load_data(args)
    if args.eval_only:
        validate(pose, val_ds, args, device, info, oracle=args.oracle)
        if args.recall and not args.oracle:
            validate_recall(pose, val_ds, args, device, info)
        dist.cleanup()
        return
    if semi:  # an item is a (labeled, unlabeled) pair; an epoch walks the larger set
        train_ds = PairedDataset(train_ds, build_unlabeled(args, train_ds, info), args.seed)
    # the contrast runs over each rank's own batch
    loader, sampler, (total_iters, epochs, milestones, eval_every) = train_loader(
        args, train_ds, device, data_device)

    # Optimisation: BatchNorm per rank, as HRNet's DataParallel; Adam, no weight decay (HRNet),
    # over the pose network(s) then the projection head(s), never a frozen teacher
    ddp_model = compile_model(dist.ddp(trained, device), args.compile)
    optimizer = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=args.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    start_epoch, it, best, epochs, history = resume_run(
        args, lambda path: resume(path, args, poses, heads, optimizer=optimizer,
                                  scheduler=scheduler, scaler=scaler),
        total_iters, epochs, len(loader))
    if dist.is_main():
        print(f"{args.backbone}: {sum(p.numel() for p in pose.parameters()):,} parameters; "
              f"{len(train_ds)} train {'pairs' if semi else 'persons'} / {len(val_ds)} val "
              f"persons; {len(loader)} it/epoch x {epochs} epochs = {total_iters} iterations on "
              f"{dist.world_size()} x {device}; "
              + (f"ICON λp {args.lambda_p} (λ1 {args.lambda_1}, λ2 {args.lambda_2}), "
                 f"{args.sampling} sampling, {args.contrast}-image" if heads else "baseline")
              + (f"; --semi {args.semi}" if semi else ""))
    # besides network 1: network 2 and the mean of both heatmaps (--semi dual, the official three)
    others = ({"net2": poses[1], "ensemble": Ensemble(nn.ModuleList(poses))} if len(poses) == 2
              else None)

    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        log, it = train(loader, ddp_model, semi, optimizer, scheduler, scaler, epoch, it,
                        total_iters, args, device, data_device)
        last = it >= total_iters
        best_state = None
        if (epoch + 1) % eval_every == 0 or last:
            dist.broadcast_buffers(pose)
            log.update(validate(pose, val_ds, args, device, info, others))
            if args.recall and last:
                log.update(validate_recall(pose, val_ds, args, device, info))
            if dist.is_main() and main_metric(log["metrics"]) > best:
                best = main_metric(log["metrics"])
                # the inference model: the pose network alone, without the projection head
                best_state = {"model": pose.state_dict(), "args": vars(args), "epoch": epoch + 1,
                              "metrics": log["metrics"]}
        history.append(log)
        rngs = dist.gather_objects(rng_state())
        if dist.is_main():  # network 1 under "model" (it evaluates as a pose network), others apart
            state = dict(model=pose.state_dict(), optimizer=optimizer.state_dict(),
                         scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                         epoch=epoch + 1, iteration=it, best=best, args=vars(args), rng=rngs)
            state.update({k: m.state_dict() for k, m in zip(("proj", "proj2"), heads)})
            state.update({"model2": f.state_dict() for f in poses[1:]})
            save_outputs(args.out, state, history, best_state)
            print_epoch(log, epochs)
        if last:
            break
    dist.cleanup()


if __name__ == "__main__":
    run_main(main)

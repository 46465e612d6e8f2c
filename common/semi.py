"""Xie et al.'s semi-supervised pose framework (ICCV 2021, code xierc/Semi_Human_Pose): `--semi
dual|cons`, and ICON's pseudo-label baseline (Eq. (6)): `--semi pseudo`. Each network runs once
per input and its output is passed through untouched, so a method can add its own terms.
Choices: README.md and eval/README.md#choices-in-detail.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.datasets import TopDownDataset, read_aic
from common.heatmap import joints_mse_loss
from common.topdown import load_weights
from common.utils import UserError

# ----------------------------------------------------------------------------------------------
# Data: labeled and unlabeled crops paired 1:1


class PairedDataset(torch.utils.data.Dataset):
    """Item i = {"labeled": crop, "unlabeled": crop}: an epoch walks the larger set once, each crop
    paired with one of the other set drawn with replacement (official mix_coco_coco.py)."""

    def __init__(self, labeled, unlabeled, seed=0):
        self.labeled, self.unlabeled, self.seed = labeled, unlabeled, seed
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.labeled.set_epoch(epoch)
        self.unlabeled.set_epoch(epoch)
        small, large = sorted((len(self.labeled), len(self.unlabeled)))
        self.drawn = np.random.default_rng([self.seed, epoch, 1314]).integers(0, small, large)

    def __len__(self):
        return len(self.drawn)

    def __getitem__(self, i):
        j = int(self.drawn[i])
        walk_unlabeled = len(self.unlabeled) >= len(self.labeled)
        return {"labeled": self.labeled[j if walk_unlabeled else i, (i, 0)],
                "unlabeled": self.unlabeled[i if walk_unlabeled else j, (i, 1)]}


def build_unlabeled(args, train_ds, info):
    """The unlabeled person crops (--unlabeled all|rest, or AI Challenger's via --unlabeled-ann),
    without keypoints, augmented as the labeled crops with their own draws (seed + 1)."""
    # a training person keeps its person id; another set's persons come after them
    n, rest = len(train_ds.records), info["unlabeled"]
    if args.unlabeled_ann:
        if not args.unlabeled_images:
            raise UserError(f"{args.unlabeled_ann}: --unlabeled-ann needs --unlabeled-images (its "
                            "image folder)")
        records = read_aic(args.unlabeled_ann, args.unlabeled_images, train_ds.aspect_ratio)[0]
        pids = range(n + len(rest), n + len(rest) + len(records))
        where = args.unlabeled_ann
    else:
        records = rest if args.unlabeled == "rest" else train_ds.records + rest
        pids = [r.get("pid", i) for i, r in enumerate(records, n if args.unlabeled == "rest"
                                                      else 0)]
        where = f"--unlabeled {args.unlabeled}"
    if not records:
        raise UserError(f"{where}: no unlabeled person to train on")
    k = args.num_joints
    records = [dict(r, joints=np.zeros((k, 2), np.float32), visible=np.zeros(k, np.float32), pid=p)
               for r, p in zip(records, pids)]
    return TopDownDataset(records, args.input_size, train_ds.flip_pairs, train_ds.upper_ids,
                          train=True, scale_factor=train_ds.scale_factor,
                          rot_factor=train_ds.rot_factor, flip=train_ds.flip, half_body_prob=0.0,
                          seed=train_ds.seed + 1)


# ----------------------------------------------------------------------------------------------
# The hard view: one random affine per sample, applied to images and heatmaps on the device


def hard_affine(rng, n, scale_factor=0.25, rot_factor=30.0, rot_prob=0.8):
    """(n, 2, 3) affine_grid matrices [M | 0] of the official pose_dual.py law: scale s ~ N(1, sf),
    rotation r ~ N(0, rf) with probability `rot_prob`, both clipped; M = getRotationMatrix2D."""
    s = np.clip(rng.standard_normal(n) * scale_factor + 1, 1 - scale_factor, 1 + scale_factor)
    r = np.where(rng.random(n) <= rot_prob,
                 np.clip(rng.standard_normal(n) * rot_factor, -2 * rot_factor, 2 * rot_factor), 0.0)
    a, b = s * np.cos(np.radians(r)), s * np.sin(np.radians(r))
    theta = np.stack([np.stack([a, b, 0 * a], -1), np.stack([-b, a, 0 * a], -1)], 1)
    return torch.from_numpy(theta).float()


def warp_images(x, theta):
    """The hard view of a batch (bilinear; zero padding is the mean colour, as official)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def heatmap_theta(theta, input_size, heatmap_size):
    """θ for heatmaps: heatmap pixel j stands for input pixel stride·j, i.e. v = u + d with
    d = (stride - 1) / W_in, so the translation gains (I - M) d (the official code reuses θ)."""
    d = theta.new_tensor([(input_size[0] / heatmap_size[0] - 1) / input_size[0],
                          (input_size[1] / heatmap_size[1] - 1) / input_size[1]])
    m = theta[:, :, :2]
    t = theta[:, :, 2] + d - (m @ d[:, None]).squeeze(-1)
    return torch.cat([m, t[..., None]], dim=-1)


def warp_heatmaps(h, theta, input_size):
    """Heatmaps (B, K, h, w) of the easy view -> the hard view of `warp_images(x, theta)`."""
    return warp_images(h, heatmap_theta(theta.to(h.device, h.dtype), input_size,
                                        (h.shape[-1], h.shape[-2])))


def argmax_joints(heatmaps):
    """Integer argmax (x, y) per channel, whatever the peak's value (official
    get_max_preds_tensor, which Joint Cutout uses)."""
    b, k, h, w = heatmaps.shape
    idx = heatmaps.reshape(b, k, -1).argmax(-1)
    return torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], -1).to(heatmaps.dtype)


def cutout_draw(rng, n, boxes, num_joints, input_height):
    """Random part of Joint Cutout (official pose_dual.py mask_joint), its pixel sizes scaled from
    256-row inputs; joints drawn from the dataset's own, not the official 24-channel union."""
    f = input_height / 256
    return {"jitter": torch.from_numpy(rng.standard_normal((n, num_joints, 2)) * 10 * f).float(),
            "half": torch.from_numpy(np.round(rng.integers(10, 20,
                                                           (n, num_joints, 2)) * f)).float(),
            "joint": torch.from_numpy(rng.integers(0, num_joints, (n, boxes)))}


def joint_cutout(x, joints, draw):
    """Zero (the mean colour) a box around each drawn joint; joints (B, K, 2) in input pixels.
    Boxes are clipped to the image's own width and height (the official clamp swaps them)."""
    b, _, h, w = x.shape
    centre = torch.trunc(joints + draw["jitter"].to(x.device))
    lo, hi = centre - draw["half"].to(x.device), centre + draw["half"].to(x.device)
    chosen = draw["joint"].to(x.device)[..., None].expand(-1, -1, 2)
    lo, hi = torch.gather(lo, 1, chosen), torch.gather(hi, 1, chosen)  # (B, boxes, 2)
    cols, rows = torch.arange(w, device=x.device), torch.arange(h, device=x.device)
    in_x = (cols >= lo[..., 0:1]) & (cols < hi[..., 0:1])  # (B, n, w)
    in_y = (rows >= lo[..., 1:2]) & (rows < hi[..., 1:2])  # (B, n, h)
    mask = (in_y[..., :, None] & in_x[..., None, :]).any(1)  # (B, h, w)
    return x.masked_fill(mask[:, None], 0.0)


def heatmaps_of(output):
    """A network's heatmaps: its output, or the first of the (heatmaps, features) it returns."""
    return output[0] if isinstance(output, tuple) else output


def mean_peak(heatmaps):
    """Mean heatmap peak: falls toward 0 when the networks collapse to background."""
    return heatmaps.detach().flatten(2).amax(-1).mean()


# ----------------------------------------------------------------------------------------------
# Xie et al.: dual networks (pose_dual) or one network (pose_cons) taught on the hard view


class ConsistencyTraining(nn.Module):
    """Two networks teach each other on the hard view (dual, official pose_dual) or one teaches
    itself (`net2` None: pose_cons); each pass has its own BatchNorm statistics, as official."""

    def __init__(self, net1, net2, input_size, heatmap_size, num_joints, scale_factor=0.25,
                 rot_factor=30.0, cutout=0, channels_last=False):
        super().__init__()
        self.nets = nn.ModuleList([net1] if net2 is None else [net1, net2])
        self.input_size, self.heatmap_size, self.num_joints = (tuple(input_size),
                                                               tuple(heatmap_size), num_joints)
        (self.scale_factor, self.rot_factor, self.cutout,
         self.channels_last) = scale_factor, rot_factor, cutout, channels_last

    def draw_view(self, rng, n):
        """The step's random part, drawn on the host so a run is reproducible."""
        view = {"theta": hard_affine(rng, n, self.scale_factor, self.rot_factor, rot_prob=0.8)}
        if self.cutout:
            view["cutout"] = [cutout_draw(rng, n, self.cutout, self.num_joints, self.input_size[1])
                              for _ in self.nets]
        return view

    def forward(self, x_l, x_u, view):
        sup = [f(x_l) for f in self.nets]
        with torch.no_grad():
            easy = [heatmaps_of(f(x_u)).float() for f in self.nets]
        teachers = easy[::-1]  # dual: network i learns from the other one; single: from itself
        stride = x_u.new_tensor([self.input_size[0] / self.heatmap_size[0],
                                 self.input_size[1] / self.heatmap_size[1]])
        theta = view["theta"].to(x_u.device)
        with torch.no_grad(), torch.autocast(x_u.device.type, enabled=False):  # the warps in fp32
            targets = [warp_heatmaps(t, theta, self.input_size) for t in teachers]
            # network i's hard view is cut at its teacher's predicted joints, then warped
            if self.cutout:
                hard = [warp_images(joint_cutout(x_u.float(), argmax_joints(t) * stride, d), theta)
                        for t, d in zip(teachers, view["cutout"])]
            else:
                hard = [warp_images(x_u.float(), theta)] * len(self.nets)
        if self.channels_last:
            hard = [h.contiguous(memory_format=torch.channels_last) for h in hard]
        cons = [f(h) for f, h in zip(self.nets, hard)]
        return {"sup": sup, "easy": easy, "targets": targets, "hard": hard, "cons": cons}

    def loss(self, out, target, weight):
        """Official PoseCoLoss (dual: supervised terms averaged) or PoseDisLoss (one network);
        every joint of an unlabeled crop counts."""
        ones = torch.ones_like(weight)
        sup = [joints_mse_loss(heatmaps_of(s).float(), target, weight) for s in out["sup"]]
        cons = [joints_mse_loss(heatmaps_of(c).float(), t, ones)
                for c, t in zip(out["cons"], out["targets"])]
        loss = sum(sup) / len(sup) + sum(cons)
        parts = {f"sup{i + 1}": s.detach() for i, s in enumerate(sup)}
        parts.update({f"cons{i + 1}": c.detach() for i, c in enumerate(cons)})
        parts.update({f"peak{i + 1}": mean_peak(e) for i, e in enumerate(out["easy"])})
        return loss, parts

    def eval_models(self):
        """Evaluated besides network 1 (the reported model)."""
        return ({"net2": self.nets[1], "ensemble": Ensemble(self.nets)} if len(self.nets) == 2
                else {})


class Ensemble(nn.Module):
    """The mean of the networks' heatmaps (the official third evaluation)."""

    def __init__(self, nets):
        super().__init__()
        self.nets = nets

    def forward(self, x):
        return sum(f(x) for f in self.nets) / len(self.nets)


# ----------------------------------------------------------------------------------------------
# ICON's pseudo-label baseline, Eq. (6)


def pseudo_label_mask(heatmaps, gamma=0.75):
    """(B, K) weights: 1 where the teacher's heatmap peak reaches γ, else 0."""
    return (heatmaps.flatten(2).amax(-1) >= gamma).float()


class PseudoLabelTraining(nn.Module):
    """A frozen teacher, trained on the labeled set only, labels the unlabeled crops online."""

    def __init__(self, student, teacher, gamma=0.75, lambda_u=0.1):
        super().__init__()
        self.nets = nn.ModuleList([student])
        self.teacher = teacher.requires_grad_(False).eval()
        self.gamma, self.lambda_u = gamma, lambda_u

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm keeps the statistics it was trained with
        return self

    def draw_view(self, rng, n):
        return None

    def forward(self, x_l, x_u, view=None):
        with torch.no_grad():
            pseudo = heatmaps_of(self.teacher(x_u)).float()
        sup, cons = [f(x_l) for f in self.nets], [f(x_u) for f in self.nets]
        return {"sup": sup, "easy": [pseudo], "targets": [pseudo], "cons": cons}

    def loss(self, out, target, weight):
        mask = pseudo_label_mask(out["targets"][0], self.gamma)
        sup = joints_mse_loss(heatmaps_of(out["sup"][0]).float(), target, weight)
        unsup = joints_mse_loss(heatmaps_of(out["cons"][0]).float(), out["targets"][0], mask)
        loss = sup + self.lambda_u * unsup  # Eq. (6)
        return loss, {"sup1": sup.detach(), "cons1": unsup.detach(),
                      "peak1": mean_peak(out["easy"][0]), "pseudo_kept": mask.mean()}

    def eval_models(self):
        return {}


def build_semi(mode, net1, make_net, args, teacher_path=None):
    """The `--semi` wrapper around the reported network `net1`; make_net() builds network 2 or the
    teacher (weights from `teacher_path`)."""
    hard_rot = getattr(args, "hard_rot_factor", None)
    if mode in ("dual", "cons"):
        return ConsistencyTraining(net1, make_net() if mode == "dual" else None, args.input_size,
                                   args.heatmap_size, args.num_joints, args.scale_factor,
                                   args.rot_factor if hard_rot is None else hard_rot,
                                   args.joint_cutout, args.channels_last)
    if not teacher_path:
        raise UserError("--semi pseudo needs --teacher (a checkpoint trained on the labeled set "
                        "only)")
    teacher = make_net()
    load_weights(teacher, teacher_path)
    return PseudoLabelTraining(net1, teacher)

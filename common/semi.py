"""Semi-supervised top-down pose training, shared by the pose scripts (`mrpose.py --semi`, `icon.py
--semi`).

Xie et al., "An Empirical Study of the Collapsing Problem in Semi-Supervised 2D Human Pose
Estimation" (ICCV 2021; MSCL calls it ESCP, ICON calls it SSPose; official code
xierc/Semi_Human_Pose), and the pseudo-label baseline of ICON (Xu et al., AAAI 2023, Eq. (6)):

- `PairedDataset`: every item is one labeled and one unlabeled person crop (1:1 per step).
- `ConsistencyTraining`: two networks (`dual`, the official pose_dual) or one (`cons`, pose_cons).
  Each network predicts the unlabeled easy view without gradient; a random affine (`hard_affine`)
  warps the batch into a hard view, on the training device and batched, and warps the teacher's
  heatmaps with it (`warp_heatmaps`, exact under this project's heatmap convention); optional Joint
  Cutout (`joint_cutout`). Network i regresses its hard view onto the other network's warped
  heatmaps.
- `PseudoLabelTraining`: a frozen teacher trained on the labeled set only; its heatmaps on the
  unlabeled crops supervise the joints whose peak reaches γ (`pseudo_label_mask`), weight λu.
- `mean_peak`: mean peak of the teachers' heatmaps on the unlabeled crops; it falls toward 0 when
  the networks collapse to all-background maps, the failure Xie et al. study.

A training script uses it in a few lines (see mrpose.py):

    semi_model = build_semi(args.semi, model, make_net, args, args.teacher)  # wraps `model`
    train_ds = PairedDataset(train_ds, build_unlabeled(args, train_ds, info), args.seed)
    ...  # each step, x / xu: normalised labeled / unlabeled crops; target, weight: gaussian_targets
    view = semi_model.draw_view(np.random.default_rng([seed, rank, it]), len(xu))
    out = ddp(semi_model)(x, xu, view)
    loss, parts = semi_model.loss(out, target, weight)

`out` holds per network its outputs on the labeled crops (`sup`) and on the hard views (`cons`;
pseudo: the unlabeled crops), passed through untouched (heatmaps, or (heatmaps, features) for a
network that returns both), the unlabeled easy-view heatmaps (`easy`), the consistency targets
(`targets`, no gradient) and the hard-view inputs (`hard`), so a method can add its own terms.

Coordinates: a joint at input pixel x sits at heatmap pixel x / stride (common.heatmap's
convention); input pixel i has its centre at i. `F.affine_grid`'s normalised coordinates
(align_corners=False) put pixel i of a size-n axis at (2i + 1)/n - 1.
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
    """Item i = {"labeled": crop, "unlabeled": crop}. An epoch walks the larger set once (the
    unlabeled one in the papers' settings) and pairs each of its crops with one of the other set
    drawn uniformly with replacement, redrawn every epoch (official: mix_coco_coco.py's
    np.random.choice(|L|, |U|)). Each crop's augmentation is drawn from its own key (epoch, pair
    index i, side), so a person drawn several times in an epoch gets a fresh crop each time, as the
    official code's fresh draw at every __getitem__, while a run stays deterministic and
    resumable."""

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


def read_unlabeled(ann_file, image_dir, aspect_ratio):
    """Person boxes of another set for the unlabeled crops: AI Challenger (MPII + AIC, the papers'
    only cross-set unlabeled data), its official json or the COCO-style one
    (common.datasets.read_aic)."""
    if not image_dir:
        raise UserError(f"{ann_file}: --unlabeled-ann needs --unlabeled-images (its image folder)")
    return read_aic(ann_file, image_dir, aspect_ratio)[0]


def build_unlabeled(args, train_ds, info):
    """The unlabeled person crops: --unlabeled all (every training person, the official default: the
    unlabeled set of its subsets includes the labeled persons), rest (the persons outside
    --labeled), or the persons of --unlabeled-ann (another set, e.g. AI Challenger for MPII+AIC).
    Keypoints are dropped: nothing of an unlabeled person but its box reaches the training step.
    Same easy-view augmentation as the labeled crops, with their own random draws (seed + 1)."""
    # person ids ("pid"), as TopDownDataset's: a training person keeps its own (its index in the
    # training list, labeled persons first, unless the record carries one); another set's persons
    # come after them
    n, rest = len(train_ds.records), info["unlabeled"]
    if args.unlabeled_ann:
        records = read_unlabeled(args.unlabeled_ann, args.unlabeled_images, train_ds.aspect_ratio)
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
    """(n, 2, 3) affine_grid matrices θ = [M | 0] of the official law (pose_dual.py
    get_batch_affine_transform): s ~ N(1, sf) clipped to 1 ± sf; r ~ N(0, rf) clipped to ±2rf with
    probability `rot_prob`, else 0; M = cv2.getRotationMatrix2D((0, 0), r, s), which acts on
    affine_grid's normalised coordinates (anisotropic in pixels for a non-square input, as
    official)."""
    s = np.clip(rng.standard_normal(n) * scale_factor + 1, 1 - scale_factor, 1 + scale_factor)
    r = np.where(rng.random(n) <= rot_prob,
                 np.clip(rng.standard_normal(n) * rot_factor, -2 * rot_factor, 2 * rot_factor), 0.0)
    a, b = s * np.cos(np.radians(r)), s * np.sin(np.radians(r))
    theta = np.stack([np.stack([a, b, 0 * a], -1), np.stack([-b, a, 0 * a], -1)], 1)
    return torch.from_numpy(theta).float()


def warp_images(x, theta):
    """The hard view of a batch: output pixel at normalised u samples the input at θ·(u, 1)
    (bilinear, zero padding = the mean colour of normalised images, as the official warp)."""
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def heatmap_theta(theta, input_size, heatmap_size):
    """θ for heatmaps that moves each heatmap point exactly with the image point it stands for.

    Heatmap pixel j stands for input pixel stride·j, so in normalised coordinates v = u + d with
    d = (stride - 1) / W_in per axis. The image warp u_easy = M u_hard + t becomes v_easy = M v_hard
    + t + (I - M) d. (The official code reuses θ as is, which misplaces the targets by a fraction of
    a heatmap pixel: up to 0.7 px at 192x256, a quarter of a pixel on average.)"""
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
    """Integer argmax (x, y) per channel in heatmap pixels, whatever the peak's value: the official
    get_max_preds_tensor that Joint Cutout uses (no quarter offset, and unlike HRNet's get_max_preds
    no zeroing of non-positive peaks)."""
    b, k, h, w = heatmaps.shape
    idx = heatmaps.reshape(b, k, -1).argmax(-1)
    return torch.stack([idx % w, torch.div(idx, w, rounding_mode="floor")], -1).to(heatmaps.dtype)


def cutout_draw(rng, n, boxes, num_joints, input_height):
    """Random part of Joint Cutout (pose_dual.py mask_joint): N(0, 10²) px jitter of each joint's
    centre and half-sizes uniform in {10..19} px per axis, one box per joint, then `boxes` joints
    per image drawn with replacement (a joint drawn twice is one box, as official). Pixel sizes are
    the official ones for 256-row inputs, scaled with the input height otherwise.
    Deviation (a fix): the official draws from the 24 channels of its joint union, several of which
    do not exist for the dataset (their argmax is (0, 0), so those boxes land in the corner); we
    draw from the dataset's own joints."""
    f = input_height / 256
    return {"jitter": torch.from_numpy(rng.standard_normal((n, num_joints, 2)) * 10 * f).float(),
            "half": torch.from_numpy(np.round(rng.integers(10, 20,
                                                           (n, num_joints, 2)) * f)).float(),
            "joint": torch.from_numpy(rng.integers(0, num_joints, (n, boxes)))}


def joint_cutout(x, joints, draw):
    """Joint Cutout: zero (the mean colour of normalised images) a box around each drawn joint.
    joints (B, K, 2) in input pixels. Boxes [c - half, c + half) per axis, c the truncated jittered
    centre (official `.int()`), clipped to the image. Deviation (a fix): the official clamp swaps
    width and height, so no box reached the bottom rows of a 192x256 crop (y clamped to 192)."""
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
    """Mean over samples and joints of each heatmap's peak (teachers on unlabeled crops): about the
    Gaussian's peak when healthy, toward 0 when the networks collapse to background."""
    return heatmaps.detach().flatten(2).amax(-1).mean()


# ----------------------------------------------------------------------------------------------
# Xie et al.: dual networks (pose_dual) or one network (pose_cons) taught on the hard view


class ConsistencyTraining(nn.Module):
    """Two networks of the same architecture teach each other (`net2` given: dual) or one network
    teaches itself (`net2` None: the official pose_cons). Every pass is separate (own BatchNorm
    batch statistics), as official: per network the labeled crops with gradient, the unlabeled easy
    view without, the hard view with."""

    def __init__(self, net1, net2, input_size, heatmap_size, num_joints, scale_factor=0.25,
                 rot_factor=30.0, cutout=0, channels_last=False):
        super().__init__()
        self.nets = nn.ModuleList([net1] if net2 is None else [net1, net2])
        self.input_size, self.heatmap_size, self.num_joints = (tuple(input_size),
                                                               tuple(heatmap_size), num_joints)
        (self.scale_factor, self.rot_factor, self.cutout,
         self.channels_last) = scale_factor, rot_factor, cutout, channels_last

    def draw_view(self, rng, n):
        """The random part of a step, drawn on the host so a run is reproducible: θ of the hard view
        (rotation with probability 0.8, the official law) and, with Joint Cutout, one draw per
        network."""
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
        """Official loss (loss.py PoseCoLoss): 0.5·MSE(sup1, G) + 0.5·MSE(sup2, G) + MSE(c1, T1) +
        MSE(c2, T2), T_i the other network's warped easy heatmaps (no gradient); every joint of an
        unlabeled crop counts (weight 1, no confidence threshold). Single network (PoseDisLoss):
        MSE(sup, G) + MSE(c, T)."""
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
        """Besides network 1 (the reported model, official): network 2 and the mean of both
        heatmaps."""
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
    """(B, K) weights: 1 where the teacher's heatmap peak is at least γ (a reliable pseudo-label),
    else 0."""
    return (heatmaps.flatten(2).amax(-1) >= gamma).float()


class PseudoLabelTraining(nn.Module):
    """A frozen teacher (trained on the labeled set only, kept in eval mode) labels the student's
    unlabeled crops online; the student's labeled and unlabeled passes are separate, as in the dual
    step."""

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
        """Eq. (6): MSE(P*, f(I)) on labeled crops + λu·MSE(f_t(I), f(I)) on the unlabeled joints
        whose teacher peak reaches γ (ICON: γ = 0.75, λu = 0.1)."""
        mask = pseudo_label_mask(out["targets"][0], self.gamma)
        sup = joints_mse_loss(heatmaps_of(out["sup"][0]).float(), target, weight)
        unsup = joints_mse_loss(heatmaps_of(out["cons"][0]).float(), out["targets"][0], mask)
        loss = sup + self.lambda_u * unsup  # Eq. (6)
        return loss, {"sup1": sup.detach(), "cons1": unsup.detach(),
                      "peak1": mean_peak(out["easy"][0]), "pseudo_kept": mask.mean()}

    def eval_models(self):
        return {}


def build_semi(mode, net1, make_net, args, teacher_path=None):
    """The training wrapper of `--semi dual|cons|pseudo` around the reported network `net1`.
    make_net() builds another network of the same architecture (network 2, or the teacher, whose
    weights come from the checkpoint `teacher_path`). Reads args.input_size, heatmap_size,
    num_joints, scale_factor, rot_factor, hard_rot_factor (optional: the hard view's rotation
    factor; default rot_factor, as the official configs' one ROT_FACTOR for both views),
    joint_cutout and channels_last."""
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

"""Semi-supervised training (common/semi.py, mrpose.py --semi): the hard-view geometry, the
consistency and pseudo-label steps, the data protocols, and one end-to-end dual run."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mrpose
from common.datasets import TopDownDataset
from common.heatmap import gaussian_targets, joints_mse_loss
from common.semi import (ConsistencyTraining, PairedDataset, PseudoLabelTraining, argmax_joints,
                         build_semi, build_unlabeled, cutout_draw, hard_affine, joint_cutout,
                         pseudo_label_mask, warp_heatmaps, warp_images)
from common.topdown import build_data
from common.transforms import normalize
from common.utils import UserError
from data.demo import make_demo
from helpers import SHARED, assert_one_line_error, run_script

INPUT, HEATMAP = (192, 256), (48, 64)  # (w, h), the COCO setting of Xie et al.


def hard_points(points, theta, size):
    """Where points (B, K, 2) in pixels of an image of `size` (w, h) land in the hard view:
    A = N⁻¹ θ⁻¹ N, N the pixel -> normalised map."""
    w, h = size
    scale, shift = (points.new_tensor([2.0 / w, 2.0 / h]),
                    points.new_tensor([1.0 / w - 1, 1.0 / h - 1]))
    u = points * scale + shift
    m, t = theta[:, :, :2].to(points), theta[:, :, 2].to(points)
    u = torch.linalg.solve(m, (u - t[:, None]).transpose(1, 2)).transpose(1, 2)
    return (u - shift) / scale


def gaussian_map(centres, size, sigma=2.0):
    """(B, 1, h, w) continuous Gaussians at `centres` (B, 2) in pixels of a map of `size` (w, h)."""
    w, h = size
    xs, ys = torch.arange(w, dtype=torch.float64), torch.arange(h, dtype=torch.float64)
    dx = xs[None, None, :] - centres[:, 0, None, None]
    dy = ys[None, :, None] - centres[:, 1, None, None]
    return torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))[:, None]


def centroid(maps):
    """(B, 2) centre of mass (x, y) of (B, 1, h, w) maps."""
    h, w = maps.shape[-2:]
    m = maps[:, 0].clamp(min=0)
    xs, ys = torch.arange(w, dtype=m.dtype), torch.arange(h, dtype=m.dtype)
    total = m.sum((1, 2))
    return torch.stack([(m.sum(1) * xs).sum(1) / total, (m.sum(2) * ys).sum(1) / total], -1)


def test_identity_warp_is_exact():
    x = torch.randn(3, 3, INPUT[1], INPUT[0], dtype=torch.float64)
    h = torch.rand(3, 17, HEATMAP[1], HEATMAP[0], dtype=torch.float64)
    eye = torch.eye(2, 3, dtype=torch.float64).repeat(3, 1, 1)
    # exact up to float64 rounding
    assert torch.allclose(warp_images(x, eye), x, atol=1e-12, rtol=0)
    assert torch.allclose(warp_heatmaps(h, eye, INPUT), h, atol=1e-12, rtol=0)
    # float32 grid rounding
    assert torch.allclose(warp_images(x.float(), eye.float()), x.float(), atol=1e-4, rtol=0)
    eye = eye.float()
    # the law's identity draw (no rotation, scale 1) is the identity matrix itself
    theta = hard_affine(np.random.default_rng(0), 4, scale_factor=0.0, rot_factor=30.0,
                        rot_prob=0.0)
    assert torch.equal(theta, eye.repeat(2, 1, 1)[:4])


def test_gaussian_moves_to_the_transformed_joint():
    """A blob at input pixel q lands at A·q (A = N⁻¹θ⁻¹N) in the hard image, and a σ=2 heatmap blob
    at q/4 lands at A·q/4 in the warped heatmap, within 0.05 heatmap px. Reusing the image's θ on
    the heatmaps (the official code) misses by more than 0.1 px: the deviation this code fixes."""
    n = 200
    theta = hard_affine(np.random.default_rng(1), n).double()
    g = torch.Generator().manual_seed(2)
    q = torch.stack([70 + 52 * torch.rand(n, generator=g, dtype=torch.float64),
                     # input pixels, near the centre
                     100 + 56 * torch.rand(n, generator=g, dtype=torch.float64)], -1)
    expected = hard_points(q[:, None], theta, INPUT)[:, 0]
    # the image warp moves content exactly as hard_points says (checks hard_points itself)
    image_err = (centroid(warp_images(gaussian_map(q, INPUT, sigma=6.0),
                                      theta)) - expected).norm(dim=-1)
    assert image_err.max() < 0.05 * 4, image_err.max()
    # heatmaps: the same transform, exact under the x / stride convention
    hm = gaussian_map(q / 4, HEATMAP)
    err = (centroid(warp_heatmaps(hm, theta, INPUT)) - expected / 4).norm(dim=-1)
    assert err.max() < 0.05, err.max()
    official = (centroid(warp_images(hm, theta)) - expected / 4).norm(dim=-1)
    assert official.max() > 0.1 and official.mean() > 2 * err.mean()


def test_hard_view_law_statistics():
    """Official law (pose_dual.py): s ~ N(1, 0.25) clipped to [0.75, 1.25]; r ~ N(0, 30°) clipped to
    ±60° with probability 0.8, else 0."""
    theta = hard_affine(np.random.default_rng(0), 100_000, scale_factor=0.25,
                        rot_factor=30.0).double()
    s = theta[:, :, :2].det().sqrt()
    r = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))
    assert torch.allclose(theta[:, :, 2], torch.zeros(100_000, 2, dtype=torch.float64))
    assert s.min() >= 0.75 - 1e-6 and s.max() <= 1.25 + 1e-6 and r.abs().max() <= 60 + 1e-4
    zero = r.abs() < 1e-9
    assert abs(zero.double().mean() - 0.2) < 0.006
    rot = r[~zero]
    clipped = 2 * (1 - 0.5 * (1 + math.erf(2 / math.sqrt(2))))  # P(|N(0,1)| > 2) = 0.0455
    assert abs(((rot.abs() > 60 - 1e-4).double().mean() - clipped)) < 0.004
    assert abs(rot.abs().median() - 30 * 0.6745) < 0.5  # the median of |N(0, 30)|
    at_bound = 1 - 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # P(N(0,1) > 1) = 0.1587 on each side
    assert abs((s > 1.25 - 1e-6).double().mean() - at_bound) < 0.006
    assert abs((s < 0.75 + 1e-6).double().mean() - at_bound) < 0.006


class Peaks(nn.Module):
    """A stand-in network: fixed heatmaps (one peak per joint), with a parameter so it can train."""

    def __init__(self, peaks, size=HEATMAP):
        super().__init__()
        self.register_buffer("maps", torch.zeros(len(peaks), size[1], size[0]))
        for k, (x, y) in enumerate(peaks):
            self.maps[k, y, x] = 1.0
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.maps.expand(x.shape[0], -1, -1, -1) * self.w + 0 * x.mean()


class Tiny(nn.Module):
    """A small trainable pose network: stride-4 conv to K heatmaps."""

    def __init__(self, k=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, k, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


def semi_batch(b=2, size=(32, 48), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_l, x_u = (torch.randn(b, 3, size[1], size[0], generator=g),
                torch.randn(b, 3, size[1], size[0], generator=g))
    target = torch.rand(b, k, size[1] // 4, size[0] // 4, generator=g)
    return x_l, x_u, target, torch.ones(b, k)


def test_consistency_target_is_the_other_networks_warped_prediction_detached():
    size = (32, 48)
    x_l, x_u, _, _ = semi_batch(size=size)
    net1, net2 = Tiny(seed=1), Tiny(seed=2)
    dual = ConsistencyTraining(net1, net2, size, (8, 12), 3)
    view = dual.draw_view(np.random.default_rng(0), 2)
    out = dual(x_l, x_u, view)
    assert torch.equal(out["targets"][0], warp_heatmaps(net2(x_u), view["theta"], size))
    assert torch.equal(out["targets"][1], warp_heatmaps(net1(x_u), view["theta"], size))
    assert all(t.grad_fn is None and not t.requires_grad for t in out["targets"])
    # no Joint Cutout: one hard view
    assert torch.equal(out["hard"][0], warp_images(x_u, view["theta"]))
    single = ConsistencyTraining(net1, None, size, (8, 12), 3)
    out = single(x_l, x_u, view)
    assert (len(out["cons"]) == 1 and torch.equal(out["targets"][0],
                                                  warp_heatmaps(net1(x_u), view["theta"], size)))


def test_gradient_routing_and_loss():
    size = (32, 48)
    x_l, x_u, target, weight = semi_batch(size=size)
    net1, net2 = Tiny(seed=1), Tiny(seed=2)
    dual = ConsistencyTraining(net1, net2, size, (8, 12), 3)
    out = dual(x_l, x_u, dual.draw_view(np.random.default_rng(0), 2))
    ones = torch.ones_like(weight)
    # network 1's consistency term reaches network 1 only: network 2 is its teacher, without
    # gradient
    joints_mse_loss(out["cons"][0], out["targets"][0], ones).backward()
    assert all(p.grad is None or not p.grad.any() for p in net2.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net1.parameters())
    # the official total: 0.5 sup1 + 0.5 sup2 + cons1 + cons2
    loss, parts = dual.loss(out, target, weight)
    s1, s2 = (joints_mse_loss(s, target, weight) for s in out["sup"])
    c1, c2 = (joints_mse_loss(c, t, ones) for c, t in zip(out["cons"], out["targets"]))
    assert torch.allclose(loss, 0.5 * s1 + 0.5 * s2 + c1 + c2)
    assert torch.allclose(parts["cons2"], c2) and "peak1" in parts and "peak2" in parts
    single = ConsistencyTraining(net1, None, size, (8, 12), 3)
    out = single(x_l, x_u, single.draw_view(np.random.default_rng(0), 2))
    loss, _ = single.loss(out, target, weight)  # pose_cons: sup + cons, 1:1
    assert torch.allclose(loss, joints_mse_loss(out["sup"][0], target, weight)
                          + joints_mse_loss(out["cons"][0], out["targets"][0], ones))


class GroundTruthStub(nn.Module):
    """A "network" that outputs each crop's ground-truth heatmaps, times `gain`: channels 3.. of
    its input carry them (`carry_truth`) and it reads them back at the heatmap pixels (heatmap
    pixel j sits at input pixel stride·j). A warp moves them with the image, so its output on a
    hard view is the hard crop's ground truth."""

    def __init__(self, stride, gain=1.0):
        super().__init__()
        self.stride, self.gain = stride, gain

    def forward(self, x):
        return self.gain * x[:, 3:, ::self.stride, ::self.stride]


def carry_truth(crops, input_size, heatmap_size):
    """Normalised crops with their ground-truth heatmaps (every joint) appended as channels,
    upsampled bilinearly between the heatmap pixels: a function that bilinear warps of the image
    and of the heatmaps sample alike. The heatmaps' first row and column are cleared, the one
    place where the two warps' zero padding differs."""
    truth, _ = gaussian_targets(crops["joints"], torch.ones_like(crops["visible"]), input_size,
                                heatmap_size)
    truth[..., 0, :] = 0
    truth[..., :, 0] = 0
    (iw, ih), (w, h) = input_size, heatmap_size
    gx = torch.arange(iw) / (iw / w) * 2 / (w - 1) - 1  # input pixel p at heatmap pixel p / stride
    gy = torch.arange(ih) / (ih / h) * 2 / (h - 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).expand(len(truth), -1, -1, -1)
    up = F.grid_sample(truth, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return torch.cat([normalize(crops["image"]), up], 1)


@pytest.fixture(scope="module")
def paired_truth(tmp_path_factory):
    """One batch of 8 (labeled, unlabeled) pairs of the real pairing, the unlabeled crops keeping
    their joints (a training run's unlabeled set drops them), as networks' inputs that carry the
    ground truth, with the labeled crops' targets."""
    root = make_demo(str(tmp_path_factory.mktemp("truth") / "demo"), seed=1, n_train=12, n_val=1)
    args = mrpose.get_args(["--data", "coco", "--ann",
                            f"{root}/annotations/person_keypoints_train2017.json", "--images",
                            f"{root}/train2017", "--val-ann",
                            f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
                            f"{root}/val2017", "--input-size", "64", "96", "--labeled", "4",
                            "--unlabeled", "rest", "--semi", "dual", "--hard-rot-factor", "30",
                            "--pretrained", "none"])
    train, _, info = build_data(args, train=True)
    unlabeled = TopDownDataset(info["unlabeled"], args.input_size, train.flip_pairs,
                               train.upper_ids, train=True, scale_factor=train.scale_factor,
                               rot_factor=train.rot_factor, seed=train.seed + 1)
    paired = PairedDataset(train, unlabeled, args.seed)
    batch = torch.utils.data.default_collate([paired[i] for i in range(8)])
    target, weight = gaussian_targets(batch["labeled"]["joints"], batch["labeled"]["visible"],
                                      args.input_size, args.heatmap_size)
    return (args, carry_truth(batch["labeled"], args.input_size, args.heatmap_size),
            carry_truth(batch["unlabeled"], args.input_size, args.heatmap_size), target, weight)


def dual_of(args, net1, net2):
    return build_semi("dual", net1, lambda: net2, args)


def test_networks_that_output_the_ground_truth_agree_with_their_warped_teachers(paired_truth):
    """Through the real pairing, hard view, warps and loss: networks whose heatmaps are each crop's
    ground truth give zero consistency loss (a warp that misplaces the targets does not), and their
    targets are real joints, not empty maps."""
    args, x, xu, target, weight = paired_truth
    stride = args.input_size[0] // args.heatmap_size[0]
    dual = dual_of(args, GroundTruthStub(stride), GroundTruthStub(stride))
    view = dual.draw_view(np.random.default_rng([0, 0, 0]), len(xu))
    assert (view["theta"][:, 0, 1] != 0).any()  # Xie et al.'s hard view rotates
    out = dual(x, xu, view)
    _, parts = dual.loss(out, target, weight)
    assert all(t.amax((2, 3)).mean() > 0.5 for t in out["targets"])
    assert parts["cons1"] < 1e-12 and parts["cons2"] < 1e-12, parts


def test_each_network_learns_from_the_other_at_the_official_weights(paired_truth):
    """Network 2 outputs twice the ground truth: network 1's target is network 2's map, so each
    consistency term is the MSE between the truth and twice the truth (zero if a network were
    taught by itself); the total is 0.5 sup1 + 0.5 sup2 + cons1 + cons2."""
    args, x, xu, target, weight = paired_truth
    stride = args.input_size[0] // args.heatmap_size[0]
    dual = dual_of(args, GroundTruthStub(stride), GroundTruthStub(stride, gain=2.0))
    out = dual(x, xu, dual.draw_view(np.random.default_rng([0, 0, 0]), len(xu)))
    loss, parts = dual.loss(out, target, weight)
    truth = out["cons"][0]
    ones = torch.ones_like(weight)
    expected = joints_mse_loss(truth, 2 * truth, ones)
    assert expected > 1e-4
    assert torch.allclose(parts["cons1"], expected, rtol=1e-5, atol=1e-10)
    assert torch.allclose(parts["cons2"], expected, rtol=1e-5, atol=1e-10)
    sup1, sup2 = (joints_mse_loss(s, target, weight) for s in out["sup"])
    assert sup2 > sup1  # network 2's labeled maps are twice the truth
    assert torch.allclose(loss, 0.5 * sup1 + 0.5 * sup2 + 2 * expected, rtol=1e-5, atol=1e-10)


class WithFeatures(nn.Module):
    """A network that returns (heatmaps, features), as a method that adds its own terms needs."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x), x.mean(1, keepdim=True)


@pytest.mark.parametrize("mode", ["dual", "pseudo"])
def test_outputs_pass_through_untouched_and_the_loss_reads_their_heatmaps(mode):
    """Each network runs once per input: its outputs on the labeled crops (`sup`) and on the hard
    view / the student's unlabeled crop (`cons`) come back as it returned them, (heatmaps,
    features) included; the loss and the easy-view targets are those of its heatmaps alone."""
    size = (32, 48)
    x_l, x_u, target, weight = semi_batch(size=size)

    def build(wrap):
        if mode == "dual":
            return ConsistencyTraining(wrap(Tiny(seed=1)), wrap(Tiny(seed=2)), size, (8, 12), 3)
        return PseudoLabelTraining(wrap(Tiny(seed=1)), Tiny(seed=3))
    plain, wrapped = build(lambda f: f), build(WithFeatures)
    view = plain.draw_view(np.random.default_rng(0), 2)
    out, out_f = plain(x_l, x_u, view), wrapped(x_l, x_u, view)
    for key in ("sup", "cons"):
        for h, (h_f, feats) in zip(out[key], out_f[key]):
            assert torch.equal(h, h_f) and feats.shape[1] == 1
    assert torch.equal(out_f["cons"][0][1], (out["hard"][0] if mode == "dual" else x_u).mean(1,
                                                                                   keepdim=True))
    for a, b in zip(out["targets"], out_f["targets"]):
        assert torch.equal(a, b)
    loss, parts = plain.loss(out, target, weight)
    loss_f, parts_f = wrapped.loss(out_f, target, weight)
    assert torch.equal(loss, loss_f) and parts.keys() == parts_f.keys()


def test_joint_cutout_boxes():
    """Boxes [c - half, c + half) around the drawn joints, clipped to the image, including near the
    bottom edge, which the official clamp (width and height swapped) never reached on 192x256."""
    x = torch.ones(1, 3, INPUT[1], INPUT[0])
    joints = torch.tensor([[[100.0, 230.0], [5.0, 3.0]]])
    draw = {"joint": torch.tensor([[0, 1]]), "jitter": torch.zeros(1, 2, 2),
            "half": torch.tensor([[[10.0, 12.0], [10.0, 10.0]]])}
    out = joint_cutout(x, joints, draw)
    expected = torch.ones(INPUT[1], INPUT[0])
    expected[218:242, 90:110] = 0
    expected[0:13, 0:15] = 0
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0], out[0, :1].expand(3, -1, -1))
    # near the bottom edge: a joint at y = 250 keeps the rows up to the last one
    out = joint_cutout(x, torch.tensor([[[100.0, 250.0]]]),
                       {"joint": torch.tensor([[0]]), "jitter": torch.zeros(1, 1, 2),
                        "half": torch.full((1, 1, 2), 10.0)})
    assert (out[0, 0, 240:, 90:110] == 0).all() and out[0, 0].eq(0).sum() == 16 * 20
    # the draw: K real joints only, half-sizes 10..19 px at 256 rows (scaled with the input height)
    d = cutout_draw(np.random.default_rng(0), 2000, 5, 17, 256)
    assert d["joint"].min() == 0 and d["joint"].max() == 16
    assert set(d["half"].unique().tolist()) == set(range(10, 20))
    assert abs(d["jitter"].std() - 10) < 0.3
    assert cutout_draw(np.random.default_rng(0), 2000, 5, 17, 128)["half"].max() <= 10


def test_argmax_and_cutout_follow_the_official_code():
    """argmax_joints is get_max_preds_tensor: the argmax even where the peak is not positive
    (HRNet's get_max_preds would give (0, 0)); mask_joint draws jitter and size per joint, so a
    joint drawn twice cuts one box, not two."""
    heat = torch.full((1, 2, 12, 8), -1.0)
    heat[0, 0, 7, 5], heat[0, 1, 3, 2] = -0.5, 0.8
    assert torch.equal(argmax_joints(heat), torch.tensor([[[5.0, 7.0], [2.0, 3.0]]]))
    x = torch.ones(1, 3, INPUT[1], INPUT[0])
    joints = torch.tensor([[[96.0, 128.0], [40.0, 60.0]]])
    for seed in range(5):
        draw = cutout_draw(np.random.default_rng(seed), 1, 2, 2, INPUT[1])
        assert draw["jitter"].shape == draw["half"].shape == (1, 2, 2)  # one box per joint
        draw["joint"] = torch.tensor([[0, 0]])
        holes = (joint_cutout(x, joints, draw)[0, 0] == 0).sum()
        # one box: 2·half_x by 2·half_y, inside the image
        assert holes == 4 * draw["half"][0, 0].prod()


def test_cutout_is_at_the_other_networks_joints_before_the_warp():
    size, hm = (64, 96), (16, 24)
    net1, net2 = Peaks([(3, 4)], hm), Peaks([(10, 20)], hm)
    dual = ConsistencyTraining(net1, net2, size, hm, 1, cutout=1)
    view = {"theta": torch.eye(2, 3)[None],
            "cutout": [{"joint": torch.zeros(1, 1, dtype=torch.long),
                        "jitter": torch.zeros(1, 1, 2), "half": torch.full((1, 1, 2), 2.0)}] * 2}
    x = torch.ones(1, 3, size[1], size[0])
    out = dual(x, x, view)
    hole1, hole2 = (torch.nonzero(h[0, 0].abs() < 0.01) for h in out["hard"])
    # network 1's hard view is cut at network 2's peak (10, 20) x 4, network 2's at (3, 4) x 4
    assert (hole1[:, 1].min() == 38 and hole1[:, 1].max() == 41 and hole1[:, 0].min() == 78
            and hole1[:, 0].max() == 81)
    assert (hole2[:, 1].min() == 10 and hole2[:, 1].max() == 13 and hole2[:, 0].min() == 14
            and hole2[:, 0].max() == 17)
    # with a rotation, the hole is cut first, then moved with the image
    view["theta"] = hard_affine(np.random.default_rng(3), 1, rot_prob=1.0)
    moved = dual(x, x, view)["hard"][0]
    centre = hard_points(torch.tensor([[[39.5, 79.5]]]), view["theta"], size)[0, 0]
    # the zero padding the warp brings in is no hole
    inside = warp_images(x, view["theta"])[0, 0] > 0.5
    dark = torch.nonzero((moved[0, 0] < 0.5) & inside).float().mean(0)
    assert (dark.flip(0) - centre).norm() < 1.0
    assert torch.equal(argmax_joints(net2(x)), torch.tensor([[[10.0, 20.0]]]))


def test_hard_rot_factor_rotates_the_hard_view_alone():
    """--hard-rot-factor: the hard view's rotation factor (p 0.8); by default the dataset's
    --rot-factor (the official configs' one ROT_FACTOR), so the demo preset's unrotated easy view
    also had no rotated hard view."""
    def rotations(flags):
        args = mrpose.get_args(["--data", "demo", "--semi", "dual"] + flags)
        semi = build_semi("dual", Tiny(seed=1), lambda: Tiny(seed=2), args)
        theta = semi.draw_view(np.random.default_rng(0), 4000)["theta"]
        return args, torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0]))

    args, r = rotations([])
    assert args.rot_factor == 0 and r.abs().max() == 0
    args, r = rotations(["--hard-rot-factor", "30"])
    assert args.rot_factor == 0  # the easy view (the dataset's augmentation) stays unrotated
    assert abs((r.abs() > 1e-6).float().mean() - 0.8) < 0.03 and r.abs().max() <= 60 + 1e-4
    assert abs(r[r.abs() > 1e-6].abs().median() - 30 * 0.6745) < 1.5  # the median of |N(0, 30)|


def test_pseudo_label_mask_and_loss():
    heat = torch.zeros(1, 3, 12, 8)
    heat[0, 0, 5, 5], heat[0, 1, 2, 2], heat[0, 2, 7, 1] = 0.74, 0.75, 0.9
    assert torch.equal(pseudo_label_mask(heat, 0.75), torch.tensor([[0.0, 1.0, 1.0]]))
    size = (32, 48)
    x_l, x_u, target, weight = semi_batch(b=1, size=size)
    student, teacher = Tiny(seed=1), Peaks([(1, 1), (2, 2), (3, 3)], (8, 12))
    teacher.maps[0] *= 0.5  # joint 0 below γ: not a pseudo-label
    model = PseudoLabelTraining(student, teacher).train()
    assert not teacher.training and not teacher.w.requires_grad
    out = model(x_l, x_u)
    loss, parts = model.loss(out, target, weight)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    expected = (joints_mse_loss(student(x_l), target,
                                weight) + 0.1 * joints_mse_loss(student(x_u), teacher(x_u), mask))
    assert torch.allclose(loss, expected) and parts["pseudo_kept"] == 2 / 3  # Eq. (6), λu = 0.1
    loss.backward()
    assert teacher.w.grad is None and student.conv.weight.grad.abs().sum() > 0


def test_build_semi_pseudo_loads_a_frozen_teacher(tmp_path):
    args = mrpose.get_args(["--data", "demo", "--semi", "pseudo"])
    def make():
        return mrpose.build_model(args)[0]

    net, teacher = make(), make()
    with pytest.raises(UserError, match="--teacher"):
        build_semi("pseudo", net, make, args)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    semi = build_semi("pseudo", net, make, args, str(tmp_path / "teacher.pth"))
    assert (semi.nets[0] is net and all(torch.equal(v, teacher.state_dict()[k]) for k,
                                        v in semi.teacher.state_dict().items()))
    # mrpose.py's Adam gets the student only
    assert not any(p.requires_grad for p in semi.teacher.parameters())
    assert (semi.gamma, semi.lambda_u) == (0.75, 0.1)  # ICON Sec. 4: γ = 0.75, λu = 0.1


class Items(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag, self.epoch = n, tag, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, *i)  # (tag, index, augmentation key)


def test_paired_dataset_walks_the_unlabeled_set_and_draws_labeled_with_replacement():
    paired = PairedDataset(Items(10, "L"), Items(1000, "U"), seed=0)
    assert len(paired) == 1000
    items = [paired[i] for i in range(1000)]
    assert [it["unlabeled"] for it in items] == [("U", i, (i, 1)) for i in range(1000)]
    drawn = [it["labeled"][1] for it in items]
    assert set(drawn) == set(range(10))  # with replacement, uniform
    # each draw its own augmentation
    assert [it["labeled"][2] for it in items] == [(i, 0) for i in range(1000)]
    paired.set_epoch(1)
    again = [paired[i]["labeled"][1] for i in range(1000)]
    assert again != drawn and paired.labeled.epoch == paired.unlabeled.epoch == 1
    assert ([PairedDataset(Items(10, "L"), Items(1000, "U"), seed=0)[i]["labeled"][1]
             for i in range(1000)] == drawn)
    # more labeled than unlabeled persons
    flipped = PairedDataset(Items(30, "L"), Items(3, "U"), seed=0)
    assert len(flipped) == 30 and [flipped[i]["labeled"][1] for i in range(30)] == list(range(30))
    assert [flipped[i]["unlabeled"][2] for i in range(30)] == [(i, 1) for i in range(30)]


def test_a_labeled_person_drawn_twice_in_an_epoch_gets_fresh_crops(tmp_path):
    """Two pair items that share a labeled person in one epoch give different crops (the official
    code draws fresh augmentation at every __getitem__); the same item is the same crop in a rebuilt
    dataset (a run is deterministic and resumable), and another epoch gives another crop."""
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=6, n_val=1)
    args = mrpose.get_args(["--data", "coco", "--ann",
                            f"{root}/annotations/person_keypoints_train2017.json", "--images",
                            f"{root}/train2017", "--val-ann",
                            f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
                            f"{root}/val2017", "--input-size", "32", "48", "--labeled", "2",
                            "--semi", "dual", "--pretrained", "none"])
    train, _, info = build_data(args, train=True)

    def paired(epoch=0):
        p = PairedDataset(train, build_unlabeled(args, train, info), args.seed)
        p.set_epoch(epoch)
        return p

    data = paired()
    i1, i2 = next((a, b) for a in range(len(data)) for b in range(a + 1, len(data))
                  if data.drawn[a] == data.drawn[b])
    a, b = data[i1]["labeled"], data[i2]["labeled"]
    assert a["index"] == b["index"]
    assert not torch.equal(a["image"], b["image"]) and not torch.equal(a["joints"], b["joints"])
    again = paired()[i1]["labeled"]
    assert torch.equal(again["image"], a["image"]) and torch.equal(again["joints"], a["joints"])
    later = paired(1)
    same_person = next(i for i in range(len(later)) if later.drawn[i] == data.drawn[i1])
    assert not torch.equal(later[same_person]["labeled"]["joints"], a["joints"])


def person(ann_id, image_id, kps=True, crowd=0, x=10):
    k = [x + 5, 20, 2] * 17 if kps else [0] * 51
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": crowd,
            "bbox": [x, 10, 30, 60], "area": 1800.0, "keypoints": k, "num_keypoints": 17 if kps
            else 0}


@pytest.fixture()
def unsorted_json(tmp_path):
    """Image ids out of order in the file; a crowd region and a person without joints to skip."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (30, 10, 20)]
    anns = [person(1, 10), person(2, 30, x=40), person(3, 20), person(4, 30, kps=False),
            person(5, 30, x=50), person(6, 10, crowd=1), person(7, 20, x=60), person(8, 10, x=70)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [
        {"id": 1, "name": "person", "keypoints": [str(k) for k in range(17)], "skeleton": []}]}))
    (tmp_path / "img").mkdir()
    # the records are read, never an image; an empty folder is refused
    (tmp_path / "img" / "10.jpg").write_bytes(b"")
    return ["--data", "coco", "--ann", path, "--images", tmp_path / "img", "--val-ann", path,
            "--val-images", tmp_path / "img", "--input-size", "64", "96"]


def annotation_keys(records):
    return [(r["image_id"], float(r["center"][0])) for r in records]


def test_first_n_persons_in_file_order(unsorted_json):
    flags = [str(f) for f in unsorted_json]
    args = mrpose.get_args(flags + ["--labeled", "3", "--labeled-order", "first"])
    train, _, info = build_data(args, train=True)
    # file order: image 30 (persons 2, 5; 4 has no joints), then 10 (1, 8; 6 is crowd), then 20 (3,
    # 7)
    assert annotation_keys(train.records) == [(30, 54.5), (30, 64.5), (10, 24.5)]
    assert annotation_keys(info["unlabeled"]) == [(10, 84.5), (20, 24.5), (20, 74.5)]
    # the MSCL protocol defaults to this order; --labeled-order random is a seeded draw of persons
    assert mrpose.get_args(flags + ["--protocol", "mscl-coco"]).labeled_order == "first"
    args = mrpose.get_args(flags + ["--labeled", "50%", "--data-seed", "3"])
    random_train, _, info = build_data(args, train=True)
    assert len(random_train.records) == 3 and len(info["unlabeled"]) == 3
    assert (annotation_keys(build_data(args,
                                       train=True)[0].records)
            == annotation_keys(random_train.records))
    # unlabeled crops: every person (official) or the rest, keypoints dropped
    args = mrpose.get_args(flags + ["--labeled", "3", "--labeled-order", "first", "--semi", "dual"])
    train, _, info = build_data(args, train=True)
    every = build_unlabeled(args, train, info)
    assert (len(every) == 6 and all(not r["visible"].any() and not r["joints"].any()
                                    for r in every.records))
    args.unlabeled = "rest"
    assert (annotation_keys(build_unlabeled(args, train, info).records)
            == annotation_keys(info["unlabeled"]))


def test_labeled_images_label_every_person_of_n_random_images(unsorted_json):
    """--labeled-order images (MSCL's text): N images drawn with the seed, all their persons
    labeled, every person of the other images unlabeled (--unlabeled rest: the paper's "remaining
    samples")."""
    flags = ([str(f) for f in unsorted_json] + ["--labeled-order", "images", "--semi", "dual",
                                                "--unlabeled", "rest"])
    per_image = {30: 2, 10: 2, 20: 2}  # trainable persons per image (unsorted_json)
    seen = set()
    for seed in range(6):
        args = mrpose.get_args(flags + ["--labeled", "2", "--data-seed", str(seed)])
        train, _, info = build_data(args, train=True)
        labeled = {r["image_id"] for r in train.records}
        assert len(labeled) == 2 and len(train.records) == sum(per_image[i] for i in labeled)
        assert (not labeled & {r["image_id"] for r in info["unlabeled"]}
                and len(info["unlabeled"]) == 2)
        assert len(build_unlabeled(args, train, info)) == 2
        seen.add(frozenset(labeled))
    assert len(seen) > 1  # drawn, not the first images of the file
    # the run's --seed leaves the data alone: the same labeled images whatever it is
    runs = [mrpose.get_args(flags + ["--labeled", "2", "--data-seed", "1", "--seed", str(seed)])
            for seed in range(6)]
    assert len({frozenset(r["image_id"] for r in build_data(a, train=True)[0].records)
                for a in runs}) == 1
    args = mrpose.get_args(flags + ["--labeled", "34%"])  # a share of the images: 1 of 3
    assert len({r["image_id"] for r in build_data(args, train=True)[0].records}) == 1
    with pytest.raises(UserError, match="only 3 training images"):
        build_data(mrpose.get_args(flags + ["--labeled", "4"]), train=True)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data not present")
def test_mscl_mpii_protocol_mpii_labeled_aic_unlabeled():
    """MPII + AIC: MPII persons labeled, AI Challenger persons (boxes only) unlabeled, paired
    1:1."""
    mpii, aic = SHARED / "mpii", SHARED / "aic"
    flags = ["--protocol", "mscl-mpii", "--ann", mpii / "annot" / "test_mpii.json", "--images",
             mpii / "images", "--val-ann", mpii / "annot" / "test_mpii.json", "--val-images",
             mpii / "images", "--gt-mat", mpii / "annot" / "detections_our_format.mat"]
    flags = [str(f) for f in flags]
    with pytest.raises(UserError, match="AI Challenger"):
        mrpose.get_args(flags)  # the semi-supervised protocol needs its unlabeled set
    # MSCL Table 1's supervised-only row
    assert mrpose.get_args(flags + ["--semi", "none"]).semi is None
    args = mrpose.get_args(flags + ["--unlabeled-ann", str(aic / "annotations" / "test_aic.json"),
                                    "--unlabeled-images", str(aic / "images")])
    assert args.semi == "dual" and args.joint_cutout == 5 and args.num_joints == 16
    train, _, info = build_data(args, train=True)
    unlabeled = build_unlabeled(args, train, info)
    assert len(unlabeled) == 9 and all(r["image"].startswith(str(aic)) for r in unlabeled.records)
    item = PairedDataset(train, unlabeled, seed=0)[0]
    assert item["unlabeled"]["image"].shape == item["labeled"]["image"].shape == (3, 256, 192)
    assert item["unlabeled"]["joints"].shape == (16, 2) and not item["unlabeled"]["visible"].any()


def test_semi_dual_end_to_end(tmp_path):
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=16, n_val=6)
    out = tmp_path / "run"
    flags = [
        "--data", "coco", "--ann", f"{root}/annotations/person_keypoints_train2017.json",
             "--images", f"{root}/train2017",
        "--val-ann", f"{root}/annotations/person_keypoints_val2017.json", "--val-images",
             f"{root}/val2017",
        "--backbone", "resnet18", "--input-size", "64", "96", "--batch-size", "4", "--workers", "0",
             "--print-freq", "1",
        "--labeled", "8", "--semi", "dual", "--joint-cutout", "2", "--lr-steps", "9",
             "--pretrained", "none",
        "--out", out]
    # one epoch: 16 unlabeled persons (all), batch 4
    run_script("mrpose.py", flags + ["--iters", "4"])
    log = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert log["iteration"] == 4 and np.isfinite(log["loss"])
    assert ({"sup1", "sup2", "cons1", "cons2", "peak1", "peak2", "metrics", "metrics_net2",
             "metrics_ensemble"} <= set(log))
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    # network 1 is `model`: mrpose.py --eval-only reads it
    assert ckpt["model"].keys() == ckpt["model2"].keys()
    assert any(not torch.equal(v, ckpt["model2"][k]) for k, v in ckpt["model"].items()
               if v.is_floating_point())
    # --resume restores both networks and goes on; a supervised --resume of a dual run is refused
    run_script("mrpose.py", flags + ["--iters", "6", "--resume"])
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["iteration"] == 6
    run_script("mrpose.py", [f for f in flags
                             if f not in ("--semi", "dual")] + ["--iters", "8", "--resume"],
               expect=2)
    # --weights2 starts network 2 (--weights network 1): swapped here, and lr 0 keeps the parameters
    #   as loaded
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    torch.save({"model": ckpt["model"]}, tmp_path / "net1.pth")
    torch.save({"model": ckpt["model2"]}, tmp_path / "net2.pth")
    swapped = tmp_path / "swapped"
    run_script("mrpose.py", flags[:-1] + [swapped, "--iters", "1", "--lr", "0", "--weights",
                                          tmp_path / "net2.pth", "--weights2",
                                          tmp_path / "net1.pth"])
    got = torch.load(swapped / "checkpoint.pth", map_location="cpu", weights_only=True)
    params = [k for k in ckpt["model"] if not k.endswith(("running_mean", "running_var",
                                                          "num_batches_tracked"))]
    assert all(torch.equal(got["model"][k], ckpt["model2"][k])
               and torch.equal(got["model2"][k], ckpt["model"][k])
               for k in params)
    p = run_script("mrpose.py", flags[:-1] + [swapped, "--semi", "none", "--weights2",
                                              tmp_path / "net1.pth"], expect=2)
    assert_one_line_error(p, "--weights2", "--semi dual")

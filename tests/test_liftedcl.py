"""Tests of liftedcl.py: exact MoCo v2 in the degenerate setting, gradient routing of the
adversarial game, the equivariant alignment (Eq. 4), the KCS (Eqs. 5-6), the App. B prior, the LSGAN
targets (Eq. 7), outputs, export, resume and bad input."""
import argparse
import contextlib
import io
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import liftedcl
from eval import liftedcl_report
from common.utils import UserError, check_resume_args
from data.demo import make_demo
from helpers import assert_one_line_error, run_script

SMALL = ["--backbone", "resnet18", "--crop-size", "32", "--batch-size", "8", "--moco-k", "16",
         "--prior-size", "200", "--workers", "0", "--print-freq", "1"]


def run(args, expect=0, torchrun=False):
    return run_script("liftedcl.py", args, expect, torchrun)


def lambdas(inv=0.5, equiv=0.5, adv=0.5):
    return argparse.Namespace(lambda_inv=inv, lambda_equiv=equiv, lambda_adv=adv)


def views(n=4, size=32, seed=0):
    """Two random view batches with full-overlap geometry (top, left, height, width, flip)."""
    g = torch.Generator().manual_seed(seed)
    geom = torch.tensor([[0.0, 0.0, 32.0, 32.0, 0.0]]).repeat(n, 1)
    return (torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g),
            geom, geom.clone())


# ----------------------------------------------------------------------------------------------
#   MoCo v2

class MoCoV2(nn.Module):
    """facebookresearch/moco builder.py (mlp=True) in a single process, written independently of
    liftedcl.py."""

    def __init__(self, dim, K, m, T):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = (torchvision.models.resnet18(num_classes=dim),
                                          torchvision.models.resnet18(num_classes=dim))
        for enc in (self.encoder_q, self.encoder_k):
            width = enc.fc.weight.shape[1]
            enc.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), enc.fc)
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data.copy_(pq.data)
            pk.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self.encoder_k(im_k), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().detach()],
                           1) / self.T
        ptr = int(self.queue_ptr)
        self.queue[:, ptr:ptr + len(k)] = k.T
        self.queue_ptr[0] = (ptr + len(k)) % self.K
        return F.cross_entropy(logits, torch.zeros(len(k), dtype=torch.long))


def test_degenerate_setting_is_moco_v2_exactly():
    torch.manual_seed(0)
    model = liftedcl.LiftedCL("resnet18", dim=16, K=32, m=0.9, T=0.2, equivariant=False,
                              train_lifting=False)
    ref = MoCoV2(16, 32, 0.9, 0.2)
    # the query encoder is shared (backbone keys are torchvision's, the head is fc); the reference
    # copies it into its key encoder as MoCo's constructor does, so a key encoder that liftedcl.py
    # did not copy fails below
    state = dict(model.encoder_q.backbone.state_dict())
    state.update({"fc." + k: v for k, v in model.encoder_q.inv_head.state_dict().items()})
    ref.encoder_q.load_state_dict(state)
    ref.encoder_k.load_state_dict(state)
    ref.queue.copy_(model.queue_inv)
    im_q, im_k, geom_q, geom_k = views()
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], 0.03, momentum=0.9,
                            weight_decay=1e-4)
            for m in (model, ref)]
    args = lambdas(1.0, 0.0, 0.0)
    for step in range(2):
        out = model(im_q, im_k, geom_q, geom_k)
        loss, l_adv = liftedcl.encoder_loss(out, None, args)
        ref_loss = ref(im_q, im_k)
        assert out["l_equiv"] is None and l_adv.item() == 0
        # at init, then after one SGD step
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        # the momentum update ran before the key forward, the keys were enqueued after the logits
        # unit keys, float32 noise
        torch.testing.assert_close(model.queue_inv, ref.queue, rtol=0, atol=5e-5)
        assert int(model.queue_ptr) == int(ref.queue_ptr) == 4 * (step + 1)
        torch.testing.assert_close(model.encoder_k.backbone.layer4[1].conv2.weight,
                                   ref.encoder_k.layer4[1].conv2.weight)
        for opt, value in zip(opts, (loss, ref_loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
        # the key encoder is never trained
        assert all(p.grad is None for p in model.encoder_k.parameters())
        assert all(p.grad is None for p in model.lifting.parameters())
    torch.testing.assert_close(model.encoder_q.inv_head[0].weight, ref.encoder_q.fc[0].weight,
                               rtol=1e-4, atol=1e-6)


def test_shuffle_bn_gives_each_key_back_to_its_own_image():
    """In eval mode BatchNorm uses running statistics, so shuffling changes no feature: the keys
    coming back from shuffle BN (4 groups) must be the key encoder's features of the same images in
    the same order."""
    torch.manual_seed(0)
    model = liftedcl.LiftedCL("resnet18", dim=16, K=16, align_size=4, bn_groups=4).eval()
    im_k = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    shuffled, idx_unshuffle = model._batch_shuffle_ddp(im_k)
    assert not torch.equal(shuffled, im_k) and torch.equal(shuffled[idx_unshuffle], im_k)
    _, k, k_map = model.encoder_k(shuffled, 4)
    k = model._batch_unshuffle_ddp(F.normalize(k, dim=1), idx_unshuffle)
    k_map = model._batch_unshuffle_ddp(k_map, idx_unshuffle)
    _, ref, ref_map = model.encoder_k(im_k)
    torch.testing.assert_close(k, F.normalize(ref, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_map, ref_map, rtol=1e-4, atol=1e-5)


def test_queues_receive_this_batchs_keys_and_pooled_key_maps():
    """After one step, queue_inv holds the normalised keys and queue_equiv the normalised, spatially
    averaged key maps (Eq. (4)'s negatives t_s-), of this batch's key images, at the old pointer."""
    torch.manual_seed(0)
    # k fixed
    model = liftedcl.LiftedCL("resnet18", dim=16, K=16, m=1.0, align_size=4, bn_groups=2).eval()
    im_q, im_k, geom_q, geom_k = views(size=64)  # 2 x 2 key maps: their mean is not any one cell
    model.queue_ptr[0] = 8
    before = model.queue_equiv.clone()
    model(im_q, im_k, geom_q, geom_k)
    with torch.no_grad():
        _, k, k_map = model.encoder_k(im_k)
    torch.testing.assert_close(model.queue_inv[:, 8:12], F.normalize(k, dim=1).T, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(model.queue_equiv[:, 8:12], F.normalize(k_map.mean((2, 3)), dim=1).T,
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(model.queue_equiv[:, :8], before[:, :8]) and int(model.queue_ptr) == 12


# ----------------------------------------------------------------------------------------------
#   adversarial game

def test_adv_loss_reaches_the_encoder_not_d_and_d_step_not_the_encoder():
    torch.manual_seed(0)
    model = liftedcl.LiftedCL("resnet18", dim=16, K=16, align_size=4, bn_groups=2)
    disc = liftedcl.Discriminator()
    out = model(*views())
    loss, l_adv = liftedcl.encoder_loss(out, disc, lambdas())
    assert out["lifted"].shape == (4, 17, 3)
    # L_adv alone: through the lifting network into the backbone, never into D or the key side
    l_adv.backward()
    assert model.encoder_q.backbone.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert model.lifting.net[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert model.encoder_q.equiv_head[0].weight.grad is None  # L_adv does not touch the dense head
    model.zero_grad(set_to_none=True)
    d_opt = torch.optim.SGD(disc.parameters(), 0.03)
    before = [p.detach().clone() for p in disc.parameters()]
    liftedcl.discriminator_step(disc, d_opt, liftedcl.sample_prior(4), out["lifted"])
    assert all(p.grad is None for p in model.parameters())  # D's step sees detached skeletons
    assert any(not torch.equal(a, p) for a, p in zip(before, disc.parameters()))
    # Eq. (1): the total is the weighted sum of the three terms
    assert (loss.item() == pytest.approx(0.5 * (out["l_inv"] + out["l_equiv"] + l_adv).item(),
                                         rel=1e-6))


class StubD(nn.Module):
    """D(x) = bias + x[:, 0, 0]: a score set by the test through one coordinate."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.bias + x[:, 0, 0]


def test_lsgan_targets_real_one_lifted_zero():
    real, fake = torch.zeros(4, 17, 3), torch.zeros(4, 17, 3)
    real[:, 0, 0], fake[:, 0, 0] = 0.8, 0.1  # D(real) = 0.8, D(lifted) = 0.1
    stub = StubD()
    d_loss, acc_real, acc_lifted = liftedcl.discriminator_step(stub,
                                                               torch.optim.SGD(stub.parameters(),
                                                                               0.0), real, fake)
    # (D(y) - 1)² + D(X̂)²; swapped labels: 1.45
    assert d_loss.item() == pytest.approx(0.2 ** 2 + 0.1 ** 2)
    assert acc_real.item() == 1 and acc_lifted.item() == 1
    # (D(X̂) - 1)²; swapped: 0.01
    assert liftedcl.encoder_adv_loss(StubD(), fake).item() == pytest.approx(0.9 ** 2)
    torch.manual_seed(0)
    disc = liftedcl.Discriminator()
    real, fake = liftedcl.sample_prior(64), liftedcl.normalize_skeletons(torch.randn(64, 17, 3))
    opt = torch.optim.SGD(disc.parameters(), 0.03, momentum=0.9)
    for _ in range(60):  # D learns to tell prior samples (1) from random skeletons (0)
        d_loss, acc_real, acc_lifted = liftedcl.discriminator_step(disc, opt, real, fake)
    assert acc_real.item() > 0.9 and acc_lifted.item() > 0.9 and d_loss.item() < 0.2


# ---------------------------------------------------------------------------------------------- Eq.
#   (4)

@pytest.mark.parametrize("cells", ["tile", "receptive-field"])
def test_alignment_of_two_views_undoes_crop_and_flip(cells):
    """Two views cut from one image whose channels are its x and y coordinates; a stride-2
    translation-equivariant stand-in for the encoder; after alignment both maps show the same image
    points. The stand-in either averages each 2 x 2 tile (cell j centred on its tile: offset 0, the
    official mapping) or keeps its first pixel (cell j centred on pixel 2 j, as a ResNet's receptive
    field on pixel 32 j: offset 0.5 / 2 - 0.5); with the other offset the flipped views would
    disagree."""
    size, grid = 64, 8
    # (top, left, height, width, flip) in a 200 px image
    boxes = torch.tensor([[10.0, 20.0, 120.0, 90.0, 0.0],
                          [40.0, 5.0, 100.0, 160.0, 1.0],
                          [0.0, 0.0, 200.0, 200.0, 1.0],
                          [150.0, 150.0, 40.0, 40.0, 0.0]])
    other = torch.tensor([[50.0, 60.0, 140.0, 120.0, 1.0],
                          [30.0, 70.0, 90.0, 100.0, 0.0],
                          [60.0, 30.0, 80.0, 100.0, 0.0],
                          [0.0, 0.0, 100.0, 100.0, 1.0]])  # no overlap with the fourth box

    def view(g):  # the exact resized crop: output pixel centre u samples left + (u + 0.5) w / size
        u = (torch.arange(size) + 0.5) / size
        xs, ys = g[1] + u * g[3], g[0] + u * g[2]
        img = torch.stack([xs.expand(size, size), ys[:, None].expand(size, size)])
        return img.flip(-1) if g[4] > 0.5 else img

    def stand_in(g):
        x = torch.stack([view(r) for r in g])
        return F.avg_pool2d(x, 2) if cells == "tile" else x[..., ::2, ::2]

    offset = 0.0 if cells == "tile" else 0.5 / 2 - 0.5
    q, k, valid = liftedcl.align_views(stand_in(boxes), stand_in(other), boxes, other, grid, offset)
    assert valid.tolist() == [True, True, True, False]
    top, left = torch.maximum(boxes[:, 0], other[:, 0]), torch.maximum(boxes[:, 1], other[:, 1])
    bottom = torch.minimum(boxes[:, 0] + boxes[:, 2], other[:, 0] + other[:, 2])
    right = torch.minimum(boxes[:, 1] + boxes[:, 3], other[:, 1] + other[:, 3])
    u = (torch.arange(grid) + 0.5) / grid
    for i in range(3):  # the shared area's cell centres, in image coordinates
        expect = torch.stack([(left[i] + u * (right[i] - left[i])).expand(grid, grid),
                              (top[i] + u * (bottom[i] - top[i]))[:, None].expand(grid, grid)])
        torch.testing.assert_close(q[i], expect, atol=1e-3, rtol=0)
        torch.testing.assert_close(k[i], expect, atol=1e-3, rtol=0)


def test_resnet_cells_sit_on_their_receptive_field_centres(images):
    """A real ResNet's C5 of a 256 px crop and of its mirror image, aligned after un-flipping: the
    cell offset that makes them agree best is the receptive-field centres' (--cell-centres resnet,
    -0.484 cells), not the official tile centres' (0), which leave the two views about one cell
    apart. Measured with ResNet-18 as initialised (the README's figures also cover ResNet-50 and a
    demo-trained ResNet-18)."""
    import glob
    import torchvision.transforms.functional as TF
    from common.datasets import read_image
    from common.ssl import IMAGENET_NORMALIZE
    files = sorted(glob.glob(f"{images[-1]}/*"))[:8]
    x = torch.stack([IMAGENET_NORMALIZE(TF.to_tensor(TF.resize(read_image(f), [256, 256])))
                     for f in files])
    torch.manual_seed(0)
    net = liftedcl.ResNetFeatures("resnet18").eval()
    with torch.no_grad():
        a, b = net(x)[3], net(x.flip(-1))[3]
    g = torch.tensor([[0.0, 0.0, 256.0, 256.0, 0.0]]).repeat(len(x), 1)
    h = g.clone()
    h[:, 4] = 1.0

    def agreement(offset):
        q, k, _ = liftedcl.align_views(a, b, g, h, 16, offset)
        return F.cosine_similarity(q, k, dim=1).mean().item()

    offsets = [i / 20 for i in range(-16, 5)]
    best = max(offsets, key=agreement)
    assert abs(best - liftedcl.RESNET_CELL_OFFSET) < 0.15, best
    assert agreement(liftedcl.RESNET_CELL_OFFSET) > agreement(0.0)


def test_equivariant_loss_is_eq4_and_masks_views_without_overlap():
    torch.manual_seed(0)
    map_q, map_k, queue = (torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4),
                           F.normalize(torch.randn(8, 10), dim=0))
    g = torch.tensor([[0.0, 0.0, 32.0, 32.0, 0.0], [0.0, 0.0, 32.0, 32.0, 1.0],
                      [0.0, 0.0, 8.0, 8.0, 0.0]])
    h = torch.tensor([[0.0, 0.0, 32.0, 32.0, 0.0], [0.0, 0.0, 32.0, 32.0, 0.0],
                      [16.0, 16.0, 8.0, 8.0, 0.0]])
    loss, valid = liftedcl.equivariant_loss(map_q, map_k, g, h, queue, 0.2, size=4)
    assert valid.tolist() == [True, True, False]
    # full overlap, both unflipped at 4 x 4: the alignment is the identity; the second view pair is
    # flipped once
    r = F.normalize(torch.stack([map_q[0], map_q[1].flip(-1)]),
                    dim=1).flatten(2).transpose(1, 2).reshape(-1, 8)
    t = F.normalize(map_k[:2], dim=1).flatten(2).transpose(1, 2).reshape(-1, 8)
    logits = torch.cat([(r * t).sum(1, keepdim=True), r @ queue], 1) / 0.2
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(len(r), dtype=torch.long)))


# ---------------------------------------------------------------------------------------------- KCS
#   and prior

def test_kcs_of_a_hand_made_skeleton():
    expected = {(0, 1), (1, 2), (2, 3), (0, 4), (4, 5), (5, 6), (0, 7), (7, 8), (8, 9), (9, 10),
                (8, 11), (11, 12), (12, 13), (8, 14), (14, 15), (15, 16)}
    # 16 bones incl. belly-neck and nose-head (the official code's typo)
    assert set(liftedcl.BONES) == expected
    x = torch.zeros(1, 17, 3)  # a T-pose, y down: legs straight down, arms straight out
    x[0, 1], x[0, 4] = torch.tensor([-1.0, 0, 0]), torch.tensor([1.0, 0, 0])
    x[0, 2], x[0, 3], x[0, 5], x[0, 6] = torch.tensor([[-1.0, 4, 0], [-1.0, 8, 0], [1.0, 4, 0],
                                                       [1.0, 8, 0]])
    x[0, 7], x[0, 8], x[0, 9], x[0, 10] = torch.tensor([[0, -2.0, 0], [0, -5.0, 0], [0, -7.0, 0],
                                                        [0, -8.0, 0]])
    x[0, 11], x[0, 12], x[0, 13] = torch.tensor([[2.0, -5, 0], [5.0, -5, 0], [7.0, -5, 0]])
    x[0, 14], x[0, 15], x[0, 16] = torch.tensor([[-2.0, -5, 0], [-5.0, -5, 0], [-7.0, -5, 0]])
    psi = liftedcl.kcs(x)[0]
    lengths = [1, 4, 4, 1, 4, 4, 2, 3, 2, 1, 2, 3, 2, 2, 3, 2]
    torch.testing.assert_close(psi.diagonal(), torch.tensor(lengths, dtype=torch.float) ** 2)
    bone = {b: i for i, b in enumerate(liftedcl.BONES)}
    assert psi[bone[(1, 2)], bone[(2, 3)]] == 16  # thigh and shin in line
    assert psi[bone[(11, 12)], bone[(14, 15)]] == -9  # the two upper arms point apart
    assert psi[bone[(1, 2)], bone[(11, 12)]] == 0  # perpendicular
    torch.testing.assert_close(psi, psi.T)
    turn = torch.linalg.qr(torch.randn(3, 3))[0]
    # rotation-invariant
    torch.testing.assert_close(liftedcl.kcs(x @ turn.T)[0], psi, atol=1e-4, rtol=1e-5)


def joint_angles(x):
    """Per leg and arm (right then left): the bend in degrees between a limb's two bones, and on
    which side of the upper bone the lower one turns, (upper x lower) . the subject's right axis
    (the pelvis's)."""
    right = F.normalize(x[:, 1] - x[:, 4], dim=1)
    bends, sides = [], []
    for a, b, c in ((1, 2, 3), (4, 5, 6), (14, 15, 16), (11, 12, 13)):
        upper, lower = x[:, b] - x[:, a], x[:, c] - x[:, b]
        bends.append(torch.rad2deg(torch.arccos(
            F.cosine_similarity(upper, lower, dim=1).clamp(-1, 1))))
        sides.append((torch.cross(upper, lower, dim=1) * right).sum(1))
    return torch.stack(bends, 1), torch.stack(sides, 1)


def test_prior_is_a_kinematic_chain_with_one_way_knees():
    """App. B's j_child = j_parent + R α b_pc with R relative to the parent bone: a knee range is a
    knee angle. Fails with every range at 0 (no bend), with absolute rotations (knees bend forward
    when the thigh swings back) and with App. B's ±180° thigh twist (the knee's hinge turns every
    way)."""
    x = liftedcl.sample_bodies(4000, torch.Generator().manual_seed(0))
    bend, side = joint_angles(x)
    knees, elbows = bend[:, :2], bend[:, 2:]
    # the ranges
    assert knees.max() <= 130 + 1e-6 and knees.max() > 120 and (knees > 90).float().mean() > 0.2
    assert elbows.max() <= 150 + 1e-6 and elbows.max() > 140
    bent = knees > 5
    assert (side[:, :2][bent] < 0).all()  # every bent knee takes the ankle behind the thigh's line
    thighs = torch.stack([x[:, 2] - x[:, 1], x[:, 5] - x[:, 4]], 1)
    assert (thighs[..., 1] < 0).float().mean() < 0.1  # y down: few thighs rise above horizontal
    odd = liftedcl_report.anatomy(x)  # the figures the README reports, by the script's own measure
    assert (odd["knee_forward"] == 0 and 0 < odd["thigh_above_horizontal"] < 0.1
            and odd["knee_over_90"] > 0.2)
    app_b = [r if r[0] not in ((1,), (4,)) else (r[0], (-90, 90), (-180, 180), (-90, 90))
             for r in liftedcl.PRIOR_RANGES]
    odd = liftedcl_report.anatomy(liftedcl.sample_bodies(4000, torch.Generator().manual_seed(0),
                                                         ranges=app_b))
    # App. B's thigh: any way
    assert 0.4 < odd["knee_forward"] < 0.6 and odd["thigh_above_horizontal"] > 0.15
    # a knee drawn at 60° bends 60° from its thigh whatever the thigh does: the range is a joint
    # angle
    ranges = [r if r[0] not in ((2,), (5,)) else (r[0], (-60, -60), (0, 0), (0, 0))
              for r in liftedcl.PRIOR_RANGES]
    bend, _ = joint_angles(liftedcl.sample_bodies(200, torch.Generator().manual_seed(1),
                                                  ranges=ranges))
    torch.testing.assert_close(bend[:, :2], torch.full((200, 2), 60.0, dtype=torch.float64))


def test_euler_rotation_matches_scipy():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    g = torch.Generator().manual_seed(0)
    angles = (torch.rand(50, 3, generator=g, dtype=torch.float64) - 0.5) * 6
    ours = liftedcl.euler_xyz(*angles.unbind(1))
    torch.testing.assert_close(
        ours, torch.from_numpy(rotation.from_euler("xyz", angles.numpy()).as_matrix()))


def test_prior_samples_root_norm_bone_lengths_and_yaw():
    bodies = liftedcl.sample_bodies(300, torch.Generator().manual_seed(0))
    ratio = liftedcl.bone_lengths(bodies) / liftedcl.TEMPLATE.norm(dim=1)
    # α ~ U[0.9, 1.1]
    assert ratio.min() >= 0.9 - 1e-9 and ratio.max() <= 1.1 + 1e-9 and ratio.std() > 0.03
    x = liftedcl.sample_prior(300, seed=0)
    assert (torch.equal(x, liftedcl.sample_prior(300, seed=0))
            and not torch.equal(x, liftedcl.sample_prior(300, 1)))
    assert x[:, 0].abs().max() == 0 and torch.allclose(x.flatten(1).norm(dim=1), torch.ones(300))
    # the pelvis points every way around the vertical (y) axis, never far off it
    hips = x[:, 4] - x[:, 1]
    assert (hips[:, 0].min() < -0.05 and hips[:, 0].max() > 0.05 and hips[:, 2].min() < -0.05
            and hips[:, 2].max() > 0.05)
    assert (hips[:, 1].abs() / hips.norm(dim=1)).max() < 0.5
    error, lr_ratio, spread = liftedcl_report.plausibility(x, liftedcl.bone_lengths(x).mean(0)
                                                           ).tolist()
    assert error < 0.15 and 1 < lr_ratio < 1.15 and spread < 0.15
    bad = liftedcl_report.plausibility(liftedcl.normalize_skeletons(torch.randn(300, 17, 3)),
                                       liftedcl.bone_lengths(x).mean(0))
    assert bad[0] > 3 * error and bad[1] > 1.5  # random skeletons are implausible by every number


def test_skeleton_file_is_normalised_always(tmp_path):
    # cm, off the origin
    x = liftedcl.sample_bodies(5, torch.Generator().manual_seed(0)).float() + 7.0
    torch.save(x, tmp_path / "joints.pt")
    loaded = liftedcl.load_skeletons(str(tmp_path / "joints.pt"))
    assert (loaded[:, 0].abs().max() == 0
            and torch.allclose(loaded.flatten(1).norm(dim=1), torch.ones(5)))
    torch.testing.assert_close(loaded, liftedcl.normalize_skeletons(x))


def test_liftable_block_runs_alone_with_torch_imports_only():
    """The losses (Eqs. 2-7) and prior block of liftedcl.py, cut out as a reader would copy it, runs
    with torch and torchvision's roi_align alone and gives what the script gives."""
    import inspect
    source = inspect.getsource(liftedcl)
    block = source[source.index("# Liftable block"):source.index("# End of the liftable block.")]
    assert "import" not in block.split("\n", 3)[3] and "args" not in block
    namespace = {}
    exec("import math\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
         "from torchvision.ops import roi_align\n" + block, namespace)
    torch.manual_seed(0)
    q, k, queue = (F.normalize(torch.randn(*shape), dim=d) for shape, d in
                   (((4, 8), 1), ((4, 8), 1), ((8, 10), 0)))
    assert torch.equal(namespace["invariant_loss"](q, k, queue, 0.2),
                       liftedcl.invariant_loss(q, k, queue, 0.2))
    map_q, map_k = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    g, h = views()[2], views()[3]
    h[1:, :2], h[2:, 4] = 8.0, 1.0  # partial overlaps, some flipped
    ours = liftedcl.equivariant_loss(map_q, map_k, g, h, queue, 0.2, 4, -0.4)
    theirs = namespace["equivariant_loss"](map_q, map_k, g, h, queue, 0.2, 4, -0.4)
    assert torch.equal(theirs[0], ours[0]) and torch.equal(theirs[1], ours[1])
    real = namespace["sample_prior"](50, seed=3)
    assert torch.equal(real, liftedcl.sample_prior(50, seed=3))
    torch.manual_seed(0)
    disc = namespace["Discriminator"]()
    torch.manual_seed(0)
    ours = liftedcl.Discriminator()
    fake = namespace["normalize_skeletons"](torch.randn(50, 17, 3))
    torch.testing.assert_close(disc(fake), ours(fake))
    loss, _, _ = namespace["discriminator_step"](disc, torch.optim.SGD(disc.parameters(), 0.1),
                                                 real, fake)
    ref, _, _ = liftedcl.discriminator_step(ours, torch.optim.SGD(ours.parameters(), 0.1), real,
                                            fake)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(namespace["encoder_adv_loss"](disc, fake),
                               liftedcl.encoder_adv_loss(ours, fake))


def test_pretrained_moco_checkpoint_fills_query_and_key_encoders(tmp_path):
    """--pretrained FILE with MoCo's keys (the paper's stage I): module.encoder_q.* is the backbone;
    the key encoder starts as its copy; encoder_k, the fc head and the queue are not read."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    net.bn1.running_var.uniform_(0.5, 2.0)  # trained statistics, unlike a fresh model's ones
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()
             if not k.startswith("fc.")}
    state.update({f"module.encoder_k.{k}": torch.zeros_like(v) for k,
                  v in net.state_dict().items()})
    head = {"fc.0.weight": torch.ones(512, 512), "fc.0.bias": torch.ones(512),
            # MoCo v2's MLP head: not loaded (heads start random)
            "fc.2.weight": torch.ones(16, 512), "fc.2.bias": torch.ones(16)}
    state.update({f"module.encoder_q.{k}": v for k, v in head.items()})
    state["module.queue"] = torch.randn(128, 64)
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    model = liftedcl.LiftedCL("resnet18", dim=16, K=16)
    report = liftedcl.load_pretrained(model, str(tmp_path / "moco.pth.tar"), "resnet18")
    assert "60/60 backbone parameters" in report and "ignored: fc.0.weight" in report, report
    assert "the heads and the lifting network start random" in report
    assert not torch.equal(model.encoder_q.inv_head[0].weight, head["fc.0.weight"])
    for enc in (model.encoder_q, model.encoder_k):  # the key encoder: MoCo's copy of the parameters
        assert torch.equal(enc.backbone.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    assert torch.equal(model.encoder_q.backbone.bn1.running_var, net.bn1.running_var)


# ----------------------------------------------------------------------------------------------
#   script

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = make_demo(str(tmp_path_factory.mktemp("tiny") / "demo"), seed=1, n_train=16, n_val=4)
    return ["--data", "folder", "--images", f"{root}/train2017"]


def test_resume_refuses_a_checkpoint_that_no_longer_fits(tmp_path):
    """A checkpoint whose model lacks a tensor of this run (the equivariant queue) is refused with
    one line naming that tensor, before anything is loaded."""
    from common.utils import resume_pretraining, rng_state
    args = liftedcl.get_args(SMALL + ["--epochs", "2", "--out", str(tmp_path), "--resume",
                                      str(tmp_path / "old.pth")])
    model, discriminator = liftedcl.build_model(args), liftedcl.Discriminator()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    d_optimizer = torch.optim.SGD(discriminator.parameters(), 0.1)
    scaler = torch.amp.GradScaler(enabled=False)
    states = dict(model=model, discriminator=discriminator, optimizer=optimizer,
                  d_optimizer=d_optimizer, scaler=scaler)
    saved = {k: v.state_dict() for k, v in states.items()}
    saved["model"].pop("queue_equiv")
    torch.save(dict(saved, epoch=1, iteration=2, args=vars(args), rng=[rng_state()]),
               tmp_path / "old.pth")
    with pytest.raises(UserError, match=r"old\.pth: the model does not fit this run \(queue_equiv: "
                                        r"expected \(128, 16\), found nothing\)$") as e:
        resume_pretraining(args, liftedcl.RESUME_KEYS, 4, ("normalize_lifted",), **states)
    assert len(str(e.value).splitlines()) == 1


def test_run_outputs_export_and_exact_resume_with_discriminator(images, tmp_path):
    common = images + SMALL + ["--epochs", "2"]  # 16 images / batch 8: 2 iterations per epoch
    run(common + ["--out", tmp_path / "straight"])
    run(common + ["--iters", "2", "--out", tmp_path / "resumed"])
    run(common + ["--resume", "--out", tmp_path / "resumed"])
    out = tmp_path / "straight"
    for name in ["checkpoint.pth", "backbone.pth", "log.jsonl", "loss.png", "lifted.png"]:
        assert (out / name).stat().st_size > 0, name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and log[-1]["iteration"] == 4
    assert ({"l_inv", "l_equiv", "l_adv", "d_loss", "d_acc_real", "d_acc_lifted",
             "bone_error"} <= set(log[-1]))
    a, b = (torch.load(tmp_path / r / "checkpoint.pth", map_location="cpu", weights_only=True)
            for r in ("straight", "resumed"))
    assert {"model", "discriminator", "optimizer", "d_optimizer", "rng"} <= set(a)
    # resume restores D (and everything else): the runs agree exactly
    for part in ("model", "discriminator"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    assert a["d_optimizer"]["state"] and torch.equal(
        a["d_optimizer"]["state"][0]["momentum_buffer"],
        b["d_optimizer"]["state"][0]["momentum_buffer"])
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out / "backbone.pth", weights_only=True),
                                              strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    assert torch.equal(net.layer4[1].conv2.weight,
                       a["model"]["encoder_q.backbone.layer4.1.conv2.weight"])
    with pytest.raises(UserError, match=r"ckpt.pth: saved with --lambda-adv 0.5, this run has 0.0"):
        check_resume_args("ckpt.pth", b["args"], liftedcl.get_args(common + ["--lambda-adv", "0"]),
                          liftedcl.RESUME_KEYS)
    with pytest.raises(UserError, match=r"ckpt.pth: saved with --no-normalize-lifted False, this "
                                        r"run has True"):
        check_resume_args("ckpt.pth", b["args"],
                          liftedcl.get_args(common + ["--no-normalize-lifted"]),
                          liftedcl.RESUME_KEYS, negated=("normalize_lifted",))
    check_report(out / "checkpoint.pth", a, images)


def check_report(path, ckpt, images):
    """eval/liftedcl_report.py on a saved checkpoint: the saved model lifts the images; the real
    skeletons are the run's prior; the JSON holds both reports."""
    model, lifted, real = liftedcl_report.lift(str(path), n=6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert not model.training and lifted.shape == (6, 17, 3)
    torch.testing.assert_close(lifted, liftedcl.normalize_skeletons(lifted))  # --normalize-lifted
    assert torch.equal(real, liftedcl.sample_prior(200))  # --prior-size 200
    report = liftedcl_report.report(str(path), n=6, images=images[-1])
    reference = liftedcl.bone_lengths(liftedcl.normalize_skeletons(real)).mean(0)
    assert report["real"] == dict(zip(liftedcl_report.PLAUSIBILITY,
                                      liftedcl_report.plausibility(real, reference).tolist()),
                                  **liftedcl_report.anatomy(real), skeletons=200)
    assert report["lifted"]["skeletons"] == 6 and set(report["lifted"]) == set(report["real"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        liftedcl_report.main([str(path), "-n", "6", "--images", images[-1]])
    assert json.loads(printed.getvalue()) == report
    with pytest.raises(UserError, match="backbone.pth: not a liftedcl.py checkpoint.pth"):
        liftedcl_report.lift(str(path.parent / "backbone.pth"))
    # a model that no longer fits: one line naming the tensor
    old = {k: v for k, v in ckpt["model"].items() if k != "queue_equiv"}
    torch.save(dict(ckpt, model=old), path.parent / "old.pth")
    with pytest.raises(UserError, match=r"old\.pth: does not fit liftedcl.py's model "
                                        r"\(queue_equiv: expected \(128, 16\), found nothing\)$"):
        liftedcl_report.lift(str(path.parent / "old.pth"))


def test_torchrun_two_ranks_shuffle_bn_hold_identical_state(images, tmp_path):
    """Shuffle BN across ranks, gathered queues and DDP on D: every rank ends with the same encoder,
    key encoder, queues and discriminator."""
    p = run(images + SMALL + ["--moco-k", "32", "--iters", "2", "--epochs", "1", "--out",
                              tmp_path / "ddp"],
            torchrun=True)
    assert "on 2 x cpu, 2 BN group(s) per rank" in p.stdout, p.stdout
    digests = dict(re.findall(r"rank (\d)/2: parameters sha1 ([0-9a-f]{40})", p.stdout))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"], p.stdout
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pth", map_location="cpu", weights_only=True)
    # 2 steps x 8 keys from both ranks
    assert int(ckpt["model"]["queue_ptr"]) == 16 and len(ckpt["rng"]) == 2


def test_paper_data_needs_pretrained_said_out_loud():
    """Stage II of the paper starts from MoCo v2's ImageNet weights: --data coco/imagenet names its
    init."""
    for data in ("coco", "imagenet"):
        with pytest.raises(UserError, match=f"--data {data} needs --pretrained "
                                            f"FILE|torchvision|none"):
            liftedcl.get_args(["--data", data])
    assert liftedcl.get_args(["--data", "coco", "--pretrained", "none"]).pretrained == "none"
    assert liftedcl.get_args([]).pretrained is None  # the demo stays scratch
    model = liftedcl.LiftedCL("resnet18", dim=16, K=16)
    assert (liftedcl.load_pretrained(model, "none",
                                     "resnet18") == "resnet18 from scratch (no stage I)")


def test_bad_inputs(tmp_path):
    p = run(["--data", "coco", "--out", tmp_path / "o"], expect=2)
    assert_one_line_error(p, "--data coco needs --pretrained FILE|torchvision|none")
    p = run(["--data", "coco", "--pretrained", "none", "--data-root", tmp_path / "nowhere", "--out",
             tmp_path / "o"],
            expect=2)
    assert_one_line_error(p, tmp_path / "nowhere", "not found")
    torch.save(torch.zeros(5, 16, 3), tmp_path / "joints.pt")
    with pytest.raises(UserError, match=r"joints.pt: expected .* shape \(N, 17, 3\), found \(5, "
                                        r"16, 3\)"):
        liftedcl.load_skeletons(str(tmp_path / "joints.pt"))
    with pytest.raises(UserError, match="no.pt"):
        liftedcl.load_skeletons(str(tmp_path / "no.pt"))
    with pytest.raises(UserError, match="--moco-k 20 must be a multiple of --batch-size 8"):
        liftedcl.get_args(SMALL + ["--moco-k", "20"])
    with pytest.raises(UserError, match="must not be negative"):
        liftedcl.get_args(["--lambda-adv", "-1"])

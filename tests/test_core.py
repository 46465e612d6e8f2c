"""Unit tests of the top-down core: targets, decoding, crop geometry, flip test, models, backbone
I/O."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

import mrpose
from common.backbone import ResNetFeatures, load_backbone
from common.datasets import COCO_FLIP_PAIRS, COCO_UPPER, TopDownDataset
from common.heatmap import decode_heatmaps, flip_back, gaussian_targets
from common.transforms import (affine_matrix, apply_affine, heatmap_to_image, invert_affine,
                               normalize, to_tensor_uint8, warp_image)
from common.utils import UserError, atomic_write


def hrnet_targets(joints, vis, input_size, heatmap_size, sigma=2):
    """HRNet's JointsDataset.generate_target, per joint in Python, written out as the reference."""
    k = len(joints)
    w, h = heatmap_size
    target = np.zeros((k, h, w), np.float32)
    weight = (vis > 0).astype(np.float32)
    tmp = sigma * 3
    stride = np.array(input_size) / np.array(heatmap_size)
    for j in range(k):
        mu_x = int(joints[j][0] / stride[0] + 0.5)
        mu_y = int(joints[j][1] / stride[1] + 0.5)
        ul = [int(mu_x - tmp), int(mu_y - tmp)]
        br = [int(mu_x + tmp + 1), int(mu_y + tmp + 1)]
        if ul[0] >= w or ul[1] >= h or br[0] < 0 or br[1] < 0:
            weight[j] = 0
            continue
        size = 2 * tmp + 1
        x = np.arange(0, size, 1, np.float32)
        y = x[:, None]
        g = np.exp(-((x - size // 2) ** 2 + (y - size // 2) ** 2) / (2 * sigma ** 2))
        g_x = max(0, -ul[0]), min(br[0], w) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], h) - ul[1]
        img_x = max(0, ul[0]), min(br[0], w)
        img_y = max(0, ul[1]), min(br[1], h)
        if weight[j] > 0.5:
            target[j][img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
    return target, weight


def test_batched_targets_equal_hrnet_loop():
    rng = np.random.default_rng(0)
    joints = rng.uniform(-40, 230, size=(6, 17, 2)).astype(np.float32)  # many off the crop
    vis = (rng.random((6, 17)) > 0.2).astype(np.float32)
    target, weight = gaussian_targets(torch.from_numpy(joints), torch.from_numpy(vis), (192, 256),
                                      (48, 64))
    for b in range(6):
        ref_t, ref_w = hrnet_targets(joints[b], vis[b], (192, 256), (48, 64))
        np.testing.assert_allclose(target[b].numpy(), ref_t, atol=1e-6)
        np.testing.assert_array_equal(weight[b].numpy(), ref_w)
    assert 0 < weight.sum() < weight.numel()  # the case mixes kept and dropped joints


def test_target_decode_round_trip_within_half_heatmap_pixel():
    rng = np.random.default_rng(1)
    joints = torch.from_numpy(rng.uniform(12, 180, size=(4, 17, 2)).astype(np.float32))
    target, _ = gaussian_targets(joints, torch.ones(4, 17), (192, 256), (48, 64))
    coords, maxvals = decode_heatmaps(target)
    # HRNet targets sit on the nearest heatmap pixel: the round trip is exact up to that rounding
    err = (coords * 4 - joints).abs()
    assert err.max() <= 2.0 + 1e-4  # half a heatmap pixel = 2 input pixels
    assert torch.allclose(maxvals, torch.ones_like(maxvals))


def test_quarter_offset_decoding_of_subpixel_gaussian():
    # a Gaussian centred between pixels: argmax + quarter shift lands within 0.25 px of the centre
    h, w = 32, 24
    centers = torch.tensor([[10.1, 7.3], [10.4, 20.45], [5.0, 5.0], [12.7, 3.6]])
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    maps = torch.stack([torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / 8) for cx,
                        cy in centers])[None]
    coords, _ = decode_heatmaps(maps)
    assert (coords[0] - centers).abs().max() <= 0.25 + 1e-6
    plain = maps.reshape(1, 4, -1).argmax(-1)
    plain_xy = torch.stack([plain % w, plain // w], -1).float()
    assert ((coords[0] - centers).norm(dim=-1) <= (plain_xy[0] - centers).norm(dim=-1) + 1e-6).all()


def test_decode_zero_heatmap_gives_origin_with_zero_confidence():
    coords, maxvals = decode_heatmaps(torch.zeros(1, 2, 8, 6))
    assert torch.equal(coords, torch.zeros(1, 2, 2)) and torch.equal(maxvals, torch.zeros(1, 2))


def test_affine_matrix_matches_hrnet_three_point_construction():
    def hrnet_affine(center, scale, rot, out):
        # HRNet get_affine_transform with scale in pixels (HRNet multiplies its scale by 200 first)
        src_w, dst_w, dst_h = scale[0], out[0], out[1]
        r = math.radians(rot)
        src_dir = np.array([-src_w * -0.5 * math.sin(r), src_w * -0.5 * math.cos(r)])
        src = np.array([center, center + src_dir, np.zeros(2)], np.float32)
        dst = np.array([[dst_w * 0.5, dst_h * 0.5], [dst_w * 0.5, dst_h * 0.5 - dst_w * 0.5],
                        [0, 0]], np.float32)
        for p in (src, dst):
            d = p[0] - p[1]
            p[2] = p[1] + np.array([-d[1], d[0]])
        a = np.hstack([src, np.ones((3, 1))])
        return np.linalg.solve(a, dst).T

    for center, scale, rot in [((100.0, 80.0), (150.0, 200.0), 0.0),
                               ((50.0, 120.0), (90.0, 120.0), 25.0),
                               ((300.5, 10.0), (60.0, 80.0), -40.0)]:
        ours = affine_matrix(np.array(center), np.array(scale), rot, (192, 256))
        np.testing.assert_allclose(ours,
                                   hrnet_affine(np.array(center), np.array(scale), rot, (192, 256)),
                                   atol=1e-3)


def _dot_image(points, size=(240, 200), radius=2):
    """Black image with a distinct colour dot per point; returns it and the colours."""
    img = np.zeros((size[1], size[0], 3), np.uint8)
    colours = [(255, (37 * j) % 256, (91 * j) % 256) for j in range(len(points))]
    for (x, y), c in zip(points, colours):
        xi, yi = int(round(x)), int(round(y))
        img[yi - radius:yi + radius + 1, xi - radius:xi + radius + 1] = c
    return Image.fromarray(img), colours


@pytest.mark.parametrize("rot,flip", [(0.0, False), (30.0, False), (-20.0, True), (0.0, True)])
def test_warp_moves_joints_with_their_pixels(rot, flip):
    pts = np.array([[60.0, 50.0], [150.0, 70.0], [100.0, 120.0], [80.0, 160.0], [170.0, 150.0]])
    img, _ = _dot_image(pts)
    m = affine_matrix(np.array([115.0, 105.0]), np.array([180.0, 240.0]), rot, (96, 128), flip=flip,
                      image_width=240)
    crop = np.asarray(warp_image(img, m, (96, 128))).astype(np.float32).sum(-1)
    moved = apply_affine(pts, m)
    for x, y in moved:
        # the bright dot is centred on the moved joint: its intensity centroid nearby is within 0.5
        # px
        x0, y0 = int(round(x)), int(round(y))
        win = crop[y0 - 3:y0 + 4, x0 - 3:x0 + 4]
        yy, xx = np.mgrid[y0 - 3:y0 + 4, x0 - 3:x0 + 4]
        assert win.sum() > 0
        assert (abs((win * xx).sum() / win.sum() - x) < 0.5
                and abs((win * yy).sum() / win.sum() - y) < 0.5)
    np.testing.assert_allclose(apply_affine(moved, invert_affine(m)), pts, atol=1e-6)


def test_training_crops_keep_joint_identity_under_flip(tmp_path):
    # distinct colour per joint: after any augmentation, returned joint j sits on the dot drawn for
    # the joint that j now stands for (left and right swap under a flip)
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(60, 180, 17), rng.uniform(50, 250, 17)], 1)
    img, colours = _dot_image(pts, size=(240, 300), radius=3)
    img.save(tmp_path / "a.png")
    rec = dict(image=str(tmp_path / "a.png"), image_id=1,
               center=np.array([120.0, 150.0], np.float32),
               scale=np.array([225.0, 300.0], np.float32), joints=pts.astype(np.float32),
               visible=np.ones(17, np.float32), area=1.0, score=1.0)
    ds = TopDownDataset([rec], (96, 128), COCO_FLIP_PAIRS, COCO_UPPER, train=True, scale_factor=0.2,
                        rot_factor=20, flip=True, seed=3)
    perm = list(range(17))
    for a, b in COCO_FLIP_PAIRS:
        perm[a], perm[b] = b, a
    flips_seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        s = ds[0]
        crop = s["image"].numpy().transpose(1, 2, 0).astype(np.float64)
        # which original joint is at returned joint 0 (nose has no pair) and 5 (left shoulder)?
        flipped = None
        for j in (5, 7, 9):
            x, y = s["joints"][j].round().int().tolist()
            if not (0 <= x < 96 and 0 <= y < 128):
                continue
            pixel = crop[y, x]
            dist_same = np.abs(pixel - colours[j]).sum()
            dist_swap = np.abs(pixel - colours[perm[j]]).sum()
            assert min(dist_same, dist_swap) < 60, "joint is not on a dot"
            flipped = dist_swap < dist_same
        flips_seen.add(flipped)
    assert {True, False} <= flips_seen  # both branches were exercised


def test_batched_normalize_equals_torchvision_per_sample_transform():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)) for _ in range(3)]
    tv = torchvision.transforms.Compose([torchvision.transforms.ToTensor(),
                                         torchvision.transforms.Normalize(
        [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    batch = torch.stack([to_tensor_uint8(im) for im in imgs])
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 12, 10)
    torch.testing.assert_close(normalize(batch), torch.stack([tv(im) for im in imgs]), atol=1e-5,
                               rtol=1e-5)


def test_flip_back_with_shift_reproduces_unflipped_heatmaps():
    # joints at x = 4m + 1 (input px): the mirrored crop's heatmap, flipped back and shifted one
    # pixel right as in the flip test, equals the heatmap of the unflipped crop
    w_in, h_in = 96, 128
    joints = torch.tensor([[[4 * m + 1.0, 4 * m + 9.0] for m in range(3, 20)]])
    vis = torch.ones(1, 17)
    ref, _ = gaussian_targets(joints, vis, (w_in, h_in), (24, 32))
    perm = list(range(17))
    for a, b in COCO_FLIP_PAIRS:
        perm[a], perm[b] = b, a
    mirrored = joints.clone()
    mirrored[..., 0] = w_in - 1 - mirrored[..., 0]
    mirrored = mirrored[:, perm]
    heat, _ = gaussian_targets(mirrored, vis, (w_in, h_in), (24, 32))
    back = flip_back(heat, COCO_FLIP_PAIRS)
    back = torch.cat([back[..., :1], back[..., :-1]], dim=-1)
    assert torch.allclose(back[..., 1:], ref[..., 1:], atol=1e-6)


class MirrorStub(nn.Module):
    """Heatmaps that mirror as a trained model's do: joint k's map is P shifted d_k columns, with
    P[c] = mean of input columns 4c-1 and 4c of channel 0 (the background's value subtracted) and
    d of a left joint = -d of its right partner. So the map of the mirrored crop is the mirrored
    map one column off, left and right swapped, which the flip test must undo exactly."""

    def __init__(self, flip_pairs, k):
        super().__init__()
        self.shifts = [0] * k
        for n, (a, b) in enumerate(flip_pairs):
            self.shifts[a], self.shifts[b] = n + 2, -(n + 2)

    def forward(self, x):
        g = nn.functional.pad(x[:, 0, ::4] - x[:, :1, 0, :1], (1, 0))  # column -1: background
        w = x.shape[-1] // 4
        p = (g[..., 0::4][..., :w] + g[..., 1::4]) / 2
        return torch.stack([p.roll(d, -1) for d in self.shifts], 1)


def test_flip_test_of_predict_agrees_with_the_unflipped_prediction():
    """predict with --flip-test: the mirrored crop's heatmaps are flipped back, left and right
    joints swapped and shifted one pixel; on MirrorStub every joint then lands where the unflipped
    crop puts it, exactly."""
    from types import SimpleNamespace

    from common.topdown import predict
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(4, 3, 256, 192, dtype=torch.uint8)  # the joints' columns: 12 to 36 of 48
    images[:, 0, 64:192, 80:112] = torch.randint(1, 256, (4, 128, 32), generator=g,
                                                 dtype=torch.uint8)
    samples = [dict(image=images[i], center=torch.tensor([96.0, 128.0]),
                    scale=torch.tensor([192.0, 256.0]), index=i) for i in range(4)]
    model = MirrorStub(COCO_FLIP_PAIRS, 17)
    args = SimpleNamespace(batch_size=2, workers=0, flip_test=False, channels_last=False,
                           input_size=(192, 256), heatmap_size=(48, 64), num_joints=17)
    info = dict(flip_pairs=COCO_FLIP_PAIRS)
    plain = predict(model, samples, args, torch.device("cpu"), info)
    args.flip_test = True
    flipped = predict(model, samples, args, torch.device("cpu"), info)
    assert (plain[1] > 0).all()
    np.testing.assert_array_equal(flipped[0], plain[0])
    np.testing.assert_array_equal(flipped[1], plain[1])


def test_heatmap_to_image_inverts_the_test_crop():
    center, scale = np.array([300.0, 200.0]), np.array([150.0, 200.0])
    m = affine_matrix(center, scale, 0.0, (48, 64))
    pts = np.array([[250.0, 150.0], [330.0, 280.0]])
    hm = torch.from_numpy(apply_affine(pts, m)).float()[None]
    back = heatmap_to_image(hm, torch.tensor(center[None]).float(),
                            torch.tensor(scale[None]).float(), (48, 64))
    np.testing.assert_allclose(back[0].numpy(), pts, atol=1e-3)


R50_PARAMS = {"simplebaseline": 33_999_697, "mrheatnet1": 34_017_785, "mrheatnet2": 34_022_409,
              "mrfeanet1": 41_341_265, "mrfeanet2": 80_141_137}


@pytest.mark.parametrize("arch", list(R50_PARAMS))
def test_parameter_counts_match_official_code(arch):
    args = mrpose.get_args(["--data", "coco", "--arch", arch, "--backbone", "resnet50",
                            "--pretrained", "none"])
    model, _ = mrpose.build_model(args)
    assert sum(p.numel() for p in model.parameters()) == R50_PARAMS[arch]


@pytest.mark.parametrize("arch", list(R50_PARAMS))
@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_every_arch_trains_on_basic_block_backbones(arch, backbone):
    # the official MRFeaNet crashes on ResNet-18/34; MRHeatNet1's official in-place add breaks
    # backward
    args = mrpose.get_args(["--data", "mpii", "--arch", arch, "--backbone", backbone,
                            "--input-size", "64", "96", "--pretrained", "none"])
    model, _ = mrpose.build_model(args)
    out = model(torch.randn(2, 3, 96, 64))
    assert out.shape == (2, 16, 24, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_head_starts_from_small_gaussian_weights():
    args = mrpose.get_args(["--data", "coco", "--arch", "mrheatnet1", "--backbone", "resnet18",
                            "--pretrained", "none"])
    model, _ = mrpose.build_model(args)
    head = [m.weight for n, m in model.named_modules() if not n.startswith("backbone")
            and isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert head and all(0.0005 < w.std().item() < 0.002 for w in head)


def test_backbone_loads_torchvision_state_dict_and_reports_fc(tmp_path):
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    feats = ResNetFeatures("resnet18")
    report = load_backbone(feats, str(tmp_path / "r18.pth"))
    assert "60/60 backbone parameters" in report and "ignored: fc.weight, fc.bias" in report
    for k, v in feats.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k])
    x = torch.randn(1, 3, 64, 64)
    ref.eval(), feats.eval()
    with torch.no_grad():
        c5 = feats(x)[3]
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(
            ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
    assert torch.allclose(c5, expected)


def test_backbone_shape_mismatch_is_a_clear_error(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="r50.pth: .*shape"):
        load_backbone(ResNetFeatures("resnet18"), str(tmp_path / "r50.pth"))


def test_backbone_file_that_loads_no_parameter_is_refused(tmp_path):
    """num_batches_tracked is never reported missing: a file matching only those buffers loads
    nothing."""
    buffers_only = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                    if "num_batches" in k}
    torch.save(dict(buffers_only, **{"stem.weight": torch.zeros(3)}), tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="wrong.pth: no parameter of a ResNet backbone"):
        load_backbone(ResNetFeatures("resnet18"), str(tmp_path / "wrong.pth"))


def test_backbone_loads_the_backbone_of_a_pose_checkpoint(tmp_path):
    """A pose network saved by this project ('backbone.*' beside the head) gives its ResNet on
    purpose."""
    args = mrpose.get_args(["--data", "coco", "--backbone", "resnet18", "--head-channels", "32",
                            "--pretrained", "none"])
    pose, _ = mrpose.build_model(args)
    torch.save(pose.state_dict(), tmp_path / "best.pth")
    feats = ResNetFeatures("resnet18")
    report = load_backbone(feats, str(tmp_path / "best.pth"))
    assert report.startswith("loaded 60/60 backbone parameters")
    for k, v in feats.state_dict().items():
        assert torch.equal(v, pose.backbone.state_dict()[k]), k


def test_reduced_jpeg_decode_keeps_dots_on_their_joints(tmp_path):
    # a large JPEG cropped small takes the DCT-scaled decode path; the dots must stay on the joints
    pts = np.array([[200.0, 300.0], [600.0, 250.0], [400.0, 500.0], [300.0, 700.0], [500.0, 650.0]])
    img, _ = _dot_image(pts, size=(800, 900), radius=12)
    img.save(tmp_path / "big.jpg", quality=95)
    rec = dict(image=str(tmp_path / "big.jpg"), image_id=1,
               center=np.array([400.0, 480.0], np.float32),
               scale=np.array([600.0, 800.0], np.float32), joints=np.zeros((17, 2), np.float32),
               visible=np.zeros(17, np.float32), area=1.0, score=1.0)
    rec["joints"][:5] = pts
    ds = TopDownDataset([rec], (96, 128), COCO_FLIP_PAIRS, COCO_UPPER)
    from common.datasets import load_image
    small, size = load_image(rec["image"], scale=96 / 600)
    assert size == (800, 900) and small.width == 200  # decoded at 1/4
    s = ds[0]
    crop = s["image"].numpy().astype(np.float64).sum(0)
    crop -= np.median(crop)
    for x, y in s["joints"][:5].numpy():
        x0, y0 = int(round(x)), int(round(y))
        win = np.clip(crop[y0 - 3:y0 + 4, x0 - 3:x0 + 4], 0, None)
        yy, xx = np.mgrid[y0 - 3:y0 + 4, x0 - 3:x0 + 4]
        assert (abs((win * xx).sum() / win.sum() - x) < 0.5
                and abs((win * yy).sum() / win.sum() - y) < 0.5)


def test_atomic_write_leaves_old_file_on_failure_and_normal_permissions(tmp_path):
    path = tmp_path / "out.json"
    atomic_write(path, lambda f: f.write(b"old"))

    def killed_halfway(f):
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, killed_halfway)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_augmentation_draws_follow_the_official_law_and_presets():
    """SimpleBaseline/SimMRPose JointsDataset: s ~ clip(N(1, sf), 1 ± sf); r ~ clip(N(0, rf), ±2rf)
    with p 0.6."""
    from scipy.stats import norm

    from common.datasets import draw_scale_rotation
    rng, n, sf, rf = np.random.default_rng(0), 40000, 0.3, 40.0
    s, r = np.array([draw_scale_rotation(rng, sf, rf) for _ in range(n)]).T

    def clipped_std(c):  # std of clip(N(0, 1), -c, c): the mass beyond ±c sits on the bounds
        return math.sqrt((2 * norm.cdf(c) - 1) - 2 * c * norm.pdf(c) + 2 * c * c * norm.sf(c))

    rotated = r[r != 0]
    assert abs(len(rotated) / n - 0.6) < 0.01
    # N(0, rf/2) would not reach 1.5rf
    assert np.abs(rotated).max() <= 2 * rf and (np.abs(rotated) > 1.5 * rf).mean() > 0.1
    assert abs(rotated.std() / (rf * clipped_std(2)) - 1) < 0.02
    assert s.min() >= 1 - sf and s.max() <= 1 + sf and abs((s == 1 + sf).mean() - norm.sf(1)) < 0.01
    assert abs((s - 1).std() / (sf * clipped_std(1)) - 1) < 0.02
    coco, mpii = mrpose.get_args(["--data", "coco"]), mrpose.get_args(["--data", "mpii"])
    assert (coco.rot_factor, coco.scale_factor, mpii.rot_factor,
            mpii.scale_factor) == (40, 0.3, 30, 0.25)


def _official_pose_net(arch, k=17):
    """The released models' layout, written from the official code (SimpleBaseline pose_resnet.py,
    SimMRPose mrheat*/mrfea*_pose_resnet.py): ResNet at the top level, their head names, their
    forward."""
    def dc(cin, cout, bare=False):
        t = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False)
        return t if bare else nn.Sequential(t, nn.BatchNorm2d(cout), nn.ReLU())

    net = torchvision.models.resnet18()
    del net.fc, net.avgpool
    if arch == "simplebaseline":
        net.deconv_layers = nn.Sequential(*dc(512, 32), *dc(32, 32), *dc(32, 32))
        net.final_layer = nn.Conv2d(32, k, 1)
    elif arch == "mrheatnet2":
        net.deconv1, net.deconv2, net.deconv3 = dc(512, 32), dc(32, 32), dc(32, 32)
        net.s_conv1 = nn.Sequential(nn.Conv2d(32, k, 1), nn.BatchNorm2d(k), nn.ReLU())
        net.s_conv2 = nn.Sequential(nn.Conv2d(32, k, 1), nn.BatchNorm2d(k), nn.ReLU())
        net.s_deconv1, net.s_deconv12, net.s_deconv2 = (dc(k, k), dc(k, k, bare=True),
                                                        dc(k, k, bare=True))
        net.final_layer = nn.Conv2d(32, k, 1)
    else:  # mrfeanet2 on ResNet-18: channels halve from each stage down to C2's 64
        net.deconv11, net.deconv12, net.deconv13 = dc(512, 256), dc(256, 128), dc(128, 64)
        net.deconv21, net.deconv22, net.deconv3 = dc(256, 128), dc(128, 64), dc(128, 64)
        net.final_layer = nn.Conv2d(64, k, 1)

    def forward(x):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        x1 = net.layer1(x)
        x2 = net.layer2(x1)
        x3 = net.layer3(x2)
        x4 = net.layer4(x3)
        if arch == "simplebaseline":
            return net.final_layer(net.deconv_layers(x4))
        if arch == "mrheatnet2":
            d1 = net.deconv1(x4)
            d2 = net.deconv2(d1)
            return (net.final_layer(net.deconv3(d2))
                    + net.s_deconv12(net.s_deconv1(net.s_conv1(d1)))
                    + net.s_deconv2(net.s_conv2(d2)))
        return net.final_layer((x1 + net.deconv3(x2) + net.deconv22(net.deconv21(x3))
                                + net.deconv13(net.deconv12(net.deconv11(x4)))) / 4)
    net.forward = forward
    return net


@pytest.mark.parametrize("arch", ["simplebaseline", "mrheatnet2", "mrfeanet2"])
def test_official_checkpoint_names_load_and_give_identical_outputs(arch, tmp_path):
    from common.topdown import load_weights
    torch.manual_seed(0)
    official = _official_pose_net(arch)
    # random weights and BatchNorm statistics everywhere: nothing may stay at its init
    for m in official.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    official.eval()
    # a DataParallel dump of a PyTorch < 0.4.1 run: 'module.' prefix, no BatchNorm counters
    state = {"module." + k: v for k, v in official.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "official.pth")
    args = mrpose.get_args(["--data", "coco", "--arch", arch, "--backbone", "resnet18",
                            "--head-channels", "32", "--pretrained", "none"])
    ours, _ = mrpose.build_model(args)
    assert load_weights(ours, str(tmp_path / "official.pth")) is True
    ours.eval()
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), official(x))
    assert load_weights(ours, str(tmp_path / "official.pth"), {"model": ours.state_dict()}) is False
    backbone = ResNetFeatures("resnet18")  # --pretrained takes the released model's ResNet part
    n = len(list(backbone.parameters()))
    assert load_backbone(backbone, str(tmp_path / "official.pth")).startswith(
        f"loaded {n}/{n} backbone parameters")
    for a, b in zip(backbone.state_dict().values(), ours.backbone.state_dict().values()):
        assert torch.equal(a, b)


def test_bgr_normalize_is_the_official_transform_on_cv2_channels():
    """Official input: ToTensor + Normalize(ImageNet mean/std) on cv2's BGR image, i.e.
    position-wise statistics."""
    rgb = torch.randint(0, 256, (2, 3, 8, 6), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = (rgb.flip(1).float() / 255 - mean) / std
    torch.testing.assert_close(normalize(rgb, bgr=True), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(normalize(rgb), expected)


def test_evaluation_runs_in_fp32_under_amp():
    """--amp trains in bf16; prediction must not: argmax, quarter offset and rescoring move with
      bf16 rounding."""
    from types import SimpleNamespace

    from common.topdown import predict
    from common.utils import autocast
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    samples = [dict(image=images[i], center=torch.tensor([24.0, 32.0]),
                    scale=torch.tensor([48.0, 64.0]), index=i)
               for i in range(2)]
    model, _ = mrpose.build_model(mrpose.get_args(["--data", "coco", "--backbone", "resnet18",
                                                   "--head-channels", "16", "--pretrained",
                                                   "none"]))
    model.eval()
    args = SimpleNamespace(batch_size=2, workers=0, flip_test=True, channels_last=False,
                           input_size=(48, 64), heatmap_size=(12, 16), num_joints=17, amp=None)
    info = dict(flip_pairs=COCO_FLIP_PAIRS)
    fp32 = predict(model, samples, args, torch.device("cpu"), info)
    args.amp = "bf16"
    with torch.no_grad():  # what bf16 would do: the test can tell them apart
        reference = model(normalize(images))
        with autocast(args, torch.device("cpu")):
            assert not torch.equal(model(normalize(images)).float(), reference)
    amp = predict(model, samples, args, torch.device("cpu"), info)
    np.testing.assert_array_equal(amp[0], fp32[0])
    np.testing.assert_array_equal(amp[1], fp32[1])


def test_resume_takes_none_for_an_unset_setting_and_refuses_a_changed_one():
    from argparse import Namespace
    from common.utils import check_resume_args
    check_resume_args("ckpt", {"amp": None}, Namespace(amp="none"), ["amp"])
    check_resume_args("ckpt", {"amp": "none"}, Namespace(amp=None), ["amp"])
    with pytest.raises(UserError, match="ckpt: saved with --amp None, this run has auto"):
        check_resume_args("ckpt", {"amp": None}, Namespace(amp="auto"), ["amp"])


def test_restore_training_loads_each_state_and_names_what_is_missing_or_wrong():
    from common.utils import restore_training, rng_state
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "iteration": 30, "rng": [rng_state()]}
    expected = torch.rand(4)  # the next draw of the saved RNG
    net2 = nn.Linear(3, 2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    assert restore_training("c.pth", ckpt, 1, model=net2, optimizer=opt2) == (3, 30)
    assert torch.equal(net2.weight, net.weight) and torch.equal(torch.rand(4), expected)
    assert opt2.state_dict()["state"][0]["momentum_buffer"].abs().sum() > 0
    with pytest.raises(UserError, match=r"^c\.pth: no discriminator in this checkpoint$"):
        restore_training("c.pth", ckpt, 0, discriminator=nn.Linear(3, 2))
    with pytest.raises(UserError, match=r"^c\.pth: the model does not fit this run \("):
        restore_training("c.pth", ckpt, 0, model=nn.Linear(4, 2))
    # the one line names the first tensor that is mis-shaped, missing or unexpected
    bias_free = dict(ckpt, model={"weight": net.weight.detach()})
    for saved, model, named in (
            (ckpt, nn.Linear(4, 2), r"weight: expected \(2, 4\), found \(2, 3\)"),
            (bias_free, nn.Linear(3, 2), r"bias: expected \(2,\), found nothing"),
            (ckpt, nn.Linear(3, 2, bias=False), r"bias: expected nothing, found \(2,\)")):
        with pytest.raises(UserError, match=r"^c\.pth: the model does not fit this run \("
                                            + named + r"\)$") as e:
            restore_training("c.pth", saved, 0, model=model)
        assert len(str(e.value).splitlines()) == 1
    # a resumed pretraining run needs an epoch and an iteration left (mscl.py, liftedcl.py)
    from common.utils import check_epochs_left
    check_epochs_left("c.pth", 1, 10, 2, 100)
    for epoch, it in ((2, 10), (1, 100)):
        with pytest.raises(UserError, match=r"^c\.pth: the run is complete \(epoch"):
            check_epochs_left("c.pth", epoch, it, 2, 100)

"""common/hrnet.py: the official pose_hrnet's structure, key names and counts, the stage-3 tap,
training under channels_last + autocast, and loading pretrained weights."""
import hashlib
import json

import pytest
import torch

from common.hrnet import PoseHighResolutionNet, load_hrnet_pretrained
from common.topdown import load_weights
from common.utils import UserError
from data.demo import make_demo
from helpers import run_script


def meta_net(width=32, num_joints=17):
    with torch.device("meta"):  # structure only: no memory, no init cost (W48 has 64M parameters)
        return PoseHighResolutionNet(width, num_joints)


def randomized(net, seed):
    """BN affine parameters and statistics random too (two fresh nets already differ in their
    conv weights), so that loading any tensor is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point() and t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return net


def test_parameter_counts_equal_official():
    # leoxiaobin/deep-high-resolution-net.pytorch, w32/w48 YAMLs (COCO 17 joints, MPII 16)
    assert sum(p.numel() for p in meta_net(32, 17).parameters()) == 28_536_113
    assert sum(p.numel() for p in meta_net(48, 17).parameters()) == 63_595_745
    assert sum(p.numel() for p in meta_net(32, 16).parameters()) == 28_536_080
    assert meta_net(48).stage3_channels == [48, 96, 192]


def test_state_dict_keys_and_shapes_equal_official():
    sd = meta_net().state_dict()
    shapes = {"conv1.weight": (64, 3, 3, 3), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
              "transition1.0.0.weight": (32, 256, 3, 3),
              "transition1.1.0.0.weight": (64, 256, 3, 3),
              "transition2.2.0.0.weight": (128, 64, 3, 3),
              # 1/4 -> 1/16: two convs
              "transition3.3.0.0.weight": (256, 128, 3, 3),
              "stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
              # 1/32 -> 1/4: 1x1 conv + BN
              "stage3.3.fuse_layers.2.0.1.0.weight": (128, 32, 3, 3),
              "stage4.0.fuse_layers.3.0.2.0.weight": (256, 32, 3, 3),
              "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
              "final_layer.weight": (17, 32, 1, 1), "final_layer.bias": (17,)}
    for k, shape in shapes.items():
        assert tuple(sd[k].shape) == shape, k
    assert "transition2.0.0.weight" not in sd  # the official empty slot (width unchanged)
    assert "stage4.2.fuse_layers.1.0.0.0.weight" not in sd  # the last module outputs 1/4 only
    # sha256 of the sorted "key:shape" lines of the official PoseHighResolutionNet built from its
    # w32_256x192 YAML (computed once from the official lib/models/pose_hrnet.py)
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(sd.items()))
    assert len(sd) == 1754
    assert hashlib.sha256(lines.encode()).hexdigest()[:16] == "eeae6b213fb592ef"


def test_init_is_official():
    net = PoseHighResolutionNet(32)
    w = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.001) < 2e-5 and abs(w.mean().item()) < 1e-5
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in bns)
    assert bool((net.final_layer.bias == 0).all())


def test_heatmaps_and_stage3_shapes():
    net = randomized(PoseHighResolutionNet(32), 0).eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        heatmaps, stage3 = net(x, return_stage3=True)
        plain = net(x)
        # 48 does not divide by 32: the official Upsample fails
        odd = net(torch.randn(1, 3, 64, 48))
    assert heatmaps.shape == (1, 17, 24, 16) and torch.equal(plain, heatmaps)
    assert torch.isfinite(heatmaps).all() and heatmaps.std() > 0
    assert [tuple(f.shape) for f in stage3] == [(1, 32, 24, 16), (1, 64, 12, 8), (1, 128, 6, 4)]
    assert [f.shape[1] for f in stage3] == net.stage3_channels
    assert odd.shape == (1, 17, 16, 12)


def test_train_step_channels_last_autocast():
    net = PoseHighResolutionNet(32, num_joints=16).to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        heatmaps, stage3 = net(x, return_stage3=True)
        loss = heatmaps.float().pow(2).mean() + sum(f.float().mean() for f in stage3)
    loss.backward()  # fails if an in-place op overwrote a tensor autograd saved
    assert (heatmaps.shape == (2, 16, 8, 8)
            and heatmaps.is_contiguous(memory_format=torch.channels_last))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.conv1.weight.grad.abs().sum() > 0


def classification_checkpoint(src):
    """What hrnet_w32-36af842e.pth holds: the shared modules under the same keys, stage4's other
    three outputs, the classifier's heads, no num_batches_tracked (saved by PyTorch 0.4)."""
    state = {k: v for k, v in src.state_dict().items()
             if not k.startswith("final_layer.") and not k.endswith("num_batches_tracked")}
    state.update({"stage4.2.fuse_layers.1.0.0.0.weight": torch.ones(64, 32, 3, 3),
                  "incre_modules.0.0.conv1.weight": torch.ones(32, 32, 1, 1),
                  "downsamp_modules.0.0.weight": torch.ones(256, 128, 3, 3),
                  "final_layer.0.weight": torch.ones(2048, 1024, 1, 1),
                  "classifier.weight": torch.ones(1000, 2048)})
    return state


def test_load_classification_checkpoint(tmp_path):
    src, dst = randomized(PoseHighResolutionNet(32), 1), PoseHighResolutionNet(32)
    head = dst.final_layer.weight.detach().clone()
    state = classification_checkpoint(src)
    state["final_layer.weight"] = torch.ones(16, 32, 1, 1)  # a head of another shape: skipped
    path = tmp_path / "hrnet_w32.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    report = load_hrnet_pretrained(dst, str(path))
    assert report.startswith(f"loaded 1752/1754 HRNet tensors from {path}")
    for needle in ("missing: final_layer.weight, final_layer.bias",
                   "another shape not loaded: final_layer.weight", "ignored 5:",
                   "incre_modules.0.0.conv1.weight", "classifier.weight",
                   "stage4.2.fuse_layers.1.0.0.0.weight", "final_layer.0.weight"):
        assert needle in report, (needle, report)
    want, got = src.state_dict(), dst.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in state if k in got
               and not k.startswith("final_layer"))
    assert torch.equal(dst.final_layer.weight, head)


def test_load_errors(tmp_path):
    net = PoseHighResolutionNet(32)
    before = net.state_dict()["conv1.weight"].clone()
    state = classification_checkpoint(randomized(PoseHighResolutionNet(32), 2))
    state["transition1.0.0.weight"] = torch.ones(48, 256, 3, 3)  # a W48 tensor
    bad = tmp_path / "w48.pth"
    torch.save(state, bad)
    with pytest.raises(UserError, match=r"w48\.pth: transition1\.0\.0\.weight has shape \(48, 256, "
                                        r"3, 3\)") as e:
        load_hrnet_pretrained(net, str(bad))
    # nothing loaded
    assert "\n" not in str(e.value) and torch.equal(net.state_dict()["conv1.weight"], before)
    torch.save({"fc.weight": torch.ones(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: no key matches an HRNet"):
        load_hrnet_pretrained(net, str(tmp_path / "other.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth: not a readable pretrained HRNet file"):
        load_hrnet_pretrained(net, str(tmp_path / "junk.pth"))
    with pytest.raises(UserError, match="absent.pth: pretrained HRNet file not found"):
        load_hrnet_pretrained(net, str(tmp_path / "absent.pth"))


def test_released_pose_hrnet_names_load_and_give_identical_outputs(tmp_path):
    """A pose_hrnet_w32_256x192.pth as released: a DataParallel dump in the official names (ours),
    'module.' prefix, without BatchNorm counters. It loads whole (no key renamed into a backbone, as
    a SimpleBaseline's top-level ResNet keys are) and the network computes what the source network
    computes."""
    src = randomized(PoseHighResolutionNet(32), 3).eval()
    state = {"module." + k: v for k, v in src.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "pose_hrnet_w32_256x192.pth")
    dst = PoseHighResolutionNet(32)
    # not renamed: RGB input
    assert load_weights(dst, str(tmp_path / "pose_hrnet_w32_256x192.pth")) is False
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        assert torch.equal(dst.eval()(x), src(x))
    # not a pose network: refused, nothing renamed
    state["module.classifier.weight"] = torch.ones(1000, 2048)
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"other\.pth: does not fit this model \(1 tensors differ, "
                                        r"e\.g\. classifier"):
        load_weights(dst, str(tmp_path / "other.pth"))


def test_hrnet_run_resumes_and_trains_on(tmp_path):
    """icon.py --backbone hrnet_w32 saves a checkpoint that --resume reads back
    (common.topdown.load_weights, the path of --weights, --teacher and --eval-only too), and
    training goes on from its iteration."""
    root = make_demo(str(tmp_path / "demo"), seed=1, n_train=8, n_val=2)
    out = tmp_path / "run"
    flags = ["--data", "coco", "--pretrained", "none", "--ann",
             f"{root}/annotations/person_keypoints_train2017.json",
             "--images", f"{root}/train2017", "--val-ann",
             f"{root}/annotations/person_keypoints_val2017.json", "--val-images", f"{root}/val2017",
             "--backbone", "hrnet_w32", "--input-size", "32", "64", "--batch-size", "4",
             "--workers", "0", "--no-flip-test", "--lambda-p", "0", "--lr-steps", "9", "--out", out]
    run_script("icon.py", flags + ["--iters", "2"])
    first = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    p = run_script("icon.py", flags + ["--iters", "4", "--resume"])
    assert "resumed from" in p.stdout and "iteration 2" in p.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in log] == [2, 4]
    last = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert last["iteration"] == 4
    assert any(not torch.equal(v, first["model"][k]) for k, v in last["model"].items()
               if v.is_floating_point())

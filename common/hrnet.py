"""HRNet for pose (pose_hrnet of Sun et al. 2019), widths W32 / W48 of the official YAMLs
(leoxiaobin/deep-high-resolution-net.pytorch). Module names, indices and empty slots follow the
official code, so its pose checkpoints and ImageNet `hrnet_w32-36af842e.pth` load by key."""

import torch.nn as nn
import torch.nn.functional as F
# same layout and names as the official blocks
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.posenet import init_pose_weights
from common.utils import UserError, read_state_dict


def conv_bn(cin, cout, stride, relu):
    layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def make_transition(cins, couts):
    """New branches come from the lowest-resolution input through a chain of stride-2 convs.
    Branches whose width does not change pass through (the official code's empty slot: no keys)."""
    layers = []
    for i, cout in enumerate(couts):
        if i < len(cins):
            layers.append(nn.Identity() if cins[i] == cout
                          else conv_bn(cins[i], cout, 1, relu=True))
        else:
            n = i + 1 - len(cins)
            layers.append(nn.Sequential(*[conv_bn(cins[-1], cout if k == n - 1 else cins[-1], 2,
                                                  relu=True)
                                          for k in range(n)]))
    return nn.ModuleList(layers)


class HighResolutionModule(nn.Module):
    """Parallel branches of BasicBlocks, then every output resolution sums all branches (Sec. 3).

    fuse_layers[i][j] brings branch j to branch i: a 1x1 conv + BN + upsampling to branch i's size
    (j > i; the official fixed scale factor fails on inputs not divisible by 32), or i - j stride-2
    3x3 convs + BN (j < i)."""

    def __init__(self, channels, num_blocks=4, multi_scale_output=True):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*[BasicBlock(c, c) for _ in range(num_blocks)])
                                      for c in channels)
        fuse_layers = []
        for i in range(len(channels) if multi_scale_output else 1):
            row = []
            for j, c in enumerate(channels):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(c, channels[i], 1, bias=False),
                                             nn.BatchNorm2d(channels[i])))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    row.append(nn.Sequential(*[conv_bn(c, channels[i] if k == i - j - 1 else c, 2,
                                                       relu=k < i - j - 1) for k in range(i - j)]))
            fuse_layers.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse_layers)

    def forward(self, xs):
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, (fuse, x) in enumerate(zip(row, xs)):
                if j > i:
                    y = y + F.interpolate(fuse(x), size=xs[i].shape[-2:], mode="nearest")
                elif j < i:
                    y = y + fuse(x)
            out.append(F.relu(y, inplace=True))  # y is a fresh sum (every module has >= 2 branches)
        return out


class PoseHighResolutionNet(nn.Module):
    """HRNet-W`width` pose network: image (B, 3, H, W) -> heatmaps (B, num_joints, H/4, W/4).

    `forward(x, return_stage3=True)` also returns the stage-3 outputs [1/4, 1/8, 1/16] with widths
    `self.stage3_channels` (= [C, 2C, 4C]); one call, so DDP sees a single forward."""

    # the released pose_hrnet models' names are ours (common.topdown.from_official_names: nothing to
    # rename)
    OFFICIAL_KEYS, OFFICIAL_RESNET_PREFIX = {}, ""

    def __init__(self, width=32, num_joints=17):
        super().__init__()
        c = [width, 2 * width, 4 * width, 8 * width]
        self.width, self.num_joints, self.stage3_channels = width, num_joints, c[:3]
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
        self.layer1 = nn.Sequential(Bottleneck(64, 64, downsample=down),
                                    *[Bottleneck(256, 64) for _ in range(3)])
        self.transition1 = make_transition([256], c[:2])
        self.stage2 = nn.Sequential(HighResolutionModule(c[:2]))
        self.transition2 = make_transition(c[:2], c[:3])
        self.stage3 = nn.Sequential(*[HighResolutionModule(c[:3]) for _ in range(4)])
        self.transition3 = make_transition(c[:3], c)
        self.stage4 = nn.Sequential(HighResolutionModule(c), HighResolutionModule(c),
                                    HighResolutionModule(c, multi_scale_output=False))
        self.final_layer = nn.Conv2d(width, num_joints, 1)  # FINAL_CONV_KERNEL 1
        self.init_weights()

    def init_weights(self):
        """Official init: every conv N(0, 0.001) with zero bias, BN weight 1 and bias 0."""
        init_pose_weights(self.modules())

    @staticmethod
    def _transition(layers, ys):
        # new branches start from the lowest-resolution map
        return [t(ys[min(i, len(ys) - 1)]) for i, t in enumerate(layers)]

    def forward(self, x, return_stage3=False):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._transition(self.transition1, [x]))
        stage3 = self.stage3(self._transition(self.transition2, ys))
        ys = self.stage4(self._transition(self.transition3, stage3))
        heatmaps = self.final_layer(ys[0])
        return (heatmaps, stage3) if return_stage3 else heatmaps


def load_hrnet_pretrained(model, path):
    """Load HRNet weights in official key names (ImageNet classifier or pose checkpoint, bare or
    wrapped) into `model`; return a one-line report. The classifier's extra keys are ignored and
    reported; a shape mismatch is an error naming the key, except for the heatmap head (below)."""
    state = read_state_dict(path, "pretrained HRNet")
    own = model.state_dict()
    skipped = []
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            # The heatmap head depends on the task (a pose checkpoint for another joint set; the
            # official YAMLs' PRETRAINED_LAYERS leave final_layer out for the same reason): it keeps
            # its fresh init. Anywhere else a mismatch means another width, an error.
            if k.startswith("final_layer."):
                skipped.append(k)
                continue
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the HRNet-W{model.width} "
                            f"expects {tuple(own[k].shape)} (wrong --backbone?)")
    state = {k: v for k, v in state.items() if k not in skipped}
    # checked first: the load below would still reset BN counters
    if not any(k in own for k in state):
        raise UserError(f"{path}: no key matches an HRNet (first keys: {list(state)[:3]})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    report = f"loaded {len(own) - len(missing)}/{len(own)} HRNet tensors from {path}"
    if missing:
        report += f"; missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
    if skipped:
        report += f"; head of another shape not loaded: {', '.join(skipped)}"
    if unexpected:  # the first key of each top-level module, e.g. the classifier's five heads
        groups = {}
        for k in unexpected:
            groups.setdefault(k.split(".")[0], []).append(k)
        report += f"; ignored {len(unexpected)}: " + ", ".join(
            ks[0] + (" ..." if len(ks) > 1 else "") for ks in groups.values())
    return report

"""ResNet stage features C2..C5 from torchvision ResNets, and loading backbone weights.

The module keeps torchvision's attribute names (conv1, bn1, layer1..layer4), so a state_dict saved
from it, or from `torchvision.models.resnetXX()`, loads in either direction without renaming.
"""

import torch.nn as nn
import torchvision

from common.utils import UserError, read_state_dict

RESNETS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
           "resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101,
           "resnet152": torchvision.models.resnet152}


class ResNetFeatures(nn.Module):
    """A torchvision ResNet without avgpool/fc that returns [C2, C3, C4, C5] (strides 4, 8, 16,
    32)."""

    def __init__(self, name="resnet50", torchvision_weights=False):
        super().__init__()
        if name not in RESNETS:
            raise UserError(f"unknown backbone {name!r}; choose from {', '.join(RESNETS)}")
        # Downloads ImageNet weights only when asked; tests never ask.
        try:
            net = RESNETS[name](weights="IMAGENET1K_V1" if torchvision_weights else None)
        except OSError as e:  # URLError included: no network and no cached copy
            raise UserError(f"--pretrained torchvision: cannot fetch the ImageNet {name} weights "
                            f"({e}); pass a backbone .pth or --pretrained none") from None
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (net.layer1, net.layer2, net.layer3,
                                                              net.layer4)
        self.channels = [m[-1].conv3.out_channels if hasattr(m[-1], "conv3")
                         else m[-1].conv2.out_channels
                         for m in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


def load_backbone(backbone, path):
    """Load a ResNet state_dict in torchvision key names into `backbone` (bare or wrapped; a MoCo
    checkpoint's query encoder; a pose checkpoint's backbone); return a one-line report. Only
    parameters count as loaded (BN counters would accept a file with no weight); none: an error."""
    state = read_state_dict(path, "pretrained backbone")
    # a MoCo query encoder, then a network's backbone part
    for prefix in ("encoder_q.", "backbone."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = backbone.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)}, the "
                            f"{type(backbone).__name__} expects {tuple(own[k].shape)} (wrong "
                            f"--backbone?)")
    params = [k for k, _ in backbone.named_parameters()]
    loaded = [k for k in params if k in state]
    if not loaded:
        raise UserError(f"{path}: no parameter of a ResNet backbone in it (first keys: "
                        f"{list(state)[:3]})")
    backbone.load_state_dict(state, strict=False)
    missing = [k for k in params if k not in state]
    ignored = [k for k in state if k not in own]
    report = f"loaded {len(loaded)}/{len(params)} backbone parameters from {path}"
    if missing:
        report += (f"; missing (left as initialised): "
                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if ignored:
        report += f"; ignored: {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}"
    return report

"""SimpleBaseline (Xiao et al., 2018): the top-down pose network that mrpose.py, icon.py and the
semi-supervised framework build on. Three 4x4 stride-2 deconvs (no bias) + BN + ReLU on ResNet's C5,
then a 1x1 conv to k heatmaps at 1/4 of the input. Attribute names are kept stable so a checkpoint
trained by one script evaluates in another (`mrpose.py --eval-only --weights`)."""
import torch.nn as nn


def deconv(cin, cout):
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def init_pose_weights(modules):
    """The official pose-network init (SimpleBaseline, HRNet): (transposed) convs N(0, 0.001) with
    zero bias, BatchNorm weight 1 and bias 0."""
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PoseNet(nn.Module):
    """Backbone + head; heads start from N(0, 0.001) weights and zero biases (SimpleBaseline)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def init_head(self):
        init_pose_weights(m for name, m in self.named_modules() if not name.startswith("backbone"))


class SimpleBaseline(PoseNet):
    """MRPose Fig. 2: three 256-channel deconvs on C5, then a 1x1 conv to k heatmaps at 1/4
    resolution."""

    # official pose_resnet key prefixes -> ours (common.topdown.load_weights; the ResNet keys sit at
    # its top level)
    OFFICIAL_KEYS = {"deconv_layers.0.": "deconv1.0.", "deconv_layers.1.": "deconv1.1.",
                     "deconv_layers.3.": "deconv2.0.", "deconv_layers.4.": "deconv2.1.",
                     "deconv_layers.6.": "deconv3.0.", "deconv_layers.7.": "deconv3.1."}

    def __init__(self, backbone, k, c=256):
        super().__init__(backbone)
        self.deconv1, self.deconv2, self.deconv3 = (deconv(backbone.channels[3], c), deconv(c, c),
                                                    deconv(c, c))
        self.final_layer = nn.Conv2d(c, k, 1)
        self.init_head()

    def forward(self, x, return_c4=False):
        """Heatmaps; with `return_c4` also ResNet's C4 (stride 16), the map icon.py's projection
        head taps."""
        c2, c3, c4, c5 = self.backbone(x)
        heatmaps = self.final_layer(self.deconv3(self.deconv2(self.deconv1(c5))))
        return (heatmaps, c4) if return_c4 else heatmaps

